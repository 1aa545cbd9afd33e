//! A small HTTPS client that speaks to the webhook as the API server does
//! (TLS verified against a CA bundle, the Service's DNS name, HTTP/1.1,
//! keep-alive), for the tests and the benchmark. It also reports the
//! certificate the server presented.

use std::{net::SocketAddr, sync::Arc};

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, body::Bytes, client::conn::http1::SendRequest};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, ServerName, pem::PemObject as _},
};
use tokio::net::TcpStream;

use crate::review::AdmissionReview;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("the CA bundle holds no usable certificate")]
    NoCa,
    #[error("bad server name {0:?}")]
    Name(String),
    #[error("connecting to {addr}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP exchange")]
    Http(#[from] hyper::Error),
    #[error("request")]
    Request(#[from] hyper::http::Error),
    #[error("the answer is not an AdmissionReview (HTTP {status}): {body}")]
    NotAReview { status: u16, body: String },
}

/// One keep-alive connection.
pub struct Connection {
    send: SendRequest<Full<Bytes>>,
    /// The leaf certificate the server presented in the handshake.
    pub peer: CertificateDer<'static>,
}

/// Connects to webhooks whose certificates a CA of the bundle signed.
#[derive(Clone)]
pub struct Client {
    config: Arc<ClientConfig>,
    addr: SocketAddr,
    name: ServerName<'static>,
}

impl Client {
    /// `ca_pem`: one or more PEM certificates; `server_name`: the name
    /// verified (what the API server dials: `<service>.<namespace>.svc`).
    pub fn new(ca_pem: &[u8], addr: SocketAddr, server_name: &str) -> Result<Self, ClientError> {
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem).flatten() {
            roots.add(c).map_err(|_| ClientError::NoCa)?;
        }
        if roots.is_empty() {
            return Err(ClientError::NoCa);
        }
        let mut config = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        // Every connection verifies the certificate served now, as the API
        // server's webhook client (Go, no session cache) does: a resumed
        // session would carry the identity of an earlier handshake.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Self {
            config: Arc::new(config),
            addr,
            name: ServerName::try_from(server_name.to_owned())
                .map_err(|_| ClientError::Name(server_name.to_owned()))?,
        })
    }

    /// A new TLS connection (a TLS error is a `Connect` error).
    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let connect = |source| ClientError::Connect {
            addr: self.addr,
            source,
        };
        let tcp = TcpStream::connect(self.addr).await.map_err(connect)?;
        tcp.set_nodelay(true).map_err(connect)?;
        let tls = tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.name.clone(), tcp)
            .await
            .map_err(connect)?;
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .expect("a verified server presented a certificate")
            .clone()
            .into_owned();
        let (send, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        Ok(Connection { send, peer })
    }
}

impl Connection {
    /// One request; returns the status and the body.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        self.send.ready().await?;
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "spright-webhook")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))?;
        let resp = self.send.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes().to_vec();
        Ok((status, body))
    }

    /// POSTs a review to `/mutate` and parses the answer.
    pub async fn review(
        &mut self,
        review: &AdmissionReview,
    ) -> Result<AdmissionReview, ClientError> {
        let body = serde_json::to_vec(review).expect("a review serializes");
        let (status, body) = self.call("POST", crate::server::MUTATE_PATH, body).await?;
        match serde_json::from_slice(&body) {
            Ok(r) if status == 200 => Ok(r),
            _ => Err(ClientError::NotAReview {
                status,
                body: String::from_utf8_lossy(&body).into_owned(),
            }),
        }
    }
}
