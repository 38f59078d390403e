//! Requests waiting for the signer, answered from one shared watch.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use meshca_kube::LastError;
use tokio::sync::oneshot;

use super::RaError;
use super::csr::{MANAGED_BY, final_outcome};

pub(super) type Outcome = Result<Vec<u8>, RaError>;

/// Requests waiting for the signer, by CSR name. One watch on all of this
/// server's CSRs (by label) feeds them, instead of a watch (and so, kube-rs
/// speaking HTTP/1.1, a connection) per request.
#[derive(Default)]
pub(super) struct Waiters(std::sync::Mutex<HashMap<String, oneshot::Sender<Outcome>>>);

impl Waiters {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, oneshot::Sender<Outcome>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for `name`'s final state; registered before the approval, so
    /// no answer of the signer can come before it.
    pub(super) fn register(
        self: &Arc<Self>,
        name: &str,
    ) -> (Registered, oneshot::Receiver<Outcome>) {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(name.to_owned(), tx);
        let registered = Registered {
            waiters: self.clone(),
            name: name.to_owned(),
        };
        (registered, rx)
    }

    fn seen(&self, csr: &CertificateSigningRequest) {
        let name = csr.metadata.name.as_deref().unwrap_or_default();
        let mut waiters = self.lock();
        if !waiters.contains_key(name) {
            return;
        }
        let outcome = match final_outcome(csr) {
            Ok(None) => return,
            Ok(Some(chain)) => Ok(chain),
            Err(e) => Err(e),
        };
        if let Some(tx) = waiters.remove(name) {
            let _ = tx.send(outcome);
        }
    }

    fn deleted(&self, csr: &CertificateSigningRequest) {
        let name = csr.metadata.name.as_deref().unwrap_or_default();
        if let Some(tx) = self.lock().remove(name) {
            let _ = tx.send(Err(RaError::Deleted));
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
/// missed while disconnected arrives with the next list.
pub(super) async fn watch_csrs(api: Api<CertificateSigningRequest>, waiters: Arc<Waiters>) {
    let selector = format!("{}={}", MANAGED_BY.0, MANAGED_BY.1);
    let mut events = watcher(api, watcher::Config::default().labels(&selector))
        .default_backoff()
        .boxed();
    let mut last_error = LastError::default();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(csr) | watcher::Event::InitApply(csr)) => waiters.seen(&csr),
            Ok(watcher::Event::Delete(csr)) => waiters.deleted(&csr),
            Ok(watcher::Event::Init | watcher::Event::InitDone) => last_error.clear(),
            Err(e) => {
                if last_error.is_new(&e) {
                    tracing::warn!(error = %e, "RA mode: watching our CSRs failed; retrying");
                }
            }
        }
    }
}
