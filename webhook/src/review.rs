//! The `admission.k8s.io/v1` wire types the API server sends to a webhook
//! and reads back: one `AdmissionReview` shape both ways (a `request` in, a
//! `response` out). Only the fields spright reads or writes are typed;
//! unknown fields of the request are ignored, as the API's own clients do.
//!
//! The patch travels base64-encoded (Go's `[]byte` in JSON), with
//! `patchType: JSONPatch` (RFC 6902), the only type the API accepts.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// `apiVersion` of the reviews this webhook speaks (the configuration's
/// `admissionReviewVersions: [v1]`).
pub const API_VERSION: &str = "admission.k8s.io/v1";
/// `kind` of a review.
pub const KIND: &str = "AdmissionReview";
/// `patchType` of every patch returned.
pub const PATCH_TYPE_JSON: &str = "JSONPatch";

/// An `AdmissionReview`, request or response.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionReview {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<AdmissionRequest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<AdmissionResponse>,
}

impl AdmissionReview {
    /// A review carrying `request` (what the API server sends).
    pub fn of_request(request: AdmissionRequest) -> Self {
        Self {
            api_version: API_VERSION.to_owned(),
            kind: KIND.to_owned(),
            request: Some(request),
            response: None,
        }
    }

    /// A review carrying `response` (what the webhook answers).
    pub fn of_response(response: AdmissionResponse) -> Self {
        Self {
            api_version: API_VERSION.to_owned(),
            kind: KIND.to_owned(),
            request: None,
            response: Some(response),
        }
    }
}

/// `group`, `version`, `kind` of the object under review.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupVersionKind {
    #[serde(default)]
    pub group: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub kind: String,
}

impl GroupVersionKind {
    /// core/v1 Pod.
    pub fn pod() -> Self {
        Self {
            group: String::new(),
            version: "v1".to_owned(),
            kind: "Pod".to_owned(),
        }
    }
}

/// `request` of a review.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionRequest {
    /// Copied into the response; the API server matches them.
    pub uid: String,
    #[serde(default)]
    pub kind: GroupVersionKind,
    /// `pods/ephemeralcontainers` and others: set for subresources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_resource: Option<String>,
    /// The object's name (empty for `generateName` pods on CREATE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// `CREATE`, `UPDATE`, `DELETE` or `CONNECT`.
    #[serde(default)]
    pub operation: String,
    /// The object as it will be stored (absent for DELETE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<bool>,
}

/// `response` of a review.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AdmissionResponse {
    pub uid: String,
    pub allowed: bool,
    /// Why a request was refused (read only when `allowed` is false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// Base64 of the JSON Patch document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub patch_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warnings: Option<Vec<String>>,
}

impl AdmissionResponse {
    /// Allowed, unchanged.
    pub fn allow(uid: &str) -> Self {
        Self {
            uid: uid.to_owned(),
            allowed: true,
            ..Self::default()
        }
    }

    /// Allowed with `patch` (empty: no patch at all, so that a reviewed
    /// object is left exactly as it was).
    pub fn patched(uid: &str, patch: &json_patch::Patch) -> Self {
        let mut r = Self::allow(uid);
        if !patch.0.is_empty() {
            let json = serde_json::to_vec(patch).expect("a JSON Patch serializes");
            r.patch = Some(base64::engine::general_purpose::STANDARD.encode(json));
            r.patch_type = Some(PATCH_TYPE_JSON.to_owned());
        }
        r
    }

    /// Refused with HTTP-style `code` and `message` (what `kubectl` shows
    /// after "admission webhook ... denied the request:").
    pub fn deny(uid: &str, code: u16, message: String) -> Self {
        Self {
            uid: uid.to_owned(),
            allowed: false,
            status: Some(Status {
                status: "Failure".to_owned(),
                code,
                reason: (code == 400).then(|| "BadRequest".to_owned()),
                message,
            }),
            ..Self::default()
        }
    }

    /// The patch decoded, `None` without one; an error when it is not
    /// base64 of a JSON Patch.
    pub fn decoded_patch(&self) -> Result<Option<json_patch::Patch>, String> {
        let Some(b64) = &self.patch else {
            return Ok(None);
        };
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .map_err(|e| format!("patch is not base64: {e}"))?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| format!("patch is not a JSON Patch: {e}"))
    }
}

/// A `meta/v1` `Status`, as far as a webhook fills it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `Failure` for a refusal.
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub code: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub message: String,
}
