//! `--self-signed`: the webhook's own CA goes into the `caBundle` of every
//! webhook of its MutatingWebhookConfiguration (through the API, as the
//! ServiceAccount allowed to get and patch that one object), and is rotated
//! before it expires without a window in which the API server cannot
//! verify the served certificate:
//!
//! 1. at start: a CA and serving certificate; `caBundle` = [CA];
//! 2. at 2/3 of the lifetime: a new pair; `caBundle` = [CA, CA'] while the
//!    old certificate is still served;
//! 3. at 5/6: serve the new certificate (the bundle trusts it since step
//!    2), then `caBundle` = [CA'].

use std::{sync::Arc, time::Duration};

use base64::Engine as _;
use json_patch::{AddOperation, Patch, PatchOperation, TestOperation, jsonptr::PointerBuf};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::{
    Api, Client,
    api::{Patch as KubePatch, PatchParams},
};
use serde_json::json;
use tokio::time::Instant;

use crate::{
    metrics::Metrics,
    tls::{self, CertStore, SelfSigned},
};

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("reading MutatingWebhookConfiguration {name}")]
    Get {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("MutatingWebhookConfiguration {name} has no webhooks")]
    NoWebhooks { name: String },
    #[error("patching the caBundle of MutatingWebhookConfiguration {name}")]
    Patch {
        name: String,
        #[source]
        source: kube::Error,
    },
}

/// Makes `cas` (PEM certificates, concatenated) the `caBundle` of every
/// webhook of configuration `name`: one JSON Patch for the webhooks whose
/// bundle differs, whose `test` operations pin each webhook's name at its
/// index, so a concurrent edit that reorders them fails the patch instead
/// of misplacing a bundle. Returns how many webhooks were patched (0: all
/// were current, nothing was sent).
pub async fn write(client: &Client, name: &str, cas: &[&str]) -> Result<usize, BundleError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let current = api.get(name).await.map_err(|source| BundleError::Get {
        name: name.to_owned(),
        source,
    })?;
    let webhooks = current.webhooks.unwrap_or_default();
    if webhooks.is_empty() {
        return Err(BundleError::NoWebhooks {
            name: name.to_owned(),
        });
    }
    let pem = cas.concat();
    let bundle = base64::engine::general_purpose::STANDARD.encode(&pem);
    let mut ops = Vec::new();
    let stale = |w: &&k8s_openapi::api::admissionregistration::v1::MutatingWebhook| {
        w.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) != Some(pem.as_bytes())
    };
    let patched = webhooks.iter().filter(stale).count();
    if patched == 0 {
        return Ok(0);
    }
    for (i, w) in webhooks.iter().enumerate().filter(|(_, w)| stale(w)) {
        let i = i.to_string();
        ops.push(PatchOperation::Test(TestOperation {
            path: PointerBuf::from_tokens(["webhooks", &i, "name"]),
            value: json!(w.name),
        }));
        // "add" on an existing member replaces it (RFC 6902 4.1).
        ops.push(PatchOperation::Add(AddOperation {
            path: PointerBuf::from_tokens(["webhooks", &i, "clientConfig", "caBundle"]),
            value: json!(bundle),
        }));
    }
    api.patch(
        name,
        &PatchParams::default(),
        &KubePatch::Json::<()>(Patch(ops)),
    )
    .await
    .map_err(|source| BundleError::Patch {
        name: name.to_owned(),
        source,
    })?;
    Ok(patched)
}

/// [`write`] until it succeeds, backing off from 1 s to 30 s; every failure
/// is logged (the API server may be briefly unreachable, RBAC may lag).
pub async fn write_until_done(client: &Client, name: &str, cas: &[&str]) {
    let mut wait = Duration::from_secs(1);
    loop {
        match write(client, name, cas).await {
            Ok(0) => {
                tracing::debug!(webhook.config = name, "caBundle already current");
                return;
            }
            Ok(n) => {
                tracing::info!(
                    webhook.config = name,
                    webhooks = n,
                    cas = cas.len(),
                    "caBundle written"
                );
                return;
            }
            Err(e) => {
                tracing::warn!(
                    error = &e as &dyn std::error::Error,
                    retry.secs = wait.as_secs(),
                    "caBundle not written"
                );
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// What the rotation needs.
pub struct Rotation {
    pub client: Client,
    pub config_name: String,
    pub names: Vec<String>,
    pub validity: Duration,
    /// How often the configuration is checked between rotations: a bundle
    /// someone removed (the configuration re-created, or re-applied by a
    /// tool that owns the field) is written again.
    pub check_every: Duration,
    pub store: Arc<CertStore>,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

/// The certificate waiting to be served (between steps 2 and 3).
struct Next {
    pair: SelfSigned,
    key: rustls::sign::CertifiedKey,
    issued: Instant,
}

impl Rotation {
    /// Publishes `current` (already served) and rotates forever.
    pub async fn run(self, mut current: SelfSigned) -> Result<(), tls::TlsError> {
        let provider = tls::provider();
        let mut issued = Instant::now();
        let mut next: Option<Next> = None;
        write_until_done(&self.client, &self.config_name, &[&current.ca_pem]).await;
        self.ready.store(true, std::sync::atomic::Ordering::Relaxed);
        loop {
            let step = match next {
                None => issued + self.validity * 2 / 3,
                Some(_) => issued + self.validity * 5 / 6,
            };
            tokio::time::sleep_until(step.min(Instant::now() + self.check_every)).await;
            if Instant::now() < step {
                // Re-assert the bundle of the current step; a failure is
                // logged and tried again at the next check.
                let bundle: Vec<&str> = std::iter::once(current.ca_pem.as_str())
                    .chain(next.as_ref().map(|n| n.pair.ca_pem.as_str()))
                    .collect();
                match write(&self.client, &self.config_name, &bundle).await {
                    Ok(0) => {}
                    Ok(n) => tracing::warn!(
                        webhook.config = self.config_name,
                        webhooks = n,
                        "the caBundle had been changed; written again"
                    ),
                    Err(e) => {
                        tracing::warn!(
                            error = &e as &dyn std::error::Error,
                            "caBundle not checked"
                        );
                    }
                }
                continue;
            }
            match next.take() {
                None => {
                    let pair = tls::self_signed(&self.names, self.validity)?;
                    let key = pair.serving.certified_key(&provider)?;
                    let n = Next {
                        pair,
                        key,
                        issued: Instant::now(),
                    };
                    write_until_done(
                        &self.client,
                        &self.config_name,
                        &[&current.ca_pem, &n.pair.ca_pem],
                    )
                    .await;
                    next = Some(n);
                }
                Some(n) => {
                    self.store.set(n.key);
                    self.metrics.certificate_changed();
                    tracing::info!(not_after = %n.pair.not_after, "serving the rotated certificate");
                    write_until_done(&self.client, &self.config_name, &[&n.pair.ca_pem]).await;
                    current = n.pair;
                    issued = n.issued;
                }
            }
        }
    }
}
