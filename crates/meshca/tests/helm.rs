//! meshca installed the way its users install it: `helm install` of
//! deploy/charts/meshca on the real node of `testenv/up node`, from an image
//! built from this test's own binary (deploy/image/build, imported, never
//! pulled). Deployments become Available through their real readiness
//! probes; the roots reach `istio-ca-root-cert` in every namespace; Istio's
//! real pilot-agent, as a proxyless workload pod with the kubelet-projected
//! token and the kubelet-mounted root, gets its certificate from meshca (local
//! CA, then RA mode behind the signer installed in the seed's shape); the
//! leading pods are deleted and the release upgraded while 200 workloads keep
//! renewing; istiod as a pod in RA mode (the seed's step, external-ca-cert
//! mounted by the kubelet) hands out a certificate that chains to the
//! signer's root; `helm uninstall` leaves no Lease, CSR or Deployment
//! behind, and the roots stay.
//!
//! Pods use hostNetwork on 127.0.0.1 (the node has no pod network), so on
//! this one node a component runs one replica at a time: a second replica
//! could not bind the same ports (the scheduler keeps it Pending), and a
//! rollout replaces the pod (maxSurge 0). With two nodes the chart's default
//! (2 replicas, maxSurge 1, PDB) keeps one serving throughout.
//!
//! Needs `testenv/up node` (./test starts it); fails, never skips, without it.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::free_port;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Pod, Secret};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use meshca_pki::csr::build_csr;
use meshca_pki::{KeyType, SanEntry, SigningKey, cert};
use meshca_proto::IstioCertificateRequest;
use meshca_proto::istio_certificate_service_client::IstioCertificateServiceClient;
use meshca_testsupport::{
    TestEnv, TestNamespace, TestNode, TokenOptions, build_image, chart, pod_certificates,
};
use serde_json::{Value, json};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

const CHART_TIMEOUT: &str = "180s";

/// The ports the pods bind on 127.0.0.1 (hostNetwork).
struct Ports {
    grpc: u16,
    monitoring: u16,
    signer_monitoring: u16,
}

/// Values every install on this node needs: the local image, the host's
/// network on 127.0.0.1, the apiserver's real address (no kube-proxy), one
/// replica replaced in place.
fn node_values(node: &TestNode, ports: &Ports, tag: &str, istio_namespace: &str) -> Value {
    let api_env = json!([
        {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
        {"name": "KUBERNETES_SERVICE_PORT", "value": node.apiserver_port.to_string()},
    ]);
    let one_at_a_time = json!({
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    });
    let component = json!({
        "replicas": 1,
        "strategy": one_at_a_time,
        "extraEnv": api_env,
        "terminationGracePeriodSeconds": 10,
    });
    let mut server = component.clone();
    server["ra"] = json!({"timeout": "30s"});
    json!({
        "image": {"repository": "meshca", "tag": tag, "pullPolicy": "Never"},
        "hostNetwork": true,
        "listenAddress": "127.0.0.1",
        "ports": {
            "grpc": ports.grpc,
            "monitoring": ports.monitoring,
            "signerMonitoring": ports.signer_monitoring,
        },
        "istioNamespace": istio_namespace,
        "server": server,
        "signer": component,
    })
}

fn write_values(dir: &Path, name: &str, values: &Value) -> Result<PathBuf> {
    let path = dir.join(format!("{name}.values.json"));
    std::fs::write(&path, serde_json::to_vec_pretty(values)?)?;
    Ok(path)
}

/// `helm ARGS` (testenv's helm, KUBECONFIG from testenv).
fn helm(args: &[&str]) -> Result<String> {
    chart::helm(args)
}

fn install(verb: &str, release: &str, ns: &str, files: &[&Path], sets: &[&str]) -> Result<()> {
    let chart_dir = chart::chart_dir().display().to_string();
    let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    let mut args = vec![
        verb,
        release,
        &chart_dir,
        "-n",
        ns,
        "--wait",
        "--timeout",
        CHART_TIMEOUT,
    ];
    for f in &files {
        args.extend(["-f", f]);
    }
    for s in sets {
        args.extend(["--set", s]);
    }
    helm(&args).map(|_| ())
}

/// `kubectl rollout status`: the newest template's pods are all there and
/// Available (Ready through their probes), and no old pod is left.
fn rolled_out(d: &Deployment) -> bool {
    let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
    let Some(s) = &d.status else { return false };
    s.observed_generation >= d.metadata.generation
        && s.updated_replicas == Some(want)
        && s.replicas == Some(want)
        && s.available_replicas == Some(want)
}

/// Pods and events of a namespace, for failure messages.
async fn diagnose(client: &kube::Client, ns: &str) -> String {
    let mut out = String::new();
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    for p in pods
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        let name = p.metadata.name.clone().unwrap_or_default();
        out += &format!(
            "pod {name}: {}\n",
            serde_json::to_string(&p.status).unwrap_or_default()
        );
        if let Ok(logs) = pods
            .logs(
                &name,
                &LogParams {
                    tail_lines: Some(20),
                    ..Default::default()
                },
            )
            .await
        {
            out += &format!("--- logs of {name}:\n{logs}\n");
        }
    }
    let events = Api::<Event>::namespaced(client.clone(), ns);
    for e in events
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default()
    {
        out += &format!(
            "event {}: {} {}\n",
            e.involved_object.name.unwrap_or_default(),
            e.reason.unwrap_or_default(),
            e.message.unwrap_or_default()
        );
    }
    out
}

