//! The option groups of `meshca server` (flood limits, RA mode, root
//! distribution, the SPIFFE bundle endpoint, the self-signed CA's Secret),
//! each with the piece of [`ServerConfig`](meshca_server::ServerConfig) it
//! becomes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use meshca_pki::WorkloadProfile;
use meshca_server::backend::ra::{
    EXTERNAL_CA_KUBERNETES, RaConfig, SignerRoots, validate_cert_signer,
};
use meshca_server::ca::istio_secret::CaSecretConfig;
use meshca_server::distribution::DistributionConfig;
use meshca_server::distribution::spiffe_bundle::SpiffeBundleConfig;

use super::super::common::LeaderElectionArgs;
use crate::duration::parse_duration;

/// Bounds on :15012 against floods of stalled streams, connections and bad tokens.
#[derive(clap::Args)]
pub struct LimitArgs {
    /// Concurrent HTTP/2 streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS,
    /// as Envoy and grpc-go); the client is told, more are refused.
    #[arg(long, env = "MESHCA_MAX_STREAMS_PER_CONNECTION", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,
    /// Concurrent connections to the gRPC port (TLS handshakes included);
    /// more are closed at accept.
    #[arg(long, env = "MESHCA_MAX_CONNECTIONS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,
    /// How long a client may take to complete its TLS handshake and send
    /// its first bytes (the HTTP/2 preface); then it is closed and its
    /// connection slot freed (slowloris).
    #[arg(long, env = "MESHCA_TLS_HANDSHAKE_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub tls_handshake_timeout: Duration,
    /// HTTP/2 SETTINGS_MAX_FRAME_SIZE; a larger frame ends the connection
    /// (GOAWAY FRAME_SIZE_ERROR). 16384 is the least HTTP/2 allows.
    #[arg(long, env = "MESHCA_MAX_FRAME_SIZE", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(16_384..=16_777_215))]
    pub max_frame_size: u32,
    /// HTTP/2 SETTINGS_MAX_HEADER_LIST_SIZE: the most header bytes one
    /// request may carry (CONTINUATION frames included); more are refused.
    #[arg(long, env = "MESHCA_MAX_HEADER_LIST_SIZE", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(1024..))]
    pub max_header_list_size: u32,
    /// The longest one request may take, its body included (gRPC
    /// `Cancelled` after it). Default: 30s, plus --ra-timeout in RA mode.
    #[arg(long, env = "MESHCA_REQUEST_TIMEOUT", value_parser = parse_duration)]
    pub request_timeout: Option<Duration>,
    /// How long an HTTP/2 keepalive PING (sent every 30s) may go unanswered
    /// before the connection is closed.
    #[arg(long, env = "MESHCA_KEEPALIVE_TIMEOUT", value_parser = parse_duration, default_value = "10s")]
    pub keepalive_timeout: Duration,
    /// Connections are closed (GOAWAY; clients reconnect) at this age, idle
    /// ones included, as istiod's --keepaliveMaxServerConnectionAge.
    #[arg(long, env = "MESHCA_MAX_CONNECTION_AGE", value_parser = parse_duration, default_value = "30m")]
    pub max_connection_age: Duration,
    /// The longest wait of an admitted request (its token reviewed) for a
    /// Kubernetes API call slot (see --kube-api-concurrency; its calls go
    /// before new requests' TokenReviews); then the request is answered
    /// `Unavailable` (reason `kube_api_busy`), which istio-agent retries.
    #[arg(long, env = "MESHCA_KUBE_API_PERMIT_WAIT", value_parser = parse_duration, default_value = "5s")]
    pub kube_api_permit_wait: Duration,
    /// TokenReviews (tokens not in the cache) in flight at once, a share of
    /// --kube-api-concurrency: a flood of bad tokens takes no more, and
    /// waits no longer than --token-review-wait for them.
    #[arg(long, env = "MESHCA_MAX_TOKEN_REVIEWS", default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_token_reviews: u64,
    /// The longest wait of a new request (token not in the cache) for a
    /// TokenReview slot and then an API call slot (behind admitted
    /// requests' calls); then `Unavailable` (`kube_api_busy`). Long enough
    /// for a mass restart to drain in order instead of being refused.
    /// Default: 25s, plus --ra-timeout in RA mode.
    #[arg(long, env = "MESHCA_TOKEN_REVIEW_WAIT", value_parser = parse_duration)]
    pub token_review_wait: Option<Duration>,
}

