//! Root distribution by `meshca server` against a real kube-apiserver, with
//! exactly deploy/server/rbac.yaml + rbac-root-configmap.yaml +
//! rbac-cluster-trust-bundle.yaml, two replicas sharing one plugged-in CA:
//! ConfigMap `istio-ca-root-cert` appears in existing and new namespaces and
//! ClusterTrustBundle `istio.io:istiod-ca:root-cert` is created; both are
//! put back after tampering or deletion (server-side apply as field manager
//! `meshca-server`, keeping other managers' keys), by whichever replica holds the
//! Lease (the other takes over when the holder stops), and follow a root
//! change of the CA files.

mod common;

use common::{Proc, ders, free_port, meshca};

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1beta1::ClusterTrustBundle;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use meshca_testsupport::{Identity, TestEnv, chart};

const BUNDLE: &str = "istio.io:istiod-ca:root-cert";
const LEASE: &str = "meshca-namespace-controller";

fn root_file(dir: &Path) -> Vec<Vec<u8>> {
    ders(&std::fs::read_to_string(dir.join("root-cert.pem")).unwrap())
}

/// The roots in a namespace's ConfigMap, if it has Istio's shape.
async fn configmap_roots(client: &kube::Client, ns: &str) -> Option<Vec<Vec<u8>>> {
    let cm = Api::<ConfigMap>::namespaced(client.clone(), ns)
        .get_opt("istio-ca-root-cert")
        .await
        .ok()??;
    let labelled = cm
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("istio.io/config"))
        .is_some_and(|v| v == "true");
    let pem = cm.data.as_ref()?.get("root-cert.pem")?;
    labelled.then(|| ders(pem))
}

/// The roots in the ClusterTrustBundle, if it has Istio's signer.
async fn bundle_roots(client: &kube::Client) -> Option<Vec<Vec<u8>>> {
    let b = Api::<ClusterTrustBundle>::all(client.clone())
        .get_opt(BUNDLE)
        .await
        .ok()??;
    (b.spec.signer_name.as_deref() == Some("istio.io/istiod-ca"))
        .then(|| ders(&b.spec.trust_bundle))
}

