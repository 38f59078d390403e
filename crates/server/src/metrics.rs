//! Prometheus metrics: Istio's `citadel_server_*` families exactly as istiod
//! exposes them, plus meshca's own `meshca_server_*` ones (a latency histogram
//! Istio lacks, the authenticator and the token cache).
//!
//! istiod serves the Prometheus text format 0.0.4 with counter suffixes off:
//! its counter `citadel_server_csr_count` is `# TYPE citadel_server_csr_count
//! counter` with samples named `citadel_server_csr_count`, no `_total`.
//! prometheus-client always appends `_total` to a [`Counter`], so Istio's
//! counters are [`IstioCounter`]s in a registry of their own
//! ([`Metrics::istio_registry`]) that [`encode`] writes with their names
//! unchanged; meshca's own metrics keep prometheus-client's naming.
//! istiod's expiry gauges are [`CertExpiry`]s: `*_expiry_seconds` is
//! computed from the clock at each scrape.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::{MetricType, TypedMetric};
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

/// A counter as istiod exposes its counters: `# TYPE <name> counter` and
/// samples named `<name>` itself, without the `_total` that
/// prometheus-client's [`Counter`] always appends. Only for the OpenMetrics
/// text encoder, whose output for it is also valid Prometheus text 0.0.4
/// (see [`encode`]).
#[derive(Clone, Debug, Default)]
pub struct IstioCounter(Counter);

impl IstioCounter {
    pub fn inc(&self) -> u64 {
        self.0.inc()
    }

    pub fn get(&self) -> u64 {
        self.0.get()
    }
}

impl TypedMetric for IstioCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for IstioCounter {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> fmt::Result {
        // The text encoder writes a gauge sample as `<name> <value>`, which
        // is exactly a counter sample with suffixes off.
        encoder.encode_gauge(&self.0.get())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// Seconds since the Unix epoch.
pub type Clock = fn() -> f64;

fn system_clock() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A certificate's not-after time, exposed as istiod's pair of gauges:
/// `*_expiry_timestamp` (Unix seconds) and `*_expiry_seconds` (seconds left,
/// computed from the clock when scraped, negative once expired). Neither is
/// exposed before the first [`CertExpiry::set`].
#[derive(Clone, Debug)]
pub struct CertExpiry {
    not_after: Arc<AtomicI64>,
    clock: Clock,
}

/// [`CertExpiry::not_after`] before anything was set.
const UNSET: i64 = i64::MIN;

impl CertExpiry {
    fn new(clock: Clock) -> Self {
        CertExpiry {
            not_after: Arc::new(AtomicI64::new(UNSET)),
            clock,
        }
    }

    /// Records the not-after time (Unix seconds).
    pub fn set(&self, not_after: i64) {
        self.not_after.store(not_after, Ordering::Relaxed);
    }

    /// Stops exposing the gauges.
    pub fn clear(&self) {
        self.not_after.store(UNSET, Ordering::Relaxed);
    }

    pub fn not_after(&self) -> Option<i64> {
        Some(self.not_after.load(Ordering::Relaxed)).filter(|&t| t != UNSET)
    }

    /// Seconds left now (negative once expired).
    pub fn seconds_left(&self) -> Option<f64> {
        self.not_after().map(|t| t as f64 - (self.clock)())
    }
}

/// The `*_expiry_timestamp` gauge of a [`CertExpiry`].
#[derive(Debug)]
struct ExpiryTimestamp(CertExpiry);

impl EncodeMetric for ExpiryTimestamp {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> fmt::Result {
        match self.0.not_after() {
            Some(t) => encoder.encode_gauge(&t),
            None => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }

    fn is_empty(&self) -> bool {
        self.0.not_after().is_none()
    }
}

/// The `*_expiry_seconds` gauge of a [`CertExpiry`], read at encode time.
#[derive(Debug)]
struct ExpirySeconds(CertExpiry);

impl EncodeMetric for ExpirySeconds {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> fmt::Result {
        match self.0.seconds_left() {
            Some(left) => encoder.encode_gauge(&left),
            None => Ok(()),
        }
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Gauge
    }

