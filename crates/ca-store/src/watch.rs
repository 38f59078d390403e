//! Keeping "the current CA" of a source: one task per source publishes
//! every verified change into a `tokio::sync::watch` channel. Files are
//! polled (kubelet swaps mounted Secrets by symlink, which inotify misses);
//! a Secret is watched. A CA that fails to load never replaces a working one,
//! and each failure is reported once, not at every poll.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use meshca_kube::{CancellationToken, LastError};
use meshca_pki::CaBundle;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::source::CaSource;

/// The CA a component signs with now; `None` until one has loaded.
pub type CurrentCa = watch::Receiver<Option<Arc<CaBundle>>>;

/// Called when a change of the source does not load (for a metric).
pub type OnLoadError = Box<dyn Fn(&anyhow::Error) + Send + Sync>;

/// Starts keeping `source` current, from `initial` (already loaded, or
/// `None` when the first load failed), until `stop` is cancelled or every
/// receiver is dropped.
pub fn watch(
    client: Option<kube::Client>,
    source: CaSource,
    poll: Duration,
    initial: Option<CaBundle>,
    on_load_error: OnLoadError,
    stop: CancellationToken,
) -> CurrentCa {
    let (tx, rx) = watch::channel(initial.map(Arc::new));
    tokio::spawn(async move {
        let keep = async {
            match (&source, client) {
                (CaSource::Secret { namespace, name }, Some(client)) => {
                    watch_secret(client, namespace, name, &tx, &on_load_error).await
                }
                _ => poll_files(&source, poll, &tx, &on_load_error).await,
            }
        };
        tokio::select! {
            _ = keep => {}
            _ = tx.closed() => {}
            _ = stop.cancelled() => {}
        }
    });
    rx
}

/// One item per change of the current CA (for controllers that look at
/// everything again when the CA changes).
pub fn changes(current: &CurrentCa) -> impl futures::Stream<Item = ()> + Send + 'static {
    futures::stream::unfold(current.clone(), |mut rx| async move {
        rx.changed().await.ok()?;
        Some(((), rx))
    })
}

/// Whether `next` differs from the CA served now in what it signs with or trusts.
fn is_change(current: Option<&Arc<CaBundle>>, next: &CaBundle) -> bool {
    current.is_none_or(|cur| {
        cur.signing_cert_der() != next.signing_cert_der()
            || cur.roots_der() != next.roots_der()
            || cur.cert_chain_pem() != next.cert_chain_pem()
    })
}

async fn poll_files(
    source: &CaSource,
    poll: Duration,
    tx: &watch::Sender<Option<Arc<CaBundle>>>,
    on_load_error: &OnLoadError,
) {
    // The first poll always loads: the files may have changed between the
    // caller's first load and this task's start.
    let mut last = None;
    let mut ticker = tokio::time::interval(poll.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let now_stamps = source.stamps();
        let changed = last.is_some() && now_stamps != last;
        // Without a CA yet, every poll tries again (the files may be fixed in place).
        if last.is_some() && !changed && tx.borrow().is_some() {
            continue;
        }
        // Remember this state either way: a broken update is reported
        // once, and the next change (the fix) is tried again.
        last = now_stamps;
        match source.load_local(OffsetDateTime::now_utc()) {
            Ok(bundle) => {
                if is_change(tx.borrow().as_ref(), &bundle) {
                    tracing::info!(source = %source, not_after = %bundle.not_after(), "CA loaded");
                    tx.send_replace(Some(Arc::new(bundle)));
                }
            }
            Err(e) if changed => {
                tracing::warn!(source = %source, error = %format!("{e:#}"), "CA changed but does not load; keeping the current CA");
                on_load_error(&e);
            }
            Err(_) => {}
        }
    }
}

async fn watch_secret(
    client: kube::Client,
    namespace: &str,
    name: &str,
    tx: &watch::Sender<Option<Arc<CaBundle>>>,
    on_load_error: &OnLoadError,
) {
    let api = Api::<Secret>::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut last_error = LastError::default();
    while let Some(event) = events.next().await {
        let secret = match event {
            Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => s,
            Ok(_) => continue,
            Err(e) => {
                if last_error.is_new(&e) {
                    tracing::warn!(secret = %format!("{namespace}/{name}"), error = %e, "watching the CA Secret; retrying");
                }
                continue;
            }
        };
        last_error.clear();
        match crate::secret::load_tls(&secret, OffsetDateTime::now_utc()) {
            Ok(bundle) => {
                if is_change(tx.borrow().as_ref(), &bundle) {
                    tracing::info!(secret = %format!("{namespace}/{name}"), not_after = %bundle.not_after(), "CA loaded");
                    tx.send_replace(Some(Arc::new(bundle)));
                }
            }
            Err(e) => {
                tracing::warn!(secret = %format!("{namespace}/{name}"), error = %format!("{e:#}"), "CA Secret does not load; keeping the current CA");
                on_load_error(&e);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dir::{NewCa, create};

    fn new_ca(dir: &std::path::Path, org: &str) -> CaBundle {
        let spec = NewCa {
            pkcs11: None,
            key_type: meshca_pki::KeyType::EcdsaP256,
            org,
            ttl: Duration::from_secs(3600),
            issuer: None,
        };
        create(dir, &spec, true).unwrap().0
    }

    #[tokio::test]
    async fn a_changed_dir_is_published_and_a_broken_one_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let first = new_ca(tmp.path(), "first");
        let first_der = first.signing_cert_der().to_vec();
        let errors = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = errors.clone();
        let mut current = watch(
            None,
            CaSource::Dir(tmp.path().to_owned()),
            Duration::from_millis(20),
            Some(first),
            Box::new(move |_| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }),
            CancellationToken::new(),
        );
        let second = new_ca(tmp.path(), "second");
        tokio::time::timeout(Duration::from_secs(10), current.changed())
            .await
            .expect("the new CA is published")
            .unwrap();
        let served = current.borrow_and_update().clone().unwrap();
        assert_eq!(served.signing_cert_der(), second.signing_cert_der());
        assert_ne!(served.signing_cert_der(), first_der);

        std::fs::write(tmp.path().join(crate::dir::CA_KEY), b"not a key").unwrap();
        let published = tokio::time::timeout(Duration::from_millis(500), current.changed()).await;
        assert!(published.is_err(), "a broken CA is never published");
        assert_eq!(
            errors.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "reported once"
        );
        assert_eq!(
            current.borrow().as_ref().unwrap().signing_cert_der(),
            second.signing_cert_der()
        );
    }
}
