//! The webhook's Prometheus metrics: reviews by result, patches, refusals
//! by reason (the annotation at fault) and certificate changes.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

use crate::mutate::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// The counters, shared by every request.
#[derive(Debug, Default)]
pub struct Metrics {
    reviews: Family<ResultLabel, Counter>,
    patches: Counter,
    patch_operations: Counter,
    refusals: Family<ReasonLabel, Counter>,
    certificate_changes: Counter,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self::default();
        let mut r = Registry::with_prefix("spright_webhook");
        r.register(
            "reviews",
            "Admission reviews answered, by result (ignored, unchanged, patched, refused, bad_request)",
            m.reviews.clone(),
        );
        r.register("patches", "Pods patched", m.patches.clone());
        r.register(
            "patch_operations",
            "JSON Patch operations returned",
            m.patch_operations.clone(),
        );
        r.register(
            "refusals",
            "Pods refused, by reason (the annotation at fault, or object)",
            m.refusals.clone(),
        );
        r.register(
            "certificate_changes",
            "Serving certificates swapped in without a restart (file reloads, rotations)",
            m.certificate_changes.clone(),
        );
        m.registry = r;
        m
    }

    /// Counts one answered review.
    pub fn review(&self, outcome: &Outcome) {
        let result = match outcome {
            Outcome::Ignored => "ignored",
            Outcome::Unchanged => "unchanged",
            Outcome::Patched(n) => {
                self.patches.inc();
                self.patch_operations.inc_by(*n as u64);
                "patched"
            }
            Outcome::Refused(reason) => {
                self.refusals.get_or_create(&ReasonLabel { reason }).inc();
                "refused"
            }
        };
        self.reviews.get_or_create(&ResultLabel { result }).inc();
    }

    /// Counts a body that was no review (answered with HTTP 400).
    pub fn bad_request(&self) {
        self.reviews
            .get_or_create(&ResultLabel {
                result: "bad_request",
            })
            .inc();
    }

    pub fn certificate_changed(&self) {
        self.certificate_changes.inc();
    }

    /// OpenMetrics text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
