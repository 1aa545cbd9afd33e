//! Prometheus metrics, derived at scrape time from the same node view as
//! `/status` (so both always agree).

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use crate::{status::Status, view::Reader};

/// Registers the node's collector.
pub fn registry(reader: Reader) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(NodeCollector(reader)));
    r
}

/// The two exposition formats a Prometheus scraper understands. The body
/// always matches the content type it is served with: a scraper that parses
/// OpenMetrics gets OpenMetrics, every other client the classic text format
/// (as client_golang's `expfmt.Negotiate` does). Serving OpenMetrics under
/// `text/plain; version=0.0.4` makes Prometheus drop every counter's type and
/// help, because the classic parser expects them under the `_total` name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    Classic,
}

impl Format {
    /// The format for a request's `Accept` header: the media range with the
    /// highest quality wins (the earlier one on a tie); OpenMetrics only when
    /// the client names it, the classic format for `text/plain`, `*/*`, a
    /// missing header or anything else.
    pub fn negotiate(accept: Option<&str>) -> Format {
        let mut best: Option<(f32, Format)> = None;
        for range in accept.unwrap_or_default().split(',') {
            let mut parts = range.split(';').map(str::trim);
            let media = parts.next().unwrap_or_default().to_ascii_lowercase();
            let mut q = 1.0_f32;
            for p in parts {
                if let Some(v) = p.strip_prefix("q=").or_else(|| p.strip_prefix("Q=")) {
                    q = v.trim().parse().unwrap_or(0.0);
                }
            }
            let format = match media.as_str() {
                "application/openmetrics-text" => Format::OpenMetrics,
                "text/plain" | "text/*" | "*/*" => Format::Classic,
                _ => continue,
            };
            if q > 0.0 && best.is_none_or(|(b, _)| q > b) {
                best = Some((q, format));
            }
        }
        best.map_or(Format::Classic, |(_, f)| f)
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Classic => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Exposition of the registry in `format`.
pub fn render(registry: &Registry, format: Format) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String cannot fail");
    match format {
        Format::OpenMetrics => out,
        Format::Classic => classic_from_openmetrics(&out),
    }
}

/// The classic text format (0.0.4) of an OpenMetrics body with counters and
/// gauges, which is all meshd exposes: a counter family `x` names its
/// samples `x_total`, so its `# HELP` and `# TYPE` lines take that name;
/// `# UNIT` and `# EOF` do not exist in the classic format, `unknown` is
/// `untyped` there.
fn classic_from_openmetrics(body: &str) -> String {
    let counters: std::collections::HashSet<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(body.len());
    for line in body.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let line = if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, ""));
            match kind {
                "counter" => format!("# TYPE {} counter", total(name)),
                "unknown" => format!("# TYPE {name} untyped"),
                _ => line.to_owned(),
            }
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            if counters.contains(name) {
                format!("# HELP {} {help}", total(name))
            } else {
                line.to_owned()
            }
        } else {
            line.to_owned()
        };
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn total(family: &str) -> String {
    if family.ends_with("_total") {
        family.to_owned()
    } else {
        format!("{family}_total")
    }
}

#[derive(Debug)]
struct NodeCollector(Reader);

type Labels = Vec<(&'static str, String)>;

impl Collector for NodeCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let status = self.0.status();
        encode_status(&status, &mut enc)
    }
}

