//! meshca's Kubernetes CSR signer controller (`meshca signer`).
//!
//! It replaces the seed's "custom CA controller" (signer-ca): istiod in RA
//! mode (`EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API`, `K8S_SIGNER=example.com/foo`)
//! creates `certificates.k8s.io/v1` CSRs, approves them itself, and waits for
//! `status.certificate`; this controller writes it.
//!
//! Data flow, per configured signer name:
//!
//! ```text
//! apiserver --watch (fieldSelector spec.signerName=<name>)--> reflector store
//!   -> kube::runtime::Controller queue (deduplicated, concurrent)
//!   -> controller::reconcile
//!        -> decide::decide(csr, policy, CA, now)          (pure)
//!             skip: other signer / not Approved=True / Denied / Failed / issued
//!             validate_csr (encoding, key, proof of possession)
//!             profile::issue_kubernetes (SAN/subject/usage/TTL policy, CA validity)
//!        -> Issue: status.certificate = leaf + intermediates [+ roots]
//!           Fail:  append condition Failed (reason, message "<code>: <rule>")
//!        -> PUT .../status with the resourceVersion read; 409 -> re-read, decide again
//!        -> Event (Normal CertificateIssued / Warning <reason>), metrics
//!           (an approved CSR with no CA loaded yet: nothing written, retried)
//! CA source (dir polled / Secret watched) -> ca::CaHandle -> every CSR re-examined
//! ca::CaHandle(s) -> trust::keep_published -> Secret external-ca-cert/root-cert.pem
//! lease::Elector: with leader election, only the Lease holder runs the
//!   controllers, the cleaner (cleaner::due, kube-controller-manager's ages,
//!   own signers only) and the trust bundle publisher; a lost lease stops it.
//! ```
//!
//! Memory: the watch cache keeps every CSR of the signer; [`controller::compact`]
//! strips managedFields and, for final CSRs, the request and certificate
//! bytes (about 41 MiB peak RSS at 10,000 CSRs). Events go through a bounded
//! queue ([`events::EventSink`]) and are dropped, never the signing, when the
//! apiserver falls behind.
//!
//! Correctness never depends on being the only replica: every write carries
//! the resourceVersion it was decided on, and the apiserver itself refuses to
//! change a certificate once set.
//!
//! Client-side rate limiting: kube-rs has no client-side limiter (unlike
//! client-go's QPS 5 / burst 10 defaults), so the only throttle is the
//! reconcile concurrency ([`Config::concurrency`]) and the apiserver's own
//! priority and fairness.
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod ca;
pub mod cleaner;
pub mod config;
pub mod controller;
pub mod decide;
pub mod events;
pub use meshca_server::lease;
pub mod manifests;
pub mod metrics;
pub mod trust;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use futures::future::{FutureExt, Shared};
use futures::{StreamExt, channel::oneshot};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::Client;
use kube::api::Api;
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

pub use ca::{CaHandle, CaSource};
pub use cleaner::CleanerConfig;
pub use decide::{Action, SignerPolicy, Skip, decide};
pub use lease::LeaderElection;
pub use trust::TrustBundleTarget;

/// One signer: a name, its policy and its CA.
#[derive(Debug, Clone)]
pub struct SignerConfig {
    pub policy: SignerPolicy,
    pub ca: CaSource,
}

/// Everything the controller runs with.
#[derive(Debug, Clone)]
pub struct Config {
    pub signers: Vec<SignerConfig>,
    /// CSRs reconciled at once, per signer.
    pub concurrency: u16,
    /// How often a CA directory is checked for changes.
    pub ca_poll_interval: Duration,
    /// Publish the roots to this Secret (istiod's `external-ca-cert`).
    pub trust_bundle: Option<TrustBundleTarget>,
    /// `/healthz`, `/readyz`, `/metrics`; `None` serves nothing.
    pub monitoring_listen: Option<SocketAddr>,
    /// Publish a Kubernetes Event per issued or failed CSR.
    pub events: bool,
    /// `reportingInstance` of Events (the pod name).
    pub instance: Option<String>,
    /// Sign only while holding this Lease (`None`: always).
    pub leader_election: Option<LeaderElection>,
    /// Delete this signer's old CSRs (while leading).
    pub cleaner: Option<CleanerConfig>,
}

impl Config {
    pub fn new(signers: Vec<SignerConfig>) -> Self {
        Config {
            signers,
            concurrency: 32,
            ca_poll_interval: Duration::from_secs(5),
            trust_bundle: None,
            monitoring_listen: None,
            events: true,
            instance: None,
            leader_election: None,
            cleaner: None,
        }
    }
}

