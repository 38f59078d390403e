//! Wiring: [`Server::build`] opens the CA and builds every part from a
//! [`ServerConfig`]; [`Server::serve`] runs them until the shutdown token
//! is cancelled, then lets in-flight requests finish.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use meshca_ca_store::dir::ROOT_CERT;
use meshca_kube::{ApiLimit, CancellationToken, monitoring};
use meshca_proto::istio_certificate_service_server::IstioCertificateServiceServer;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::ServerConfig;
use crate::auth::impersonation::{Impersonation, PodStore};
use crate::auth::jwt::JwtVerifier;
use crate::auth::local_issuer::{LOCAL_ISSUER, local_issuer};
use crate::auth::{Authenticator, ClientCertIssuers, TokenCache, TokenReviewer};
use crate::backend::Backend;
use crate::backend::local::{LocalBackend, current_ca};
use crate::backend::ra::KubernetesRa;
use crate::ca::reload::Reloader;
use crate::ca::{self, CaOrigin};
use crate::distribution::{self, spiffe_bundle};
use crate::grpc::body_first::BodyFirstLayer;
use crate::grpc::service::CaService;
use crate::grpc::tls::{self, TlsState};
use crate::metrics::Metrics;

/// Paths a standalone user needs.
pub struct Started {
    pub root_cert: PathBuf,
    pub local_token_issuer: bool,
}

/// A server ready to serve: CA open, listeners bound.
pub struct Server {
    config: ServerConfig,
    origin: CaOrigin,
    service: CaService,
    reloader: Reloader,
    roots: watch::Receiver<String>,
    tls: Arc<TlsState>,
    pods: Option<PodStore>,
    listener: tokio::net::TcpListener,
    spiffe_bundle: Option<spiffe_bundle::Endpoint>,
    registry: Arc<Registry>,
    _ca_tasks: tokio_util::sync::DropGuard,
}

impl Server {
    /// Opens the CA, builds the authenticators and the backend, binds :15012.
    pub async fn build(config: ServerConfig) -> Result<Server> {
        // Stops the CA's polling and rotation with the server.
        let ca_tasks = CancellationToken::new();
        let opened = ca::open(&config, &ca_tasks).await?;
        let mut registry = Registry::default();
        let metrics = Arc::new(Metrics::new(&mut registry));
        if let Some(bundle) = opened.current.borrow().as_ref() {
            metrics.observe_ca(bundle);
        }
        let api_limit = ApiLimit::new(config.kube_api_concurrency)
            .with_permit_wait(config.limits.api_permit_wait);
        let client_certs = Arc::new(ClientCertIssuers::new(
            opened.current.borrow().as_deref(),
            config.workload.max_ttl,
        ));
        let auth = authenticator(&config, &api_limit, client_certs.clone())?;
        let ra = match &config.ra {
            None => None,
            Some(ra_config) => {
                let client = config.kube.clone().context(
                    "RA mode (EXTERNAL_CA) needs a Kubernetes client (kubeconfig or in-cluster)",
                )?;
                let ra = KubernetesRa::new(client, ra_config.clone(), api_limit.clone())?;
                tracing::info!(
                    signer = ?ra_config.signer,
                    signer_domain = ?ra_config.signer_domain,
                    roots = %ra_config.roots_file.display(),
                    timeout = ?ra_config.timeout,
                    "RA mode: workload certificates come from the Kubernetes CSR API"
                );
                Some(Arc::new(ra))
            }
        };
        let backend: Arc<dyn Backend> = match &ra {
            Some(ra) => ra.clone(),
            None => Arc::new(LocalBackend::new(
                opened.current.clone(),
                config.workload.clone(),
            )),
        };
        let tls = Arc::new(TlsState::new(
            &current_ca(&opened.current, &config.workload),
            &config.serving,
            client_certs.clone(),
        )?);
        let pods = match &config.kube {
            Some(client) if !config.trusted_node_accounts.is_empty() => {
                Some(PodStore::start(client.clone(), auth.cache.pod_deletions()))
            }
            _ => None,
        };
        let impersonation = pods.as_ref().map(|pods| Impersonation {
            trusted: config.trusted_node_accounts.clone(),
            pods: pods.clone(),
        });
        let (roots_tx, roots) =
            watch::channel(Reloader::trusted_roots(&opened.current, ra.as_deref()));
        let reloader = Reloader {
            ca: opened.current,
            profile: config.workload.clone(),
            ra,
            tls: tls.clone(),
            client_certs,
            serving: config.serving.clone(),
            metrics: metrics.clone(),
            interval: config.reload_interval,
            roots: roots_tx,
        };
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let spiffe_bundle = match &config.spiffe_bundle {
            Some(cfg) => Some(spiffe_bundle::Endpoint::bind(cfg.clone()).await?),
            None => None,
        };
        Ok(Server {
            service: CaService {
                backend,
                auth,
                metrics,
                impersonation,
            },
            origin: opened.origin,
            reloader,
            roots,
            tls,
            pods,
            listener,
            spiffe_bundle,
            registry: Arc::new(registry),
            config,
            _ca_tasks: ca_tasks.drop_guard(),
        })
    }

    /// Where :15012 listens (the real port when 0 was asked for).
    pub fn local_addr(&self) -> Result<std::net::SocketAddr> {
        Ok(self.listener.local_addr()?)
    }

    /// Where the SPIFFE bundle endpoint listens, if it is on.
    pub fn spiffe_bundle_addr(&self) -> Option<std::net::SocketAddr> {
        self.spiffe_bundle.as_ref()?.local_addr().ok()
    }