fn encode_status(s: &Status, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    gauge(
        enc,
        "spright_acceleration_enabled",
        "1 when the eBPF datapath is installed and in use, 0 when off (see /status for why)",
        &[(vec![], i64::from(s.acceleration.enabled))],
    )?;
    if let Some(t) = &s.selftest {
        gauge(
            enc,
            "spright_kernel_blocking_recv_eagain",
            "Start-up self-test: 1 when this kernel's redirect path makes a blocking recv() return EAGAIN, 0 when not, -1 unknown or disabled",
            &[(vec![], t.gauge())],
        )?;
    }
    if let Some(t) = &s.selftest {
        let rows: Vec<(Labels, i64)> = t
            .families
            .iter()
            .map(|f| {
                (
                    vec![("family", f.name.clone()), ("verdict", f.verdict.clone())],
                    1,
                )
            })
            .collect();
        gauge(
            enc,
            "spright_kernel_syscall_family",
            "Start-up self-test: 1 for each syscall family's verdict on this kernel's redirect path (same-as-tcp, mitigated, unsafe, inconclusive)",
            &rows,
        )?;
    }
    gauge(
        enc,
        "spright_redirects_enabled",
        "1 when new chain connections are redirected, 0 when a syscall family this kernel would lose data on stops them (see /status)",
        &[(
            vec![],
            i64::from(s.acceleration.enabled && s.acceleration.redirects.redirect),
        )],
    )?;
    counter(
        enc,
        "spright_splice_refused",
        "splice()/sendfile() calls from redirected sockets the splice guard refused with EINVAL (callers then copy with read/write)",
        &[(vec![], s.acceleration.splice_guard.refused)],
    )?;
    gauge(
        enc,
        "spright_malformed_records",
        "Endpoint records skipped because they could not be read",
        &[(
            vec![],
            i64::try_from(s.malformed_records.len()).unwrap_or(i64::MAX),
        )],
    )?;
    counter(
        enc,
        "spright_reconciles",
        "Reconciliations of the maps from the endpoint records",
        &[(vec![], s.reconciles)],
    )?;
    if let Some(m) = &s.memory_bound {
        gauge(
            enc,
            "spright_memory_bound_limit_bytes",
            "Receive memory one redirected connection may queue before its sender is moved to TCP (0: bound off, or not available on this kernel)",
            &[(
                vec![],
                if m.mode == crate::membound::Mode::Unavailable {
                    0
                } else {
                    i64::try_from(m.limit_bytes).unwrap_or(i64::MAX)
                },
            )],
        )?;
        counter(
            enc,
            "spright_memory_bound_switches",
            "Connection directions moved from the redirect path to TCP because the receiver stopped reading",
            &[(vec![], m.switches)],
        )?;
    }
    if let Some(f) = &s.flows {
        counter(
            enc,
            "spright_flow_events",
            "Chain-pod connections reported by the datapath: opened, closed, switched to TCP, found established before attach",
            &[
                (vec![("event", "opened".to_owned())], f.opened),
                (vec![("event", "closed".to_owned())], f.closed),
                (vec![("event", "switched".to_owned())], f.switched),
                (vec![("event", "before_attach".to_owned())], f.before_attach),
            ],
        )?;
        counter(
            enc,
            "spright_flow_events_lost",
            "Flow events the kernel dropped because the ring buffer was full",
            &[(vec![], f.lost)],
        )?;
    }
    let chain_labels = |ns: &str, chain: &str| -> Labels {
        vec![("namespace", ns.to_owned()), ("chain", chain.to_owned())]
    };
    gauge(
        enc,
        "spright_chain_endpoints",
        "Local endpoints per chain",
        &s.chains
            .iter()
            .map(|c| {
                (
                    chain_labels(&c.namespace, &c.chain),
                    i64::try_from(c.endpoints).unwrap_or(i64::MAX),
                )
            })
            .collect::<Vec<_>>(),
    )?;
    let pods: Vec<(Labels, &crate::status::CounterSet)> = s
        .endpoints
        .iter()
        .filter(|e| e.chain.is_some())
        .map(|e| {
            (
                vec![
                    ("namespace", e.namespace.clone()),
                    ("chain", e.chain.clone().unwrap_or_default()),
                    ("pod", e.pod.clone()),
                    ("function", e.function.clone().unwrap_or_default()),
                ],
                &e.counters,
            )
        })
        .collect();
    let per_pod = |f: fn(&crate::status::CounterSet) -> u64| {
        pods.iter()
            .map(|(l, c)| (l.clone(), f(c)))
            .collect::<Vec<_>>()
    };
    counter(
        enc,
        "spright_redirected_messages",
        "Messages sent socket to socket (sk_msg redirect), per sending pod",
        &per_pod(|c| c.redirected_messages),
    )?;
    counter(
        enc,
        "spright_redirected_bytes",
        "Bytes sent socket to socket, per sending pod",
        &per_pod(|c| c.redirected_bytes),
    )?;
    counter(
        enc,
        "spright_fallback_messages",
        "Messages of accelerated sockets that took the TCP path (peer not yet in the map)",
        &per_pod(|c| c.fallback_messages),
    )?;
    counter(
        enc,
        "spright_fallback_bytes",
        "Bytes of accelerated sockets that took the TCP path",
        &per_pod(|c| c.fallback_bytes),
    )?;
    counter(
        enc,
        "spright_accelerated_sockets",
        "Sockets of the pod inserted into the sockhash",
        &per_pod(|c| c.accelerated_sockets),
    )?;
    encode_services(s, enc)
}

