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
//!
//! Waiting for a permit is bounded too ([`DEFAULT_PERMIT_WAIT`]): a flood of
//! requests (bad tokens, each costing a TokenReview) must not queue without
//! bound. A call that gets no permit in time fails at once with [`ApiBusy`]
//! (see [`ApiBusy::is`]); the gRPC server answers it `Unavailable`, which
//! istio-agent retries (5 tries with a 100 ms exponential backoff, over
//! within about 2 s: a refusal costs a workload more than a wait).
//!
//! Two classes share the permits. The first call of a new request (its
//! TokenReview: [`ApiLimit::first_calls`]) waits behind the calls of requests
//! already admitted (CSR create, approval, delete: work already started).
//! With one FIFO queue for all, a burst larger than the apiserver drains
//! within the wait put every admitted request's next call behind the whole
//! burst's TokenReviews: everyone slowed down and most of the burst was
//! refused (measured in BENCHMARKS.md, Scale 4). Follow-up calls come only
//! from admitted requests, so they cannot starve new ones for long.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

/// The default: enough to keep a 2-core apiserver busy, far below the
/// default per-flow queue.
pub const DEFAULT_CONCURRENCY: usize = 64;

/// How long one call (its retries included) may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// The default longest wait for a permit.
pub const DEFAULT_PERMIT_WAIT: Duration = Duration::from_secs(5);

/// No permit came within the wait: the API calls of this process are all
/// busy. Carried as `kube::Error::Service`; recognise it with [`ApiBusy::is`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiBusy(pub Duration);

impl std::fmt::Display for ApiBusy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Kubernetes API busy: no call slot free within {:?}",
            self.0
        )
    }
}

impl std::error::Error for ApiBusy {}

impl ApiBusy {
    /// Whether a call failed because no permit came in time.
    pub fn is(error: &kube::Error) -> bool {
        matches!(error, kube::Error::Service(e) if e.is::<ApiBusy>())
    }
}

#[derive(Debug, Clone)]
pub struct ApiLimit {
    permits: Arc<Semaphore>,
    /// One permit: held by the one first call that is in the (FIFO) permit
    /// queue, so every follow-up call waits behind at most one first call.
    first_in_line: Arc<Semaphore>,
    first: bool,
    permit_wait: Duration,
}

impl ApiLimit {
    pub fn new(concurrency: usize) -> Self {
        ApiLimit {
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            first_in_line: Arc::new(Semaphore::new(1)),
            first: false,
            permit_wait: DEFAULT_PERMIT_WAIT,
        }
    }

    /// The same permits for the first call of new requests: these wait
    /// behind the calls of this limit (follow-ups of admitted requests).
    pub fn first_calls(&self) -> Self {
        ApiLimit {
            first: true,
            ..self.clone()
        }
    }

    /// Waits at most `wait` for a permit, then fails with [`ApiBusy`].
    pub fn with_permit_wait(mut self, wait: Duration) -> Self {
        self.permit_wait = wait;
        self
    }

    /// Runs one API call under a permit, for at most [`CALL_TIMEOUT`];
    /// fails with [`ApiBusy`] when no permit comes within the permit wait.
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
        let acquire = async {
            let _line = match self.first {
                true => Some(self.first_in_line.acquire().await),
                false => None,
            };
            self.permits.acquire().await
        };
        // The semaphores are never closed: only the wait can end without one.
        let _permit = tokio::time::timeout(self.permit_wait, acquire)
            .await
            .map_err(|_| kube::Error::Service(Box::new(ApiBusy(self.permit_wait))))?;
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

    #[tokio::test(start_paused = true)]
    async fn a_call_waits_for_a_permit_at_most_the_permit_wait_then_is_busy() {
        let limit = ApiLimit::new(1).with_permit_wait(Duration::from_secs(5));
        let holder = tokio::spawn({
            let limit = limit.clone();
            async move {
                limit
                    .call(async {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        Ok(())
                    })
                    .await
            }
        });
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        let e = limit.call(async { Ok(1) }).await.unwrap_err();
        assert!(ApiBusy::is(&e), "{e}");
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // A failed call is not busy; the holder's call ends normally.
        holder.await.unwrap().unwrap();
        assert!(!ApiBusy::is(&kube::Error::Service("other".into())));
        assert_eq!(limit.call(async { Ok(2) }).await.unwrap(), 2);
    }

    /// Runs the calls (each holding its permit for 1 s), each getting in
    /// line 1 ms after the one before; the names in the order they got a permit.
    async fn order_of(calls: &[(&'static str, &ApiLimit)]) -> Vec<&'static str> {
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for (name, limit) in calls {
            let (name, limit, order) = (*name, (*limit).clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                limit
                    .call(async {
                        order.lock().unwrap().push(name);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        Ok(())
                    })
                    .await
            }));
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        for task in tasks {
            task.await.unwrap().unwrap();
        }
        Arc::try_unwrap(order).unwrap().into_inner().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn follow_up_calls_go_before_first_calls_that_queued_earlier() {
        let limit = ApiLimit::new(1).with_permit_wait(Duration::from_secs(60));
        let first = limit.first_calls();
        let order = order_of(&[
            ("holder", &limit),
            ("new 1", &first),
            ("new 2", &first),
            ("new 3", &first),
            ("admitted 1", &limit),
            ("admitted 2", &limit),
        ])
        .await;
        // "new 1" was already in line for the permit when the admitted
        // requests' calls came; the other new ones wait behind them.
        assert_eq!(
            order,
            [
                "holder",
                "new 1",
                "admitted 1",
                "admitted 2",
                "new 2",
                "new 3"
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn first_calls_keep_their_order_and_take_free_permits_at_once() {
        let limit = ApiLimit::new(2).with_permit_wait(Duration::from_secs(60));
        let first = limit.first_calls();
        let started = tokio::time::Instant::now();
        let order = order_of(&[("a", &first), ("b", &first), ("c", &first), ("d", &first)]).await;
        assert_eq!(order, ["a", "b", "c", "d"]);
        // Two at a time: a and b at once, c and d when they end.
        assert!(
            started.elapsed() < Duration::from_millis(2100),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_call_behind_busy_follow_ups_is_busy_after_its_own_wait() {
        let limit = ApiLimit::new(1).with_permit_wait(Duration::from_secs(60));
        let first = limit.first_calls().with_permit_wait(Duration::from_secs(2));
        let holder = tokio::spawn({
            let limit = limit.clone();
            async move {
                limit
                    .call(async {
                        tokio::time::sleep(Duration::from_secs(10)).await;
                        Ok(())
                    })
                    .await
            }
        });
        tokio::task::yield_now().await;
        let started = tokio::time::Instant::now();
        // The one in line and the one waiting to get in line: both busy.
        let (a, b) = tokio::join!(first.call(async { Ok(1) }), first.call(async { Ok(2) }));
        assert!(ApiBusy::is(&a.unwrap_err()) && ApiBusy::is(&b.unwrap_err()));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
        holder.await.unwrap().unwrap();
        // Their places in line were given back.
        assert_eq!(first.call(async { Ok(3) }).await.unwrap(), 3);
    }
}
