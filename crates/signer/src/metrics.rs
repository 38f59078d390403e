//! Prometheus metrics (`meshca_signer_*`), served on `/metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SignerLabel {
    pub signer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    pub signer: String,
    /// HTTP status of the apiserver's answer (`403`: RBAC, e.g. no `sign`
    /// on the signer name), or `transport`.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailedLabel {
    pub signer: String,
    /// meshca's stable snake_case reason (`policy_trust_domain`, `ca_expired`, ...).
    pub reason: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0])
}

pub struct Metrics {
    /// Certificates written to `status.certificate`.
    pub signed: Family<SignerLabel, Counter>,
    /// `Failed` conditions written, by reason.
    pub failed: Family<FailedLabel, Counter>,
    /// Seconds from the CSR's creationTimestamp (1 s resolution) to the
    /// certificate being written.
    pub latency: Family<SignerLabel, Histogram, fn() -> Histogram>,
    /// Approved CSRs of this signer without a certificate or a failure yet.
    pub queue_depth: Family<SignerLabel, Gauge>,
    /// NotAfter of the signer's signing certificate (Unix seconds).
    pub ca_expiry_timestamp: Family<SignerLabel, Gauge>,
    /// NotAfter of the earliest-expiring root (Unix seconds).
    pub root_expiry_timestamp: Family<SignerLabel, Gauge>,
    /// CA loads that failed (the previous CA, if any, stays in use).
    pub ca_load_errors: Family<SignerLabel, Counter>,
    /// Status writes that hit a conflict (re-read and decided again).
    pub conflicts: Family<SignerLabel, Counter>,
    /// 1 while this replica leads (always 1 without leader election).
    pub leader: Gauge,
    /// Events not published because the queue was full.
    pub events_dropped: Counter,
    /// Status writes or re-reads the apiserver refused (retried).
    pub api_errors: Family<ErrorLabel, Counter>,
    /// PodCertificateRequests issued, by signer.
    pub pod_certificates_issued: Family<SignerLabel, Counter>,
    /// PodCertificateRequests Denied or Failed, by signer and reason.
    pub pod_certificates_refused: Family<FailedLabel, Counter>,
    /// Root changes published to the signer's ClusterTrustBundle.
    pub trust_bundle_writes: Family<SignerLabel, Counter>,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            signed: Family::default(),
            failed: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
            queue_depth: Family::default(),
            ca_expiry_timestamp: Family::default(),
            root_expiry_timestamp: Family::default(),
            ca_load_errors: Family::default(),
            conflicts: Family::default(),
            leader: Gauge::default(),
            events_dropped: Counter::default(),
            api_errors: Family::default(),
            pod_certificates_issued: Family::default(),
            pod_certificates_refused: Family::default(),
            trust_bundle_writes: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("meshca_signer");
        r.register("signed", "Certificates issued, by signer", m.signed.clone());
        r.register(
            "failed",
            "CSRs marked Failed, by signer and reason",
            m.failed.clone(),
        );
        r.register(
            "issue_latency_seconds",
            "Seconds from CSR creation to certificate in status",
            m.latency.clone(),
        );
        r.register(
            "queue_depth",
            "Approved CSRs waiting for a certificate",
            m.queue_depth.clone(),
        );
        r.register(
            "ca_expiry_timestamp_seconds",
            "NotAfter of the signing certificate",
            m.ca_expiry_timestamp.clone(),
        );
        r.register(
            "root_expiry_timestamp_seconds",
            "NotAfter of the earliest-expiring root",
            m.root_expiry_timestamp.clone(),
        );
        r.register(
            "ca_load_errors",
            "CA loads that failed",
            m.ca_load_errors.clone(),
        );
        r.register(
            "status_conflicts",
            "Status writes that conflicted and were decided again",
            m.conflicts.clone(),
        );
        r.register("leader", "1 while this replica signs", m.leader.clone());
        r.register(
            "api_errors",
            "CSR reads/writes the apiserver refused, by HTTP status (retried)",
            m.api_errors.clone(),
        );
        r.register(
            "pod_certificates_issued",
            "PodCertificateRequests issued, by signer",
            m.pod_certificates_issued.clone(),
        );
        r.register(
            "pod_certificates_refused",
            "PodCertificateRequests Denied or Failed, by signer and reason",
            m.pod_certificates_refused.clone(),
        );
        r.register(
            "cluster_trust_bundle_writes",
            "Writes of the signer's ClusterTrustBundle",
            m.trust_bundle_writes.clone(),
        );
        r.register(
            "events_dropped",
            "Events dropped because the apiserver fell behind",
            m.events_dropped.clone(),
        );
        m
    }

    pub fn label(signer: &str) -> SignerLabel {
        SignerLabel {
            signer: signer.to_owned(),
        }
    }
}
