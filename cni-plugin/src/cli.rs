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
    let read = std::io::stdin().read_to_end(&mut stdin);
    let loose: Option<Value> = serde_json::from_slice(&stdin).ok();
    init_logging(loose.as_ref());
    let error_version = loose
        .as_ref()
        .and_then(|v| v.get("cniVersion"))
        .and_then(Value::as_str)
        .filter(|v| version::SUPPORTED.contains(v))
        .unwrap_or(version::CURRENT)
        .to_owned();
    let outcome = read
        .map_err(Error::io("read", "stdin"))
        .and_then(|_| run(&stdin));
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

fn run(stdin: &[u8]) -> Result<Option<Value>> {
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
    let config = Config::parse(stdin)?;
    let env = Env::from_vars(command, &|k| std::env::var(k).ok())?;
    let raw: Value = serde_json::from_slice(stdin).map_err(Error::Decode)?;
    tracing::debug!(command = command.name(), container.id = %env.container_id, "invoked");
    match command {
        Command::Add => commands::add(&config, &env, &raw).map(Some),
        Command::Del => commands::del(&config, &env, &raw).map(|()| None),
        Command::Check => commands::check(&config, &env, &raw).map(|()| None),
        Command::Status => commands::status(&config, &env).map(|()| None),
        Command::Gc => commands::gc(&config, &env, &raw).map(|()| None),
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
