//! Requests waiting for the signer, answered from one shared watch.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use meshca_kube::LastError;
use tokio::sync::oneshot;

use super::RaError;
use super::csr::{MANAGED_BY, final_outcome};
use super::deletions::Deletions;
use super::orphans::{self, Orphans};

pub(super) type Outcome = Result<Vec<u8>, RaError>;

/// One waiting request: the UID of its CSR, and where its answer goes.
struct Waiter {
    uid: String,
    tx: oneshot::Sender<Outcome>,
}

/// Requests waiting for the signer, by CSR name. One watch on all of this
/// server's CSRs (by label) feeds them, instead of a watch (and so, kube-rs
/// speaking HTTP/1.1, a connection) per request. An answer is taken only
/// from the object with the request's UID: a namesake (ours deleted, the
/// name reused) ends the wait with `Replaced`, never with its certificate.
#[derive(Default)]
pub(super) struct Waiters(std::sync::Mutex<HashMap<String, Waiter>>);

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waiter>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the final state of CSR `name` with `uid`; registered
    /// before the approval, so no answer of the signer can come before it.
    pub(super) fn register(
        self: &Arc<Self>,
        name: &str,
        uid: &str,
    ) -> (Registered, oneshot::Receiver<Outcome>) {
        let (tx, rx) = oneshot::channel();
        let waiter = Waiter {
            uid: uid.to_owned(),
            tx,
        };
        self.lock().insert(name.to_owned(), waiter);
        let registered = Registered {
            waiters: self.clone(),
            name: name.to_owned(),
        };
        (registered, rx)
    }

    pub(super) fn seen(&self, csr: &CertificateSigningRequest) {
        let name = csr.metadata.name.as_deref().unwrap_or_default();
        let mut waiters = self.lock();
        let Some(waiter) = waiters.get(name) else {
            return;
        };
        let outcome = if csr.metadata.uid.as_deref() != Some(waiter.uid.as_str()) {
            Err(RaError::Replaced(name.to_owned()))
        } else {
            match final_outcome(csr) {
                Ok(None) => return,
                Ok(Some(chain)) => Ok(chain),
                Err(e) => Err(e),
            }
        };
        if let Some(waiter) = waiters.remove(name) {
            let _ = waiter.tx.send(outcome);
        }
    }

    /// Whether a request of this process waits for CSR `name` with `uid`.
    pub(super) fn waits_for(&self, name: &str, uid: &str) -> bool {
        self.lock().get(name).is_some_and(|w| w.uid == uid)
    }

    pub(super) fn deleted(&self, csr: &CertificateSigningRequest) {
        let name = csr.metadata.name.as_deref().unwrap_or_default();
        let mut waiters = self.lock();
        let Some(waiter) = waiters.get(name) else {
            return;
        };
        let outcome = if csr.metadata.uid.as_deref() == Some(waiter.uid.as_str()) {
            RaError::Deleted
        } else {
            RaError::Replaced(name.to_owned())
        };
        if let Some(waiter) = waiters.remove(name) {
            let _ = waiter.tx.send(Err(outcome));
        }
    }
}

/// Unregisters when the request ends, answered or not (timeout, caller gone).
pub(super) struct Registered {
    waiters: Arc<Waiters>,
    name: String,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.waiters.lock().remove(&self.name);
    }
}

/// The shared watch; restarts (re-listing) after errors, so an answer
/// missed while disconnected arrives with the next list. It also finds our
/// CSRs no request waits for ([`Orphans`]) and deletes them after `grace`.
pub(super) async fn watch_csrs(
    api: Api<CertificateSigningRequest>,
    waiters: Arc<Waiters>,
    deletions: Arc<Deletions>,
    grace: Duration,
) {
    let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    let mut events = watcher(api, watcher::Config::default().labels(&selector))
        .backoff(meshca_kube::WatchBackoff::default())
        .boxed();
    let mut last_error = LastError::default();
    let mut orphans = Orphans::default();
    let mut check = tokio::time::interval(orphans::check_every(grace));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            event = events.next() => match event {
                Some(event) => event,
                None => return,
            },
            _ = check.tick() => {
                let due = orphans.take_due(Instant::now(), grace, |name, uid| waiters.waits_for(name, uid));
                for (name, uid) in due {
                    tracing::info!(csr = %name, "RA mode: deleting a CSR of ours that no request waits for (created after its request gave up, or left by a stopped server)");
                    let deletions = deletions.clone();
                    tokio::spawn(async move { deletions.delete(&name, &uid).await });
                }
                continue;
            }
        };
        match event {
            Ok(watcher::Event::Apply(csr) | watcher::Event::InitApply(csr)) => {
                waiters.seen(&csr);
                if let (Some(name), Some(uid)) = (&csr.metadata.name, &csr.metadata.uid) {
                    orphans.seen(name, uid, Instant::now());
                }
            }
            Ok(watcher::Event::Delete(csr)) => {
                waiters.deleted(&csr);
                orphans.deleted(csr.metadata.name.as_deref().unwrap_or_default());
            }
            Ok(watcher::Event::Init) => orphans.relist_started(),
            Ok(watcher::Event::InitDone) => {
                orphans.relist_done();
                last_error.clear();
            }
            Err(e) => {
                if last_error.is_new(&e) {
                    tracing::warn!(error = %e, "RA mode: watching our CSRs failed; retrying");
                }
            }
        }
    }
}
