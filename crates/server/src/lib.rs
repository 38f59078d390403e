//! meshca's Istio CA server: istiod's `CreateCertificate` on :15012.
//!
//! Request flow: TLS accept ([`tls`]) -> [`service::CaService`] ->
//! [`auth::Authenticator`] (client certificate, TokenReview with a bounded
//! cache, or local JWT keys) -> a [`service::Backend`]: `meshca_pki::LocalCa`,
//! or in RA mode the Kubernetes CSR API ([`ra`]) -> Istio's chain layout.
//! A reload loop watches the CA files and renews the serving certificate;
//! [`metrics`] serves Istio's `citadel_server_*` metrics; with Kubernetes,
//! [`distribution`] keeps the roots in every namespace (leader-elected).
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod api_limit;
pub mod auth;
pub mod ca_secret;
pub mod cadir;
pub mod cluster_trust_bundle;
pub mod distribution;
pub mod impersonation;
pub mod jwt;
pub mod last_error;
pub mod lease;
pub mod metrics;
pub mod ra;
pub mod root_configmap;
pub mod service;
pub mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{Context, Result};
use meshca_pki::{CaBundle, CertificateAuthority, CsrPolicy, KeyType, LocalCa, WorkloadProfile};
use meshca_proto::istio_certificate_service_server::IstioCertificateServiceServer;
use prometheus_client::registry::Registry;
use time::OffsetDateTime;

use crate::auth::{Authenticator, TokenCache, TokenReviewer};
use crate::service::{Backend, CaService, Shared};
use crate::tls::{ServingNames, TlsState};

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
    pub ca_secret: Option<ca_secret::CaSecretConfig>,
}

/// The issuer name of locally minted tokens.
pub const LOCAL_ISSUER: &str = "meshca-local";
const JWT_KEY: &str = "jwt-signing-key.pem";
const JWT_PUBLIC: &str = "jwt-public-key.pem";

/// Where the CA comes from, and so whether it is watched.
enum CaSource {
    Plugged(PathBuf),
    SelfSigned(PathBuf),
    /// Secret `istio-ca-secret`; the directory holds a copy of its public root.
    Secret(PathBuf),
}

impl CaSource {
    fn dir(&self) -> &Path {
        match self {
            CaSource::Plugged(d) | CaSource::SelfSigned(d) | CaSource::Secret(d) => d,
        }
    }
}

/// Loads the plugged-in CA, or the self-signed one (creating it on first
/// start): in Secret `istio-ca-secret` with Kubernetes, else in the state directory.
async fn open_ca(config: &ServerConfig) -> Result<(CaSource, CaBundle)> {
    if let Some(dir) = &config.ca_dir
        && cadir::has_ca(dir)
    {
        let bundle = cadir::load(dir, OffsetDateTime::now_utc())?;
        return Ok((CaSource::Plugged(dir.clone()), bundle));
    }
    if let (Some(client), Some(secret)) = (&config.kube, &config.ca_secret) {
        let spec = ca_secret::RootSpec {
            key_type: config.self_signed_key_type,
            org: &config.trust_domain,
            ttl: config.self_signed_ttl,
        };
        let bundle = ca_secret::load_or_create(client.clone(), secret, &spec).await?;
        let dir = config.state_dir.join("ca-secret");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::write(dir.join(cadir::ROOT_CERT), bundle.roots_pem())
            .with_context(|| format!("writing {}", dir.join(cadir::ROOT_CERT).display()))?;
        return Ok((CaSource::Secret(dir), bundle));
    }
    let dir = config.state_dir.join("ca");
    if cadir::has_ca(&dir) {
        let bundle = cadir::load(&dir, OffsetDateTime::now_utc())?;
        return Ok((CaSource::SelfSigned(dir), bundle));
    }
    let spec = cadir::NewCa {
        key_type: config.self_signed_key_type,
        org: &config.trust_domain,
        ttl: config.self_signed_ttl,
        issuer: None,
    };
    let (bundle, _) = cadir::create(&dir, &spec, false).context("creating the self-signed CA")?;
    tracing::info!(dir = %dir.display(), "created a self-signed root CA");
    Ok((CaSource::SelfSigned(dir), bundle))
}

