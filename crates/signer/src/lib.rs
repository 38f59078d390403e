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
//! CA source (meshca-ca-store: dir/files polled, Secret watched) -> CurrentCa
//!   (a tokio watch channel) -> every CSR re-examined on change
//! CurrentCa(s) -> trust::keep_published -> Secret external-ca-cert/root-cert.pem
//! PodCertificateRequests (certificates.k8s.io/v1beta1, signers with a
//!   PodCertPolicy): watch (fieldSelector spec.signerName=<name>)
//!   -> pcr_controller::reconcile: GET pod, ServiceAccount, Node (fresh)
//!        -> pcr::decide(request, policy, CA, facts, roots published, now)  (pure)
//!        -> PUT .../status: Issued + chain + notBefore/notAfter/beginRefreshAt,
//!           or Denied/Failed with a stable reason; Event, metrics
//! CurrentCa -> cluster_trust_bundle::keep_published -> ClusterTrustBundle
//!   <signer as :>:roots (new roots in before any pod certificate from them;
//!   retired roots kept for the longest lifetime)
//! lease::Elector: with leader election, only the Lease holder runs the
//!   controllers, the cleaner (cleaner::due, kube-controller-manager's ages,
//!   own signers only) and the trust bundle publishers; a lost lease stops it.
//! ```
//!
//! Memory: the watch cache keeps every CSR of the signer; [`controller::compact`]
//! strips managedFields and, for CSRs not approved yet and final ones, the
//! request, metadata and certificate bytes, so pending CSRs nobody approves
//! cost little (about 41 MiB peak RSS at 10,000 CSRs arriving live).
//! [`controller::trim`] strips every listed CSR, approved ones too, and the
//! reconciler reads such a CSR again before signing it, so a backlog
//! present at start is not held whole (51 MiB peak at 10,000, from 72). Events go through a bounded
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
pub mod cluster_trust_bundle;
pub mod config;
pub mod controller;
pub mod decide;
pub mod events;
mod leader;
pub mod metrics;
pub mod pcr;
pub mod pcr_controller;
#[cfg(test)]
mod test_keys;
pub mod trust;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::Client;
use kube::api::Api;
use meshca_ca_store::CurrentCa;
use meshca_kube::{CancellationToken, monitoring};
use prometheus_client::registry::Registry;
use tokio::task::JoinHandle;

use crate::leader::{BundleWork, LeaderWork, Part, lead_and_run};

pub use cleaner::CleanerConfig;
pub use decide::{Action, SignerPolicy, Skip, decide};
pub use meshca_ca_store::CaSource;
pub use meshca_kube::LeaderElection;
pub use pcr::PodCertPolicy;
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
    /// Publish each signer's roots as ClusterTrustBundle
    /// `<signer with / as :>:roots` (while leading); pod certificates then
    /// wait until their CA's roots are in it.
    pub cluster_trust_bundles: bool,
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
            cluster_trust_bundles: false,
        }
    }
}

/// A running controller.
pub struct Running {
    /// Where `/metrics` & co. listen (the actual port if 0 was asked for).
    pub monitoring_addr: Option<SocketAddr>,
    cas: Vec<CurrentCa>,
    registry: Arc<Registry>,
    /// Graceful stop: no new work, reconciles in flight finish, lease released.
    shutdown: CancellationToken,
    /// Everything else (CA polling, events, monitoring), stopped when this ends.
    helpers: CancellationToken,
    main: JoinHandle<Result<()>>,
}

impl Running {
    /// Whether every signer has a CA.
    pub fn ready(&self) -> bool {
        self.cas.iter().all(|ca| ca.borrow().is_some())
    }

    /// The metrics, as `/metrics` serves them.
    pub fn metrics_text(&self) -> String {
        monitoring::encode(None, &self.registry).unwrap_or_default()
    }

    /// Stops taking new work, lets reconciles in flight finish, releases
    /// the lease, stops.
    pub async fn shutdown(mut self) -> Result<()> {
        self.shutdown.cancel();
        self.wait_main().await
    }

    /// Stops at once, as a crash would (in-flight writes may or may not land).
    pub fn abort(self) {
        drop(self);
    }

    /// Waits until the controller stops: after a shutdown signal, or with an
    /// error when the leader lease is lost.
    pub async fn wait(mut self) -> Result<()> {
        self.wait_main().await
    }

