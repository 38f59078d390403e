//! Keeps what follows from the CA current: on every CA change (plugged-in
//! files reloaded, or the root rotated) the metrics, the serving certificate
//! and the published roots; every interval the RA signers' roots files
//! (re-read, so a signer's root rotation needs no restart) and the serving
//! certificate's renewal at half its life.

use std::sync::Arc;
use std::time::Duration;

use meshca_ca_store::CurrentCa;
use meshca_kube::LastError;
use meshca_pki::WorkloadProfile;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::auth::ClientCertIssuers;
use crate::backend::local::current_ca;
use crate::backend::ra::KubernetesRa;
use crate::distribution::configmap::merge_roots;
use crate::grpc::tls::{ServingNames, TlsState};
use crate::metrics::Metrics;

/// What the reload loop keeps current.
pub struct Reloader {
    pub ca: CurrentCa,
    pub profile: WorkloadProfile,
    pub ra: Option<Arc<KubernetesRa>>,
    pub tls: Arc<TlsState>,
    /// Whose leaves authenticate as client certificates: follows the CA,
    /// keeping the signing certificates it rotates from.
    pub client_certs: Arc<ClientCertIssuers>,
    pub serving: ServingNames,
    pub metrics: Arc<Metrics>,
    pub interval: Duration,
    /// Every root workloads must trust, PEM (to the distribution).
    pub roots: watch::Sender<String>,
}

impl Reloader {
    /// What workloads trust: the local roots (they sign the serving
    /// certificate) and, in RA mode, the signers' roots.
    pub fn trusted_roots(ca: &CurrentCa, ra: Option<&KubernetesRa>) -> String {
        let local = ca
            .borrow()
            .as_ref()
            .map(|b| b.roots_pem().to_owned())
            .unwrap_or_default();
        match ra {
            Some(ra) => merge_roots(&[&local, &ra.all_roots_pem()]),
            None => merge_roots(&[&local]),
        }
    }

    pub async fn run(mut self, stop: CancellationToken) {
        let mut ticker = tokio::time::interval(self.interval);
        let mut last_ra_error = LastError::default();
        let mut ca_open = true;
        loop {
            let ca_changed = tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticker.tick() => false,
                changed = self.ca.changed(), if ca_open => {
                    // The CA's source ended (a fixed CA): only the ticker is left.
                    ca_open = changed.is_ok();
                    ca_open
                }
            };
            if ca_changed && let Some(bundle) = self.ca.borrow_and_update().clone() {
                self.metrics.observe_ca(&bundle);
                self.client_certs
                    .rotate(&bundle, time::OffsetDateTime::now_utc());
                tracing::info!(not_after = %bundle.not_after(), "serving with the new CA");
            }
            let mut roots_changed = ca_changed;
            if let Some(ra) = &self.ra {
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
                let next = Self::trusted_roots(&self.ca, self.ra.as_deref());
                self.roots.send_if_modified(|current| {
                    let changed = *current != next;
                    *current = next;
                    changed
                });
            }
            if ca_changed || self.tls.needs_renewal(&self.serving) {
                match self
                    .tls
                    .renew(&current_ca(&self.ca, &self.profile), &self.serving)
                {
                    Ok(()) => tracing::info!("serving certificate renewed"),
                    Err(e) => {
                        tracing::error!(error = %format!("{e:#}"), "serving certificate renewal failed")
                    }
                }
            }
        }
    }
}
