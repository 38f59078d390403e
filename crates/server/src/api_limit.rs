//! A bound on this server's Kubernetes API calls in flight.
//!
//! The apiserver's Priority and Fairness puts all of one service account's
//! requests in one flow with a bounded queue; a mass restart that sends
//! thousands of TokenReviews and CSR calls at once overflows it, and the
//! rejected calls (429) are retried with a growing backoff, leaving a few
//! unlucky workloads waiting tens of seconds while the apiserver idles
//! (measured in BENCHMARKS.md, RA path). A fair (first come, first served)
//! semaphore keeps the burst inside the queue instead. Waiting for a signer
//! holds no permit: only the calls themselves do.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::Semaphore;

/// The default: enough to keep a 2-core apiserver busy, far below the
/// default per-flow queue.
pub const DEFAULT_CONCURRENCY: usize = 64;

#[derive(Debug, Clone)]
pub struct ApiLimit(Arc<Semaphore>);

impl ApiLimit {
    pub fn new(concurrency: usize) -> Self {
        ApiLimit(Arc::new(Semaphore::new(concurrency.max(1))))
    }

    /// Runs one API call under a permit.
    pub async fn call<T>(&self, call: impl Future<Output = T>) -> T {
        // The semaphore is never closed, so a permit always comes.
        let _permit = self.0.acquire().await.ok();
        call.await
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
                    })
                    .await
            })
        });
        for call in calls.collect::<Vec<_>>() {
            call.await.unwrap();
        }
        assert_eq!(peak.load(Ordering::SeqCst), 3);
    }
}
