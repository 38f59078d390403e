//! Pods with a `podCertificate` projected volume, written as the README's
//! "Pod certificates" section writes them, and what the kubelet put in them.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

/// The projected volume's name and where the app container mounts it.
pub const VOLUME: &str = "mesh";
pub const MOUNT_PATH: &str = "/var/run/mesh";
/// The files in it: the kubelet's key and chain, and the signer's roots.
pub const CREDENTIAL_BUNDLE: &str = "credentialbundle.pem";
pub const ROOTS: &str = "roots.pem";

/// A pod of ServiceAccount `service_account` running `image` (the node's
/// pause image does: it only has to start), with a `podCertificate` volume
/// for `signer` and the signer's roots through a `clusterTrustBundle`
/// projection (by signer name and meshca's label).
pub fn pod(
    name: &str,
    service_account: &str,
    signer: &str,
    image: &str,
    max_expiration_seconds: u32,
) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "hostNetwork": true,
            "serviceAccountName": service_account,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": image,
                "imagePullPolicy": "Never",
                "securityContext": {
                    "runAsNonRoot": true, "runAsUser": 65532, "readOnlyRootFilesystem": true,
                    "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "volumeMounts": [{"name": VOLUME, "mountPath": MOUNT_PATH, "readOnly": true}],
            }],
            "volumes": [{"name": VOLUME, "projected": {"sources": [
                {"podCertificate": {
                    "signerName": signer,
                    "keyType": "ECDSAP256",
                    "maxExpirationSeconds": max_expiration_seconds,
                    "credentialBundlePath": CREDENTIAL_BUNDLE,
                }},
                {"clusterTrustBundle": {
                    "signerName": signer,
                    "labelSelector": {"matchLabels": {"app.kubernetes.io/managed-by": "meshca-signer"}},
                    "path": ROOTS,
                }},
            ]}}],
        },
    }))?)
}

/// Waits until pod `name` is Running (the kubelet starts its containers only
/// once the podCertificate volume holds a credential); returns how long.
pub async fn wait_running(pods: &Api<Pod>, name: &str, limit: Duration) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let p = pods.get(name).await?;
        if p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") {
            return Ok(t.elapsed());
        }
        if t.elapsed() > limit {
            bail!("pod {name} not Running after {limit:?}: {:?}", p.status);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// A `credentialbundle.pem`: the PKCS#8 key, then the chain (leaf first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialBundle {
    pub key_pkcs8: Vec<u8>,
    pub chain: Vec<Vec<u8>>,
}

impl CredentialBundle {
    /// Reads `credentialbundle.pem` from the volume directory `dir`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CREDENTIAL_BUNDLE);
        let pem = std::fs::read(&path).with_context(|| {
            let listing: Vec<_> = std::fs::read_dir(dir)
                .map(|d| d.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default();
            format!("reading {} (there: {listing:?})", path.display())
        })?;
        let blocks = meshca_pki::pem::parse_all(&pem)?;
        let (key, certs) = blocks.split_first().context("empty credential bundle")?;
        ensure!(
            key.label == "PRIVATE KEY",
            "the credential bundle does not start with a PKCS#8 key but {:?}",
            key.label
        );
        ensure!(
            !certs.is_empty() && certs.iter().all(|b| b.label == "CERTIFICATE"),
            "the credential bundle's key is not followed by certificates only"
        );
        Ok(CredentialBundle {
            key_pkcs8: key.der.to_vec(),
            chain: certs.iter().map(|b| b.der.to_vec()).collect(),
        })
    }

    /// The key and the chain as PEM files in `out` (`key.pem`, `chain.pem`).
    pub fn write_pem(&self, out: &Path) -> Result<()> {
        std::fs::create_dir_all(out)?;
        std::fs::write(
            out.join("key.pem"),
            meshca_pki::pem::encode("PRIVATE KEY", &self.key_pkcs8),
        )?;
        let certs: String = self
            .chain
            .iter()
            .map(|der| meshca_pki::pem::encode("CERTIFICATE", der))
            .collect();
        std::fs::write(out.join("chain.pem"), certs)?;
        Ok(())
    }
}

/// A pod [`start_all`] started.
#[derive(Debug, Clone)]
pub struct Started {
    pub name: String,
    pub uid: String,
    /// From its create call to the first watch event that shows it Running.
    pub running_after: Duration,
}

