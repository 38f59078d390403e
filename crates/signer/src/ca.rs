//! Where a signer's CA comes from, and keeping it current: a directory
//! polled for changes, or a `kubernetes.io/tls` Secret watched.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use futures::channel::mpsc;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::Api;
use kube::runtime::watcher;
use meshca_pki::{BundleSources, CaBundle, Source};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::metrics::Metrics;

/// A signer's CA material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// Istio's cacerts layout (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`,
    /// `root-cert.pem`) or `tls.crt`/`tls.key`[/`ca.crt`]; polled.
    Dir(PathBuf),
    /// A Secret with `tls.crt`, `tls.key` and optional `ca.crt`; watched.
    Secret { namespace: String, name: String },
}

impl std::fmt::Display for CaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaSource::Dir(d) => write!(f, "directory {}", d.display()),
            CaSource::Secret { namespace, name } => write!(f, "Secret {namespace}/{name}"),
        }
    }
}

impl std::str::FromStr for CaSource {
    type Err = String;
    /// `NAMESPACE/NAME` (a Secret).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(CaSource::Secret {
                    namespace: ns.into(),
                    name: name.into(),
                })
            }
            _ => Err(format!("expected NAMESPACE/NAME, got {s:?}")),
        }
    }
}

/// The CA a signer currently signs with; swapped on reload. Subscribers are
/// told of every change (the controller then looks at every CSR again).
#[derive(Default)]
pub struct CaHandle {
    current: RwLock<Option<Arc<CaBundle>>>,
    subscribers: Mutex<Vec<mpsc::UnboundedSender<()>>>,
}

impl CaHandle {
    pub fn get(&self) -> Option<Arc<CaBundle>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set(&self, bundle: CaBundle) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(bundle));
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|tx| tx.unbounded_send(()).is_ok());
    }

    /// A stream with one item per CA change.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<()> {
        let (tx, rx) = mpsc::unbounded();
        self.subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }
}

/// Loads a CA from the three keys of a `kubernetes.io/tls` Secret.
pub fn bundle_from_secret(secret: &Secret, now: OffsetDateTime) -> Result<CaBundle> {
    let name = format!(
        "Secret {}/{}",
        secret.metadata.namespace.as_deref().unwrap_or_default(),
        secret.metadata.name.as_deref().unwrap_or_default()
    );
    let data = secret.data.as_ref();
    let get = |key: &str| {
        data.and_then(|d| d.get(key))
            .map(|b| Zeroizing::new(b.0.clone()))
    };
    let Some(cert) = get("tls.crt") else {
        bail!("{name}: no tls.crt")
    };
    let Some(key) = get("tls.key") else {
        bail!("{name}: no tls.key")
    };
    let roots = get("ca.crt").filter(|r| !r.iter().all(u8::is_ascii_whitespace));
    let names = [
        format!("{name} tls.crt"),
        format!("{name} tls.key"),
        format!("{name} ca.crt"),
    ];
    let sources = BundleSources {
        cert: Source {
            name: &names[0],
            bytes: &cert,
        },
        key: Source {
            name: &names[1],
            bytes: &key,
        },
        chain: None,
        roots: roots.as_ref().map(|r| Source {
            name: &names[2],
            bytes: r,
        }),
    };
    Ok(CaBundle::load(&sources, now)?)
}

/// Loads the CA once (for the first start).
pub async fn load_once(client: &Client, source: &CaSource) -> Result<CaBundle> {
    let now = OffsetDateTime::now_utc();
    match source {
        CaSource::Dir(dir) => meshca_server::cadir::load(dir, now),
        CaSource::Secret { namespace, name } => {
            let secret = Api::<Secret>::namespaced(client.clone(), namespace)
                .get(name)
                .await
                .with_context(|| format!("reading CA Secret {namespace}/{name}"))?;
            bundle_from_secret(&secret, now)
        }
    }
}

fn observe(metrics: &Metrics, signer: &str, bundle: &CaBundle) {
    let label = Metrics::label(signer);
    metrics
        .ca_expiry_timestamp
        .get_or_create(&label)
        .set(bundle.not_after().unix_timestamp());
    if let Some(t) = bundle.roots_not_after() {
        metrics
            .root_expiry_timestamp
            .get_or_create(&label)
            .set(t.unix_timestamp());
    }
}

/// Installs a freshly loaded bundle and records it.
pub fn install(handle: &CaHandle, metrics: &Metrics, signer: &str, bundle: CaBundle) {
    observe(metrics, signer, &bundle);
    handle.set(bundle);
}

/// Keeps `handle` current from `source` until the task is dropped. A CA that
/// fails to load never replaces a working one.
pub async fn keep_current(
    client: Client,
    source: CaSource,
    handle: Arc<CaHandle>,
    metrics: Arc<Metrics>,
    signer: String,
    poll_interval: Duration,
) {
    match source {
        CaSource::Dir(dir) => {
            let mut last = meshca_server::cadir::fingerprint(&dir);
            let mut ticker = tokio::time::interval(poll_interval);
            loop {
                ticker.tick().await;
                let now_fp = meshca_server::cadir::fingerprint(&dir);
                if now_fp == last && handle.get().is_some() {
                    continue;
                }
                match meshca_server::cadir::load(&dir, OffsetDateTime::now_utc()) {
                    Ok(bundle) => {
                        tracing::info!(signer, dir = %dir.display(), not_after = %bundle.not_after(), "CA loaded");
                        install(&handle, &metrics, &signer, bundle);
                        last = now_fp;
                    }
                    Err(e) => {
                        if now_fp != last {
                            metrics
                                .ca_load_errors
                                .get_or_create(&Metrics::label(&signer))
                                .inc();
                            tracing::warn!(signer, error = %format!("{e:#}"), "CA files changed but do not load; keeping the current CA");
                        }
                        last = now_fp;
                    }
                }
            }
        }
        CaSource::Secret { namespace, name } => {
            let api = Api::<Secret>::namespaced(client, &namespace);
            let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
            let mut stream = watcher(api, config).boxed();
            while let Some(event) = stream.next().await {
                let secret = match event {
                    Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s)) => s,
                    Ok(_) => continue,
                    Err(e) => {
                        tracing::warn!(signer, error = %e, "watching the CA Secret");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                match bundle_from_secret(&secret, OffsetDateTime::now_utc()) {
                    Ok(bundle) => {
                        let same = handle.get().is_some_and(|cur| {
                            cur.signing_cert_der() == bundle.signing_cert_der()
                                && cur.roots_der() == bundle.roots_der()
                        });
                        if !same {
                            tracing::info!(signer, secret = %format!("{namespace}/{name}"), not_after = %bundle.not_after(), "CA loaded");
                            install(&handle, &metrics, &signer, bundle);
                        }
                    }
                    Err(e) => {
                        metrics
                            .ca_load_errors
                            .get_or_create(&Metrics::label(&signer))
                            .inc();
                        tracing::warn!(signer, error = %format!("{e:#}"), "CA Secret does not load; keeping the current CA");
                    }
                }
            }
        }
    }
}