/// The local token issuer of standalone mode: its key is created once and
/// its public key is trusted for JWT authentication.
pub fn local_issuer(state_dir: &Path, create: bool) -> Result<jwt::JwtIssuer> {
    let dir = state_dir.join("jwt");
    let key_path = dir.join(JWT_KEY);
    if !key_path.exists() {
        anyhow::ensure!(
            create,
            "{}: missing (start `meshca server` once to create it)",
            key_path.display()
        );
        let der = jwt::JwtIssuer::generate_pkcs8()?;
        let pem_text = zeroize::Zeroizing::new(meshca_pki::pem::encode("PRIVATE KEY", &der));
        let issuer = jwt::JwtIssuer::from_pkcs8(&der, LOCAL_ISSUER)?;
        cadir::write_all(
            &dir,
            &[
                cadir::OutFile {
                    name: JWT_KEY,
                    contents: pem_text.as_bytes(),
                    secret: true,
                },
                cadir::OutFile {
                    name: JWT_PUBLIC,
                    contents: issuer.public_key_pem().as_bytes(),
                    secret: false,
                },
            ],
            false,
        )?;
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read(&key_path).with_context(|| format!("reading {}", key_path.display()))?,
    );
    let blocks = meshca_pki::pem::parse_all(&text)?;
    let block = blocks.first().context("empty JWT key file")?;
    jwt::JwtIssuer::from_pkcs8(&block.der, LOCAL_ISSUER)
}

/// Paths a standalone user needs.
pub struct Started {
    pub root_cert: PathBuf,
    pub local_token_issuer: bool,
}

