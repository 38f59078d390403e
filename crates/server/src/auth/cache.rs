//! The TokenReview/JWT answer cache.

use std::time::{Duration, Instant};

use super::KubeAccount;

/// TokenReview answers, keyed by a hash of the token. An entry never
/// outlives the token's own `exp` nor the configured TTL; only successes are
/// cached, so a revoked token is refused as soon as its entry ends. A moka
/// cache: bounded to `max_entries` (TinyLFU admission and eviction, so a
/// burst of one-off tokens does not push out the ones in use), each entry
/// with its own life.
pub struct TokenCache {
    ttl: Duration,
    /// `None` when caching is off (TTL or size 0).
    entries: Option<moka::sync::Cache<[u8; 32], Entry>>,
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
        TokenCache { ttl, entries }
    }

    pub(super) fn get(&self, key: &[u8; 32]) -> Option<(KubeAccount, &'static str)> {
        let entry = self.entries.as_ref()?.get(key)?;
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
