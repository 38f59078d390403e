//! meshca as a Deployment on the real node of `testenv/up node`: the image
//! built from this test's own `meshca` binary by `deploy/image/build`
//! (no registry), imported into the node's containerd, scheduled by
//! kube-scheduler, its ReplicaSet made by kube-controller-manager, run by the
//! kubelet under containerd + runc with a restricted securityContext
//! (non-root 65532, read-only root filesystem, no capabilities, seccomp
//! RuntimeDefault) and hostNetwork on 127.0.0.1.
//!
//! The pod's volumes are real: `meshca ca init` writes the CA into an emptyDir
//! (init container) that `meshca server` serves from; the server's JWT keys
//! (the apiserver's ServiceAccount public key) come from a ConfigMap volume;
//! the kubelet writes a projected ServiceAccount token (audience istio-ca)
//! that the server accepts, proving it is the pod's own account's token.
//!
//! Needs `testenv/up node` (./test starts it); fails, never skips, without it.

mod common;

use common::{free_port, leaf_uris};

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Pod};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use meshca_testsupport::{TestEnv, TestNode, build_image};

/// Is the Deployment Available (its pods Ready, by the controller-manager)?
fn available(d: &Deployment) -> bool {
    d.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| {
            cs.iter()
                .any(|c| c.type_ == "Available" && c.status == "True")
        })
}

