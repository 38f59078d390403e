//! Kubernetes Events about CSRs (events.k8s.io/v1, namespace `default`,
//! where cluster-scoped objects' events go) and PodCertificateRequests (in
//! their namespace). Best effort and bounded: a
//! fixed pool of publishers drains a bounded queue; when the apiserver falls
//! behind, events are dropped (counted), never the signing. No per-object
//! cache (kube's Recorder keeps one per object for 6 minutes: ~3 KiB per CSR).

use std::sync::Arc;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::certificates::v1beta1::PodCertificateRequest;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use kube::{Client, Resource};
use meshca_kube::CancellationToken;
use tokio::sync::{Mutex, mpsc};

use crate::metrics::Metrics;

/// Normal or Warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Normal,
    Warning,
}

#[derive(Clone)]
pub struct EventSink {
    tx: mpsc::Sender<Event>,
    controller: String,
    instance: String,
    metrics: Arc<Metrics>,
}

impl EventSink {
    /// Starts `workers` publishers with a queue of `capacity` events.
    pub fn start(
        client: Client,
        controller: &str,
        instance: &str,
        metrics: Arc<Metrics>,
        workers: usize,
        capacity: usize,
        stop: CancellationToken,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<Event>(capacity.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..workers.max(1) {
            let (rx, client) = (rx.clone(), client.clone());
            tokio::spawn(stop.clone().run_until_cancelled_owned(async move {
                loop {
                    let Some(ev) = rx.lock().await.recv().await else {
                        return;
                    };
                    let ns = ev.metadata.namespace.as_deref().unwrap_or("default");
                    let api = Api::<Event>::namespaced(client.clone(), ns);
                    if let Err(e) = api.create(&PostParams::default(), &ev).await {
                        tracing::debug!(error = %e, "publishing an Event");
                    }
                }
            }));
        }
        EventSink {
            tx,
            controller: controller.into(),
            instance: instance.into(),
            metrics,
        }
    }

    /// Queues an Event about `csr`; drops it if the queue is full.
    pub fn publish(&self, csr: &CertificateSigningRequest, kind: Kind, reason: &str, note: String) {
        self.publish_about(csr.object_ref(&()), "default", kind, reason, note);
    }

    /// Queues an Event about a PodCertificateRequest, in its namespace.
    pub fn publish_pcr(&self, pcr: &PodCertificateRequest, kind: Kind, reason: &str, note: String) {
        let ns = pcr
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        self.publish_about(pcr.object_ref(&()), &ns, kind, reason, note);
    }

    fn publish_about(
        &self,
        regarding: ObjectReference,
        namespace: &str,
        kind: Kind,
        reason: &str,
        note: String,
    ) {
        let now = k8s_openapi::jiff::Timestamp::now();
        let name = regarding.name.clone().unwrap_or_default();
        let ev = Event {
            metadata: ObjectMeta {
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                namespace: Some(namespace.into()),
                ..Default::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some("Sign".into()),
            reason: Some(reason.into()),
            note: Some(note),
            regarding: Some(regarding),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            type_: Some(
                match kind {
                    Kind::Normal => "Normal",
                    Kind::Warning => "Warning",
                }
                .into(),
            ),
            ..Default::default()
        };
        if self.tx.try_send(ev).is_err() {
            self.metrics.events_dropped.inc();
        }
    }
}
