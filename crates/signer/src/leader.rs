//! What this replica runs while it holds the signer's Lease: the CSR and
//! PodCertificateRequest controllers, the cleaner, and the trust bundle
//! publishers (one writer each, so replicas never flap them).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use futures::{FutureExt, StreamExt, TryStreamExt};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::certificates::v1beta1::PodCertificateRequest;
use kube::Client;
use kube::api::Api;
use kube::runtime::{Controller, WatchStreamExt, reflector, watcher};
use meshca_ca_store::CurrentCa;
use meshca_kube::{CancellationToken, LeaderElection, lease};

use crate::{
    CleanerConfig, TrustBundleTarget, cleaner, cluster_trust_bundle, controller, metrics,
    pcr_controller, trust,
};

/// One signer's controller inputs, built before leadership.
pub(crate) struct Part {
    pub(crate) api: Api<CertificateSigningRequest>,
    pub(crate) ctx: Arc<controller::SignerContext>,
}

/// What only the leader does besides signing.
pub(crate) struct LeaderWork {
    pub(crate) cleaner: Option<CleanerConfig>,
    /// Publishing the roots (one writer, so replicas with CAs loaded at
    /// slightly different times never flap the Secret).
    pub(crate) trust: Option<(TrustBundleTarget, Vec<CurrentCa>)>,
    /// Each signer's ClusterTrustBundle.
    pub(crate) bundles: Vec<BundleWork>,
    /// The PodCertificateRequest controllers (signers with a PodCertPolicy).
    pub(crate) pod_certificates: Vec<Arc<pcr_controller::PcrContext>>,
}

/// One signer's ClusterTrustBundle publisher inputs.
pub(crate) struct BundleWork {
    pub(crate) signer: String,
    pub(crate) ca: CurrentCa,
    /// How long a rotated-away root stays (the longest certificate lifetime).
    pub(crate) retain: Duration,
    pub(crate) published: tokio::sync::watch::Sender<Arc<std::collections::BTreeSet<Vec<u8>>>>,
}

/// Waits for the lease (if any), then runs the controllers and the cleaner
/// until shutdown (releasing the lease) or until the lease is lost (error).
pub(crate) async fn lead_and_run(
    client: Client,
    parts: Vec<Part>,
    concurrency: u16,
    election: Option<LeaderElection>,
    work: LeaderWork,
    metrics: Arc<metrics::Metrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    let mut elector = election.map(|e| lease::Elector::new(client.clone(), e));
    if let Some(el) = elector.as_mut() {
        tokio::select! {
            _ = el.acquire() => {}
            _ = shutdown.cancelled() => return Ok(()),
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
    if let Some((target, cas)) = work.trust {
        leader_tasks.push(tokio::spawn(trust::keep_published(
            client.clone(),
            target,
            cas,
            Duration::from_secs(30),
        )));
    }
    for b in work.bundles {
        leader_tasks.push(tokio::spawn(cluster_trust_bundle::keep_published(
            client.clone(),
            b.signer,
            b.ca,
            b.retain,
            b.published,
            metrics.clone(),
            Duration::from_secs(30),
        )));
    }
    let mut controllers = Vec::new();
    for ctx in work.pod_certificates {
        let name = ctx.signer.clone();
        let wc = watcher::Config::default().fields(&format!("spec.signerName={name}"));
        let api = Api::<PodCertificateRequest>::all(client.clone());
        let (reader, writer) = reflector::store();
        let objects = watcher(api, wc)
            .backoff(meshca_kube::WatchBackoff::default())
            .modify(pcr_controller::compact)
            .reflect(writer)
            .applied_objects();
        let mut controller = Controller::for_stream(objects, reader)
            .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
            .reconcile_all_on(meshca_ca_store::changes(&ctx.ca))
            .graceful_shutdown_on(shutdown.clone().cancelled_owned());
        if let Some(published) = ctx.published.clone() {
            // New roots in the bundle release the requests that waited for them.
            controller = controller.reconcile_all_on(futures::stream::unfold(
                published,
                |mut rx| async move {
                    rx.changed().await.ok()?;
                    Some(((), rx))
                },
            ));
        }
        controllers.push(
            controller
                .run(pcr_controller::reconcile, pcr_controller::error_policy, ctx)
                .for_each(move |res| {
                    if let Err(e) = res {
                        tracing::debug!(signer = %name, error = %e, "pod certificate controller");
                    }
                    futures::future::ready(())
                })
                .boxed(),
        );
    }
    for part in parts {
        let name = part.ctx.policy.name.clone();
        let wc = watcher::Config::default().fields(&format!("spec.signerName={name}"));
        let (reader, writer) = reflector::store();
        let objects = watcher(part.api, wc)
            // Requests wait on this watch: back soon after an outage.
            .backoff(meshca_kube::WatchBackoff::default())
            .map_ok(controller::trim)
            .reflect(writer)
            .applied_objects();
        let controller = Controller::for_stream(objects, reader)
            .with_config(kube::runtime::controller::Config::default().concurrency(concurrency))
            .reconcile_all_on(meshca_ca_store::changes(&part.ctx.ca))
            .graceful_shutdown_on(shutdown.clone().cancelled_owned());
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