type ShutdownSignal =
    Shared<futures::future::Map<oneshot::Receiver<()>, fn(Result<(), oneshot::Canceled>)>>;

/// A running controller.
pub struct Running {
    /// Where `/metrics` & co. listen (the actual port if 0 was asked for).
    pub monitoring_addr: Option<SocketAddr>,
    handles: Vec<Arc<CaHandle>>,
    registry: Arc<Registry>,
    shutdown: Option<oneshot::Sender<()>>,
    main: JoinHandle<Result<()>>,
    helpers: Vec<JoinHandle<()>>,
}

impl Running {
    /// Whether every signer has a CA.
    pub fn ready(&self) -> bool {
        self.handles.iter().all(|h| h.get().is_some())
    }

    /// The metrics, in the Prometheus text format.
    pub fn metrics_text(&self) -> String {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// Stops taking new work, lets reconciles in flight finish, releases
    /// the lease, stops.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let result = (&mut self.main).await;
        for h in &self.helpers {
            h.abort();
        }
        result.context("controller task")?
    }

    /// Stops at once, as a crash would (in-flight writes may or may not land).
    pub fn abort(self) {
        drop(self);
    }

    /// Waits until the controller stops: after a shutdown signal, or with an
    /// error when the leader lease is lost.
    pub async fn wait(mut self) -> Result<()> {
        let result = (&mut self.main).await;
        for h in &self.helpers {
            h.abort();
        }
        result.context("controller task")?
    }

    /// Resolves when the controller stops by itself (lease lost: error).
    /// Afterwards [`Running::shutdown`] returns at once.
    pub async fn stopped(&mut self) -> Result<()> {
        let result = (&mut self.main).await;
        self.main = tokio::spawn(async { Ok(()) });
        result.context("controller task")?
    }

    /// Sends the shutdown signal without waiting (see [`Running::wait`]).
    pub fn signal_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// Dropping a [`Running`] stops everything at once (as [`Running::abort`]).
impl Drop for Running {
    fn drop(&mut self) {
        self.main.abort();
        for h in &self.helpers {
            h.abort();
        }
    }
}

/// Starts the controller on `client`. A CA that does not load at start is
/// logged and retried; its signer signs nothing until it loads.
pub async fn start(client: Client, config: Config) -> Result<Running> {
    anyhow::ensure!(!config.signers.is_empty(), "no signer configured");
    let mut registry = Registry::default();
    let metrics = Arc::new(metrics::Metrics::new(&mut registry));
    let registry = Arc::new(registry);
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let drop_result: fn(Result<(), oneshot::Canceled>) = drop;
    let shutdown: ShutdownSignal = shutdown_rx.map(drop_result).shared();
    let mut helpers = Vec::new();
    let events = if config.events {
        let (sink, workers) = events::EventSink::start(
            client.clone(),
            "meshca-signer",
            config.instance.as_deref().unwrap_or("meshca-signer"),
            metrics.clone(),
            8,
            4096,
        );
        helpers.extend(workers);
        Some(sink)
    } else {
        None
    };
    let mut handles = Vec::new();
    let mut parts = Vec::new();
    for signer in &config.signers {
        let name = signer.policy.name.clone();
        let handle = Arc::new(CaHandle::default());
        match ca::load_once(&client, &signer.ca).await {
            Ok(bundle) => {
                tracing::info!(signer = %name, source = %signer.ca, not_after = %bundle.not_after(), "CA loaded");
                ca::install(&handle, &metrics, &name, bundle);
            }
            Err(e) => {
                metrics
                    .ca_load_errors
                    .get_or_create(&metrics::Metrics::label(&name))
                    .inc();
                tracing::error!(signer = %name, error = %format!("{e:#}"), "CA does not load; this signer signs nothing until it does");
            }
        }
        helpers.push(tokio::spawn(ca::keep_current(
            client.clone(),
            signer.ca.clone(),
            handle.clone(),
            metrics.clone(),
            name.clone(),
            config.ca_poll_interval,
        )));

        parts.push(Part {
            api: Api::<CertificateSigningRequest>::all(client.clone()),
            ctx: Arc::new(controller::SignerContext {
                api: Api::<CertificateSigningRequest>::all(client.clone()),
                policy: signer.policy.clone(),
                ca: handle.clone(),
                metrics: metrics.clone(),
                events: events.clone(),
            }),
            changes: handle.subscribe(),
        });
        handles.push(handle);
    }

    let mut monitoring_addr = None;
    if let Some(addr) = config.monitoring_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        monitoring_addr = Some(listener.local_addr()?);
        let app = monitoring_router(registry.clone(), handles.clone());
        helpers.push(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "monitoring server");
            }
        }));
    }

    let main = tokio::spawn(lead_and_run(
        client,
        parts,
        config.concurrency,
        config.leader_election.clone(),
        LeaderWork {
            cleaner: config.cleaner.clone(),
            trust: config
                .trust_bundle
                .clone()
                .map(|target| (target, handles.clone())),
        },
        metrics,
        shutdown,
    ));
    Ok(Running {
        monitoring_addr,
        handles,
        registry,
        shutdown: Some(shutdown_tx),
        main,
        helpers,
    })
}

