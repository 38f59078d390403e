//! Deleting this server's CSRs after each answer, and again later when the
//! API could not take the deletion (down, restarting, without its storage,
//! or just restarted and still refusing with empty RBAC caches): an outage
//! must leave no CSR behind (measured: 9 left after an apiserver restart
//! before the retry). One retry loop at most, with a bounded backlog.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, DeleteParams, Preconditions};
use meshca_kube::{ApiLimit, status};

/// CSRs waiting for a retry at most; beyond it a CSR is left to the
/// signer's (or kube-controller-manager's) cleaner, with a warning.
const MAX_BACKLOG: usize = 10_000;
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// As the watches (`meshca_kube::WatchBackoff`): soon after an outage.
const LONGEST_RETRY: Duration = Duration::from_secs(5);

pub(super) struct Deletions {
    api: Api<CertificateSigningRequest>,
    limit: ApiLimit,
    /// Deletions the API did not answer: name -> UID.
    backlog: std::sync::Mutex<HashMap<String, String>>,
    retrying: AtomicBool,
    first_retry: Duration,
}

impl Deletions {
    pub(super) fn new(api: Api<CertificateSigningRequest>, limit: ApiLimit) -> Self {
        Deletions {
            api,
            limit,
            backlog: Default::default(),
            retrying: AtomicBool::new(false),
            first_retry: FIRST_RETRY,
        }
    }

    fn backlog(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.backlog.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// CSRs waiting for a retry.
    pub(super) fn pending(&self) -> usize {
        self.backlog().len()
    }

    /// Deletes our CSR `name` (only the object with `uid`); if the API gave
    /// no answer, again later until it does.
    pub(super) async fn delete(self: &Arc<Self>, name: &str, uid: &str) {
        if !self.try_delete(name, uid).await {
            self.retry_later(name, uid);
        }
    }

    /// `false` when the API gave no answer: worth a retry.
    async fn try_delete(&self, name: &str, uid: &str) -> bool {
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(uid.to_owned()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match self.limit.call(self.api.delete(name, &dp)).await {
            Ok(_) => true,
            Err(e) if status::is_not_found(&e) => true,
            // The UID precondition failed: the name is another object's now.
            Err(e) if status::is_conflict(&e) => {
                tracing::debug!(csr = %name, "our CSR is gone; another object has its name");
                true
            }
            // Anything else is retried: besides an API that is away, a
            // just restarted apiserver forbids everything for a moment
            // (its RBAC caches are still empty).
            Err(e) => {
                tracing::debug!(csr = %name, error = %e, "deleting the CSR failed; retrying later");
                false
            }
        }
    }

    fn retry_later(self: &Arc<Self>, name: &str, uid: &str) {
        {
            let mut backlog = self.backlog();
            if backlog.len() >= MAX_BACKLOG {
                tracing::warn!(csr = %name, "too many CSRs waiting for deletion; leaving this one to the cleaner");
                return;
            }
            backlog.insert(name.to_owned(), uid.to_owned());
        }
        // After the insert: a loop that saw an empty backlog has cleared
        // `retrying` under the lock, so this starts the next one.
        if !self.retrying.swap(true, Ordering::SeqCst) {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                tracing::warn!(csr = %name, "no runtime to retry deleting the CSR");
                self.retrying.store(false, Ordering::SeqCst);
                return;
            };
            runtime.spawn(self.clone().retry());
        }
    }

    async fn retry(self: Arc<Self>) {
        tracing::warn!(
            csrs = self.pending(),
            "the Kubernetes API did not answer CSR deletions; retrying until it does"
        );
        let mut wait = self.first_retry;
        loop {
            tokio::time::sleep(wait).await;
            let batch: Vec<(String, String)> = self
                .backlog()
                .iter()
                .map(|(n, u)| (n.clone(), u.clone()))
                .collect();
            let mut unanswered = false;
            for (name, uid) in batch {
                if !self.try_delete(&name, &uid).await {
                    unanswered = true;
                    break;
                }
                let mut backlog = self.backlog();
                if backlog.get(&name) == Some(&uid) {
                    backlog.remove(&name);
                }
            }
            {
                let backlog = self.backlog();
                if backlog.is_empty() {
                    self.retrying.store(false, Ordering::SeqCst);
                    tracing::info!("the CSRs left by the outage are deleted");
                    return;
                }
            }
            wait = if unanswered {
                (wait * 2).min(LONGEST_RETRY)
            } else {
                self.first_retry
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshca_kube::mock;

    /// The API forbids the first deletion (just restarted, RBAC caches
    /// empty) and is away (503) for the first retry, then answers: the CSR
    /// is deleted by the retry loop, which then ends.
    #[tokio::test]
    async fn a_deletion_the_api_did_not_answer_is_retried_until_it_does() {
        let (client, mut api) = mock::client();
        let mut deletions = Deletions::new(Api::all(client), ApiLimit::new(4));
        deletions.first_retry = Duration::from_millis(10);
        let deletions = Arc::new(deletions);
        let path = "/apis/certificates.k8s.io/v1/certificatesigningrequests/csr-workload-a";
        let first = deletions.delete("csr-workload-a", "uid-a");
        let answered = api.expect("DELETE", path, 403, mock::status(403, "Forbidden"));
        let (_, sent) = tokio::join!(first, answered);
        assert_eq!(sent["preconditions"]["uid"], "uid-a");
        assert_eq!(deletions.pending(), 1);
        assert!(deletions.retrying.load(Ordering::SeqCst));
        api.expect("DELETE", path, 503, mock::status(503, "ServiceUnavailable"))
            .await;
        let gone = serde_json::json!({
            "apiVersion": "certificates.k8s.io/v1", "kind": "CertificateSigningRequest",
            "metadata": {"name": "csr-workload-a", "uid": "uid-a"}, "spec": {"request": "", "signerName": "x"},
        });
        api.expect("DELETE", path, 200, gone).await;
        for _ in 0..100 {
            if !deletions.retrying.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(deletions.pending(), 0);
        assert!(!deletions.retrying.load(Ordering::SeqCst), "the loop ended");
    }

    /// A CSR already gone (404), or whose name is another object's now
    /// (409, the UID precondition), is not retried.
    #[tokio::test]
    async fn a_csr_already_gone_is_not_retried() {
        let (client, mut api) = mock::client();
        let deletions = Arc::new(Deletions::new(Api::all(client), ApiLimit::new(4)));
        for (code, reason) in [(404, "NotFound"), (409, "Conflict")] {
            let path = "/apis/certificates.k8s.io/v1/certificatesigningrequests/csr-workload-b";
            let first = deletions.delete("csr-workload-b", "uid-b");
            let answered = api.expect("DELETE", path, code, mock::status(code, reason));
            tokio::join!(first, answered);
            assert_eq!(deletions.pending(), 0, "{code}");
            assert!(!deletions.retrying.load(Ordering::SeqCst), "{code}");
        }
    }
}