/// Runs the server until `shutdown` resolves, then lets in-flight requests finish.
pub async fn run(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_started: impl FnOnce(&Started),
) -> Result<()> {
    let (source, bundle) = open_ca(&config).await?;
    // Root rotation of the CA in the Secret: new bundles go to the reload loop.
    let (updates_tx, updates_rx) = tokio::sync::mpsc::unbounded_channel();
    if let (CaSource::Secret(dir), Some(client), Some(secret)) =
        (&source, &config.kube, &config.ca_secret)
    {
        tokio::spawn(ca_secret::rotation_loop(
            client.clone(),
            secret.clone(),
            config.self_signed_ttl,
            bundle.signing_cert_der().to_vec(),
            Some(dir.join(cadir::ROOT_CERT)),
            move |b| {
                let _ = updates_tx.send(b);
            },
        ));
    }
    let mut registry = Registry::default();
    let metrics = metrics::Metrics::new(&mut registry);
    metrics.observe_ca(&bundle);
    let workload = config.workload.clone();
    let make_ca = move |bundle: CaBundle| {
        Arc::new(LocalCa::new(
            Arc::new(bundle),
            CsrPolicy::default(),
            workload.clone(),
        ))
    };
    let ca = make_ca(bundle);

    let mut verifiers_pem = Vec::new();
    if let Some(path) = &config.jwt_keys {
        verifiers_pem
            .push(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    }
    if config.local_token_issuer {
        verifiers_pem.push(
            local_issuer(&config.state_dir, true)?
                .public_key_pem()
                .into_bytes(),
        );
    }
    let jwt = if verifiers_pem.is_empty() {
        None
    } else {
        // Local tokens carry our issuer; a configured issuer applies to the key file.
        let issuer = if config.jwt_keys.is_some() {
            config.jwt_issuer.clone()
        } else {
            Some(LOCAL_ISSUER.into())
        };
        Some(jwt::JwtVerifier::new(
            &verifiers_pem.concat(),
            issuer,
            &config.token_audiences,
        )?)
    };
    let api_limit = api_limit::ApiLimit::new(config.kube_api_concurrency);
    let auth = Authenticator {
        trust_domain: config.trust_domain.clone(),
        cluster_id: config.cluster_id.clone(),
        cluster_aliases: config.cluster_aliases.clone(),
        token_review: config
            .kube
            .clone()
            .map(|c| TokenReviewer::new(c, config.token_audiences.clone(), api_limit.clone())),
        jwt,
        cache: TokenCache::new(config.token_cache_ttl, config.token_cache_size),
    };

    let backend = match &config.ra {
        None => Backend::Local,
        Some(ra_config) => {
            let client = config.kube.clone().context(
                "RA mode (EXTERNAL_CA) needs a Kubernetes client (kubeconfig or in-cluster)",
            )?;
            let ra = ra::KubernetesRa::new(client, ra_config.clone(), api_limit.clone())?;
            tracing::info!(
                signer = ?ra_config.signer,
                signer_domain = ?ra_config.signer_domain,
                roots = %ra_config.roots_file.display(),
                timeout = ?ra_config.timeout,
                "RA mode: workload certificates come from the Kubernetes CSR API"
            );
            Backend::KubernetesRa(Box::new(ra))
        }
    };
    let (roots_tx, roots_rx) = tokio::sync::watch::channel(trusted_roots(&ca, &backend));
    let (stop_distribution, distribution_stop) = tokio::sync::watch::channel(false);
    let distribution = match config.kube.clone() {
        Some(client) if config.distribution.enabled() => {
            let d = &config.distribution;
            tracing::info!(
                configmaps = d.configmaps,
                cluster_trust_bundle = d.cluster_trust_bundle,
                lease = ?d.election.as_ref().map(|e| format!("{}/{}", e.namespace, e.name)),
                "distributing the roots"
            );
            Some(tokio::spawn(distribution::run(
                client,
                roots_rx,
                d.clone(),
                distribution_stop,
            )))
        }
        _ => None,
    };
    let tls = Arc::new(TlsState::new(&ca, &config.serving)?);
    let impersonation = match &config.kube {
        Some(client) if !config.trusted_node_accounts.is_empty() => {
            Some(impersonation::Impersonation {
                trusted: config.trusted_node_accounts.clone(),
                pods: impersonation::PodStore::start(client.clone()),
            })
        }
        _ => None,
    };
    let pods_synced = impersonation.as_ref().map(|i| i.pods.clone());
    let shared = Arc::new(Shared {
        ca: RwLock::new(ca),
        backend,
        auth,
        metrics,
        impersonation,
    });
    let ready = Arc::new(AtomicBool::new(false));

    if let Some(addr) = config.monitoring_listen {
        let app = monitoring_router(
            shared.metrics.istio_registry(),
            Arc::new(registry),
            ready.clone(),
        );
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "monitoring server stopped");
            }
        });
    }

    let watched = matches!(source, CaSource::Plugged(_)).then(|| source.dir().to_owned());
    tokio::spawn(reload_loop(
        shared.clone(),
        tls.clone(),
        watched,
        updates_rx,
        config.serving.clone(),
        config.reload_interval,
        roots_tx,
        make_ca,
    ));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let service = IstioCertificateServiceServer::new(CaService {
        shared: shared.clone(),
    })
    .max_decoding_message_size(config.max_message_bytes);
    // Ready once the pods for impersonation are listed (if watched).
    tokio::spawn({
        let ready = ready.clone();
        async move {
            if let Some(pods) = pods_synced {
                pods.wait_synced().await;
            }
            ready.store(true, Ordering::SeqCst);
        }
    });
    tracing::info!(listen = %config.listen, ca = %source.dir().display(), "meshca CA server ready");
    on_started(&Started {
        root_cert: source.dir().join(cadir::ROOT_CERT),
        local_token_issuer: config.local_token_issuer,
    });
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(service)
        .serve_with_incoming_shutdown(tls::incoming(listener, tls), shutdown)
        .await
        .context("gRPC server")?;
    ready.store(false, Ordering::SeqCst);
    if let Some(task) = distribution {
        // Hand the lease over rather than make a standby wait it out.
        let _ = stop_distribution.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
    }
    tracing::info!("meshca CA server stopped");
    Ok(())
}

