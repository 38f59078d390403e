//! Leader election on a `coordination.k8s.io/v1` Lease, client-go style:
//! the holder renews every `retry_period`; a candidate takes over when the
//! record has not changed for `lease_duration` by its own clock (no clock
//! comparison across machines). Every write carries the resourceVersion read.
//!
//! Correctness never depends on the lease: two replicas that both believe
//! they lead still cannot overwrite each other's writes (every write carries
//! the resourceVersion it read). Used by `meshca signer` and by the server's
//! root distribution.

use std::time::Duration;

use anyhow::{Context, Result};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::time::Instant;

use crate::last_error::LastError;
use crate::status;

#[derive(Debug, Clone)]
pub struct LeaderElection {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it gives up leading.
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaderElection {
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        LeaderElection {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    /// client-go's proportions for another lease duration: renew within
    /// 2/3 of it, retry 7 times per duration (at least every 200 ms).
    pub fn with_lease_duration(mut self, lease_duration: Duration) -> Self {
        self.lease_duration = lease_duration;
        self.renew_deadline = lease_duration * 2 / 3;
        self.retry_period = (lease_duration / 7).max(Duration::from_millis(200));
        self
    }
}

fn now() -> MicroTime {
    MicroTime(k8s_openapi::jiff::Timestamp::now())
}

/// The lease loop of one replica.
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaderElection,
    /// The last record seen and when it was first seen by this replica.
    observed: Option<(Option<LeaseSpec>, Instant)>,
}

impl Elector {
    pub fn new(client: Client, cfg: LeaderElection) -> Self {
        Elector {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            observed: None,
        }
    }

