//! Where a CA comes from.

use std::path::PathBuf;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use meshca_pki::CaBundle;
use time::OffsetDateTime;

use crate::files::Stamp;

/// A CA's material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// Istio's cacerts layout (`ca-cert.pem`, `ca-key.pem`, `cert-chain.pem`,
    /// `root-cert.pem`) or `tls.crt`, `tls.key` and optional `ca.crt`; polled.
    Dir(PathBuf),
    /// A `kubernetes.io/tls` Secret (`tls.crt`, `tls.key`, optional `ca.crt`); watched.
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

impl CaSource {
    /// A change marker for polled sources; `None` for watched ones.
    pub fn stamps(&self) -> Option<Vec<Stamp>> {
        match self {
            CaSource::Dir(dir) => Some(
                crate::dir::fingerprint(dir)
                    .into_iter()
                    .map(|(_, s)| s)
                    .collect(),
            ),
            CaSource::Files { cert, key, roots } => {
                let mut paths = vec![cert.as_path(), key.as_path()];
                paths.extend(roots.as_deref());
                Some(crate::files::stamps(&paths))
            }
            CaSource::Secret { .. } => None,
        }
    }

    /// Loads from disk; a Secret needs [`CaSource::load`].
    pub fn load_local(&self, now: OffsetDateTime) -> Result<CaBundle> {
        match self {
            CaSource::Dir(dir) => crate::dir::load(dir, now),
            CaSource::Files { cert, key, roots } => {
                crate::files::load(cert, key, roots.as_deref(), now)
            }
            CaSource::Secret { namespace, name } => {
                anyhow::bail!("Secret {namespace}/{name} needs a Kubernetes client")
            }
        }
    }

    /// Loads the CA once, from disk or from the API.
    pub async fn load(
        &self,
        client: Option<&kube::Client>,
        now: OffsetDateTime,
    ) -> Result<CaBundle> {
        match (self, client) {
            (CaSource::Secret { namespace, name }, Some(client)) => {
                let secret = Api::<Secret>::namespaced(client.clone(), namespace)
                    .get(name)
                    .await
                    .with_context(|| format!("reading CA Secret {namespace}/{name}"))?;
                crate::secret::load_tls(&secret, now)
            }
            _ => self.load_local(now),
        }
    }
}