    fn is_empty(&self) -> bool {
        self.0.not_after().is_none()
    }
}

pub struct Metrics {
    // istiod's families (security/pkg/server/ca/monitoring.go), same names,
    // types and labels.
    pub csr: IstioCounter,
    pub authentication_failure: IstioCounter,
    pub csr_parsing_err: IstioCounter,
    /// A credential was proven but names no identity a certificate can carry.
    pub id_extraction_err: IstioCounter,
    pub csr_sign_err: Family<ErrorLabel, IstioCounter>,
    pub success_cert_issuance: IstioCounter,
    /// The earliest-expiring root (istiod: the first root).
    pub root_cert_expiry: CertExpiry,
    /// The CA's signing certificate when it is not itself a root, i.e. when
    /// Istio's `cert-chain.pem` is not empty (istiod's condition).
    pub cert_chain_expiry: CertExpiry,
    istio: Arc<Registry>,
    // meshca's own.
    pub authenticated: Family<AuthLabel, Counter>,
    pub token_cache_hits: Counter,
    pub issue_duration: Histogram,
    /// CreateCertificate calls being answered now (see [`InFlight`]).
    pub in_flight: Gauge,
}

/// Counts one request in [`Metrics::in_flight`] until dropped, however the
/// request ends (answered, refused, or cancelled by its deadline).
pub struct InFlight(Gauge);

impl InFlight {
    pub fn start(gauge: &Gauge) -> Self {
        gauge.inc();
        InFlight(gauge.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Metrics {
    /// Registers meshca's own metrics in `registry`; istiod's families go to
    /// [`Metrics::istio_registry`].
    pub fn new(registry: &mut Registry) -> Self {
        Self::with_clock(registry, system_clock)
    }

    fn with_clock(registry: &mut Registry, clock: Clock) -> Self {
        let mut istio = Registry::default();
        let csr = IstioCounter::default();
        let authentication_failure = IstioCounter::default();
        let csr_parsing_err = IstioCounter::default();
        let id_extraction_err = IstioCounter::default();
        let csr_sign_err = Family::<ErrorLabel, IstioCounter>::default();
        let success_cert_issuance = IstioCounter::default();
        let root_cert_expiry = CertExpiry::new(clock);
        let cert_chain_expiry = CertExpiry::new(clock);
        let c = "citadel_server";
        istio.register(
            format!("{c}_csr_count"),
            "The number of CSRs received by Citadel server",
            csr.clone(),
        );
        istio.register(
            format!("{c}_authentication_failure_count"),
            "The number of authentication failures",
            authentication_failure.clone(),
        );
        istio.register(
            format!("{c}_csr_parsing_err_count"),
            "The number of errors occurred when parsing the CSR",
            csr_parsing_err.clone(),
        );
        istio.register(
            format!("{c}_id_extraction_err_count"),
            "The number of errors occurred when extracting the ID from the caller's credentials",
            id_extraction_err.clone(),
        );
        istio.register(
            format!("{c}_csr_sign_err_count"),
            "The number of errors occurred when signing the CSR",
            csr_sign_err.clone(),
        );
        istio.register(
            format!("{c}_success_cert_issuance_count"),
            "The number of certificates issuances that have succeeded",
            success_cert_issuance.clone(),
        );
        istio.register(
            format!("{c}_root_cert_expiry_timestamp"),
            "The unix timestamp, in seconds, when the root cert will expire",
            ExpiryTimestamp(root_cert_expiry.clone()),
        );
        istio.register(
            format!("{c}_root_cert_expiry_seconds"),
            "The time remaining, in seconds, before the root cert will expire. \
             A negative value indicates the cert is expired",
            ExpirySeconds(root_cert_expiry.clone()),
        );
        istio.register(
            format!("{c}_cert_chain_expiry_timestamp"),
            "The unix timestamp, in seconds, when Istio generated cert chain will expire",
            ExpiryTimestamp(cert_chain_expiry.clone()),
        );
        istio.register(
            format!("{c}_cert_chain_expiry_seconds"),
            "The time remaining, in seconds, before the Istio Generated cert chain will expire. \
             A negative value indicates the cert is expired",
            ExpirySeconds(cert_chain_expiry.clone()),
        );

        let authenticated = Family::<AuthLabel, Counter>::default();
        let token_cache_hits = Counter::default();
        let issue_duration = Histogram::new([
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        ]);
        registry.register(
            "meshca_server_authenticated",
            "Requests authenticated, by authenticator",
            authenticated.clone(),
        );
        registry.register(
            "meshca_server_token_cache_hits",
            "Token authentications answered from the cache",
            token_cache_hits.clone(),
        );
        registry.register(
            "meshca_server_issue_duration_seconds",
            "CreateCertificate latency, request received to response ready",
            issue_duration.clone(),
        );
        let in_flight = Gauge::default();
        registry.register(
            "meshca_server_requests_in_flight",
            "CreateCertificate calls being answered",
            in_flight.clone(),
        );
        Metrics {
            csr,
            authentication_failure,
            csr_parsing_err,
            id_extraction_err,
            csr_sign_err,
            success_cert_issuance,
            root_cert_expiry,
            cert_chain_expiry,
            istio: Arc::new(istio),
            authenticated,
            token_cache_hits,
            issue_duration,
            in_flight,
        }
    }

    /// istiod's `citadel_server_*` families, written as they are named
    /// (see [`meshca_kube::monitoring::Registries`]).
    pub fn istio_registry(&self) -> Arc<Registry> {
        self.istio.clone()
    }

    /// Records the not-after times of the CA in use (the expiry gauges
    /// compute the time left when scraped).
    pub fn observe_ca(&self, bundle: &meshca_pki::CaBundle) {
        if bundle.cert_chain_pem().is_empty() {
            self.cert_chain_expiry.clear();
        } else {
            self.cert_chain_expiry
                .set(bundle.not_after().unix_timestamp());
        }
        match bundle.roots_not_after() {
            Some(root) => self.root_cert_expiry.set(root.unix_timestamp()),
            None => self.root_cert_expiry.clear(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(m: &Metrics, own: &Registry) -> String {
        meshca_kube::monitoring::encode(Some(&m.istio_registry()), own).unwrap()
    }

    #[test]
    fn istio_families_have_istiods_names_types_and_labels() {
        let mut own = Registry::default();
        let m = Metrics::new(&mut own);
        m.csr.inc();
        m.csr.inc();
        m.success_cert_issuance.inc();
        m.authentication_failure.inc();
        m.csr_sign_err
            .get_or_create(&ErrorLabel {
                error: "ttl_too_long".into(),
            })
            .inc();
        m.authenticated
            .get_or_create(&AuthLabel {
                authenticator: "jwt".into(),
            })
            .inc();
        let text = scrape(&m, &own);
        for line in [
            "# TYPE citadel_server_csr_count counter",
            "citadel_server_csr_count 2",
            "# TYPE citadel_server_success_cert_issuance_count counter",
            "citadel_server_success_cert_issuance_count 1",
            "# TYPE citadel_server_authentication_failure_count counter",
            "citadel_server_authentication_failure_count 1",
            "# TYPE citadel_server_csr_parsing_err_count counter",
            "citadel_server_csr_parsing_err_count 0",
            "# TYPE citadel_server_id_extraction_err_count counter",
            "citadel_server_id_extraction_err_count 0",
            "# TYPE citadel_server_csr_sign_err_count counter",
            "citadel_server_csr_sign_err_count{error=\"ttl_too_long\"} 1",
            // meshca's own keep prometheus-client's names.
            "# TYPE meshca_server_authenticated_total counter",
            "meshca_server_authenticated_total{authenticator=\"jwt\"} 1",
            "# TYPE meshca_server_issue_duration_seconds histogram",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert!(!text.contains("citadel_server_csr_count_total"), "{text}");
        assert!(!text.contains("# EOF"), "not OpenMetrics: {text}");
    }

    /// Prometheus text 0.0.4: every sample belongs to the family its TYPE
    /// line names (counters and gauges by the same name, histograms with
    /// `_bucket`, `_sum`, `_count`), and each family is typed once.
    #[test]
    fn the_exposition_is_valid_prometheus_text() {
        let mut own = Registry::default();
        let m = Metrics::new(&mut own);
        m.csr.inc();
        m.csr_sign_err
            .get_or_create(&ErrorLabel {
                error: "csr_signature_invalid".into(),
            })
            .inc();
        m.authenticated
            .get_or_create(&AuthLabel {
                authenticator: "client_cert".into(),
            })
            .inc();
        m.issue_duration.observe(0.002);
        m.root_cert_expiry.set(2_000_000_000);
        m.cert_chain_expiry.set(1_900_000_000);
        let text = scrape(&m, &own);
        let mut types = std::collections::HashMap::new();
        let mut current: Option<(String, String)> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert!(
                    types.insert(name.to_owned(), kind.to_owned()).is_none(),
                    "{name} typed twice"
                );
                current = Some((name.to_owned(), kind.to_owned()));
                continue;
            }
            if line.starts_with('#') {
                assert!(line.starts_with("# HELP "), "stray comment {line:?}");
                continue;
            }
            let name = line.split(['{', ' ']).next().unwrap();
            let (family, kind) = current.as_ref().expect("sample before any TYPE");
            let ok = match kind.as_str() {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| name == format!("{family}{s}")),
                "counter" | "gauge" => name == family,
                other => panic!("unexpected type {other}"),
            };
            assert!(ok, "sample {name} under TYPE {family} {kind}");
            let value = line.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "value {value:?}");
        }
        for family in [
            "citadel_server_root_cert_expiry_timestamp",
            "citadel_server_root_cert_expiry_seconds",
            "citadel_server_cert_chain_expiry_timestamp",
            "citadel_server_cert_chain_expiry_seconds",
        ] {
            assert_eq!(types.get(family).map(String::as_str), Some("gauge"));
        }
    }

    static FAKE_NOW: AtomicI64 = AtomicI64::new(1_000_000);

    fn fake_clock() -> f64 {
        FAKE_NOW.load(Ordering::SeqCst) as f64
    }

    fn sample(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn expiry_seconds_are_computed_when_scraped() {
        let mut own = Registry::default();
        let m = Metrics::with_clock(&mut own, fake_clock);
        let text = scrape(&m, &own);
        assert!(
            !text.contains("expiry"),
            "expiry gauges before any CA: {text}"
        );

        let now = FAKE_NOW.load(Ordering::SeqCst);
        m.cert_chain_expiry.set(now + 86_400);
        m.root_cert_expiry.set(now + 10 * 86_400);
        let first = scrape(&m, &own);
        let chain = "citadel_server_cert_chain_expiry_seconds";
        let root = "citadel_server_root_cert_expiry_seconds";
        assert_eq!(sample(&first, chain), Some(86_400.0), "{first}");
        assert_eq!(sample(&first, root), Some(864_000.0), "{first}");

        // An hour later, without any new observation.
        FAKE_NOW.fetch_add(3600, Ordering::SeqCst);
        let later = scrape(&m, &own);
        assert_eq!(sample(&later, chain), Some(82_800.0), "{later}");
        assert_eq!(sample(&later, root), Some(860_400.0), "{later}");
        assert_eq!(
            sample(&later, "citadel_server_cert_chain_expiry_timestamp"),
            Some((now + 86_400) as f64),
            "{later}"
        );

        // Past the end: negative, as istiod reports an expired certificate.
        FAKE_NOW.fetch_add(86_400, Ordering::SeqCst);
        let expired = scrape(&m, &own);
        assert_eq!(sample(&expired, chain), Some(-3600.0), "{expired}");
    }

    /// As istiod: the root's expiry always, the cert chain's only when the
    /// CA has one (its `cert-chain.pem` is not empty).
    #[test]
    fn cert_chain_expiry_only_for_a_ca_below_a_root() {
        let day = std::time::Duration::from_secs(86_400);
        let (root, inter) = crate::test_ca::root_and_intermediate(10 * day, day);
        let mut own = Registry::default();
        let m = Metrics::new(&mut own);
        m.observe_ca(&inter);
        let text = scrape(&m, &own);
        let root_end = root.not_after().unix_timestamp() as f64;
        let inter_end = inter.not_after().unix_timestamp() as f64;
        assert_eq!(
            sample(&text, "citadel_server_root_cert_expiry_timestamp"),
            Some(root_end)
        );
        assert_eq!(
            sample(&text, "citadel_server_cert_chain_expiry_timestamp"),
            Some(inter_end)
        );
        let left = sample(&text, "citadel_server_cert_chain_expiry_seconds").unwrap();
        assert!((86_000.0..=86_400.0).contains(&left), "{left}");

        // Back to a self-signed CA: no cert chain.
        m.observe_ca(&root);
        let text = scrape(&m, &own);
        assert_eq!(
            sample(&text, "citadel_server_root_cert_expiry_timestamp"),
            Some(root_end)
        );
        assert!(!text.contains("citadel_server_cert_chain_expiry"), "{text}");
    }

    #[test]
    fn expiry_seconds_use_the_system_clock_at_scrape_time() {
        let mut own = Registry::default();
        let m = Metrics::new(&mut own);
        let not_after = system_clock() as i64 + 1000;
        m.cert_chain_expiry.set(not_after);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let left = sample(
            &scrape(&m, &own),
            "citadel_server_cert_chain_expiry_seconds",
        )
        .unwrap();
        let expected = not_after as f64 - system_clock();
        assert!(left < 999.0, "not recomputed at scrape time: {left}");
        assert!((left - expected).abs() < 1.0, "{left} vs {expected}");
    }
}