impl LimitArgs {
    pub(super) fn limits(&self, ra_timeout: Option<Duration>) -> meshca_server::Limits {
        let defaults = meshca_server::Limits::default();
        let count = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        meshca_server::Limits {
            max_streams_per_connection: self.max_streams_per_connection,
            max_connections: count(self.max_connections),
            tls_handshake_timeout: self.tls_handshake_timeout,
            max_frame_bytes: self.max_frame_size,
            max_header_list_bytes: self.max_header_list_size,
            request_timeout: self
                .request_timeout
                .unwrap_or_else(|| meshca_server::Limits::default_request_timeout(ra_timeout)),
            keepalive_timeout: self.keepalive_timeout,
            max_connection_age: self.max_connection_age,
            api_permit_wait: self.kube_api_permit_wait,
            max_token_reviews: count(self.max_token_reviews),
            token_review_wait: self
                .token_review_wait
                .unwrap_or_else(|| meshca_server::Limits::default_token_review_wait(ra_timeout)),
            ..defaults
        }
    }
}

/// RA mode (`EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API`).
#[derive(clap::Args)]
pub struct RaArgs {
    /// `ISTIOD_RA_KUBERNETES_API`: RA mode, workload certificates come from
    /// the Kubernetes CSR API (a signer such as `meshca signer`), as istiod's
    /// RA mode; empty: meshca signs itself.
    #[arg(long, env = "EXTERNAL_CA", default_value = "")]
    pub external_ca: String,
    /// RA mode: the signer name of requests without `CertSigner` metadata.
    #[arg(long, env = "K8S_SIGNER")]
    pub k8s_signer: Option<String>,
    /// RA mode: requests with `CertSigner` metadata go to `<domain>/<CertSigner>`,
    /// for the `CertSigner` values in --cert-signers only.
    #[arg(long, env = "CERT_SIGNER_DOMAIN")]
    pub cert_signer_domain: Option<String>,
    /// RA mode: the `CertSigner` values requests may name (comma separated;
    /// Istio's mesh config `certificateSigners`), each a signer-name segment
    /// such as `istio-ca`. Empty: every request with `CertSigner` metadata is refused.
    #[arg(long, env = "MESHCA_CERT_SIGNERS", value_delimiter = ',')]
    pub cert_signers: Vec<String>,
    /// RA mode: the signer's roots; returned chains must verify to them.
    #[arg(
        long,
        env = "MESHCA_EXTERNAL_CA_ROOT",
        default_value = "./etc/external-ca-cert/root-cert.pem"
    )]
    pub external_ca_root: PathBuf,
    /// RA mode: roots of one signer, SIGNER=PATH (repeatable; istiod's
    /// MeshConfig caCertificates with certSigners); others use --external-ca-root.
    #[arg(
        long = "signer-roots",
        env = "MESHCA_SIGNER_ROOTS",
        value_delimiter = ','
    )]
    pub signer_roots: Vec<String>,
    /// RA mode: how long to wait for the signer (Denied/Failed end it at once).
    #[arg(long, env = "MESHCA_RA_TIMEOUT", value_parser = parse_duration, default_value = "60s")]
    pub ra_timeout: Duration,
}

/// Where the roots go and who writes them.
#[derive(clap::Args)]
pub struct DistributionArgs {
    /// Do not keep ConfigMap istio-ca-root-cert (the roots workloads trust)
    /// in every namespace; it is kept whenever Kubernetes is configured.
    #[arg(long, env = "MESHCA_NO_ROOT_CONFIGMAP")]
    pub no_root_configmap: bool,
    /// Also publish the roots as ClusterTrustBundle istio.io:istiod-ca:root-cert
    /// (certificates.k8s.io/v1beta1; server.clusterTrustBundle in the Helm chart).
    #[arg(long, env = "ENABLE_CLUSTER_TRUST_BUNDLE_API")]
    pub cluster_trust_bundle: bool,
    /// Lease in POD_NAMESPACE electing the one replica that writes the roots.
    #[arg(
        long,
        env = "MESHCA_LEADER_ELECTION_LEASE",
        default_value = "meshca-namespace-controller"
    )]
    pub leader_election_lease: String,
    #[command(flatten)]
    pub leader_election: LeaderElectionArgs,
}

/// The SPIFFE bundle endpoint (SPIFFE Federation, profile `https_web`).
#[derive(clap::Args)]
pub struct SpiffeBundleArgs {
    /// Serve the trust domain's SPIFFE bundle (the roots as a JWK Set with
    /// `spiffe_sequence`) over HTTPS here, at path `/`, for federation;
    /// needs --spiffe-bundle-cert and --spiffe-bundle-key.
    #[arg(long, env = "MESHCA_SPIFFE_BUNDLE_LISTEN", requires_all = ["spiffe_bundle_cert", "spiffe_bundle_key"])]
    pub spiffe_bundle_listen: Option<SocketAddr>,
    /// The endpoint's serving certificate chain (PEM), one the consumers'
    /// web PKI roots trust for its name; re-read when it changes.
    #[arg(long, env = "MESHCA_SPIFFE_BUNDLE_CERT")]
    pub spiffe_bundle_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[arg(long, env = "MESHCA_SPIFFE_BUNDLE_KEY")]
    pub spiffe_bundle_key: Option<PathBuf>,
    /// `spiffe_refresh_hint`: how often consumers should poll.
    #[arg(long, env = "MESHCA_SPIFFE_BUNDLE_REFRESH_HINT", value_parser = parse_duration, default_value = "5m")]
    pub spiffe_bundle_refresh_hint: Duration,
}