/// Creates `pods` in `api`'s namespace, `concurrency` create calls at a
/// time, and waits (at most `limit` in all) until every one is Running, as
/// seen by one watch on the namespace (no polling per pod: at hundreds of
/// pods that would be the load).
pub async fn start_all(
    api: &Api<Pod>,
    pods: Vec<Pod>,
    concurrency: usize,
    limit: Duration,
) -> Result<Vec<Started>> {
    use futures::{StreamExt, TryStreamExt};
    use kube::runtime::watcher;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    let total = pods.len();
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    // The watch is established (its initial list done) before the first
    // create, so no pod can turn Running unseen.
    loop {
        match tokio::time::timeout(Duration::from_secs(30), events.try_next()).await {
            Ok(Ok(Some(watcher::Event::InitDone))) => break,
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) => bail!("the pod watch ended"),
            Ok(Err(e)) => bail!("pod watch: {e}"),
            Err(_) => bail!("the pod watch did not start in 30 s"),
        }
    }
    let creating = {
        let created = created.clone();
        let api = api.clone();
        tokio::spawn(async move {
            futures::stream::iter(pods)
                .map(|pod| {
                    let (api, created) = (api.clone(), created.clone());
                    async move {
                        let name = pod.metadata.name.clone().unwrap_or_default();
                        created.lock().unwrap().insert(name, Instant::now());
                        api.create(&PostParams::default(), &pod).await
                    }
                })
                .buffer_unordered(concurrency.max(1))
                .try_for_each(|_| async { Ok(()) })
                .await
        })
    };
    let deadline = Instant::now() + limit;
    let mut started: HashMap<String, Started> = HashMap::new();
    while started.len() < total {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = match tokio::time::timeout(left, events.try_next()).await {
            Err(_) => bail!("{} of {total} pods Running after {limit:?}", started.len()),
            Ok(Ok(Some(e))) => e,
            Ok(Ok(None)) => bail!("the pod watch ended"),
            // The watcher re-lists by itself after an error.
            Ok(Err(_)) => continue,
        };
        let (watcher::Event::Apply(p) | watcher::Event::InitApply(p)) = event else {
            continue;
        };
        let name = p.metadata.name.clone().unwrap_or_default();
        if started.contains_key(&name)
            || p.status.as_ref().and_then(|s| s.phase.as_deref()) != Some("Running")
        {
            continue;
        }
        let Some(at) = created.lock().unwrap().get(&name).copied() else {
            continue;
        };
        started.insert(
            name.clone(),
            Started {
                name,
                uid: p.metadata.uid.clone().unwrap_or_default(),
                running_after: at.elapsed(),
            },
        );
    }
    creating.await.context("pod creator")??;
    let mut all: Vec<Started> = started.into_values().collect();
    all.sort_by_key(|s| s.running_after);
    Ok(all)
}

/// The `p`th percentile (nearest rank) of `times`; zero when empty.
pub fn percentile(times: &[Duration], p: usize) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    match sorted.len() {
        0 => Duration::ZERO,
        n => sorted[((n * p).div_ceil(100)).clamp(1, n) - 1],
    }
}

/// `meshca signer` (the binary at `meshca`) for a signer name of its own,
/// `meshca.test/<namespace>`, with pod certificates on, a fresh ECDSA P-256
/// root and exactly the Helm chart's RBAC.
pub struct PodSigner {
    pub name: String,
    /// The root, DER (the CA is the root itself).
    pub root_der: Vec<u8>,
    pub ca_dir: std::path::PathBuf,
    _process: crate::Proc,
}

impl PodSigner {
    pub async fn start(
        meshca: &Path,
        ns: &crate::TestNamespace,
        extra: &[&str],
    ) -> Result<PodSigner> {
        use std::process::{Command, Stdio};
        let name = format!("meshca.test/{}", ns.name());
        let ca_dir = ns.temp_dir().join("signer-ca");
        let out = Command::new(meshca)
            .args(["ca", "init", "--key-type", "ecdsa-p256", "--out"])
            .arg(&ca_dir)
            .output()
            .with_context(|| format!("running {}", meshca.display()))?;
        ensure!(
            out.status.success(),
            "meshca ca init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rbac = crate::chart::signer_rbac(
            ns.name(),
            &ns.unique_name("m"),
            &[&name],
            ns.name(),
            &[
                "leaderElection.enabled=false",
                "signer.trustBundle=false",
                "signer.podCertificates.enabled=true",
            ],
        )?;
        let identity = ns
            .identity_from_manifest("signer-ca-controller-manager", &rbac)
            .await?;
        let child = Command::new(meshca)
            .args(["signer", "--signer-name", &name, "--ca-dir"])
            .arg(&ca_dir)
            .arg("--kubeconfig")
            .arg(identity.kubeconfig_path())
            .args(["--pod-certificates", "--no-trust-bundle"])
            .args(["--monitoring-listen", "none", "--no-leader-election"])
            .args(extra)
            // One line per certificate at info: hundreds in the scale runs.
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting meshca signer")?;
        let root = std::fs::read(ca_dir.join("root-cert.pem"))?;
        let root_der = meshca_pki::pem::parse_all(&root)?
            .into_iter()
            .next()
            .context("empty root-cert.pem")?
            .der
            .to_vec();
        Ok(PodSigner {
            name,
            root_der,
            ca_dir,
            _process: crate::Proc(child),
        })
    }

    /// Deletes the signer's ClusterTrustBundles (cluster-scoped: the
    /// namespace's cleanup does not reach them).
    pub async fn cleanup(&self, client: &kube::Client) {
        use k8s_openapi::api::certificates::v1beta1::ClusterTrustBundle;
        let api = Api::<ClusterTrustBundle>::all(client.clone());
        let _ = api
            .delete_collection(
                &kube::api::DeleteParams::default(),
                &kube::api::ListParams::default().fields(&format!("spec.signerName={}", self.name)),
            )
            .await;
    }
}
