//! Everything `meshca server` can be told, as one value the CLI builds.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use meshca_pki::{KeyType, WorkloadProfile};

use crate::auth::impersonation;
use crate::backend::ra;
use crate::ca::istio_secret;
use crate::distribution;
use crate::grpc::tls::ServingNames;

/// Everything `meshca server` can be told.
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub monitoring_listen: Option<SocketAddr>,
    pub trust_domain: String,
    pub workload: WorkloadProfile,
    /// A plugged-in CA (Istio's cacerts layout); used when it holds files.
    pub ca_dir: Option<PathBuf>,
    /// Where a self-signed CA (and the local JWT key) live when no CA is plugged in.
    pub state_dir: PathBuf,
    pub self_signed_key_type: KeyType,
    pub self_signed_ttl: Duration,
    pub token_audiences: Vec<String>,
    pub cluster_id: String,
    pub cluster_aliases: Vec<String>,
    /// `CA_TRUSTED_NODE_ACCOUNTS`: who may impersonate (ztunnel); with
    /// `kube` and any entry, pods are watched for Istio's node checks.
    pub trusted_node_accounts: Vec<impersonation::TrustedAccount>,
    pub kube: Option<kube::Client>,
    /// At most this many Kubernetes API calls in flight (TokenReview, RA).
    pub kube_api_concurrency: usize,
    /// Bounds on what one client (or a flood of them) can make the server hold.
    pub limits: Limits,
    pub jwt_keys: Option<PathBuf>,
    pub jwt_issuer: Option<String>,
    /// Create and trust a local token issuer key in the state directory.
    pub local_token_issuer: bool,
    pub serving: ServingNames,
    pub token_cache_ttl: Duration,
    pub token_cache_size: usize,
    pub max_message_bytes: usize,
    pub reload_interval: Duration,
    /// RA mode (`EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API`): workload
    /// certificates come from the Kubernetes CSR API; needs `kube`.
    pub ra: Option<ra::RaConfig>,
    /// Where the roots go (ConfigMaps, ClusterTrustBundle) and who writes
    /// them; needs `kube`.
    pub distribution: distribution::DistributionConfig,
    /// The SPIFFE bundle endpoint (federation, `https_web`), off when `None`.
    pub spiffe_bundle: Option<distribution::spiffe_bundle::SpiffeBundleConfig>,
    /// With `kube` and no plugged-in CA: the self-signed CA lives in Secret
    /// `istio-ca-secret` here (and is rotated) instead of the state directory.
    pub ca_secret: Option<istio_secret::CaSecretConfig>,
}

/// Bounds on :15012 against floods (stalled streams, idle connections, bad
/// tokens); each is a `meshca server` flag.
#[derive(Debug, Clone)]
pub struct Limits {
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS per connection (Envoy's and
    /// grpc-go's 100); the client is told, streams beyond it are refused.
    pub max_streams_per_connection: u32,
    /// Concurrent connections (TLS handshakes included); more are closed at accept.
    pub max_connections: usize,
    /// How long a client may take over its TLS handshake (a slowloris's
    /// partial ClientHello, or nothing at all); then the connection is
    /// closed and its slot under `max_connections` freed.
    pub tls_handshake_timeout: Duration,
    /// HTTP/2 SETTINGS_MAX_FRAME_SIZE: larger frames end the connection
    /// (GOAWAY FRAME_SIZE_ERROR).
    pub max_frame_bytes: u32,
    /// HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE: a request with more header
    /// bytes (CONTINUATION frames included) is refused.
    pub max_header_list_bytes: u32,
    /// The longest one request may take, reading its body included.
    pub request_timeout: Duration,
    /// HTTP/2 PING interval and how long its acknowledgement may take.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    /// Connections are closed (GOAWAY, then after the grace forcibly) at this
    /// age; it also ends idle ones (tonic has no idle timeout).
    pub max_connection_age: Duration,
    pub max_connection_age_grace: Duration,
    /// The longest wait for a Kubernetes API call slot before answering
    /// `Unavailable` (`kube_api_busy`).
    pub api_permit_wait: Duration,
    /// TokenReviews (tokens not in the cache) in flight at once, a share of
    /// `kube_api_concurrency`: a flood of bad tokens leaves the rest to the RA.
    pub max_token_reviews: usize,
    /// The longest wait of a new request (its token not in the cache) for a
    /// TokenReview slot, and then for an API call slot behind the calls of
    /// admitted requests, before answering `Unavailable` (`kube_api_busy`):
    /// long enough for a mass restart's burst to drain in order.
    pub token_review_wait: Duration,
}

impl Limits {
    /// The request timeout when none is given: room for the TokenReview wait
    /// and the TokenReview's answer (a call that hangs, up to 15 s, is cut:
    /// `Cancelled`, which istio-agent retries as it does `Unavailable`); in
    /// RA mode plus the wait for the signer.
    pub fn default_request_timeout(ra_timeout: Option<Duration>) -> Duration {
        Duration::from_secs(30) + ra_timeout.unwrap_or_default()
    }

    /// The TokenReview wait when none is given: most of the default request
    /// timeout (5 s left for the review's answer), in RA mode plus the wait
    /// for the signer as the request timeout has it. A burst larger than the
    /// apiserver drains in 25 s then completes in arrival order instead of
    /// being refused: 5000 RA workloads at once on the 2-core test machine
    /// took 35 s; with a 25 s wait 3028 of them were refused, with 85 s
    /// (60 s `--ra-timeout`) none (BENCHMARKS.md, Scale 4).
    pub fn default_token_review_wait(ra_timeout: Option<Duration>) -> Duration {
        Duration::from_secs(25) + ra_timeout.unwrap_or_default()
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_streams_per_connection: 100,
            max_connections: 10_000,
            tls_handshake_timeout: Duration::from_secs(10),
            // hyper's defaults, the smallest frame HTTP/2 allows and a
            // header list 16 times what istio-agent sends.
            max_frame_bytes: 16 * 1024,
            max_header_list_bytes: 16 * 1024,
            request_timeout: Limits::default_request_timeout(None),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            max_connection_age: Duration::from_secs(30 * 60),
            max_connection_age_grace: Duration::from_secs(10),
            api_permit_wait: meshca_kube::api_limit::DEFAULT_PERMIT_WAIT,
            max_token_reviews: 32,
            token_review_wait: Limits::default_token_review_wait(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default TokenReview wait leaves the review's answer room within
    /// the default request timeout, with and without RA mode.
    #[test]
    fn the_token_review_wait_fits_in_the_request_timeout() {
        for ra_timeout in [
            None,
            Some(Duration::from_secs(5)),
            Some(Duration::from_secs(60)),
        ] {
            let wait = Limits::default_token_review_wait(ra_timeout);
            let request = Limits::default_request_timeout(ra_timeout);
            assert_eq!(request - wait, Duration::from_secs(5), "{ra_timeout:?}");
        }
        assert_eq!(
            Limits::default_token_review_wait(Some(Duration::from_secs(60))),
            Duration::from_secs(85)
        );
    }
}
