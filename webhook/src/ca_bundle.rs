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

/// Writes `cas` (PEM certificates, concatenated) as the `caBundle` of every
/// webhook of configuration `name`. A JSON Patch whose `test` operations
/// pin each webhook's name at its index, so a concurrent edit that reorders
/// them fails the patch instead of misplacing a bundle. Returns how many
/// webhooks were patched.
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
    let bundle = base64::engine::general_purpose::STANDARD.encode(cas.concat());
    let mut ops = Vec::new();
    for (i, w) in webhooks.iter().enumerate() {
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
    Ok(webhooks.len())
}

/// [`write`] until it succeeds, backing off from 1 s to 30 s; every failure
/// is logged (the API server may be briefly unreachable, RBAC may lag).
pub async fn write_until_done(client: &Client, name: &str, cas: &[&str]) {
    let mut wait = Duration::from_secs(1);
    loop {
        match write(client, name, cas).await {
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
    pub store: Arc<CertStore>,
    pub metrics: Arc<Metrics>,
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

impl Rotation {
    /// Publishes `current` (already served) and rotates forever.
    pub async fn run(self, mut current: SelfSigned) -> Result<(), tls::TlsError> {
        let provider = tls::provider();
        let mut issued = Instant::now();
        write_until_done(&self.client, &self.config_name, &[&current.ca_pem]).await;
        self.ready.store(true, std::sync::atomic::Ordering::Relaxed);
        loop {
            tokio::time::sleep_until(issued + self.validity * 2 / 3).await;
            let next = tls::self_signed(&self.names, self.validity)?;
            let next_key = next.serving.certified_key(&provider)?;
            let next_issued = Instant::now();
            write_until_done(
                &self.client,
                &self.config_name,
                &[&current.ca_pem, &next.ca_pem],
            )
            .await;
            tokio::time::sleep_until(issued + self.validity * 5 / 6).await;
            self.store.set(next_key);
            self.metrics.certificate_changed();
            tracing::info!(not_after = %next.not_after, "serving the rotated certificate");
            write_until_done(&self.client, &self.config_name, &[&next.ca_pem]).await;
            current = next;
            issued = next_issued;
        }
    }
}
