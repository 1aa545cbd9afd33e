//! meshd's errors, and how any error prints with its sources.

use std::net::SocketAddr;

/// What stops meshd from starting or serving.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--kubernetes on: cannot build a Kubernetes API client")]
    KubeClient(#[source] kube::Error),
    #[error("binding {flag} {addr}")]
    Bind {
        flag: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving HTTP")]
    Serve(#[source] std::io::Error),
    #[error("the start-up task failed")]
    Start(#[source] tokio::task::JoinError),
}

/// An error with its sources, `a: b: c`.
pub use spright_endpoint::error_chain as chain;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_print_with_their_sources() {
        let e = Error::Bind {
            flag: "--metrics-addr",
            addr: "127.0.0.1:1".parse().unwrap(),
            source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
        };
        assert_eq!(
            chain(&e),
            "binding --metrics-addr 127.0.0.1:1: address in use"
        );
    }
}