/// Waits until Deployment `name` has rolled out; how long that took.
async fn wait_available(client: &kube::Client, ns: &str, name: &str) -> Result<Duration> {
    let api = Api::<Deployment>::namespaced(client.clone(), ns);
    let t = Instant::now();
    loop {
        if api.get_opt(name).await?.as_ref().is_some_and(rolled_out) {
            return Ok(t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(120) {
            bail!(
                "{ns}/{name} not rolled out after 120 s\n{}",
                diagnose(client, ns).await
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The roots in `istio-ca-root-cert` of every Active namespace (but the
/// system ones istiod skips too), once they all equal `expected` (waits for
/// the distribution); how many namespaces that is.
async fn root_in_every_namespace(client: &kube::Client, expected: &str) -> Result<usize> {
    let namespaces = Api::<Namespace>::all(client.clone());
    let t = Instant::now();
    loop {
        let mut missing = Vec::new();
        let mut count = 0;
        for ns in namespaces.list(&ListParams::default()).await? {
            let active = ns.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Active");
            let name = ns.metadata.name.unwrap_or_default();
            let ignored = meshca_server::distribution::configmap::IGNORED_NAMESPACES;
            if !active || ignored.contains(&name.as_str()) {
                continue;
            }
            count += 1;
            let cm = Api::<ConfigMap>::namespaced(client.clone(), &name)
                .get_opt("istio-ca-root-cert")
                .await?;
            let root = cm
                .and_then(|c| c.data)
                .and_then(|mut d| d.remove("root-cert.pem"));
            if root.as_deref().map(str::trim) != Some(expected.trim()) {
                missing.push(name);
            }
        }
        if missing.is_empty() {
            return Ok(count);
        }
        if t.elapsed() > Duration::from_secs(60) {
            bail!("istio-ca-root-cert missing or stale in {missing:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Istio's pilot-agent as a proxyless workload pod of ServiceAccount `sa`:
/// no Envoy (`DISABLE_ENVOY`), certificates written to an emptyDir
/// (`OUTPUT_CERTS`), the kubelet-projected token (audience istio-ca) and the
/// kubelet-mounted `istio-ca-root-cert`. The agent's status server would
/// listen on every interface of the host's network: its port is one this
/// test holds on 127.0.0.1 (`blocked_port`), so that bind fails (the agent
/// logs it and goes on) and nothing listens beyond loopback.
async fn start_workload(
    client: &kube::Client,
    ns: &str,
    name: &str,
    sa: &str,
    image: &str,
    ca_port: u16,
    blocked_port: u16,
) -> Result<String> {
    let restricted = json!({
        "runAsNonRoot": true, "runAsUser": 1337, "runAsGroup": 1337,
        "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
    });
    let scratch = [
        "istio-proxy",
        "workload-socket",
        "credential-socket",
        "istio-data",
        "tmp",
        "certs",
    ];
    let mounts = [
        "/etc/istio/proxy",
        "/var/run/secrets/workload-spiffe-uds",
        "/var/run/secrets/credential-uds",
        "/var/lib/istio/data",
        "/tmp",
        "/var/run/secrets/workload-certs",
    ];
    let mut volume_mounts: Vec<Value> = scratch
        .iter()
        .zip(mounts)
        .map(|(v, m)| json!({"name": v, "mountPath": m}))
        .collect();
    volume_mounts.push(
        json!({"name": "istio-token", "mountPath": "/var/run/secrets/tokens", "readOnly": true}),
    );
    volume_mounts.push(
        json!({"name": "istiod-ca-cert", "mountPath": "/var/run/secrets/istio", "readOnly": true}),
    );
    let mut volumes: Vec<Value> = scratch
        .iter()
        .map(|v| json!({"name": v, "emptyDir": {}}))
        .collect();
    volumes.push(
        json!({"name": "istio-token", "projected": {"sources": [{"serviceAccountToken": {
        "audience": "istio-ca", "expirationSeconds": 3600, "path": "istio-token"}}]}}),
    );
    volumes.push(json!({"name": "istiod-ca-cert", "configMap": {"name": "istio-ca-root-cert"}}));
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "hostNetwork": true,
            "serviceAccountName": sa,
            "automountServiceAccountToken": false,
            "terminationGracePeriodSeconds": 1,
            "securityContext": {"fsGroup": 1337},
            "containers": [{
                "name": "istio-proxy",
                "image": image,
                "imagePullPolicy": "Never",
                "command": ["/usr/local/bin/pilot-agent"],
                "args": ["proxy"],
                "env": [
                    {"name": "DISABLE_ENVOY", "value": "true"},
                    {"name": "CLOUD_PLATFORM", "value": "none"},
                    {"name": "CA_ADDR", "value": format!("127.0.0.1:{ca_port}")},
                    {"name": "OUTPUT_CERTS", "value": "/var/run/secrets/workload-certs"},
                    {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "SERVICE_ACCOUNT", "value": sa},
                    {"name": "TRUST_DOMAIN", "value": "cluster.local"},
                    // No istiod here; the status port is taken (see above).
                    {"name": "PROXY_CONFIG", "value": format!(r#"{{"discoveryAddress":"127.0.0.1:9","statusPort":{blocked_port}}}"#)},
                ],
                "securityContext": restricted,
                "volumeMounts": volume_mounts,
            }],
            "volumes": volumes,
        },
    }))?;
    let created = Api::<Pod>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &pod)
        .await
        .context("creating the workload pod")?;
    created.metadata.uid.context("pod without a uid")
}

/// Waits until the workload pod wrote its certificate; the chain's path (as
/// the kubelet holds the pod's emptyDir).
async fn workload_chain(
    node: &TestNode,
    client: &kube::Client,
    ns: &str,
    pod: &str,
    uid: &str,
) -> Result<PathBuf> {
    let dir = node.pod_volume(uid, "kubernetes.io~empty-dir", "certs");
    let chain = dir.join("cert-chain.pem");
    let t = Instant::now();
    while !(chain.is_file() && dir.join("key.pem").is_file() && dir.join("root-cert.pem").is_file())
    {
        if t.elapsed() > Duration::from_secs(90) {
            let logs = Api::<Pod>::namespaced(client.clone(), ns)
                .logs(
                    pod,
                    &LogParams {
                        tail_lines: Some(40),
                        ..Default::default()
                    },
                )
                .await
                .unwrap_or_default();
            bail!(
                "{pod} wrote no certificate in 90 s; its log:\n{logs}\n{}",
                diagnose(client, ns).await
            );
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(chain)
}

/// `meshca verify --root ROOT --chain CHAIN`: its report, or an error.
fn meshca_verify(root: &Path, chain: &Path) -> Result<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_meshca"))
        .arg("verify")
        .arg("--root")
        .arg(root)
        .arg("--chain")
        .arg(chain)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "meshca verify: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

async fn delete_pod_and_wait(client: &kube::Client, ns: &str, name: &str) -> Result<()> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    pods.delete(name, &DeleteParams::default()).await?;
    let t = Instant::now();
    while pods.get_opt(name).await?.is_some() {
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "pod {ns}/{name} still there after 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// The running pod of a component (by its chart labels).
async fn component_pod(client: &kube::Client, ns: &str, component: &str) -> Result<String> {
    let pods = Api::<Pod>::namespaced(client.clone(), ns)
        .list(&ListParams::default().labels(&format!("app.kubernetes.io/component={component}")))
        .await?;
    pods.items
        .into_iter()
        .find(|p| p.metadata.deletion_timestamp.is_none())
        .and_then(|p| p.metadata.name)
        .with_context(|| format!("no {component} pod in {ns}"))
}

/// What the renewing workloads saw.
#[derive(Debug, Default)]
struct Renewals {
    attempts: usize,
    ok: usize,
    failed_attempts: usize,
    /// Renewals that never succeeded, retries included.
    lost: usize,
    /// The longest time without any successful renewal.
    longest_gap: Duration,
}

/// `workloads` workloads renew every `every` (as istio-agent does, but far
/// more often), each retrying a failed attempt after 250 ms as long as the
/// run lasts, while `during` runs; then they run `settle` more.
async fn renew_during<F: std::future::Future<Output = Result<()>>>(
    addr: u16,
    server_root: &str,
    server_name: &str,
    identities: Vec<(String, String)>,
    every: Duration,
    settle: Duration,
    during: F,
) -> Result<Renewals> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(server_root))
        .domain_name(server_name);
    let channel: Channel = Endpoint::from_shared(format!("https://127.0.0.1:{addr}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (i, (token, spiffe)) in identities.into_iter().enumerate() {
        let key = SigningKey::generate(KeyType::EcdsaP256)?;
        let csr = build_csr(&key, cert::EMPTY_NAME, &[SanEntry::Uri(spiffe)])
            .map_err(anyhow::Error::msg)?;
        let channel = channel.clone();
        let stopping = stopping.clone();
        tasks.push(tokio::spawn(async move {
            let mut grpc = IstioCertificateServiceClient::new(channel);
            // (time of each attempt, ok), and whether the last renewal was lost.
            let mut seen = Vec::new();
            let mut lost = 0;
            // Spread the first renewals over one period.
            tokio::time::sleep(every.mul_f64(i as f64 / 200.0 % 1.0)).await;
            while !stopping.load(std::sync::atomic::Ordering::SeqCst) {
                let mut done = false;
                while !done {
                    let mut req = tonic::Request::new(IstioCertificateRequest::from_agent(csr.clone(), 3600, ""));
                    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
                    let ok = matches!(grpc.create_certificate(req).await, Ok(r) if r.get_ref().cert_chain.len() >= 2);
                    seen.push((start.elapsed(), ok));
                    done = ok;
                    if !ok {
                        if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                            lost += 1;
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                }
                tokio::time::sleep(every).await;
            }
            (seen, lost)
        }));
    }
    let outcome = during.await;
    tokio::time::sleep(settle).await;
    stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut r = Renewals::default();
    let mut successes = Vec::new();
    for t in tasks {
        let (seen, lost) = t.await?;
        r.lost += lost;
        for (at, ok) in seen {
            r.attempts += 1;
            if ok {
                r.ok += 1;
                successes.push(at);
            } else {
                r.failed_attempts += 1;
            }
        }
    }
    outcome?;
    successes.sort();
    r.longest_gap = successes
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    Ok(r)
}

/// Tokens (audience istio-ca) for `count` workloads over `accounts` accounts
/// of `ns`, with the SPIFFE ID each CSR must carry in RA mode.
async fn workload_tokens(
    ns: &TestNamespace,
    accounts: usize,
    count: usize,
) -> Result<Vec<(String, String)>> {
    for a in 0..accounts {
        ns.create_service_account(&format!("w{a}")).await?;
    }
    let mut out = Vec::new();
    for i in 0..count {
        let sa = format!("w{}", i % accounts);
        let token = ns
            .token_with(
                &sa,
                &TokenOptions {
                    expiration_seconds: 3600,
                    ..Default::default()
                },
            )
            .await?;
        out.push((
            token,
            format!("spiffe://cluster.local/ns/{}/sa/{sa}", ns.name()),
        ));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn helm_installs_meshca_on_the_node_and_workloads_get_certificates() -> Result<()> {
    let node = TestNode::get();
    let env = TestEnv::get().await;
    let client = env.client();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();

    // The images: meshca from this very binary (two tags, for the upgrade),
    // Istio's pilot-agent for the workloads.
    let t = Instant::now();
    let mut meshca_images = Vec::new();
    for tag in ["helm-1", "helm-2"] {
        let image = build_image(
            "meshca",
            &["--bin", env!("CARGO_BIN_EXE_meshca"), "--tag", tag],
            &dir.join(format!("meshca-{tag}.oci.tar")),
        )?;
        ensure!(node.import(&image.archive)? == image.name);
        meshca_images.push(image);
    }
    let bindir = env.config().bin_dir.display().to_string();
    let istio = build_image(
        "istio",
        &["--bindir", &bindir, "--tag", "helm-e2e"],
        &dir.join("istio.oci.tar"),
    )?;
    ensure!(node.import(&istio.archive)? == istio.name);
    eprintln!("images built and imported in {:?}", t.elapsed());

    let mesh = env.namespace("helm-mesh").await?;
    let app = env.namespace("helm-app").await?;
    let ports = Ports {
        grpc: free_port(),
        monitoring: free_port(),
        signer_monitoring: free_port(),
    };
    let values = write_values(
        dir,
        "node",
        &node_values(&node, &ports, "helm-1", mesh.name()),
    )?;
    // Held for the whole test: the workloads' status servers cannot bind it.
    let status_block = std::net::TcpListener::bind("127.0.0.1:0")?;
    let blocked_port = status_block.local_addr()?.port();

    // 1. The mesh CA with its own self-signed root, as istiod's CA.
    let t = Instant::now();
    install(
        "install",
        "meshca",
        mesh.name(),
        &[&chart::profile("local-ca"), &values],
        &[],
    )?;
    wait_available(&client, mesh.name(), "meshca").await?;
    eprintln!(
        "local CA: helm install --wait and Available in {:?}",
        t.elapsed()
    );
    let secret = Api::<Secret>::namespaced(client.clone(), mesh.name())
        .get("istio-ca-secret")
        .await?;
    let root = String::from_utf8(
        secret.data.context("istio-ca-secret without data")?["ca-cert.pem"]
            .0
            .clone(),
    )?;
    let namespaces = root_in_every_namespace(&client, &root).await?;
    eprintln!("istio-ca-root-cert in all {namespaces} namespaces");
    std::fs::write(dir.join("local-root.pem"), &root)?;
    app.create_service_account("productpage").await?;
    let uid = start_workload(
        &client,
        app.name(),
        "productpage",
        "productpage",
        &istio.name,
        ports.grpc,
        blocked_port,
    )
    .await?;
    let chain = workload_chain(&node, &client, app.name(), "productpage", &uid).await?;
    let report = meshca_verify(&dir.join("local-root.pem"), &chain)?;
    let expected = format!("spiffe://cluster.local/ns/{}/sa/productpage", app.name());
    ensure!(report.contains(&expected), "{report}");
    delete_pod_and_wait(&client, app.name(), "productpage").await?;

    // Uninstall: the Deployment and the Lease go, the roots stay.
    helm(&[
        "uninstall",
        "meshca",
        "-n",
        mesh.name(),
        "--wait",
        "--timeout",
        CHART_TIMEOUT,
    ])?;
    let leases = Api::<Lease>::namespaced(client.clone(), mesh.name());
    ensure!(
        leases.list(&ListParams::default()).await?.items.is_empty(),
        "a Lease outlived the release"
    );
    ensure!(
        Api::<Deployment>::namespaced(client.clone(), mesh.name())
            .list(&ListParams::default())
            .await?
            .items
            .is_empty()
    );
    ensure!(
        Api::<ConfigMap>::namespaced(client.clone(), app.name())
            .get_opt("istio-ca-root-cert")
            .await?
            .is_some(),
        "the roots workloads rely on were removed"
    );

    // 2. The seed's shape: the signer in its own namespace with its CA in a
    // Secret, publishing its root to external-ca-cert in the mesh namespace;
    // the mesh CA in RA mode forwarding every request to it.
    let signer_ns = env.namespace("helm-signer").await?;
    let signer_name = format!("{}.example.com/foo", signer_ns.name());
    // signer.name (cluster-scoped names, unique per run) names the Deployment too.
    let signer_deployment = format!("{}-controller-manager", signer_ns.name());
    let ca = dir.join("signer-ca");
    common::meshca(&[
        "ca",
        "init",
        "--out",
        &ca.display().to_string(),
        "--key-type",
        "ecdsa-p256",
        "--org",
        "helm",
    ])?;
    let signer_root = std::fs::read_to_string(ca.join("root-cert.pem"))?;
    let tls: Secret = serde_json::from_value(json!({
        "metadata": {"name": "signer-ca-keypair"},
        "type": "kubernetes.io/tls",
        "stringData": {
            "tls.crt": std::fs::read_to_string(ca.join("ca-cert.pem"))?,
            "tls.key": std::fs::read_to_string(ca.join("ca-key.pem"))?,
        },
    }))?;
    Api::<Secret>::namespaced(client.clone(), signer_ns.name())
        .create(&PostParams::default(), &tls)
        .await?;
    let signer_sets = [
        format!("signer.signerNames={{{signer_name}}}"),
        format!("signer.name={}", signer_ns.name()),
        "signer.podCertificates.enabled=true".to_string(),
    ];
    let signer_sets: Vec<&str> = signer_sets.iter().map(String::as_str).collect();
    install(
        "install",
        "signer-ca",
        signer_ns.name(),
        &[&chart::profile("signer"), &values],
        &signer_sets,
    )?;
    wait_available(&client, signer_ns.name(), &signer_deployment).await?;
    let ra_sets = [format!("server.ra.signer={signer_name}")];
    let ra_sets: Vec<&str> = ra_sets.iter().map(String::as_str).collect();
    install(
        "install",
        "meshca",
        mesh.name(),
        &[&chart::profile("ra"), &values],
        &ra_sets,
    )?;
    wait_available(&client, mesh.name(), "meshca").await?;
    let published = Api::<Secret>::namespaced(client.clone(), mesh.name())
        .get("external-ca-cert")
        .await?;
    ensure!(
        published
            .data
            .as_ref()
            .and_then(|d| d.get("root-cert.pem"))
            .map(|b| b.0.as_slice())
            == Some(signer_root.as_bytes()),
        "external-ca-cert does not hold the signer's root"
    );
    app.create_service_account("reviews").await?;
    let uid = start_workload(
        &client,
        app.name(),
        "reviews",
        "reviews",
        &istio.name,
        ports.grpc,
        blocked_port,
    )
    .await?;
    let chain = workload_chain(&node, &client, app.name(), "reviews", &uid).await?;
    let report = meshca_verify(&ca.join("root-cert.pem"), &chain)?;
    ensure!(
        report.contains(&format!(
            "spiffe://cluster.local/ns/{}/sa/reviews",
            app.name()
        )),
        "{report}"
    );
    // Mesh identity without a sidecar: a pod with a `podCertificate` volume
    // for the signer (the kubelet makes the key and the request), and the
    // signer's roots through a `clusterTrustBundle` projection. Its
    // certificate and pilot-agent's (RA mode) complete mutual TLS both ways.
    let pod_cert = pod_certificate(&node, &client, app.name(), "details", &signer_name).await?;
    ensure!(
        std::fs::read_to_string(&pod_cert.roots)
            .with_context(|| {
                let dir = pod_cert
                    .roots
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_default();
                let listing: Vec<_> = std::fs::read_dir(&dir)
                    .map(|d| d.flatten().map(|e| e.file_name()).collect())
                    .unwrap_or_default();
                format!("reading {} (there: {listing:?})", pod_cert.roots.display())
            })?
            .trim()
            == signer_root.trim(),
        "the projected bundle is not the signer's root"
    );
    let report = meshca_verify(&pod_cert.roots, &pod_cert.chain)?;
    let details = format!("spiffe://cluster.local/ns/{}/sa/details", app.name());
    ensure!(report.contains(&details), "{report}");
    let agent_dir = chain.parent().context("chain dir")?;
    let agent = Credential {
        chain: chain.clone(),
        key: agent_dir.join("key.pem"),
    };
    mutual_tls(dir, &pod_cert.credential, &agent, &pod_cert.roots)?;
    mutual_tls(dir, &agent, &pod_cert.credential, &pod_cert.roots)?;
    delete_pod_and_wait(&client, app.name(), "details").await?;
    delete_pod_and_wait(&client, app.name(), "reviews").await?;

    // 3. Failover and upgrade while 200 workloads keep renewing through the
    // RA path: delete the signer's and the server's pods, then upgrade both
    // releases to a new image.
    let ra_secret = Api::<Secret>::namespaced(client.clone(), mesh.name())
        .get("istio-ca-secret")
        .await?;
    let server_root =
        String::from_utf8(ra_secret.data.context("no data")?["ca-cert.pem"].0.clone())?;
    let server_name = format!("meshca.{}.svc", mesh.name());
    let identities = workload_tokens(&app, 20, 200).await?;
    let renewals = renew_during(
        ports.grpc,
        &server_root,
        &server_name,
        identities.clone(),
        Duration::from_secs(2),
        Duration::from_secs(5),
        async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let signer_pod = component_pod(&client, signer_ns.name(), "signer").await?;
            delete_pod_and_wait(&client, signer_ns.name(), &signer_pod).await?;
            wait_available(&client, signer_ns.name(), &signer_deployment).await?;
            let server_pod = component_pod(&client, mesh.name(), "server").await?;
            delete_pod_and_wait(&client, mesh.name(), &server_pod).await?;
            wait_available(&client, mesh.name(), "meshca").await?;
            Ok(())
        },
    )
    .await?;
    eprintln!("failover (signer pod, then server pod deleted): {renewals:?}");
    ensure!(
        renewals.lost == 0,
        "renewals lost during the failover: {renewals:?}"
    );
    ensure!(renewals.ok > 200, "too few renewals: {renewals:?}");

    let upgrade = renew_during(
        ports.grpc,
        &server_root,
        &server_name,
        identities,
        Duration::from_secs(2),
        Duration::from_secs(5),
        async {
            tokio::time::sleep(Duration::from_secs(3)).await;
            install(
                "upgrade",
                "signer-ca",
                signer_ns.name(),
                &[&chart::profile("signer"), &values],
                &{
                    let mut s = signer_sets.clone();
                    s.push("image.tag=helm-2");
                    s
                },
            )?;
            install(
                "upgrade",
                "meshca",
                mesh.name(),
                &[&chart::profile("ra"), &values],
                &{
                    let mut s = ra_sets.clone();
                    s.push("image.tag=helm-2");
                    s
                },
            )?;
            Ok(())
        },
    )
    .await?;
    eprintln!("helm upgrade to a new image: {upgrade:?}");
    ensure!(
        upgrade.lost == 0,
        "renewals lost during the upgrade: {upgrade:?}"
    );
    let image = Api::<Deployment>::namespaced(client.clone(), mesh.name())
        .get("meshca")
        .await?
        .spec
        .and_then(|s| s.template.spec)
        .map(|s| s.containers[0].image.clone().unwrap_or_default())
        .unwrap_or_default();
    ensure!(
        image == "meshca:helm-2",
        "the upgrade did not change the image: {image}"
    );

    // 4. The seed itself: istiod (Istio's pilot-discovery, as a pod) in RA
    // mode in front of the signer, with external-ca-cert mounted by the
    // kubelet where the seed mounts it. meshca's server goes first: istiod
    // is the namespace controller now.
    helm(&[
        "uninstall",
        "meshca",
        "-n",
        mesh.name(),
        "--wait",
        "--timeout",
        CHART_TIMEOUT,
    ])?;
    istiod_in_ra_mode(
        &env,
        &node,
        &mesh,
        &istio.name,
        &signer_name,
        &signer_root,
        dir,
    )
    .await?;

    // 5. Teardown: nothing of meshca's left but the roots.
    helm(&[
        "uninstall",
        "signer-ca",
        "-n",
        signer_ns.name(),
        "--wait",
        "--timeout",
        CHART_TIMEOUT,
    ])?;
    for ns in [mesh.name(), signer_ns.name()] {
        // meshca's Leases (istiod's own, from step 4, are istiod's business).
        let leases: Vec<Lease> = Api::<Lease>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|l| {
                matches!(
                    l.metadata.name.as_deref(),
                    Some("meshca-namespace-controller" | "signer-ca-leader")
                )
            })
            .collect();
        ensure!(
            leases.is_empty(),
            "Leases left in {ns}: {:?}",
            leases.iter().map(|l| &l.metadata.name).collect::<Vec<_>>()
        );
        // The pods end with their grace period (they are not the release's
        // objects, so `helm uninstall --wait` does not wait for them).
        let pods = Api::<Pod>::namespaced(client.clone(), ns);
        let t = Instant::now();
        while !pods.list(&ListParams::default()).await?.items.is_empty() {
            ensure!(
                t.elapsed() < Duration::from_secs(60),
                "pods left in {ns} 60 s after uninstall"
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let csrs = Api::<CertificateSigningRequest>::all(client.clone())
        .list(&ListParams::default().fields(&format!("spec.signerName={signer_name}")))
        .await?;
    ensure!(
        csrs.items.is_empty(),
        "{} CSRs left behind",
        csrs.items.len()
    );
    ensure!(
        Api::<Secret>::namespaced(client.clone(), mesh.name())
            .get_opt("external-ca-cert")
            .await?
            .is_some(),
        "the published roots were removed"
    );
    app.cleanup().await?;
    signer_ns.cleanup().await?;
    mesh.cleanup().await
}

/// istiod in RA mode as a pod (the seed's step): `EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API`,
/// `K8S_SIGNER`, and Secret external-ca-cert (published by the signer) mounted
/// at /etc/external-ca-cert; its ServiceAccount `istiod` has the `approve` the
/// signer's chart grants, plus what istiod reads to run (cluster-admin here:
/// Istio's own chart is not under test). Istio's CA client then gets a
/// workload certificate from it that chains to the signer's custom root, and
/// istiod deletes its CSR.
async fn istiod_in_ra_mode(
    env: &TestEnv,
    node: &TestNode,
    mesh: &TestNamespace,
    image: &str,
    signer: &str,
    signer_root: &str,
    dir: &Path,
) -> Result<()> {
    let client = env.client();
    mesh.create_service_account("istiod").await?;
    let binding: k8s_openapi::api::rbac::v1::ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": format!("{}-istiod-admin", mesh.name())},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "cluster-admin"},
        "subjects": [{"kind": "ServiceAccount", "name": "istiod", "namespace": mesh.name()}],
    }))?;
    let bindings = Api::<k8s_openapi::api::rbac::v1::ClusterRoleBinding>::all(client.clone());
    bindings.create(&PostParams::default(), &binding).await?;
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let addr = |p: u16| format!("127.0.0.1:{p}");
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "istiod"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "istiod"}},
            "template": {
                "metadata": {"labels": {"app": "istiod"}},
                "spec": {
                    "hostNetwork": true,
                    "serviceAccountName": "istiod",
                    "terminationGracePeriodSeconds": 2,
                    "securityContext": {"runAsNonRoot": true, "runAsUser": 1337, "fsGroup": 1337},
                    "containers": [{
                        "name": "discovery",
                        "image": image,
                        "imagePullPolicy": "Never",
                        "command": ["/usr/local/bin/pilot-discovery"],
                        "args": [
                            "discovery", "--clusterID", "Kubernetes",
                            "--httpAddr", addr(ports[0]), "--grpcAddr", addr(ports[1]),
                            "--secureGRPCAddr", addr(ports[2]), "--httpsAddr", addr(ports[3]),
                            "--monitoringAddr", addr(ports[4]),
                        ],
                        "env": [
                            {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                            {"name": "KUBERNETES_SERVICE_PORT", "value": node.apiserver_port.to_string()},
                            {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                            {"name": "CLOUD_PLATFORM", "value": "none"},
                            {"name": "PILOT_ENABLE_ANALYSIS", "value": "false"},
                            {"name": "EXTERNAL_CA", "value": "ISTIOD_RA_KUBERNETES_API"},
                            {"name": "K8S_SIGNER", "value": signer},
                        ],
                        "readinessProbe": {"httpGet": {"path": "/ready", "port": ports[0]}, "periodSeconds": 2},
                        "securityContext": {
                            "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
                            "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"},
                        },
                        "volumeMounts": [
                            {"name": "external-ca-cert", "mountPath": "/etc/external-ca-cert", "readOnly": true},
                            {"name": "tmp", "mountPath": "/tmp"},
                            {"name": "dns-certs", "mountPath": "/var/run/secrets/istio-dns"},
                        ],
                    }],
                    "volumes": [
                        // The seed's mount: the signer's roots where istiod reads them.
                        {"name": "external-ca-cert", "secret": {"secretName": "external-ca-cert", "optional": true}},
                        {"name": "tmp", "emptyDir": {}},
                        {"name": "dns-certs", "emptyDir": {}},
                    ],
                },
            },
        },
    }))?;
    Api::<Deployment>::namespaced(client.clone(), mesh.name())
        .create(&PostParams::default(), &deployment)
        .await?;
    let t = Instant::now();
    wait_available(&client, mesh.name(), "istiod").await?;
    eprintln!("istiod (RA mode) rolled out in {:?}", t.elapsed());

    // istiod's serving certificate comes from its own self-signed CA.
    let istiod_ca = Api::<Secret>::namespaced(client.clone(), mesh.name())
        .get("istio-ca-secret")
        .await?;
    let istiod_root = dir.join("istiod-root.pem");
    std::fs::write(
        &istiod_root,
        &istiod_ca.data.context("no data")?["ca-cert.pem"].0,
    )?;
    mesh.create_service_account("ratings").await?;
    let token = mesh
        .token_with(
            "ratings",
            &TokenOptions {
                expiration_seconds: 3600,
                ..Default::default()
            },
        )
        .await?;
    let token_file = dir.join("ratings.token");
    std::fs::write(&token_file, token)?;
    let spiffe = format!("spiffe://cluster.local/ns/{}/sa/ratings", mesh.name());
    let out = Command::new(meshca_testsupport::bin("istio-client"))
        .args([
            "-addr",
            &addr(ports[2]),
            "-json",
            "-timeout",
            "60s",
            "-ttl",
            "1h",
        ])
        .arg("-root-cert")
        .arg(&istiod_root)
        .arg("-token")
        .arg(&token_file)
        .args([
            "-host",
            &spiffe,
            "-server-name",
            &format!("istiod.{}.svc", mesh.name()),
        ])
        .output()?;
    if !out.status.success() {
        bail!(
            "istio-client against istiod: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            diagnose(&client, mesh.name()).await
        );
    }
    let answer: Value = serde_json::from_slice(&out.stdout)?;
    let chain: String = answer["chain"]
        .as_array()
        .context("no chain")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    std::fs::write(dir.join("istiod-chain.pem"), &chain)?;
    std::fs::write(dir.join("signer-root.pem"), signer_root)?;
    let report = meshca_verify(&dir.join("signer-root.pem"), &dir.join("istiod-chain.pem"))?;
    ensure!(report.contains(&spiffe), "{report}");

    Api::<Deployment>::namespaced(client.clone(), mesh.name())
        .delete("istiod", &DeleteParams::foreground())
        .await?;
    bindings
        .delete(
            &format!("{}-istiod-admin", mesh.name()),
            &DeleteParams::default(),
        )
        .await?;
    Ok(())
}

/// A certificate chain and its key, as files.
struct Credential {
    chain: PathBuf,
    key: PathBuf,
}

/// What a `podCertificate` + `clusterTrustBundle` volume gave a pod.
struct PodCertificate {
    credential: Credential,
    /// The certificates alone (leaf first).
    chain: PathBuf,
    roots: PathBuf,
}

/// A pod (the node's pause image) of ServiceAccount `sa` with a
/// `podCertificate` volume for `signer` and the signer's roots from its
/// ClusterTrustBundle; waits until the kubelet started it (it does only once
/// the certificate is there) and splits the credential bundle.
async fn pod_certificate(
    node: &TestNode,
    client: &kube::Client,
    ns: &str,
    sa: &str,
    signer: &str,
) -> Result<PodCertificate> {
    let sas = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), ns);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": sa}}))?,
    )
    .await?;
    let image =
        std::env::var("MESHCA_TESTENV_PAUSE_IMAGE").context("MESHCA_TESTENV_PAUSE_IMAGE")?;
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    let created = pods
        .create(
            &PostParams::default(),
            &pod_certificates::pod(sa, sa, signer, &image, 3600)?,
        )
        .await?;
    let uid = created.metadata.uid.context("pod without uid")?;
    let running = match pod_certificates::wait_running(&pods, sa, Duration::from_secs(90)).await {
        Ok(t) => t,
        Err(e) => bail!("{e:#}\n{}", diagnose(client, ns).await),
    };
    eprintln!("pod with a podCertificate volume Running {running:?} after creation");
    let dir = node.pod_volume(&uid, "kubernetes.io~projected", pod_certificates::VOLUME);
    // The kubelet starts its ClusterTrustBundle informer on the first
    // request: the roots can come with the volume's next sync.
    let t = Instant::now();
    while !dir.join(pod_certificates::ROOTS).is_file() {
        ensure!(
            t.elapsed() < Duration::from_secs(150),
            "the kubelet wrote no roots.pem from the ClusterTrustBundle in 150 s"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "roots.pem (clusterTrustBundle projection) written {:?} later",
        t.elapsed()
    );
    let out = std::env::temp_dir().join(format!("meshca-pcr-{uid}"));
    pod_certificates::CredentialBundle::read(&dir)?.write_pem(&out)?;
    Ok(PodCertificate {
        credential: Credential {
            chain: out.join("chain.pem"),
            key: out.join("key.pem"),
        },
        chain: out.join("chain.pem"),
        roots: dir.join(pod_certificates::ROOTS),
    })
}

/// openssl s_server with `server`'s credential requiring a client
/// certificate, and s_client with `client`'s; both verify against `roots`.
/// TLS 1.2, so that the server checks the client's certificate inside the
/// handshake: a completed handshake means both certificates verified. A
/// client without a certificate must fail (the check is real).
fn mutual_tls(dir: &Path, server: &Credential, client: &Credential, roots: &Path) -> Result<()> {
    let port = free_port().to_string();
    let p = |x: &Path| x.display().to_string();
    let mut s_server = Command::new("openssl")
        .args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-tls1_2",
            "-quiet",
        ])
        .args([
            "-cert",
            &p(&server.chain),
            "-key",
            &p(&server.key),
            "-CAfile",
            &p(roots),
        ])
        .args(["-Verify", "2", "-verify_return_error"])
        .current_dir(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let t = Instant::now();
    while std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_err() {
        if t.elapsed() > Duration::from_secs(10) {
            let _ = s_server.kill();
            bail!("s_server did not start");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let connect = |with_cert: bool| -> Result<(bool, String)> {
        let mut cmd = Command::new("openssl");
        cmd.args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-tls1_2",
            "-brief",
        ])
        .args(["-CAfile", &p(roots), "-verify_return_error"])
        .current_dir(dir)
        .stdin(std::process::Stdio::null());
        if with_cert {
            cmd.args(["-cert", &p(&client.chain), "-key", &p(&client.key)]);
        }
        let out = cmd.output()?;
        Ok((
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        ))
    };
    let with = connect(true);
    let without = connect(false);
    let _ = s_server.kill();
    let _ = s_server.wait();
    let (ok, text) = with?;
    ensure!(
        ok && text.contains("Verification: OK"),
        "mutual TLS failed: {text}"
    );
    let (ok, text) = without?;
    ensure!(
        !ok,
        "the server accepted a client without a certificate: {text}"
    );
    Ok(())
}
