//! spright-webhook's configuration: every flag has an environment twin;
//! clap's errors name the flag and the bad value.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{ArgGroup, Parser};

/// Environment twins of the flags.
pub mod env {
    pub const ADDR: &str = "SPRIGHT_WEBHOOK_ADDR";
    pub const TLS_CERT: &str = "SPRIGHT_WEBHOOK_TLS_CERT";
    pub const TLS_KEY: &str = "SPRIGHT_WEBHOOK_TLS_KEY";
    pub const RELOAD_SECS: &str = "SPRIGHT_WEBHOOK_RELOAD_SECS";
    pub const SELF_SIGNED: &str = "SPRIGHT_WEBHOOK_SELF_SIGNED";
    pub const WEBHOOK_CONFIG: &str = "SPRIGHT_WEBHOOK_CONFIG";
    pub const SERVICE: &str = "SPRIGHT_WEBHOOK_SERVICE";
    pub const NAMESPACE: &str = "SPRIGHT_WEBHOOK_NAMESPACE";
    pub const CERT_VALIDITY: &str = "SPRIGHT_WEBHOOK_CERT_VALIDITY";
    pub const CA_BUNDLE_CHECK_SECS: &str = "SPRIGHT_WEBHOOK_CA_BUNDLE_CHECK_SECS";
    pub const DRAIN_SECS: &str = "SPRIGHT_WEBHOOK_DRAIN_SECS";
    pub const LOG: &str = "SPRIGHT_WEBHOOK_LOG";
}

/// Default listen address (the Service's targetPort).
pub const DEFAULT_ADDR: &str = "0.0.0.0:8443";
/// Default name of the MutatingWebhookConfiguration and of the Service.
pub const DEFAULT_NAME: &str = "spright-webhook";
/// Default namespace of the Service.
pub const DEFAULT_NAMESPACE: &str = "spright-system";

/// Parses a duration: a positive number with a unit `s`, `m`, `h` or `d`
/// (`90d`, `12h`, `30s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| "expected a duration such as 90d, 12h, 30m or 45s".to_owned())?;
    let secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("unknown unit {unit:?} (use s, m, h or d)")),
    };
    match n.checked_mul(secs) {
        Some(0) => Err("must be greater than zero".to_owned()),
        Some(t) if t >= 6 => Ok(Duration::from_secs(t)),
        Some(_) => Err("must be at least 6s (rotation happens at 2/3 and 5/6 of it)".to_owned()),
        None => Err("too large".to_owned()),
    }
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    match s.parse::<u64>() {
        Ok(0) | Err(_) => Err("expected a whole number of seconds, at least 1".to_owned()),
        Ok(n) => Ok(Duration::from_secs(n)),
    }
}

/// The mutating admission webhook that gives a Pod annotated
/// spright.dev/chain its chain label, shared-memory volume and co-location.
#[derive(Clone, Debug, Parser)]
#[command(name = "spright-webhook", version, about)]
#[command(group(ArgGroup::new("tls").required(true).args(["tls_cert", "self_signed"])))]
pub struct Config {
    /// Address to serve HTTPS on
    #[arg(long, env = env::ADDR, value_name = "HOST:PORT", default_value = DEFAULT_ADDR)]
    pub addr: SocketAddr,
    /// PEM certificate chain to serve (leaf first); reloaded when it changes
    #[arg(long, env = env::TLS_CERT, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert
    #[arg(long, env = env::TLS_KEY, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How often to check --tls-cert and --tls-key for a new certificate
    #[arg(long, env = env::RELOAD_SECS, value_name = "SECS", default_value = "10", value_parser = parse_secs)]
    pub reload_secs: Duration,
    /// Make a CA and a serving certificate at start, write the CA into the
    /// webhook configuration's caBundle through the API, rotate both
    /// before they expire (one replica; use --tls-cert for several)
    #[arg(long, env = env::SELF_SIGNED, conflicts_with_all = ["tls_cert", "tls_key"])]
    pub self_signed: bool,
    /// MutatingWebhookConfiguration whose webhooks' caBundle --self-signed writes
    #[arg(long, env = env::WEBHOOK_CONFIG, value_name = "NAME", default_value = DEFAULT_NAME)]
    pub webhook_config: String,
    /// Service the API server calls (the certificate's names are <service>.<namespace>.svc)
    #[arg(long, env = env::SERVICE, value_name = "NAME", default_value = DEFAULT_NAME)]
    pub service: String,
    /// Namespace of --service
    #[arg(long, env = env::NAMESPACE, value_name = "NS", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Lifetime of the --self-signed CA and certificate (s, m, h, d)
    #[arg(long, env = env::CERT_VALIDITY, value_name = "DURATION", default_value = "90d", value_parser = parse_duration)]
    pub cert_validity: Duration,
    /// How often --self-signed checks the caBundle between rotations and
    /// writes it again when someone changed it
    #[arg(long, env = env::CA_BUNDLE_CHECK_SECS, value_name = "SECS", default_value = "60", value_parser = parse_secs)]
    pub ca_bundle_check_secs: Duration,
    /// After SIGTERM, how long to keep accepting reviews (while the
    /// endpoint is being removed from the Service) before stopping
    #[arg(long, env = env::DRAIN_SECS, value_name = "SECS", default_value = "5", value_parser = clap::value_parser!(u64).range(0..=300))]
    pub drain_secs: u64,
    /// Log filter (tracing's EnvFilter syntax)
    #[arg(long, env = env::LOG, value_name = "FILTER", default_value = "info")]
    pub log: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, String> {
        Config::try_parse_from(std::iter::once("spright-webhook").chain(args.iter().copied()))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn one_tls_mode_is_required() {
        let e = parse(&[]).unwrap_err();
        assert!(
            e.contains("--tls-cert") && e.contains("--self-signed"),
            "{e}"
        );
        let e = parse(&["--tls-cert", "c.pem"]).unwrap_err();
        assert!(e.contains("--tls-key"), "{e}");
        let e = parse(&["--self-signed", "--tls-cert", "c", "--tls-key", "k"]).unwrap_err();
        assert!(e.contains("cannot be used with"), "{e}");
        let c = parse(&["--tls-cert", "c", "--tls-key", "k", "--addr", "127.0.0.1:0"]).unwrap();
        assert_eq!(c.addr.port(), 0);
        let c = parse(&["--self-signed", "--namespace", "x"]).unwrap();
        assert_eq!(
            (c.namespace.as_str(), c.cert_validity),
            ("x", Duration::from_hours(90 * 24))
        );
    }

    #[test]
    fn bad_values_name_the_flag() {
        for (args, flag) in [
            (&["--self-signed", "--addr", "localhost"][..], "--addr"),
            (
                &["--self-signed", "--cert-validity", "3w"],
                "--cert-validity",
            ),
            (
                &["--self-signed", "--cert-validity", "0d"],
                "--cert-validity",
            ),
            (
                &["--tls-cert", "c", "--tls-key", "k", "--reload-secs", "0"],
                "--reload-secs",
            ),
        ] {
            let e = parse(args).unwrap_err();
            assert!(e.contains(flag), "{args:?}: {e}");
        }
        assert_eq!(parse_duration("12h"), Ok(Duration::from_hours(12)));
        assert!(parse_duration("5s").is_err());
    }
}