    async fn wait_main(&mut self) -> Result<()> {
        let result = (&mut self.main).await;
        self.helpers.cancel();
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
        self.shutdown.cancel();
    }
}

/// Dropping a [`Running`] stops everything at once (as [`Running::abort`]).
impl Drop for Running {
    fn drop(&mut self) {
        self.main.abort();
        self.helpers.cancel();
    }
}

/// Events published at once: the apiserver takes each in about a millisecond.
const EVENT_PUBLISHERS: usize = 8;
/// Events waiting to be published. Events are best effort (dropped and
/// counted when the queue is full); each waiting one costs about 1 KiB, and a
/// backlog drain fills the queue (the signer outpaces the apiserver), so the
/// bound is memory: 1024 kept the signer under 50 MiB with 10,000 approved
/// CSRs at start, where 4096 did not (BENCHMARKS.md, Scale, axis 3).
const EVENT_QUEUE: usize = 1024;

/// Starts the controller on `client`. A CA that does not load at start is
/// logged and retried; its signer signs nothing until it loads.
pub async fn start(client: Client, config: Config) -> Result<Running> {
    anyhow::ensure!(!config.signers.is_empty(), "no signer configured");
    let mut registry = Registry::default();
    let metrics = Arc::new(metrics::Metrics::new(&mut registry));
    let registry = Arc::new(registry);
    let shutdown = CancellationToken::new();
    let helpers = CancellationToken::new();
    let events = if config.events {
        let sink = events::EventSink::start(
            client.clone(),
            "meshca-signer",
            config.instance.as_deref().unwrap_or("meshca-signer"),
            metrics.clone(),
            EVENT_PUBLISHERS,
            EVENT_QUEUE,
            helpers.clone(),
        );
        Some(sink)
    } else {
        None
    };
    let mut cas = Vec::new();
    let mut parts = Vec::new();
    let mut pcr_parts = Vec::new();
    let mut bundles = Vec::new();
    for signer in &config.signers {
        let name = signer.policy.name.clone();
        let ca = ca::start(
            &client,
            &name,
            &signer.ca,
            config.ca_poll_interval,
            metrics.clone(),
            helpers.clone(),
        )
        .await;
        parts.push(Part {
            api: Api::<CertificateSigningRequest>::all(client.clone()),
            ctx: Arc::new(controller::SignerContext {
                api: Api::<CertificateSigningRequest>::all(client.clone()),
                policy: signer.policy.clone(),
                ca: ca.clone(),
                metrics: metrics.clone(),
                events: events.clone(),
            }),
        });
        let published = if config.cluster_trust_bundles {
            let (tx, rx) = tokio::sync::watch::channel(Arc::default());
            let pcr_ttl = signer
                .policy
                .pod_certificates
                .as_ref()
                .map_or(Duration::ZERO, |p| p.max_ttl);
            bundles.push(BundleWork {
                signer: name.clone(),
                ca: ca.clone(),
                retain: signer.policy.profile.max_ttl.max(pcr_ttl),
                published: tx,
            });
            Some(rx)
        } else {
            None
        };
        if let Some(policy) = &signer.policy.pod_certificates {
            pcr_parts.push(Arc::new(pcr_controller::PcrContext {
                client: client.clone(),
                signer: name.clone(),
                policy: policy.clone(),
                ca: ca.clone(),
                published,
                metrics: metrics.clone(),
                events: events.clone(),
            }));
        }
        cas.push(ca);
    }

    let mut monitoring_addr = None;
    if let Some(addr) = config.monitoring_listen {
        let watched = cas.clone();
        let readiness: monitoring::Readiness = Arc::new(move || {
            if watched.iter().all(|ca| ca.borrow().is_some()) {
                Ok(())
            } else {
                Err("a signer has no CA".into())
            }
        });
        let app = monitoring::router(monitoring::Registries::one(registry.clone()), readiness);
        monitoring_addr = Some(monitoring::serve(addr, app, helpers.clone()).await?);
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
                .map(|target| (target, cas.clone())),
            bundles,
            pod_certificates: pcr_parts,
        },
        metrics,
        shutdown.clone(),
    ));
    Ok(Running {
        monitoring_addr,
        cas,
        registry,
        shutdown,
        helpers,
        main,
    })
}