/// What went wrong, for a failure message: pods' status and the namespace's events.
async fn diagnose(client: &kube::Client, ns: &str) -> String {
    let mut out = String::new();
    if let Ok(pods) = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
    {
        for p in pods {
            out += &format!(
                "pod {}: {}\n",
                p.metadata.name.unwrap_or_default(),
                serde_json::to_string(&p.status).unwrap_or_default()
            );
        }
    }
    if let Ok(events) = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
    {
        for e in events {
            out += &format!(
                "event {}: {} {}\n",
                e.involved_object.name.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default()
            );
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn meshca_deployment_runs_on_the_node_from_a_local_image() -> Result<()> {
    let node = TestNode::get();
    let env = TestEnv::get().await;
    let client = env.client();
    let ns = env.namespace("node").await?;
    let tmp = tempfile::tempdir()?;

    // The image, from the very binary under test; imported, never pulled.
    let t = Instant::now();
    let image = build_image(
        "meshca",
        &["--bin", env!("CARGO_BIN_EXE_meshca"), "--tag", "node-e2e"],
        &tmp.path().join("meshca.oci.tar"),
    )?;
    let imported = node.import(&image.archive)?;
    assert_eq!(imported, image.name);
    assert_eq!(image.name, "docker.io/library/meshca:node-e2e");
    eprintln!(
        "image {} {} built and imported in {:?}",
        image.name,
        image.digest,
        t.elapsed()
    );

    // A ServiceAccount of its own, and the JWT keys in a ConfigMap.
    ns.create_service_account("meshca").await?;
    let sa_pub = std::fs::read_to_string(
        std::env::var("MESHCA_TESTENV_SA_PUBLIC_KEY").context("MESHCA_TESTENV_SA_PUBLIC_KEY")?,
    )?;
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "jwt-keys"},
        "data": {"sa.pub": sa_pub},
    }))?;
    Api::<ConfigMap>::namespaced(client.clone(), ns.name())
        .create(&PostParams::default(), &cm)
        .await?;

    let grpc = free_port();
    let monitoring = free_port();
    let issuer = env
        .config()
        .sa_issuer
        .clone()
        .context("MESHCA_TESTENV_SA_ISSUER")?;
    let restricted = serde_json::json!({
        "runAsNonRoot": true,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    });
    let deployment: Deployment = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "meshca"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "meshca"}},
            "template": {
                "metadata": {"labels": {"app": "meshca"}},
                "spec": {
                    "hostNetwork": true,
                    "serviceAccountName": "meshca",
                    "terminationGracePeriodSeconds": 5,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "fsGroup": 65532,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "initContainers": [{
                        "name": "ca-init",
                        "image": image.name,
                        "imagePullPolicy": "Never",
                        "args": ["ca", "init", "--out", "/data/cacerts", "--key-type", "ecdsa-p256"],
                        "securityContext": restricted,
                        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    }],
                    "containers": [{
                        "name": "server",
                        "image": image.name,
                        "imagePullPolicy": "Never",
                        "args": [
                            "server", "--standalone",
                            "--listen", format!("127.0.0.1:{grpc}"),
                            "--monitoring-listen", format!("127.0.0.1:{monitoring}"),
                            "--root-ca-dir", "/data/cacerts",
                            "--state-dir", "/data/state",
                            "--jwt-keys", "/etc/meshca-jwt/sa.pub",
                            "--jwt-issuer", issuer,
                        ],
                        "securityContext": restricted,
                        "readinessProbe": {
                            "httpGet": {"host": "127.0.0.1", "port": monitoring, "path": "/readyz"},
                            "periodSeconds": 1,
                        },
                        "volumeMounts": [
                            {"name": "data", "mountPath": "/data"},
                            {"name": "jwt-keys", "mountPath": "/etc/meshca-jwt", "readOnly": true},
                            {"name": "istio-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true},
                        ],
                    }],
                    "volumes": [
                        {"name": "data", "emptyDir": {}},
                        {"name": "jwt-keys", "configMap": {"name": "jwt-keys"}},
                        {"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
                            "audience": "istio-ca", "expirationSeconds": 3600, "path": "istio-token",
                        }}]}},
                    ],
                },
            },
        },
    }))?;
    let deployments = Api::<Deployment>::namespaced(client.clone(), ns.name());
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .context("creating the Deployment")?;

    // Available: ReplicaSet (controller-manager), scheduling, kubelet, readiness.
    let t = Instant::now();
    loop {
        let d = deployments.get("meshca").await?;
        if available(&d) {
            break;
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!(
                "Deployment meshca not Available after 120 s: {}\n{}",
                serde_json::to_string(&d.status)?,
                diagnose(&client, ns.name()).await
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!("Deployment Available {:?} after creation", t.elapsed());

    let pods = Api::<Pod>::namespaced(client.clone(), ns.name());
    let pod = pods
        .list(&ListParams::default().labels("app=meshca"))
        .await?
        .items
        .into_iter()
        .find(|p| p.metadata.deletion_timestamp.is_none())
        .context("no meshca pod")?;
    let pod_name = pod.metadata.name.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().context("pod without uid")?;
    let spec = pod.spec.as_ref().context("pod without spec")?;
    assert_eq!(spec.node_name.as_deref(), Some(node.name.as_str()));
    // The ServiceAccount admission plugin added the API access volume.
    let api_access = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name.starts_with("kube-api-access-"))
        .context("no kube-api-access projected volume: ServiceAccount admission is off?")?
        .name
        .clone();
    let api_dir = node.pod_volume(&uid, "kubernetes.io~projected", &api_access);
    for f in ["token", "ca.crt", "namespace"] {
        assert!(
            api_dir.join(f).is_file(),
            "{} missing",
            api_dir.join(f).display()
        );
    }
    assert_eq!(
        std::fs::read_to_string(api_dir.join("namespace"))?,
        ns.name()
    );

    // The CA the init container made in the emptyDir, as the server serves it,
    // and the projected istio-ca token the kubelet wrote for the pod's account.
    let root = node
        .pod_volume(&uid, "kubernetes.io~empty-dir", "data")
        .join("cacerts/root-cert.pem");
    let token = node
        .pod_volume(&uid, "kubernetes.io~projected", "istio-token")
        .join("istio-token");
    let certs = tmp.path().join("certs");
    let out = Command::new(env!("CARGO_BIN_EXE_meshca"))
        .args(["request", "--addr", &format!("127.0.0.1:{grpc}")])
        .arg("--root")
        .arg(&root)
        .arg("--token-file")
        .arg(&token)
        .arg("--out")
        .arg(&certs)
        .output()?;
    if !out.status.success() {
        bail!(
            "meshca request with the pod's projected token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let chain = read_chain(&certs.join("cert-chain.pem"))?;
    assert_eq!(
        leaf_uris(&chain),
        [format!("spiffe://cluster.local/ns/{}/sa/meshca", ns.name())]
    );

    // Logs through the apiserver (which asks the kubelet).
    let logs = pods
        .logs(
            &pod_name,
            &LogParams {
                container: Some("server".into()),
                ..Default::default()
            },
        )
        .await
        .context("kubectl logs equivalent (apiserver -> kubelet)")?;
    assert!(!logs.trim().is_empty(), "the server logged nothing");

    // Delete the Deployment (garbage collection removes ReplicaSet and pod)
    // and wait for the pod to be gone before the namespace is.
    deployments
        .delete("meshca", &DeleteParams::foreground())
        .await?;
    let t = Instant::now();
    while !pods
        .list(&ListParams::default().labels("app=meshca"))
        .await?
        .items
        .is_empty()
    {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("meshca pod still there 60 s after deleting its Deployment");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    ns.cleanup().await
}

fn read_chain(path: &Path) -> Result<Vec<String>> {
    let pem = std::fs::read_to_string(path)?;
    Ok(pem
        .split_inclusive("-----END CERTIFICATE-----")
        .map(|s| s.trim().to_owned())
        .filter(|s| s.starts_with("-----BEGIN"))
        .collect())
}

/// Istio's pilot-discovery and pilot-agent (testenv's builds) in an image of
/// their own (`deploy/image/build istio`) run on the node as a non-root pod
/// with a read-only root filesystem: the image the istiod-as-a-pod and
/// proxyless-workload tests start from.
#[tokio::test(flavor = "multi_thread")]
async fn istio_image_runs_on_the_node() -> Result<()> {
    let node = TestNode::get();
    let env = TestEnv::get().await;
    let client = env.client();
    let ns = env.namespace("node-istio").await?;
    let tmp = tempfile::tempdir()?;
    let bindir = env.config().bin_dir.to_str().context("bin dir")?.to_owned();
    let image = build_image(
        "istio",
        &["--bindir", &bindir, "--tag", "node-e2e"],
        &tmp.path().join("istio.oci.tar"),
    )?;
    assert_eq!(node.import(&image.archive)?, image.name);

    let pods = Api::<Pod>::namespaced(client.clone(), ns.name());
    for bin in ["pilot-discovery", "pilot-agent"] {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": bin},
            "spec": {
                "hostNetwork": true,
                "restartPolicy": "Never",
                "automountServiceAccountToken": false,
                "containers": [{
                    "name": "istio",
                    "image": image.name,
                    "imagePullPolicy": "Never",
                    "command": [format!("/usr/local/bin/{bin}")],
                    "args": ["version", "--short"],
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 1337,
                        "readOnlyRootFilesystem": true,
                        "allowPrivilegeEscalation": false,
                        "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                }],
            },
        }))?;
        pods.create(&PostParams::default(), &pod).await?;
    }
    for bin in ["pilot-discovery", "pilot-agent"] {
        let t = Instant::now();
        loop {
            let p = pods.get(bin).await?;
            let phase = p.status.as_ref().and_then(|s| s.phase.clone());
            match phase.as_deref() {
                Some("Succeeded") => break,
                Some("Failed") => bail!(
                    "{bin} failed: {}\n{}",
                    pods.logs(bin, &LogParams::default())
                        .await
                        .unwrap_or_default(),
                    diagnose(&client, ns.name()).await
                ),
                _ if t.elapsed() > Duration::from_secs(60) => bail!(
                    "{bin} not done after 60 s\n{}",
                    diagnose(&client, ns.name()).await
                ),
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
        let logs = pods.logs(bin, &LogParams::default()).await?;
        assert!(logs.contains("version"), "{bin} printed {logs:?}");
        pods.delete(bin, &DeleteParams::default()).await?;
    }
    let t = Instant::now();
    while !pods.list(&ListParams::default()).await?.items.is_empty() {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("istio pods still there 60 s after their deletion");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    ns.cleanup().await
}