    /// Tries once to acquire or renew. `Ok(true)`: this replica leads.
    pub async fn try_acquire_or_renew(&mut self) -> Result<bool> {
        let name = &self.cfg.name;
        let me = self.cfg.identity.clone();
        let duration = i32::try_from(self.cfg.lease_duration.as_secs()).unwrap_or(15);
        let Some(mut lease) = self.api.get_opt(name).await.context("reading the Lease")? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(self.cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(me),
                    lease_duration_seconds: Some(duration),
                    acquire_time: Some(now()),
                    renew_time: Some(now()),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if status::is_conflict(&e) => Ok(false),
                Err(e) => Err(e).context("creating the Lease"),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let held_by_me = holder.as_deref() == Some(me.as_str());
        if !held_by_me {
            // Note when the record last changed, by our own clock.
            let changed = self
                .observed
                .as_ref()
                .is_none_or(|(s, _)| s.as_ref() != Some(&spec));
            if changed {
                self.observed = Some((Some(spec.clone()), Instant::now()));
            }
            let observed_at = self
                .observed
                .as_ref()
                .map(|(_, t)| *t)
                .unwrap_or_else(Instant::now);
            let their_duration = spec
                .lease_duration_seconds
                .map(|s| Duration::from_secs(s.max(0) as u64))
                .unwrap_or(self.cfg.lease_duration);
            if holder.is_some() && observed_at.elapsed() < their_duration {
                return Ok(false);
            }
        }
        let mut next = spec.clone();
        if !held_by_me {
            next.acquire_time = Some(now());
            next.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        next.holder_identity = Some(me);
        next.lease_duration_seconds = Some(duration);
        next.renew_time = Some(now());
        lease.spec = Some(next);
        match self.api.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if status::is_lost_race(&e) => Ok(false),
            Err(e) => Err(e).context("updating the Lease"),
        }
    }

    /// Waits until this replica leads.
    pub async fn acquire(&mut self) {
        let mut last_error = LastError::default();
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(lease = %self.cfg.name, identity = %self.cfg.identity, "became the leader");
                    return;
                }
                Ok(false) => {}
                Err(e) => {
                    let error = format!("{e:#}");
                    if last_error.is_new(&error) {
                        tracing::warn!(
                            lease = %format!("{}/{}", self.cfg.namespace, self.cfg.name),
                            %error,
                            "leader election failed; retrying"
                        );
                    }
                }
            }
            tokio::time::sleep(self.cfg.retry_period).await;
        }
    }

    /// Renews until a renewal has not succeeded for `renew_deadline`; then
    /// returns (leadership lost).
    pub async fn hold(&mut self) {
        let mut last_ok = Instant::now();
        loop {
            tokio::time::sleep(self.cfg.retry_period).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_ok = Instant::now(),
                Ok(false) => {
                    tracing::error!(lease = %self.cfg.name, "another replica holds the lease");
                    return;
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "renewing the lease"),
            }
            if last_ok.elapsed() > self.cfg.renew_deadline {
                tracing::error!(lease = %self.cfg.name, "could not renew the lease in time");
                return;
            }
        }
    }

    /// Gives the lease up so a standby takes over at once.
    pub async fn release(&mut self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.cfg.name).await else {
            return;
        };
        let Some(spec) = lease.spec.as_mut() else {
            return;
        };
        if spec.holder_identity.as_deref() != Some(self.cfg.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(now());
        match self
            .api
            .replace(&self.cfg.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.cfg.name, "released the lease"),
            Err(e) => tracing::warn!(error = %e, "releasing the lease"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::{self, MockApi};
    use serde_json::json;

    const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases";
    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/ns/leases/l";

    fn lease(holder: &str, transitions: i32) -> serde_json::Value {
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "l", "namespace": "ns", "resourceVersion": "7"},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                     "renewTime": "2026-01-01T00:00:00.000000Z", "leaseTransitions": transitions},
        })
    }

    fn elector() -> (Elector, MockApi) {
        let (client, api) = mock::client();
        (
            Elector::new(client, LeaderElection::new("ns", "l", "me")),
            api,
        )
    }

    #[tokio::test]
    async fn a_missing_lease_is_created_with_this_replica_as_holder() {
        let (mut elector, mut api) = elector();
        let attempt = tokio::spawn(async move { elector.try_acquire_or_renew().await });
        api.expect("GET", LEASE, 404, mock::status(404, "NotFound"))
            .await;
        let created = api.expect("POST", LEASES, 201, lease("me", 0)).await;
        assert_eq!(created["spec"]["holderIdentity"], "me");
        assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
        assert!(attempt.await.unwrap().unwrap(), "this replica leads");
    }

    #[tokio::test]
    async fn losing_the_create_race_is_not_leadership() {
        let (mut elector, mut api) = elector();
        let attempt = tokio::spawn(async move { elector.try_acquire_or_renew().await });
        api.expect("GET", LEASE, 404, mock::status(404, "NotFound"))
            .await;
        api.expect("POST", LEASES, 409, mock::status(409, "AlreadyExists"))
            .await;
        assert!(!attempt.await.unwrap().unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn another_holder_is_waited_out_by_this_replicas_clock_then_taken_over() {
        let (mut elector, mut api) = elector();
        let answer = tokio::spawn(async move {
            // A record unchanged for the lease duration, by our clock.
            api.expect("GET", LEASE, 200, lease("other", 3)).await;
            api.expect("GET", LEASE, 200, lease("other", 3)).await;
            let taken = api.expect("PUT", LEASE, 200, lease("me", 4)).await;
            assert_eq!(taken["spec"]["holderIdentity"], "me");
            assert_eq!(taken["spec"]["leaseTransitions"], 4);
            assert_eq!(
                taken["metadata"]["resourceVersion"], "7",
                "the update carries the version read"
            );
        });
        assert!(
            !elector.try_acquire_or_renew().await.unwrap(),
            "fresh: wait"
        );
        tokio::time::advance(Duration::from_secs(16)).await;
        assert!(
            elector.try_acquire_or_renew().await.unwrap(),
            "expired: taken"
        );
        answer.await.unwrap();
    }

    #[tokio::test]
    async fn a_renewal_that_conflicts_is_not_leadership() {
        let (mut elector, mut api) = elector();
        let attempt = tokio::spawn(async move { elector.try_acquire_or_renew().await });
        api.expect("GET", LEASE, 200, lease("me", 1)).await;
        api.expect("PUT", LEASE, 409, mock::status(409, "Conflict"))
            .await;
        assert!(!attempt.await.unwrap().unwrap());
    }
}