/// One signer's controller inputs, built before leadership.
struct Part {
    api: Api<CertificateSigningRequest>,
    ctx: Arc<controller::SignerContext>,
    changes: futures::channel::mpsc::UnboundedReceiver<()>,
}

/// What only the leader does besides signing.
struct LeaderWork {
    cleaner: Option<CleanerConfig>,
    /// Publishing the roots (one writer, so replicas with CAs loaded at
    /// slightly different times never flap the Secret).
    trust: Option<(TrustBundleTarget, Vec<Arc<CaHandle>>)>,
}

/// Waits for the lease (if any), then runs the controllers and the cleaner
/// until shutdown (releasing the lease) or until the lease is lost (error).
async fn lead_and_run(
    client: Client,
    parts: Vec<Part>,
    concurrency: u16,
    election: Option<LeaderElection>,
    work: LeaderWork,
    metrics: Arc<metrics::Metrics>,
    shutdown: ShutdownSignal,
) -> Result<()> {
    let mut elector = election.map(|e| lease::Elector::new(client.clone(), e));
    if let Some(el) = elector.as_mut() {
        tokio::select! {
            _ = el.acquire() => {}
            _ = shutdown.clone() => return Ok(()),
        }
    }
    metrics.leader.set(1);
    let names: Vec<String> = parts.iter().map(|p| p.ctx.policy.name.clone()).collect();
    let mut leader_tasks = Vec::new();
    if let Some(cfg) = work.cleaner {
        leader_tasks.push(tokio::spawn(cleaner::run(
            client.clone(),
            names.clone(),
            cfg,
        )));
    }
    if let Some((target, handles)) = work.trust {
        leader_tasks.push(tokio::spawn(trust::keep_published(
            client.clone(),
            target,
            handles,
            Duration::from_secs(30),
        )));
    }
    let mut controllers = Vec::new();
    for part in parts {
        let name = part.ctx.policy.name.clone();
        let wc = watcher::Config::default().fields(&format!("spec.signerName={name}"));
        let (reader, writer) = reflector::store();
        let objects = watcher(part.api, wc)
            .default_backoff()
            .modify(controller::compact)
            .reflect(writer)
            .applied_objects();
        let controller = Controller::for_stream(objects, reader)
            .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
            .reconcile_all_on(part.changes)
            .graceful_shutdown_on(shutdown.clone());
        let store = controller.store();
        let gauge = metrics
            .queue_depth
            .get_or_create(&metrics::Metrics::label(&name))
            .clone();
        let depth_name = name.clone();
        leader_tasks.push(tokio::spawn(async move {
            loop {
                gauge.set(controller::pending(&store, &depth_name));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }));
        controllers.push(
            controller
                .run(controller::reconcile, controller::error_policy, part.ctx)
                .for_each(move |res| {
                    if let Err(e) = res {
                        tracing::debug!(signer = %name, error = %e, "controller");
                    }
                    futures::future::ready(())
                })
                .boxed(),
        );
    }
    let lost = async {
        match elector.as_mut() {
            Some(el) => el.hold().await,
            None => futures::future::pending().await,
        }
    };
    let result = tokio::select! {
        _ = futures::future::join_all(controllers) => Ok(()),
        _ = lost => Err(anyhow::anyhow!("lost the leader lease; stopping so a new leader takes over")),
    };
    metrics.leader.set(0);
    for t in leader_tasks {
        t.abort();
    }
    if result.is_ok()
        && let Some(el) = elector.as_mut()
    {
        el.release().await;
    }
    result
}

fn monitoring_router(registry: Arc<Registry>, handles: Vec<Arc<CaHandle>>) -> axum::Router {
    use axum::http::StatusCode;
    use axum::routing::get;
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = handles.iter().all(|h| h.get().is_some());
                async move {
                    if ready {
                        (StatusCode::OK, "ready")
                    } else {
                        (
                            StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: a signer has no CA",
                        )
                    }
                }
            }),
        )
        .route("/metrics", meshca_server::metrics::metrics_route(registry))
}
