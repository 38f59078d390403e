//! Prometheus metrics with Istio's `citadel_server_*` names, plus a latency
//! histogram Istio lacks.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabel {
    /// A stable reason string (`csr_signature_invalid`, `ttl_too_long`, ...).
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthLabel {
    /// Which authenticator identified the caller: `client_cert`, `token_review`, `jwt`.
    pub authenticator: String,
}

pub struct Metrics {
    pub csr: Counter,
    pub authentication_failure: Counter,
    pub csr_parsing_err: Counter,
    pub id_extraction_err: Counter,
    pub csr_sign_err: Family<ErrorLabel, Counter>,
    pub success_cert_issuance: Counter,
    pub authenticated: Family<AuthLabel, Counter>,
    pub token_cache_hits: Counter,
    pub root_cert_expiry_timestamp: Gauge,
    pub root_cert_expiry_seconds: Gauge,
    pub cert_chain_expiry_timestamp: Gauge,
    pub cert_chain_expiry_seconds: Gauge,
    pub issue_duration: Histogram,
}

impl Metrics {
    pub fn new(registry: &mut Registry) -> Self {
        let m = Metrics {
            csr: Counter::default(),
            authentication_failure: Counter::default(),
            csr_parsing_err: Counter::default(),
            id_extraction_err: Counter::default(),
            csr_sign_err: Family::default(),
            success_cert_issuance: Counter::default(),
            authenticated: Family::default(),
            token_cache_hits: Counter::default(),
            root_cert_expiry_timestamp: Gauge::default(),
            root_cert_expiry_seconds: Gauge::default(),
            cert_chain_expiry_timestamp: Gauge::default(),
            cert_chain_expiry_seconds: Gauge::default(),
            issue_duration: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ]),
        };
        let c = "citadel_server";
        registry.register(format!("{c}_csr_count"), "CSRs received", m.csr.clone());
        registry.register(
            format!("{c}_authentication_failure_count"),
            "Requests that failed authentication",
            m.authentication_failure.clone(),
        );
        registry.register(
            format!("{c}_csr_parsing_err_count"),
            "CSRs that failed to parse",
            m.csr_parsing_err.clone(),
        );
        registry.register(
            format!("{c}_id_extraction_err_count"),
            "Requests whose identity could not be extracted",
            m.id_extraction_err.clone(),
        );
        registry.register(
            format!("{c}_csr_sign_err_count"),
            "CSR signing errors by reason",
            m.csr_sign_err.clone(),
        );
        registry.register(
            format!("{c}_success_cert_issuance_count"),
            "Certificates issued",
            m.success_cert_issuance.clone(),
        );
        registry.register(
            format!("{c}_root_cert_expiry_timestamp"),
            "Unix time the earliest root expires",
            m.root_cert_expiry_timestamp.clone(),
        );
        registry.register(
            format!("{c}_root_cert_expiry_seconds"),
            "Seconds until the earliest root expires",
            m.root_cert_expiry_seconds.clone(),
        );
        registry.register(
            format!("{c}_cert_chain_expiry_timestamp"),
            "Unix time the CA signing certificate expires",
            m.cert_chain_expiry_timestamp.clone(),
        );
        registry.register(
            format!("{c}_cert_chain_expiry_seconds"),
            "Seconds until the CA signing certificate expires",
            m.cert_chain_expiry_seconds.clone(),
        );
        registry.register(
            "meshca_server_authenticated",
            "Requests authenticated, by authenticator",
            m.authenticated.clone(),
        );
        registry.register(
            "meshca_server_token_cache_hits",
            "Token authentications answered from the cache",
            m.token_cache_hits.clone(),
        );
        registry.register(
            "meshca_server_issue_duration_seconds",
            "CreateCertificate latency, request received to response ready",
            m.issue_duration.clone(),
        );
        m
    }

    /// Refreshes the expiry gauges from the CA in use.
    pub fn observe_ca(&self, bundle: &meshca_pki::CaBundle) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let chain = bundle.not_after().unix_timestamp();
        self.cert_chain_expiry_timestamp.set(chain);
        self.cert_chain_expiry_seconds.set(chain - now);
        if let Some(root) = bundle.roots_not_after() {
            let root = root.unix_timestamp();
            self.root_cert_expiry_timestamp.set(root);
            self.root_cert_expiry_seconds.set(root - now);
        }
    }
}
