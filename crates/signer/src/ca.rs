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
    /// `root-cert.pem`) or `tls.crt`, `tls.key` and optional `ca.crt`; polled.
    Dir(PathBuf),
    /// A Secret with `tls.crt`, `tls.key` and optional `ca.crt`; watched.
    Secret { namespace: String, name: String },
    /// Two (or three) files, as signer-ca's `--ca-cert-path`/`--ca-key-path`:
    /// the signing certificate (intermediates may follow it), its key, and
    /// optionally the roots (default: the last certificate of the chain); polled.
    Files {
        cert: PathBuf,
        key: PathBuf,
        roots: Option<PathBuf>,
    },
}

impl std::fmt::Display for CaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaSource::Dir(d) => write!(f, "directory {}", d.display()),
            CaSource::Secret { namespace, name } => write!(f, "Secret {namespace}/{name}"),
            CaSource::Files { cert, key, .. } => {
                write!(f, "files {} and {}", cert.display(), key.display())
            }
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

/// Loads a CA from separate files.
pub fn bundle_from_files(
    cert: &std::path::Path,
    key: &std::path::Path,
    roots: Option<&std::path::Path>,
    now: OffsetDateTime,
) -> Result<CaBundle> {
    let read = |p: &std::path::Path| {
        std::fs::read(p)
            .map(Zeroizing::new)
            .with_context(|| format!("reading {}", p.display()))
    };
    let (cert_bytes, key_bytes) = (read(cert)?, read(key)?);
    let roots_bytes = roots.map(read).transpose()?;
    let names = [
        cert.display().to_string(),
        key.display().to_string(),
        roots.map(|r| r.display().to_string()).unwrap_or_default(),
    ];
    let sources = BundleSources {
        cert: Source {
            name: &names[0],
            bytes: &cert_bytes,
        },
        key: Source {
            name: &names[1],
            bytes: &key_bytes,
        },
        chain: None,
        roots: roots_bytes.as_ref().map(|r| Source {
            name: &names[2],
            bytes: r,
        }),
    };
    Ok(CaBundle::load(&sources, now)?)
}

type Stamp = Option<(std::time::SystemTime, u64)>;

fn file_stamps(paths: &[&std::path::Path]) -> Vec<Stamp> {
    paths
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len()))
        })
        .collect()
}

/// A change marker for polled sources; `None` for watched ones.
fn fingerprint(source: &CaSource) -> Option<Vec<Stamp>> {
    match source {
        CaSource::Dir(dir) => Some(
            meshca_server::cadir::fingerprint(dir)
                .into_iter()
                .map(|(_, s)| s)
                .collect(),
        ),
        CaSource::Files { cert, key, roots } => {
            let mut paths = vec![cert.as_path(), key.as_path()];
            paths.extend(roots.as_deref());
            Some(file_stamps(&paths))
        }
        CaSource::Secret { .. } => None,
    }
}

fn load_local(source: &CaSource, now: OffsetDateTime) -> Result<CaBundle> {
    match source {
        CaSource::Dir(dir) => meshca_server::cadir::load(dir, now),
        CaSource::Files { cert, key, roots } => bundle_from_files(cert, key, roots.as_deref(), now),
        CaSource::Secret { .. } => bail!("a Secret is not a local source"),
    }
}

/// Loads the CA once (for the first start).
pub async fn load_once(client: &Client, source: &CaSource) -> Result<CaBundle> {
    let now = OffsetDateTime::now_utc();
    match source {
        CaSource::Dir(_) | CaSource::Files { .. } => load_local(source, now),
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
        CaSource::Dir(_) | CaSource::Files { .. } => {
            let mut last = fingerprint(&source);
            let mut ticker = tokio::time::interval(poll_interval);
            loop {
                ticker.tick().await;
                let now_fp = fingerprint(&source);
                if now_fp == last && handle.get().is_some() {
                    continue;
                }
                match load_local(&source, OffsetDateTime::now_utc()) {
                    Ok(bundle) => {
                        tracing::info!(signer, source = %source, not_after = %bundle.not_after(), "CA loaded");
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
