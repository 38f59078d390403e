//! A bound on this server's Kubernetes API calls in flight.
//!
//! The apiserver's Priority and Fairness puts all of one service account's
//! requests in one flow with a bounded queue; a mass restart that sends
//! thousands of TokenReviews and CSR calls at once overflows it, and the
//! rejected calls (429) are retried with a growing backoff, leaving a few
//! unlucky workloads waiting tens of seconds while the apiserver idles
//! (measured in BENCHMARKS.md, RA path). A fair (first come, first served)
//! semaphore keeps the burst inside the queue instead. Waiting for a signer
//! holds no permit: only the calls themselves do, each for at most
//! [`CALL_TIMEOUT`] (kube-rs retries a 429 with a backoff that can grow to
//! minutes; a call stuck there must not keep a permit from the others).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

/// The default: enough to keep a 2-core apiserver busy, far below the
/// default per-flow queue.
pub const DEFAULT_CONCURRENCY: usize = 64;

/// How long one call (its retries included) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct ApiLimit(Arc<Semaphore>);

impl ApiLimit {
    pub fn new(concurrency: usize) -> Self {
        ApiLimit(Arc::new(Semaphore::new(concurrency.max(1))))
    }

    /// Runs one API call under a permit, for at most [`CALL_TIMEOUT`].
    pub async fn call<T>(
        &self,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, kube::Error> {
        self.call_within(CALL_TIMEOUT, call).await
    }

    async fn call_within<T>(
        &self,
        limit: Duration,
        call: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, kube::Error> {
        // The semaphore is never closed, so a permit always comes.
        let _permit = self.0.acquire().await.ok();
        tokio::time::timeout(limit, call).await.unwrap_or_else(|_| {
            Err(kube::Error::Service(
                format!("no answer from the Kubernetes API within {limit:?}").into(),
            ))
        })
    }
}

impl Default for ApiLimit {
    fn default() -> Self {
        ApiLimit::new(DEFAULT_CONCURRENCY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn no_more_calls_than_the_limit_run_at_once() {
        let limit = ApiLimit::new(3);
        let (running, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let calls = (0..20).map(|_| {
            let (limit, running, peak) = (limit.clone(), running.clone(), peak.clone());
            tokio::spawn(async move {
                limit
                    .call(async {
                        let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                        peak.fetch_max(now, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        running.fetch_sub(1, Ordering::SeqCst);
                        Ok(())
                    })
                    .await
            })
        });
        for call in calls.collect::<Vec<_>>() {
            call.await.unwrap().unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_call_that_hangs_gives_its_permit_back_with_an_error() {
        let limit = ApiLimit::new(1);
        let hung = limit
            .call_within(
                Duration::from_millis(20),
                std::future::pending::<Result<(), kube::Error>>(),
            )
            .await;
        let e = hung.unwrap_err();
        assert!(e.to_string().contains("no answer"), "{e}");
        assert_eq!(limit.call(async { Ok(7) }).await.unwrap(), 7);
    }
}
