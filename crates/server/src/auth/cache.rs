//! The TokenReview/JWT answer cache.

use std::time::{Duration, Instant};

use super::KubeAccount;

/// TokenReview answers, keyed by a hash of the token. An entry never
/// outlives the token's own `exp` nor the configured TTL; only successes are
/// cached, so a revoked token is refused as soon as its entry ends. A moka
/// cache: bounded to `max_entries` (TinyLFU admission and eviction, so a
/// burst of one-off tokens does not push out the ones in use), each entry
/// with its own life.
///
/// A token bound to a pod ends with the pod: [`PodDeletions::deleted`] (fed
/// by the server's pod watch, when it has one) marks the pod's UID, and an
/// entry naming a marked UID is never served again. Pod UIDs are never
/// reused, and a mark lives at least as long as any entry can, so this also
/// covers an answer that was being fetched while the pod went away.
pub struct TokenCache {
    ttl: Duration,
    /// `None` when caching is off (TTL or size 0).
    entries: Option<moka::sync::Cache<[u8; 32], Entry>>,
    deleted_pods: PodDeletions,
}

/// The UIDs of pods deleted within the last TTL (a cheap clone, shared with
/// the pod watch). Not bounded in size: its entries each live one TTL, and
/// pod deletions come from the apiserver at the rate the cluster deletes
/// pods; a size bound could drop a mark and bring a revoked token back.
#[derive(Clone)]
pub struct PodDeletions(Option<moka::sync::Cache<String, ()>>);

impl PodDeletions {
    /// The pod with this UID is gone: tokens bound to it are no longer
    /// served from the cache.
    pub fn deleted(&self, pod_uid: &str) {
        if let Some(marks) = &self.0 {
            marks.insert(pod_uid.to_owned(), ());
        }
    }

    fn contains(&self, pod_uid: &str) -> bool {
        self.0.as_ref().is_some_and(|m| m.contains_key(pod_uid))
    }
}

#[derive(Clone)]
struct Entry {
    account: KubeAccount,
    authenticator: &'static str,
    /// How long the entry lives from its insertion.
    life: Duration,
}

/// Each entry lives for its own `life`, counted from its last insertion.
struct EntryLife;

impl moka::Expiry<[u8; 32], Entry> for EntryLife {
    fn expire_after_create(&self, _: &[u8; 32], entry: &Entry, _: Instant) -> Option<Duration> {
        Some(entry.life)
    }

    fn expire_after_update(
        &self,
        _: &[u8; 32],
        entry: &Entry,
        _: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.life)
    }
}

