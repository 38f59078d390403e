//! Our CSRs that no request will delete. A request deletes the CSR it
//! created; two kinds escape it:
//! - a create the apiserver committed after our call gave up (the call's
//!   timeout, or the caller went away while it was in flight): we never
//!   learned the name;
//! - a CSR left by a process of ours that died mid-request.
//!
//! Neither is ever approved by us, so kube-controller-manager's cleaner
//! would keep it for 24 h (pending). The shared watch sees every CSR with
//! our label; one that no request of this process has registered for, still
//! there `grace` after we first saw it, is an orphan and is deleted (bound to
//! its UID, through [`super::Deletions`]). `grace` outlasts any request of
//! ours: the create call's timeout plus the wait for the signer plus a
//! margin, so another replica's CSR (same label) is its own to delete until
//! then. The age is counted from when this process first saw the CSR, not
//! from its `creationTimestamp`, so clock skew cannot shorten it.
//! Pure bookkeeping; the watch loop in [`super::waiters`] drives it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use meshca_kube::api_limit::CALL_TIMEOUT;

/// Added to the longest request: the deletion's own call and slack.
const MARGIN: Duration = Duration::from_secs(30);

/// How long a CSR of ours may stay unclaimed before it is an orphan, for
/// requests that wait `ra_timeout` for the signer.
pub(super) fn grace(ra_timeout: Duration) -> Duration {
    CALL_TIMEOUT + ra_timeout + MARGIN
}

/// How often the watch loop looks for orphans.
pub(super) fn check_every(grace: Duration) -> Duration {
    (grace / 4).max(Duration::from_millis(100))
}

#[derive(Debug, Default)]
pub(super) struct Orphans {
    /// name -> (UID, first seen).
    seen: HashMap<String, (String, Instant)>,
    /// While a re-list runs: what it has listed so far. CSRs deleted while
    /// the watch was down get no Delete event; the re-list's end forgets them.
    relisting: Option<HashMap<String, (String, Instant)>>,
}

impl Orphans {
    /// A CSR with our label seen on the watch (added, changed or listed).
    pub(super) fn seen(&mut self, name: &str, uid: &str, now: Instant) {
        let first = match self.seen.get(name) {
            Some((known, first)) if known == uid => *first,
            _ => now,
        };
        let map = self.relisting.as_mut().unwrap_or(&mut self.seen);
        map.insert(name.to_owned(), (uid.to_owned(), first));
    }

    pub(super) fn deleted(&mut self, name: &str) {
        self.seen.remove(name);
        if let Some(relisting) = &mut self.relisting {
            relisting.remove(name);
        }
    }

    pub(super) fn relist_started(&mut self) {
        self.relisting = Some(HashMap::new());
    }

    pub(super) fn relist_done(&mut self) {
        if let Some(listed) = self.relisting.take() {
            self.seen = listed;
        }
    }

    /// The CSRs seen at least `grace` ago that no request of ours waits
    /// for (`claimed(name, uid)`); they are forgotten here, their deletion
    /// is the caller's (a failed one is retried by `Deletions`).
    pub(super) fn take_due(
        &mut self,
        now: Instant,
        grace: Duration,
        claimed: impl Fn(&str, &str) -> bool,
    ) -> Vec<(String, String)> {
        let due: Vec<(String, String)> = self
            .seen
            .iter()
            .filter(|(name, (uid, first))| {
                now.saturating_duration_since(*first) >= grace && !claimed(name, uid)
            })
            .map(|(name, (uid, _))| (name.clone(), uid.clone()))
            .collect();
        for (name, _) in &due {
            self.seen.remove(name);
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(60);

    #[test]
    fn a_csr_unclaimed_for_the_grace_is_due_once() {
        let t0 = Instant::now();
        let mut orphans = Orphans::default();
        orphans.seen("csr-workload-a", "uid-a", t0);
        // Seen again later (an update): the age still counts from the first.
        orphans.seen("csr-workload-a", "uid-a", t0 + Duration::from_secs(50));
        let nobody = |_: &str, _: &str| false;
        assert!(
            orphans
                .take_due(t0 + Duration::from_secs(59), GRACE, nobody)
                .is_empty()
        );
        assert_eq!(
            orphans.take_due(t0 + GRACE, GRACE, nobody),
            vec![("csr-workload-a".to_string(), "uid-a".to_string())]
        );
        assert!(orphans.take_due(t0 + GRACE * 2, GRACE, nobody).is_empty());
    }

    #[test]
    fn a_claimed_or_deleted_csr_is_never_due() {
        let t0 = Instant::now();
        let mut orphans = Orphans::default();
        orphans.seen("csr-workload-a", "uid-a", t0);
        orphans.seen("csr-workload-b", "uid-b", t0);
        orphans.deleted("csr-workload-b");
        let claimed = |name: &str, uid: &str| name == "csr-workload-a" && uid == "uid-a";
        assert!(orphans.take_due(t0 + GRACE, GRACE, claimed).is_empty());
    }

    #[test]
    fn a_namesake_starts_its_own_grace() {
        let t0 = Instant::now();
        let mut orphans = Orphans::default();
        orphans.seen("csr-workload-a", "uid-a", t0);
        orphans.seen("csr-workload-a", "uid-b", t0 + Duration::from_secs(30));
        let nobody = |_: &str, _: &str| false;
        assert!(orphans.take_due(t0 + GRACE, GRACE, nobody).is_empty());
        let due = orphans.take_due(t0 + Duration::from_secs(90), GRACE, nobody);
        assert_eq!(
            due,
            vec![("csr-workload-a".to_string(), "uid-b".to_string())]
        );
    }

    /// A CSR deleted while the watch was down is not in the re-list: it is
    /// forgotten; one still there keeps its first-seen time.
    #[test]
    fn a_relist_forgets_what_it_did_not_list() {
        let t0 = Instant::now();
        let mut orphans = Orphans::default();
        orphans.seen("csr-workload-gone", "uid-g", t0);
        orphans.seen("csr-workload-kept", "uid-k", t0);
        orphans.relist_started();
        orphans.seen("csr-workload-kept", "uid-k", t0 + Duration::from_secs(40));
        orphans.relist_done();
        let due = orphans.take_due(t0 + GRACE, GRACE, |_, _| false);
        assert_eq!(
            due,
            vec![("csr-workload-kept".to_string(), "uid-k".to_string())]
        );
    }

    #[test]
    fn the_grace_outlasts_any_request() {
        let ra_timeout = Duration::from_secs(10);
        assert!(grace(ra_timeout) > CALL_TIMEOUT + ra_timeout);
        assert!(check_every(grace(ra_timeout)) < grace(ra_timeout));
    }
}