/// What workloads trust: the local roots (they sign the serving
/// certificate) and, in RA mode, the signers' roots.
fn trusted_roots(ca: &LocalCa, backend: &Backend) -> String {
    let local = ca
        .bundle()
        .map(|b| b.roots_pem().to_owned())
        .unwrap_or_default();
    match backend {
        Backend::KubernetesRa(ra) => root_configmap::merge_roots(&[&local, &ra.all_roots_pem()]),
        Backend::Local => root_configmap::merge_roots(&[&local]),
    }
}

/// Polls the plugged-in CA files and swaps the CA when they change and
/// verify, or when a rotated CA arrives on `updates`; in RA mode re-reads
/// the signers' roots; renews the serving certificate at half its life.
/// Any change of the roots goes to `roots` (and so to every namespace).
#[allow(clippy::too_many_arguments)]
async fn reload_loop(
    shared: Arc<Shared>,
    tls: Arc<TlsState>,
    watched: Option<PathBuf>,
    mut updates: tokio::sync::mpsc::UnboundedReceiver<CaBundle>,
    serving: ServingNames,
    interval: Duration,
    roots: tokio::sync::watch::Sender<String>,
    make_ca: impl Fn(CaBundle) -> Arc<LocalCa>,
) {
    let mut last = watched.as_deref().map(cadir::fingerprint);
    let mut ticker = tokio::time::interval(interval);
    let mut last_ra_error = last_error::LastError::default();
    loop {
        // Whether the CA (and so maybe the roots) changed in this round.
        let mut ca_changed = tokio::select! {
            _ = ticker.tick() => false,
            Some(bundle) = updates.recv() => {
                shared.metrics.observe_ca(&bundle);
                *shared.ca.write().unwrap_or_else(|p| p.into_inner()) = make_ca(bundle);
                tracing::info!("swapped to the rotated CA");
                true
            }
        };
        if let Some(dir) = &watched {
            let now = cadir::fingerprint(dir);
            if last.as_ref() != Some(&now) {
                // Remember this state either way: a broken update is reported
                // once, and the next change (the fix) is tried again.
                last = Some(now);
                match cadir::load(dir, OffsetDateTime::now_utc()) {
                    Ok(bundle) => {
                        shared.metrics.observe_ca(&bundle);
                        *shared.ca.write().unwrap_or_else(|p| p.into_inner()) = make_ca(bundle);
                        tracing::info!(dir = %dir.display(), "reloaded the CA");
                        ca_changed = true;
                    }
                    // Keep serving with the CA we have; a half-written update
                    // usually completes by the next poll.
                    Err(e) => tracing::warn!(
                        error = %format!("{e:#}"),
                        "CA files changed but do not load; keeping the current CA"
                    ),
                }
            }
        }
        let mut roots_changed = ca_changed;
        if let Backend::KubernetesRa(ra) = &shared.backend {
            match ra.reload_roots() {
                Ok(changed) => {
                    if changed {
                        tracing::info!("RA mode: the signers' roots changed; reloaded");
                    }
                    roots_changed |= changed;
                    last_ra_error.clear();
                }
                // Kept: a half-written update usually completes by the next poll.
                Err(e) => {
                    let error = format!("{e:#}");
                    if last_ra_error.is_new(&error) {
                        tracing::warn!(%error, "RA mode: roots do not load; keeping the current ones");
                    }
                }
            }
        }
        if roots_changed {
            roots.send_if_modified(|current| {
                let next = trusted_roots(&shared.ca(), &shared.backend);
                let changed = *current != next;
                *current = next;
                changed
            });
        }
        let renew = ca_changed || tls.needs_renewal(&serving);
        if renew {
            match tls.renew(&shared.ca(), &serving) {
                Ok(()) => tracing::info!("serving certificate renewed"),
                Err(e) => {
                    tracing::error!(error = %format!("{e:#}"), "serving certificate renewal failed")
                }
            }
        }
    }
}

fn monitoring_router(
    istio: Arc<Registry>,
    registry: Arc<Registry>,
    ready: Arc<AtomicBool>,
) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.load(Ordering::SeqCst);
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                    }
                }
            }),
        )
        .route("/metrics", metrics::istio_metrics_route(istio, registry))
}
