//! `meshca server`: the Istio CA server. Flags carry Istio's environment
//! variable names where istiod has one.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Result, bail};
use meshca_pki::{KeyType, WorkloadProfile};
use meshca_server::grpc::tls::ServingNames;
use meshca_server::{Server, ServerConfig, Started};

use super::common::{KubeArgs, LogArgs, monitoring_addr};
use crate::duration::parse_duration;

mod options;
pub use options::{CaSecretArgs, DistributionArgs, LimitArgs, RaArgs, SpiffeBundleArgs};

#[derive(clap::Args)]
pub struct ServerArgs {
    /// gRPC address (istio-agent's CA_ADDR points here).
    #[arg(long, env = "MESHCA_LISTEN", default_value = "127.0.0.1:15012")]
    pub listen: SocketAddr,
    /// /healthz, /readyz and /metrics; `none` turns it off.
    #[arg(
        long,
        env = "MESHCA_MONITORING_LISTEN",
        default_value = "127.0.0.1:15014"
    )]
    pub monitoring_listen: String,
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Lifetime for requests asking for none (Go or human durations: 24h, 24h0m0s).
    #[arg(long, env = "DEFAULT_WORKLOAD_CERT_TTL", value_parser = parse_duration, default_value = "24h")]
    pub default_workload_cert_ttl: Duration,
    /// Longer requests are refused with InvalidArgument, as istiod does.
    #[arg(long, env = "MAX_WORKLOAD_CERT_TTL", value_parser = parse_duration, default_value = "2160h")]
    pub max_workload_cert_ttl: Duration,
    /// Plugged-in CA in Istio's cacerts layout; watched and reloaded.
    #[arg(long, env = "ROOT_CA_DIR", default_value = "./etc/cacerts")]
    pub root_ca_dir: PathBuf,
    /// State directory: the self-signed CA and the local token key.
    #[arg(long, env = "MESHCA_STATE_DIR", default_value = "./meshca-data")]
    pub state_dir: PathBuf,
    /// Key type of a self-signed root created on first start.
    #[arg(long, env = "MESHCA_SELF_SIGNED_KEY_TYPE", default_value = "rsa-2048")]
    pub self_signed_key_type: KeyType,
    #[arg(long, env = "CITADEL_SELF_SIGNED_CA_CERT_TTL", value_parser = parse_duration, default_value = "87600h")]
    pub self_signed_ca_cert_ttl: Duration,
    /// Audiences a Kubernetes token must carry (comma separated).
    #[arg(
        long,
        env = "TOKEN_AUDIENCES",
        default_value = "istio-ca",
        value_delimiter = ','
    )]
    pub token_audiences: Vec<String>,
    /// This cluster's ID; a `clusterid` header naming another cluster is refused.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    #[arg(long, env = "MESHCA_CLUSTER_ALIASES", value_delimiter = ',')]
    pub cluster_aliases: Vec<String>,
    /// Accounts (`<namespace>/<service account>`, comma separated) that may
    /// ask for another workload's certificate (ztunnel's
    /// ImpersonatedIdentity); pods are then watched (RBAC:
    /// the Helm chart's impersonation ClusterRole). Empty turns it off.
    #[arg(
        long,
        env = "CA_TRUSTED_NODE_ACCOUNTS",
        default_value = "istio-system/ztunnel",
        value_delimiter = ','
    )]
    pub trusted_node_accounts: Vec<String>,
    /// Refuse every impersonation and watch no pods.
    #[arg(long, env = "MESHCA_NO_IMPERSONATION")]
    pub no_impersonation: bool,
    #[command(flatten)]
    pub kube: KubeArgs,
    /// Run without Kubernetes even if a kubeconfig is around.
    #[arg(long)]
    pub standalone: bool,
    /// Trusted JWT issuer public keys (PEM or JWKS) for running without a
    /// cluster; needs --jwt-issuer.
    #[arg(long, env = "MESHCA_JWT_KEYS", requires = "jwt_issuer")]
    pub jwt_keys: Option<PathBuf>,
    /// Required `iss` of tokens verified with --jwt-keys (required with it).
    #[arg(long, env = "MESHCA_JWT_ISSUER", value_parser = clap::builder::NonEmptyStringValueParser::new())]
    pub jwt_issuer: Option<String>,
    /// DNS names in the serving certificate.
    #[arg(
        long,
        env = "MESHCA_SERVER_DNS",
        value_delimiter = ',',
        default_value = "istiod.istio-system.svc,istiod.istio-system.svc.cluster.local,localhost"
    )]
    pub server_dns: Vec<String>,
    /// IP addresses in the serving certificate.
    #[arg(
        long,
        env = "MESHCA_SERVER_IPS",
        value_delimiter = ',',
        default_value = "127.0.0.1"
    )]
    pub server_ips: Vec<IpAddr>,
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    pub serving_cert_ttl: Duration,
    /// How long a proven token (TokenReview or JWT answer) may be reused,
    /// never beyond the token's exp: the longest a deleted ServiceAccount's
    /// token is still accepted (a token bound to a deleted pod ends at the
    /// pod's delete event when pods are watched, i.e. with impersonation
    /// on). istiod caches nothing; 10s is what kube-apiserver caches a
    /// successful token check for, and still absorbs a node agent's burst
    /// of requests with one token. 0 turns the cache off.
    #[arg(long, env = "MESHCA_TOKEN_CACHE_TTL", value_parser = parse_duration, default_value = "10s")]
    pub token_cache_ttl: Duration,
    #[arg(long, default_value_t = 100_000)]
    pub token_cache_size: usize,
    /// Largest accepted gRPC message (an istio-agent request, its CSR, is a few KiB);
    /// a larger one is answered `OutOfRange` before it is decoded.
    #[arg(long, env = "MESHCA_MAX_MESSAGE_BYTES", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u64).range(1024..=16 * 1024 * 1024))]
    pub max_message_bytes: u64,
    /// How often the CA files are checked for changes.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub reload_interval: Duration,
    #[command(flatten)]
    pub ra: RaArgs,
    /// At most this many Kubernetes API calls in flight (TokenReview, RA
    /// CSR calls), first come first served: a mass restart then queues here
    /// instead of overflowing the apiserver's per-client queue (429s).
    #[arg(long, env = "MESHCA_KUBE_API_CONCURRENCY", default_value_t = meshca_kube::api_limit::DEFAULT_CONCURRENCY)]
    pub kube_api_concurrency: usize,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub distribution: DistributionArgs,
    #[command(flatten)]
    pub spiffe_bundle: SpiffeBundleArgs,
    #[command(flatten)]
    pub ca_secret: CaSecretArgs,
    #[command(flatten)]
    pub log: LogArgs,
    #[command(flatten)]
    pub pkcs11: crate::commands::common::Pkcs11Args,
}

