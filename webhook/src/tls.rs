//! The serving certificate: one slot the TLS acceptor reads on every
//! handshake, filled from PEM files (reloaded when they change) or from a
//! CA the webhook makes itself (`--self-signed`). Swapping the slot changes
//! the certificate of the next handshake; connections already open keep
//! theirs, nothing restarts.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Duration,
};

use rustls::{
    ServerConfig,
    crypto::CryptoProvider,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

/// Why a certificate could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {what} {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("parsing the PEM of the {what}")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the certificate file holds no certificate")]
    NoCertificate,
    #[error("certificate and key do not make a serving identity")]
    Identity(#[source] rustls::Error),
    #[error("generating the self-signed certificates")]
    Generate(#[source] rcgen::Error),
    #[error("building the TLS configuration")]
    Config(#[source] rustls::Error),
}

/// The crypto provider of everything TLS here (ring, as kube's client).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and key, in PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct PemPair {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for PemPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PemPair")
            .field("cert", &String::from_utf8_lossy(&self.cert))
            .field("key", &"<redacted>")
            .finish()
    }
}

impl PemPair {
    /// Reads both files.
    pub fn read(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let read = |what, path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                what,
                path: path.to_owned(),
                source,
            })
        };
        Ok(Self {
            cert: read("certificate", cert)?,
            key: read("key", key)?,
        })
    }

    /// The serving identity: chain (leaf first) and a key that matches it.
    pub fn certified_key(&self, provider: &CryptoProvider) -> Result<CertifiedKey, TlsError> {
        let chain = CertificateDer::pem_slice_iter(&self.cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| TlsError::Pem {
                what: "certificate",
                source,
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|source| TlsError::Pem {
            what: "key",
            source,
        })?;
        CertifiedKey::from_der(chain, key, provider).map_err(TlsError::Identity)
    }
}

/// The slot the acceptor reads.
#[derive(Debug)]
pub struct CertStore {
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    pub fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(key)),
        })
    }

    /// Serves `key` from the next handshake on.
    pub fn set(&self, key: CertifiedKey) {
        *self.current.write().expect("cert store lock") = Arc::new(key);
    }

    pub fn get(&self) -> Arc<CertifiedKey> {
        self.current.read().expect("cert store lock").clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The server side of TLS: HTTP/1.1 over TLS 1.2/1.3 with the store's
/// certificate (the API server speaks both).
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Watches a certificate and key file pair and swaps the store's identity
/// when their content changes (a Secret volume's atomic symlink swap, a
/// cert-manager renewal, a `cp`). Reading both files every `interval`
/// needs no inotify on the kubelet's `..data` symlinks and cannot miss an
/// update between two events. A pair that does not load (a half-written
/// renewal) is logged and the previous identity stays.
pub async fn watch_files(
    store: Arc<CertStore>,
    cert: PathBuf,
    key: PathBuf,
    mut last: PemPair,
    interval: Duration,
    on_reload: impl Fn() + Send + 'static,
) {
    let provider = provider();
    let mut failed: Option<PemPair> = None;
    loop {
        tokio::time::sleep(interval).await;
        let pair = match PemPair::read(&cert, &key) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    "certificate not reloaded"
                );
                continue;
            }
        };
        if pair == last || failed.as_ref() == Some(&pair) {
            continue;
        }
        match pair.certified_key(&provider) {
            Ok(k) => {
                store.set(k);
                tracing::info!(cert.path = %cert.display(), "serving certificate reloaded");
                last = pair;
                failed = None;
                on_reload();
            }
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    cert.path = %cert.display(),
                    "new certificate files do not load; still serving the previous certificate"
                );
                failed = Some(pair);
            }
        }
    }
}

/// A CA and the serving certificate it signed, both valid from a little
/// before `now` (clock skew between nodes) until `now + validity`.
pub struct SelfSigned {
    /// The CA certificate in PEM: what goes into `caBundle`.
    pub ca_pem: String,
    pub serving: PemPair,
    pub not_after: time::OffsetDateTime,
}

/// Backdating of `notBefore`, for API servers whose clock is behind.
const BACKDATE: time::Duration = time::Duration::minutes(5);

/// Creates a fresh CA (ECDSA P-256, its key kept in memory only) and a
/// serving certificate for `dns_names` signed by it.
pub fn self_signed(dns_names: &[String], validity: Duration) -> Result<SelfSigned, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let now = time::OffsetDateTime::now_utc();
    let not_after = now + validity;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(TlsError::Generate)?;
    ca.distinguished_name
        .push(DnType::CommonName, "spright-webhook CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = now - BACKDATE;
    ca.not_after = not_after;
    let ca_key = KeyPair::generate().map_err(TlsError::Generate)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(TlsError::Generate)?;
    let issuer = Issuer::new(ca, ca_key);

    let mut leaf = CertificateParams::new(dns_names.to_vec()).map_err(TlsError::Generate)?;
    leaf.distinguished_name.push(
        DnType::CommonName,
        dns_names.first().map_or("spright-webhook", String::as_str),
    );
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    leaf.not_before = now - BACKDATE;
    leaf.not_after = not_after;
    let leaf_key = KeyPair::generate().map_err(TlsError::Generate)?;
    let leaf_cert = leaf
        .signed_by(&leaf_key, &issuer)
        .map_err(TlsError::Generate)?;
    Ok(SelfSigned {
        ca_pem: ca_cert.pem(),
        serving: PemPair {
            cert: leaf_cert.pem().into_bytes(),
            key: leaf_key.serialize_pem().into_bytes(),
        },
        not_after,
    })
}

/// The names the API server may use for the webhook's Service: it calls
/// `https://<service>.<namespace>.svc:<port>`.
pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        format!("{service}.{namespace}"),
        service.to_owned(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_pairs_load_and_files_that_do_not_match_are_refused() {
        let a = self_signed(&service_names("hook", "ns"), Duration::from_hours(1)).unwrap();
        let b = self_signed(&["other".to_owned()], Duration::from_hours(1)).unwrap();
        let p = provider();
        a.serving.certified_key(&p).unwrap();
        assert!(a.ca_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let mixed = PemPair {
            cert: a.serving.cert.clone(),
            key: b.serving.key.clone(),
        };
        assert!(matches!(
            mixed.certified_key(&p),
            Err(TlsError::Identity(_))
        ));
        let empty = PemPair {
            cert: Vec::new(),
            key: a.serving.key.clone(),
        };
        assert!(matches!(
            empty.certified_key(&p),
            Err(TlsError::NoCertificate)
        ));
        assert!(!format!("{:?}", a.serving).contains("PRIVATE KEY"));
    }
}
