//! The process entry: stdout carries exactly one JSON document — the result
//! or the CNI error — and logs go to stderr or the configured `logFile`.

use std::{io::Read as _, process::ExitCode};

use serde_json::Value;

use crate::{
    commands,
    config::{self, Command, Config, Env},
    error::{Error, Result},
    version,
};

/// Runs one CNI invocation from the process environment and stdin.
pub fn main() -> ExitCode {
    let mut stdin = Vec::new();
    // stdin is parsed once: the same document gives the log file, the
    // version errors are answered in, and (validated) the config.
    let input = std::io::stdin()
        .read_to_end(&mut stdin)
        .map_err(Error::io("read", "stdin"))
        .map(|_| serde_json::from_slice::<Value>(&stdin).map_err(Error::Decode));
    let parsed = input.as_ref().ok().and_then(|r| r.as_ref().ok());
    init_logging(parsed);
    let error_version = parsed
        .and_then(|v| v.get("cniVersion"))
        .and_then(Value::as_str)
        .filter(|v| version::SUPPORTED.contains(v))
        .unwrap_or(version::CURRENT)
        .to_owned();
    let outcome = input.and_then(run);
    match outcome {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(
                code = e.code(),
                error = &e as &dyn std::error::Error,
                "failed"
            );
            let json =
                serde_json::to_string(&e.to_cni(&error_version)).expect("errors always serialise");
            println!("{json}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the command of `CNI_COMMAND` with the stdin document (`input`:
/// `Err` when stdin was not JSON, which only VERSION may ignore).
fn run(input: Result<Value>) -> Result<Option<Value>> {
    let command = std::env::var(config::ENV_COMMAND)
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or(Error::MissingEnv {
            name: config::ENV_COMMAND,
        })?;
    let command = Command::parse(&command)?;
    if command == Command::Version {
        return Ok(Some(version::version_info()));
    }
    let config = Config::from_input(input?)?;
    let env = Env::from_vars(command, &|k| std::env::var(k).ok())?;
    tracing::debug!(command = command.name(), container.id = %env.container_id, "invoked");
    match command {
        Command::Add => commands::add(&config, &env).map(Some),
        Command::Del => commands::del(&config, &env).map(|()| None),
        Command::Check => commands::check(&config, &env).map(|()| None),
        Command::Status => commands::status(&config, &env).map(|()| None),
        Command::Gc => commands::gc(&config, &env).map(|()| None),
        Command::Version => unreachable!("answered above"),
    }
}

/// Logs to `logFile` when configured (appending), else stderr. `SPRIGHT_CNI_LOG`
/// sets the filter (default `info`).
fn init_logging(config: Option<&Value>) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SPRIGHT_CNI_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let file = config
        .and_then(|c| c.get("logFile"))
        .and_then(Value::as_str)
        .and_then(|p| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .ok()
        });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false);
    match file {
        Some(f) => builder.with_writer(std::sync::Mutex::new(f)).init(),
        None => builder.with_writer(std::io::stderr).init(),
    }
}