    /// What a standalone user needs to know.
    pub fn started(&self) -> Started {
        Started {
            root_cert: self.origin.dir().join(ROOT_CERT),
            local_token_issuer: self.config.local_token_issuer,
        }
    }

    /// Serves until `shutdown` is cancelled, then lets in-flight requests
    /// finish and hands the distribution lease over.
    pub async fn serve(self, shutdown: CancellationToken) -> Result<()> {
        let Server {
            config,
            origin,
            service,
            reloader,
            roots,
            tls,
            pods,
            listener,
            spiffe_bundle,
            registry,
            _ca_tasks,
        } = self;
        // Background work (monitoring, reload, distribution) stops after
        // the gRPC server has drained, however serving ends.
        let background = CancellationToken::new();
        let _stop_background = background.clone().drop_guard();
        let ready = Arc::new(AtomicBool::new(false));
        if let Some(addr) = config.monitoring_listen {
            let ready = ready.clone();
            let readiness: monitoring::Readiness = Arc::new(move || {
                if ready.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err("starting or stopping".into())
                }
            });
            monitoring::serve(
                addr,
                monitoring::router(
                    monitoring::Registries {
                        as_named: Some(service.metrics.istio_registry()),
                        registry,
                    },
                    readiness,
                ),
                background.clone(),
            )
            .await?;
        }
        if let Some(endpoint) = spiffe_bundle {
            tokio::spawn(endpoint.serve(roots.clone(), background.clone()));
        }
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
                    roots,
                    d.clone(),
                    background.clone(),
                )))
            }
            _ => None,
        };
        tokio::spawn(reloader.run(background.clone()));
        // Ready once the pods for impersonation are listed (if watched).
        tokio::spawn({
            let ready = ready.clone();
            async move {
                if let Some(pods) = pods {
                    pods.wait_synced().await;
                }
                ready.store(true, Ordering::SeqCst);
            }
        });
        let service = IstioCertificateServiceServer::new(service)
            .max_decoding_message_size(config.max_message_bytes);
        tracing::info!(listen = %config.listen, ca = %origin.dir().display(), "meshca CA server ready");
        let limits = &config.limits;
        tonic::transport::Server::builder()
            .max_concurrent_streams(limits.max_streams_per_connection)
            .max_frame_size(limits.max_frame_bytes)
            .http2_max_header_list_size(limits.max_header_list_bytes)
            .timeout(limits.request_timeout)
            .http2_keepalive_interval(Some(limits.keepalive_interval))
            .http2_keepalive_timeout(Some(limits.keepalive_timeout))
            .max_connection_age(limits.max_connection_age)
            .max_connection_age_grace(limits.max_connection_age_grace)
            .layer(BodyFirstLayer {
                // One message and its gRPC frame header.
                limit: config.max_message_bytes.saturating_add(5),
            })
            .add_service(service)
            .serve_with_incoming_shutdown(
                tls::incoming(listener, tls, limits),
                shutdown.clone().cancelled_owned(),
            )
            .await
            .context("gRPC server")?;
        ready.store(false, Ordering::SeqCst);
        if let Some(task) = distribution {
            // Hand the lease over rather than make a standby wait it out.
            background.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        }
        tracing::info!("meshca CA server stopped");
        Ok(())
    }
}

/// Istio's authenticators from the configuration: TokenReview with a
/// cluster, JWT keys (a file, or the local issuer of standalone mode).
fn authenticator(
    config: &ServerConfig,
    api_limit: &ApiLimit,
    client_certs: Arc<ClientCertIssuers>,
) -> Result<Authenticator> {
    // Each key file with its own issuer: --jwt-keys with --jwt-issuer, the
    // local key with the local issuer.
    // A key is trusted for one issuer only, never for any `iss`.
    let mut sources: Vec<(Vec<u8>, String)> = Vec::new();
    if let Some(path) = &config.jwt_keys {
        let issuer = config
            .jwt_issuer
            .clone()
            .filter(|i| !i.is_empty())
            .context("--jwt-keys needs --jwt-issuer (MESHCA_JWT_ISSUER): the `iss` its tokens must carry")?;
        let keys = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        sources.push((keys, issuer));
    }
    if config.local_token_issuer {
        let pem = local_issuer(&config.state_dir, true)?.public_key_pem();
        sources.push((pem.into_bytes(), LOCAL_ISSUER.into()));
    }
    let jwt = if sources.is_empty() {
        None
    } else {
        let sources: Vec<(&[u8], &str)> = sources
            .iter()
            .map(|(keys, issuer)| (keys.as_slice(), issuer.as_str()))
            .collect();
        Some(JwtVerifier::from_sources(
            &sources,
            &config.token_audiences,
        )?)
    };
    Ok(Authenticator {
        trust_domain: config.trust_domain.clone(),
        client_certs,
        cluster_id: config.cluster_id.clone(),
        cluster_aliases: config.cluster_aliases.clone(),
        token_review: config.kube.clone().map(|c| {
            // Its own bound inside the shared one: a flood of bad tokens
            // takes at most these slots and waits no longer for them. A
            // TokenReview is a new request's first call: it waits behind the
            // calls of admitted requests.
            let wait = config.limits.token_review_wait;
            let reviews = ApiLimit::new(config.limits.max_token_reviews).with_permit_wait(wait);
            TokenReviewer::new(
                c,
                config.token_audiences.clone(),
                api_limit.first_calls().with_permit_wait(wait),
                reviews,
            )
        }),
        jwt,
        cache: TokenCache::new(config.token_cache_ttl, config.token_cache_size),
    })
}