impl TokenCache {
    pub fn new(ttl: Duration, max_entries: usize) -> Self {
        let entries = (!ttl.is_zero() && max_entries > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(max_entries as u64)
                .expire_after(EntryLife)
                .build()
        });
        // A mark must outlive every entry cached before it: one TTL (plus
        // a second for clock granularity).
        let deleted_pods = PodDeletions(entries.as_ref().map(|_| {
            moka::sync::Cache::builder()
                .time_to_live(ttl + Duration::from_secs(1))
                .build()
        }));
        TokenCache {
            ttl,
            entries,
            deleted_pods,
        }
    }

    /// Where the pod watch reports deleted pods.
    pub fn pod_deletions(&self) -> PodDeletions {
        self.deleted_pods.clone()
    }

    pub(super) fn get(&self, key: &[u8; 32]) -> Option<(KubeAccount, &'static str)> {
        let entries = self.entries.as_ref()?;
        let entry = entries.get(key)?;
        if let Some(uid) = &entry.account.pod_uid
            && self.deleted_pods.contains(uid)
        {
            entries.invalidate(key);
            return None;
        }
        Some((entry.account, entry.authenticator))
    }

    pub(super) fn insert(
        &self,
        key: [u8; 32],
        account: &KubeAccount,
        authenticator: &'static str,
        token_exp: Option<i64>,
    ) {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let (Some(entries), Some(life)) = (&self.entries, self.life(token_exp, now)) else {
            return;
        };
        entries.insert(
            key,
            Entry {
                account: account.clone(),
                authenticator,
                life,
            },
        );
    }

    /// The TTL, cut to what is left of the token at `now` (unix seconds).
    /// Without a readable exp the token's lifetime is unknown: not cached.
    fn life(&self, token_exp: Option<i64>, now: i64) -> Option<Duration> {
        let left = u64::try_from(token_exp? - now).ok().filter(|&s| s > 0)?;
        Some(self.ttl.min(Duration::from_secs(left)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moka::Expiry;

    fn now() -> i64 {
        time::OffsetDateTime::now_utc().unix_timestamp()
    }

    #[test]
    fn cache_entries_never_outlive_the_token() {
        let cache = TokenCache::new(Duration::from_secs(60), 10);
        let now = now();
        let a = KubeAccount::new("ns".into(), "sa".into());
        cache.insert([1; 32], &a, "jwt", Some(now + 3600));
        assert_eq!(cache.get(&[1; 32]), Some((a.clone(), "jwt")));
        cache.insert([2; 32], &a, "jwt", Some(now - 1));
        assert_eq!(cache.get(&[2; 32]), None, "expired token cached");
        cache.insert([3; 32], &a, "jwt", None);
        assert_eq!(cache.get(&[3; 32]), None, "token without exp cached");

        // An entry's life: the TTL, or what is left of the token if shorter.
        let at = 1_000_000;
        assert_eq!(
            cache.life(Some(at + 3600), at),
            Some(Duration::from_secs(60))
        );
        assert_eq!(cache.life(Some(at + 10), at), Some(Duration::from_secs(10)));
        assert_eq!(cache.life(Some(at), at), None);
        assert_eq!(cache.life(Some(at - 1), at), None);
        assert_eq!(cache.life(None, at), None);
        // ... and moka is told exactly that life, on insertion and on replacement.
        let entry = Entry {
            account: a,
            authenticator: "jwt",
            life: Duration::from_secs(10),
        };
        let t = Instant::now();
        assert_eq!(
            EntryLife.expire_after_create(&[1; 32], &entry, t),
            Some(entry.life)
        );
        assert_eq!(
            EntryLife.expire_after_update(&[1; 32], &entry, t, Some(Duration::from_secs(1))),
            Some(entry.life)
        );
    }

    #[test]
    fn an_entry_ends_with_its_own_life() {
        let cache = TokenCache::new(Duration::from_secs(60), 10);
        let entries = cache.entries.as_ref().unwrap();
        let a = KubeAccount::new("ns".into(), "sa".into());
        for (key, life) in [
            ([1; 32], Duration::from_secs(3600)),
            ([2; 32], Duration::from_millis(20)),
        ] {
            entries.insert(
                key,
                Entry {
                    account: a.clone(),
                    authenticator: "jwt",
                    life,
                },
            );
        }
        // moka reads std's clock (its mock clock is private): a real wait,
        // which a slow machine can only lengthen.
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(cache.get(&[1; 32]), Some((a, "jwt")));
        assert_eq!(cache.get(&[2; 32]), None, "entry outlived its life");
    }

    #[test]
    fn cached_entries_keep_the_bound_pod() {
        let cache = TokenCache::new(Duration::from_secs(60), 10);
        let exp = Some(now() + 600);
        let a = KubeAccount {
            namespace: "istio-system".into(),
            service_account: "ztunnel".into(),
            pod_name: Some("ztunnel-abc".into()),
            pod_uid: Some("0000-1111".into()),
        };
        cache.insert([7; 32], &a, "token_review", exp);
        assert_eq!(cache.get(&[7; 32]), Some((a, "token_review")));
    }

    #[test]
    fn a_deleted_pod_ends_the_entries_of_tokens_bound_to_it() {
        let cache = TokenCache::new(Duration::from_secs(60), 10);
        let exp = Some(now() + 600);
        let bound = |uid: &str| KubeAccount {
            namespace: "shop".into(),
            service_account: "web".into(),
            pod_name: Some(format!("web-{uid}")),
            pod_uid: Some(uid.into()),
        };
        let unbound = KubeAccount::new("shop".into(), "web".into());
        cache.insert([1; 32], &bound("uid-1"), "token_review", exp);
        cache.insert([2; 32], &bound("uid-1"), "token_review", exp);
        cache.insert([3; 32], &bound("uid-2"), "token_review", exp);
        cache.insert([4; 32], &unbound, "token_review", exp);
        let deletions = cache.pod_deletions();
        deletions.deleted("uid-1");
        deletions.deleted("uid-never-cached");
        assert_eq!(cache.get(&[1; 32]), None, "token of the deleted pod served");
        assert_eq!(cache.get(&[2; 32]), None, "token of the deleted pod served");
        assert_eq!(cache.get(&[3; 32]), Some((bound("uid-2"), "token_review")));
        assert_eq!(cache.get(&[4; 32]), Some((unbound, "token_review")));
        // An answer fetched while the pod was being deleted, cached after
        // the delete event, is not served either.
        cache.insert([5; 32], &bound("uid-1"), "token_review", exp);
        assert_eq!(cache.get(&[5; 32]), None, "late answer for a deleted pod");
        // Without a cache, deletions are a no-op.
        TokenCache::new(Duration::ZERO, 10)
            .pod_deletions()
            .deleted("uid-1");
    }

    #[test]
    fn a_full_cache_stays_within_its_size() {
        let cache = TokenCache::new(Duration::from_secs(60), 2);
        let exp = Some(now() + 600);
        let a = KubeAccount::new("ns".into(), "sa".into());
        for i in 0..5u8 {
            cache.insert([i; 32], &a, "jwt", exp);
        }
        let entries = cache.entries.as_ref().unwrap();
        entries.run_pending_tasks();
        assert_eq!(entries.entry_count(), 2);
    }

    /// Threads hammer one cache the way the authenticator does (a miss asks
    /// the "apiserver", a success is cached) while half the tokens are
    /// revoked mid-run: a revoked token is served from the cache only within
    /// one TTL of the last answer that still said yes, never later.
    #[test]
    fn revoked_tokens_end_within_one_ttl_under_concurrent_use() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Barrier};
        let ttl = Duration::from_millis(150);
        // Small enough that the flood of one-off tokens below evicts entries.
        let cache = Arc::new(TokenCache::new(ttl, 64));
        let start = Instant::now();
        let revoked = Arc::new(AtomicBool::new(false));
        // When the last "still valid" answer for a revoked token was cached
        // (µs since start, recorded after the insert: an upper bound).
        let last_yes = Arc::new(AtomicU64::new(0));
        let threads = 8;
        let barrier = Arc::new(Barrier::new(threads + 1));
        let exp = Some(now() + 600);
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (cache, revoked, last_yes, barrier) = (
                    cache.clone(),
                    revoked.clone(),
                    last_yes.clone(),
                    barrier.clone(),
                );
                std::thread::spawn(move || {
                    let account = KubeAccount::new("ns".into(), "sa".into());
                    let mut late_hits = Vec::new();
                    let mut valid_hits = 0u64;
                    barrier.wait();
                    let mut i = 0u32;
                    while start.elapsed() < Duration::from_millis(900) {
                        i = i.wrapping_add(1);
                        // Keys 0-15 stay valid, 16-31 are revoked at 300 ms,
                        // and every 4th request is a one-off token (churn).
                        let key: [u8; 32] = match i % 4 {
                            0 => {
                                let mut k = [0xee; 32];
                                k[..4].copy_from_slice(&i.to_le_bytes());
                                k[4] = t as u8;
                                k
                            }
                            _ => [(i % 32) as u8; 32],
                        };
                        let to_revoke = (16..32).contains(&key[0]) && key[1] == key[0];
                        // Taken before the lookup: a thread descheduled
                        // after it cannot make a timely hit look late.
                        let asked_at = start.elapsed();
                        let was_revoked = revoked.load(Ordering::SeqCst);
                        if cache.get(&key).is_some() {
                            if to_revoke && was_revoked {
                                late_hits.push(asked_at);
                            } else if !to_revoke {
                                valid_hits += 1;
                            }
                            continue;
                        }
                        let says_yes = !(to_revoke && revoked.load(Ordering::SeqCst));
                        if says_yes {
                            cache.insert(key, &account, "token_review", exp);
                            if to_revoke {
                                let at = start.elapsed().as_micros() as u64;
                                last_yes.fetch_max(at, Ordering::SeqCst);
                            }
                        }
                    }
                    (late_hits, valid_hits)
                })
            })
            .collect();
        barrier.wait();
        std::thread::sleep(Duration::from_millis(300));
        revoked.store(true, Ordering::SeqCst);
        let mut valid_hits = 0;
        let mut late = Vec::new();
        for w in workers {
            let (hits, valid) = w.join().unwrap();
            late.extend(hits);
            valid_hits += valid;
        }
        let bound = Duration::from_micros(last_yes.load(Ordering::SeqCst)) + ttl;
        let beyond: Vec<_> = late.iter().filter(|t| **t > bound).collect();
        assert!(
            beyond.is_empty(),
            "revoked tokens served after {bound:?} (last yes + TTL): {beyond:?}"
        );
        assert!(
            valid_hits > 0,
            "the valid tokens were never served from the cache"
        );
    }

    #[test]
    fn a_zero_ttl_or_size_caches_nothing() {
        let exp = Some(now() + 600);
        let a = KubeAccount::new("ns".into(), "sa".into());
        for cache in [
            TokenCache::new(Duration::ZERO, 10),
            TokenCache::new(Duration::from_secs(60), 0),
        ] {
            cache.insert([1; 32], &a, "jwt", exp);
            assert_eq!(cache.get(&[1; 32]), None);
        }
    }
}