pub fn run(args: ServerArgs) -> Result<ExitCode> {
    args.log.init();
    args.pkcs11.apply();
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let listen = args.listen;
        let state_dir = args.state_dir.clone();
        let server = Server::build(config(args).await?).await?;
        print_banner(listen, &state_dir, &server.started());
        // In-flight requests may finish after SIGTERM, but clients that keep
        // their connections open must not hold the process past the grace period.
        let shutdown = meshca_kube::shutdown::on_signals();
        let stopping = shutdown.clone();
        tokio::select! {
            result = server.serve(shutdown) => result,
            () = async {
                stopping.cancelled().await;
                tracing::info!("shutting down: finishing in-flight requests");
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                tracing::warn!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace period; exiting");
                Ok(())
            }
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// The server's configuration from its flags (and a cluster, unless standalone).
async fn config(args: ServerArgs) -> Result<ServerConfig> {
    let workload = WorkloadProfile {
        default_ttl: args.default_workload_cert_ttl,
        max_ttl: args.max_workload_cert_ttl,
    };
    let ra = args.ra.config(&workload)?;
    if ra.is_some() && args.standalone {
        bail!("RA mode (EXTERNAL_CA) needs Kubernetes; it cannot run --standalone");
    }
    let kube = if args.standalone {
        None
    } else {
        meshca_kube::client::optional(args.kube.kubeconfig.as_deref()).await?
    };
    if ra.is_some() && kube.is_none() {
        bail!("RA mode (EXTERNAL_CA) needs a kubeconfig or an in-cluster config");
    }
    let standalone = kube.is_none();
    let trusted_node_accounts = if args.no_impersonation {
        Vec::new()
    } else {
        meshca_server::auth::impersonation::parse_trusted_accounts(&args.trusted_node_accounts)
            .map_err(anyhow::Error::msg)?
    };
    Ok(ServerConfig {
        listen: args.listen,
        monitoring_listen: monitoring_addr(&args.monitoring_listen)?,
        trust_domain: args.trust_domain,
        workload,
        ca_dir: Some(args.root_ca_dir),
        state_dir: args.state_dir,
        self_signed_key_type: args.self_signed_key_type,
        self_signed_ttl: args.self_signed_ca_cert_ttl,
        token_audiences: args.token_audiences,
        cluster_id: args.cluster_id,
        cluster_aliases: args.cluster_aliases,
        trusted_node_accounts,
        kube,
        kube_api_concurrency: args.kube_api_concurrency,
        limits: args.limits.limits(ra.as_ref().map(|ra| ra.timeout)),
        jwt_keys: args.jwt_keys,
        jwt_issuer: args.jwt_issuer,
        local_token_issuer: standalone,
        serving: ServingNames {
            dns: args.server_dns,
            ips: args.server_ips,
            ttl: args.serving_cert_ttl,
        },
        token_cache_ttl: args.token_cache_ttl,
        token_cache_size: args.token_cache_size,
        max_message_bytes: usize::try_from(args.max_message_bytes).unwrap_or(usize::MAX),
        reload_interval: args.reload_interval,
        ra,
        distribution: args
            .distribution
            .config(&args.ca_secret.ca_secret_namespace),
        ca_secret: args.ca_secret.config(),
        spiffe_bundle: args.spiffe_bundle.config(),
    })
}

/// How long draining may take after SIGTERM (Kubernetes' default
/// terminationGracePeriodSeconds is 30 s).
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

fn print_banner(listen: SocketAddr, state_dir: &std::path::Path, started: &Started) {
    println!("meshca CA server listening on {listen}");
    println!("  root certificate: {}", started.root_cert.display());
    if started.local_token_issuer {
        println!(
            "  standalone: tokens from `meshca token` (key in {}/jwt) or client certificates",
            state_dir.display()
        );
        println!("  get a first certificate:");
        println!("    meshca token --namespace default --service-account demo > demo.token");
        println!(
            "    meshca request --addr {listen} --root {} --token-file demo.token --out demo-certs",
            started.root_cert.display()
        );
    } else {
        println!(
            "  authentication: Kubernetes TokenReview (kubeconfig or in-cluster) and client certificates; \
             --standalone ignores the cluster"
        );
    }
}