fn encode_services(s: &Status, enc: &mut DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
    let labels = |v: &crate::services::ServiceStatus| -> Labels {
        vec![
            ("namespace", v.port.namespace.clone()),
            ("service", v.port.name.clone()),
            ("address", v.port.address.to_string()),
        ]
    };
    counter(
        enc,
        "spright_service_translations",
        "Connections to a Service port sent straight to a node-local backend at connect()",
        &s.services
            .iter()
            .map(|v| (labels(v), v.translated_connections))
            .collect::<Vec<_>>(),
    )?;
    gauge(
        enc,
        "spright_service_local_backends",
        "Ready backends of a Service port that are chain pods on this node",
        &s.services
            .iter()
            .map(|v| {
                (
                    labels(v),
                    i64::try_from(v.local_backends.len()).unwrap_or(i64::MAX),
                )
            })
            .collect::<Vec<_>>(),
    )?;
    gauge(
        enc,
        "spright_translated_connections_open",
        "Open connections whose destination was translated at connect()",
        &[(
            vec![],
            i64::try_from(s.translations.len()).unwrap_or(i64::MAX),
        )],
    )?;
    gauge(
        enc,
        "spright_malformed_service_files",
        "Service files (or objects in them) skipped because they could not be used",
        &[(
            vec![],
            i64::try_from(s.malformed_service_files.len()).unwrap_or(i64::MAX),
        )],
    )
}

fn counter(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Labels, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiates_like_a_scraper_expects() {
        // Prometheus 2.x's scrape Accept header.
        let prom = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Format::negotiate(Some(prom)), Format::OpenMetrics);
        assert_eq!(Format::negotiate(None), Format::Classic);
        assert_eq!(Format::negotiate(Some("*/*")), Format::Classic);
        assert_eq!(
            Format::negotiate(Some(
                "text/plain;version=0.0.4;q=0.9,application/openmetrics-text;q=0.5"
            )),
            Format::Classic
        );
        assert_eq!(
            Format::negotiate(Some("application/openmetrics-text;q=0,text/plain")),
            Format::Classic
        );
        assert_eq!(Format::negotiate(Some("application/json")), Format::Classic);
    }

    #[test]
    fn classic_names_counters_by_their_samples() {
        let om = "# HELP spright_reconciles Reconciliations done.\n\
                  # TYPE spright_reconciles counter\n\
                  spright_reconciles_total 3\n\
                  # HELP spright_chain_endpoints Endpoints.\n\
                  # TYPE spright_chain_endpoints gauge\n\
                  # UNIT spright_chain_endpoints endpoints\n\
                  spright_chain_endpoints{chain=\"a\"} 2\n\
                  # EOF\n";
        assert_eq!(
            classic_from_openmetrics(om),
            "# HELP spright_reconciles_total Reconciliations done.\n\
             # TYPE spright_reconciles_total counter\n\
             spright_reconciles_total 3\n\
             # HELP spright_chain_endpoints Endpoints.\n\
             # TYPE spright_chain_endpoints gauge\n\
             spright_chain_endpoints{chain=\"a\"} 2\n"
        );
    }
}
