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
    /// With `kube` and no plugged-in CA: the self-signed CA lives in Secret
    /// `istio-ca-secret` here (and is rotated) instead of the state directory.
    pub ca_secret: Option<istio_secret::CaSecretConfig>,
}