/// Waits until every namespace's ConfigMap and the ClusterTrustBundle hold
/// exactly `roots`.
async fn wait_roots(client: &kube::Client, namespaces: &[&str], roots: &[Vec<u8>], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut wrong = Vec::new();
        for ns in namespaces {
            if configmap_roots(client, ns).await.as_deref() != Some(roots) {
                wrong.push(*ns);
            }
        }
        if bundle_roots(client).await.as_deref() != Some(roots) {
            wrong.push("ClusterTrustBundle");
        }
        if wrong.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: roots not in sync in {wrong:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether field manager `meshca-server` owns `field` (a fieldsV1 path)
/// through `operation` (`Apply`, or `Update` for a patch).
fn written_by_meshca(meta: &ObjectMeta, field: &[&str], operation: &str) -> bool {
    meta.managed_fields.iter().flatten().any(|entry| {
        let owned = entry
            .fields_v1
            .as_ref()
            .is_some_and(|f| field.iter().try_fold(&f.0, |v, key| v.get(*key)).is_some());
        entry.manager.as_deref() == Some("meshca-server")
            && entry.operation.as_deref() == Some(operation)
            && owned
    })
}

/// Waits until the Lease names `holder`.
async fn wait_holder(leases: &Api<Lease>, holder: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = leases
            .get_opt(LEASE)
            .await
            .unwrap()
            .and_then(|l| l.spec?.holder_identity);
        if now.as_deref() == Some(holder) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Lease {LEASE}: holder {now:?}, expected {holder}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One replica of `meshca server` distributing the roots, ready.
async fn replica(identity: &Identity, plugged: &Path, namespace: &str, pod: &str) -> Proc {
    let state = identity
        .kubeconfig_path()
        .with_file_name(format!("state-{pod}"));
    let monitoring = format!("127.0.0.1:{}", free_port());
    let mut server = Proc(
        Command::new(env!("CARGO_BIN_EXE_meshca"))
            .args(["server", "--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--monitoring-listen", &monitoring])
            .arg("--root-ca-dir")
            .arg(plugged)
            .args(["--reload-interval", "200ms"])
            .arg("--state-dir")
            .arg(&state)
            .arg("--kubeconfig")
            .arg(identity.kubeconfig_path())
            .args(["--no-impersonation", "--cluster-trust-bundle"])
            .args(["--leader-election-lease-duration", "2s"])
            .env("POD_NAMESPACE", namespace)
            .env("POD_NAME", pod)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting meshca server")
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            server.0.try_wait().unwrap().is_none(),
            "meshca server exited"
        );
        let ready = Command::new("curl")
            .args(["-sf", &format!("http://{monitoring}/readyz")])
            .output()
            .is_ok_and(|o| o.status.success());
        if ready {
            return server;
        }
        assert!(Instant::now() < deadline, "meshca server not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops a replica as Kubernetes does (SIGTERM), so it releases the Lease.
fn terminate(mut server: Proc) {
    let pid = server.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = server.0.wait().unwrap();
    assert!(status.success(), "meshca server after SIGTERM: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_namespace_gets_the_root_configmap_and_it_is_kept_in_sync() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let env = TestEnv::get().await;
        let admin = env.client();
        let home = env.namespace("srv-rootcm").await.unwrap();
        let before = env.namespace("srv-rootcm-old").await.unwrap();
        let dir = home.temp_dir().to_path_buf();
        let (root, plugged) = (dir.join("root"), dir.join("plugged"));
        let (root_s, plugged_s) = (root.to_str().unwrap(), plugged.to_str().unwrap());
        for args in [
            vec!["--out", root_s, "--org", "rootcm"],
            vec![
                "--out",
                plugged_s,
                "--intermediate-of",
                root_s,
                "--org",
                "rootcm",
            ],
        ] {
            let mut all = vec!["ca", "init", "--key-type", "ecdsa-p256"];
            all.extend(args);
            meshca(&all).unwrap();
        }

        let rbac = chart::server_rbac(
            home.name(),
            &[
                "server.rootConfigMap=true",
                "leaderElection.enabled=true",
                "server.clusterTrustBundle=true",
            ],
        )
        .unwrap();
        let identity = home.identity_from_manifest("meshca", &rbac).await.unwrap();
        let leases = Api::<Lease>::namespaced(admin.clone(), home.name());
        let first_replica = replica(&identity, &plugged, home.name(), "rootcm-a").await;
        wait_holder(&leases, "rootcm-a").await;
        let second_replica = replica(&identity, &plugged, home.name(), "rootcm-b").await;

        // Existing namespaces, and one created after the start.
        let after = env.namespace("srv-rootcm-new").await.unwrap();
        let all = [home.name(), before.name(), after.name()];
        let first = root_file(&plugged);
        assert_eq!(first.len(), 1);
        wait_roots(&admin, &all, &first, "initial sync").await;

        // Tampering (a plain update by another field manager) is undone by
        // meshca's server-side apply, which keeps the other manager's key;
        // a deleted ConfigMap comes back.
        let other_manager = PostParams {
            field_manager: Some("someone-else".into()),
            ..Default::default()
        };
        let in_before = Api::<ConfigMap>::namespaced(admin.clone(), before.name());
        let mut cm = in_before.get("istio-ca-root-cert").await.unwrap();
        let data = cm.data.as_mut().unwrap();
        data.insert("root-cert.pem".into(), "not a root".into());
        data.insert("note".into(), "kept".into());
        in_before
            .replace("istio-ca-root-cert", &other_manager, &cm)
            .await
            .unwrap();
        // The key moved to binaryData (the same key in both is invalid).
        let in_home = Api::<ConfigMap>::namespaced(admin.clone(), home.name());
        let mut cm = in_home.get("istio-ca-root-cert").await.unwrap();
        cm.data.as_mut().unwrap().remove("root-cert.pem");
        cm.binary_data = Some([("root-cert.pem".to_string(), ByteString(b"x".to_vec()))].into());
        in_home
            .replace("istio-ca-root-cert", &other_manager, &cm)
            .await
            .unwrap();
        let bundles = Api::<ClusterTrustBundle>::all(admin.clone());
        let mut bundle = bundles.get(BUNDLE).await.unwrap();
        bundle.spec.trust_bundle = std::fs::read_to_string(plugged.join("ca-cert.pem")).unwrap();
        bundles
            .replace(BUNDLE, &other_manager, &bundle)
            .await
            .unwrap();
        Api::<ConfigMap>::namespaced(admin.clone(), after.name())
            .delete("istio-ca-root-cert", &DeleteParams::default())
            .await
            .unwrap();
        wait_roots(&admin, &all, &first, "after tampering and deletion").await;
        let cm = in_before.get("istio-ca-root-cert").await.unwrap();
        assert_eq!(cm.data.as_ref().unwrap()["note"], "kept");
        assert!(
            // Taken back by the merge patch that updates an existing one.
            written_by_meshca(&cm.metadata, &["f:data", "f:root-cert.pem"], "Update"),
            "root-cert.pem not owned by meshca-server's update: {:?}",
            cm.metadata.managed_fields
        );
        let cm = in_home.get("istio-ca-root-cert").await.unwrap();
        assert!(
            cm.binary_data
                .is_none_or(|b| !b.contains_key("root-cert.pem")),
            "binaryData still has root-cert.pem"
        );
        let bundle = bundles.get(BUNDLE).await.unwrap();
        assert!(
            written_by_meshca(&bundle.metadata, &["f:spec", "f:trustBundle"], "Apply"),
            "trustBundle not owned by meshca-server's apply: {:?}",
            bundle.metadata.managed_fields
        );

        // The holder stops and hands the Lease over; the standby repairs.
        terminate(first_replica);
        wait_holder(&leases, "rootcm-b").await;
        Api::<ConfigMap>::namespaced(admin.clone(), before.name())
            .delete("istio-ca-root-cert", &DeleteParams::default())
            .await
            .unwrap();
        Api::<ClusterTrustBundle>::all(admin.clone())
            .delete(BUNDLE, &DeleteParams::default())
            .await
            .unwrap();
        wait_roots(&admin, &all, &first, "after the leader stopped").await;

        // A second root in the CA files (multi-root rotation) reaches every namespace.
        let next = dir.join("next-root");
        meshca(&[
            "ca",
            "init",
            "--key-type",
            "ecdsa-p256",
            "--out",
            next.to_str().unwrap(),
            "--org",
            "rootcm-next",
        ])
        .unwrap();
        let both = format!(
            "{}{}",
            std::fs::read_to_string(plugged.join("root-cert.pem")).unwrap(),
            std::fs::read_to_string(next.join("root-cert.pem")).unwrap()
        );
        let tmp = plugged.join(".root-cert.pem.tmp");
        std::fs::write(&tmp, &both).unwrap();
        std::fs::rename(&tmp, plugged.join("root-cert.pem")).unwrap();
        let rotated = root_file(&plugged);
        assert_eq!(rotated.len(), 2);
        wait_roots(&admin, &all, &rotated, "after the root change").await;

        drop(second_replica);
        let _ = Api::<ClusterTrustBundle>::all(admin.clone())
            .delete(BUNDLE, &DeleteParams::default())
            .await;
        // The server also wrote into namespaces outside this test: remove
        // exactly the ConfigMaps that carry this test's roots.
        let everywhere = Api::<ConfigMap>::all(admin.clone());
        let lp = ListParams::default().fields("metadata.name=istio-ca-root-cert");
        for cm in everywhere.list(&lp).await.unwrap() {
            let pem = cm.data.as_ref().and_then(|d| d.get("root-cert.pem"));
            let ns = cm.metadata.namespace.clone().unwrap_or_default();
            let ours = pem.is_some_and(|p| {
                let d = ders(p);
                d == first || d == rotated
            });
            if ours {
                let _ = Api::<ConfigMap>::namespaced(admin.clone(), &ns)
                    .delete("istio-ca-root-cert", &DeleteParams::default())
                    .await;
            }
        }
        after.cleanup().await.unwrap();
        before.cleanup().await.unwrap();
        home.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}