impl SpiffeBundleArgs {
    pub(super) fn config(&self) -> Option<SpiffeBundleConfig> {
        Some(SpiffeBundleConfig {
            listen: self.spiffe_bundle_listen?,
            cert_file: self.spiffe_bundle_cert.clone()?,
            key_file: self.spiffe_bundle_key.clone()?,
            refresh_hint: self.spiffe_bundle_refresh_hint,
        })
    }
}

/// The self-signed CA in Secret `istio-ca-secret`.
#[derive(clap::Args)]
pub struct CaSecretArgs {
    /// meshca's own namespace: Secret istio-ca-secret (the self-signed CA
    /// with Kubernetes and no plugged-in CA) and the root distribution Lease.
    #[arg(long, env = "POD_NAMESPACE", default_value = "istio-system")]
    pub ca_secret_namespace: String,
    /// Keep the self-signed CA in the state directory even with Kubernetes.
    #[arg(long, env = "MESHCA_NO_CA_SECRET")]
    pub no_ca_secret: bool,
    /// How often the self-signed root's remaining life is checked (plus jitter).
    #[arg(long, env = "CITADEL_SELF_SIGNED_ROOT_CERT_CHECK_INTERVAL", value_parser = parse_duration, default_value = "1h")]
    pub self_signed_root_check_interval: Duration,
    /// Re-issue the self-signed root (same key and subject) when less than
    /// this percentage of its life remains.
    #[arg(long, env = "CITADEL_SELF_SIGNED_ROOT_CERT_GRACE_PERIOD_PERCENTILE", default_value_t = 20, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub self_signed_root_grace_percentile: u32,
}

impl RaArgs {
    /// The RA settings, or `None` when meshca signs itself.
    pub(super) fn config(&self, workload: &WorkloadProfile) -> Result<Option<RaConfig>> {
        let args = self;
        match args.external_ca.as_str() {
            "" => Ok(None),
            EXTERNAL_CA_KUBERNETES => {
                let signer_roots = args
                    .signer_roots
                    .iter()
                    .map(|spec| {
                        let (signer, file) = spec.split_once('=').with_context(|| {
                            format!("--signer-roots {spec:?}: expected SIGNER=PATH")
                        })?;
                        Ok(SignerRoots {
                            signer: signer.to_owned(),
                            file: file.into(),
                        })
                    })
                    .collect::<Result<Vec<_>>>()?;
                let cert_signers: Vec<String> = args
                    .cert_signers
                    .iter()
                    .map(|s| s.trim())
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        validate_cert_signer(s)
                            .map(|()| s.to_owned())
                            .map_err(|e| anyhow::anyhow!("--cert-signers: {e}"))
                    })
                    .collect::<Result<_>>()?;
                let none = |s: &Option<String>| s.as_deref().is_none_or(str::is_empty);
                if none(&args.k8s_signer) && none(&args.cert_signer_domain) {
                    bail!(
                        "RA mode needs K8S_SIGNER (--k8s-signer) or CERT_SIGNER_DOMAIN (--cert-signer-domain)"
                    );
                }
                Ok(Some(RaConfig {
                    signer: args.k8s_signer.clone(),
                    signer_domain: args.cert_signer_domain.clone(),
                    cert_signers,
                    roots_file: args.external_ca_root.clone(),
                    signer_roots,
                    timeout: args.ra_timeout,
                    workload: workload.clone(),
                    after_create: None,
                }))
            }
            other => bail!(
                "EXTERNAL_CA={other:?} is not supported (use {EXTERNAL_CA_KUBERNETES} or leave it empty)"
            ),
        }
    }
}

impl DistributionArgs {
    /// The distribution settings; the Lease lives in `namespace`.
    pub(super) fn config(&self, namespace: &str) -> DistributionConfig {
        DistributionConfig {
            configmaps: !self.no_root_configmap,
            cluster_trust_bundle: self.cluster_trust_bundle,
            election: self
                .leader_election
                .election(namespace, &self.leader_election_lease),
        }
    }
}

impl CaSecretArgs {
    /// The Secret's settings, or `None` to keep the CA in the state directory.
    pub(super) fn config(&self) -> Option<CaSecretConfig> {
        (!self.no_ca_secret).then(|| CaSecretConfig {
            namespace: self.ca_secret_namespace.clone(),
            check_interval: self.self_signed_root_check_interval,
            grace_percentile: self.self_signed_root_grace_percentile,
        })
    }
}
