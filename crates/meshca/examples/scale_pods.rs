//! Benchmark (issue 14, axis 2): impersonation's pod cache at 10,000,
//! 50,000 and 100,000 pods, meshca server against istiod, on one
//! kube-apiserver in the same run.
//!
//! ```text
//! testenv/build all && testenv/build istiod
//! env="$(testenv/up)" && eval "$env"
//! cargo build --release -p meshca --examples
//! target/release/examples/scale_pods [--lists] [SIZES...]   # default 10000 50000 100000
//! testenv/down
//! ```
//!
//! Pods are objects only (no kubelet, they stay Pending), created 64 at a
//! time through the API and kept for the next size and the next run on the
//! same testenv (so each size can be its own invocation): 100 namespaces
//! `scale-pods-NN`, 10 service accounts each, 100 pods per node (nodes
//! `node-NNNN`), one container with ports, env and resources, labels and an
//! annotation, like a Deployment's pod. For each size:
//! - meshca server (the Helm chart's RBAC with trustedNodeAccounts, P-256
//!   CA): time from start to ready (ready waits for the pod list), RSS;
//!   then `meshca loadgen` with a node agent's token bound to its pod on
//!   `node-0007`, 2000 requests at 16 concurrent, plain and with
//!   `ImpersonatedIdentity` of a workload on that node: the latency the
//!   check adds;
//! - the check alone in process: `PodIndex` lookups at the same size;
//! - with `--lists`, first: the pod watch's first list in process, for
//!   each list strategy, reading whole `Pod`s and meshca's `WatchedPod`;
//! - istiod (pilot-discovery, admin kubeconfig, self-signed CA, its
//!   defaults): time from start to ready (its informers synced), RSS.

mod bench_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bench_common::{
    Auth, IstiodOptions, Proc, create_all, free_port, loadgen_with, meshca_bin, rss_mib,
    rss_now_mib, start_istiod, terminate, wait_http,
};
use futures::StreamExt;
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use kube::api::{Api, ListParams, PostParams};
use kube::runtime::watcher;
use meshca_server::auth::impersonation::{PodFacts, PodIndex, Pods, WatchedPod};
use meshca_testsupport::{TestEnv, TestNamespace, chart};

const NAMESPACES: usize = 100;
/// Every bench pod's `pod-template-hash` label.
const TEMPLATE_HASH: &str = "5d8f7c9b6";
const PODS_PER_NODE: usize = 100;
const CREATE_CONCURRENCY: usize = 64;
/// The node agent's node, and a workload that runs there.
const NODE: usize = 7;

fn namespace_of(i: usize) -> String {
    format!("scale-pods-{:02}", i % NAMESPACES)
}

fn node_of(i: usize) -> String {
    format!("node-{:04}", i / PODS_PER_NODE)
}

fn account_of(i: usize) -> String {
    format!("sa-{}", (i / NAMESPACES) % 10)
}

/// Pod `i`, shaped like a small Deployment's pod.
fn pod(i: usize) -> Result<Pod> {
    Ok(serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("w-{i:06}"),
            "namespace": namespace_of(i),
            "labels": {
                "app": format!("app-{}", i % 1000),
                "version": "v1",
                "pod-template-hash": TEMPLATE_HASH,
            },
            "annotations": {"kubectl.kubernetes.io/default-container": "app"},
        },
        "spec": {
            "nodeName": node_of(i),
            "serviceAccountName": account_of(i),
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "app",
                "image": "example.invalid/app:1.0",
                "ports": [{"name": "http", "containerPort": 8080}],
                "env": [{"name": "MODE", "value": "bench"}],
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
            }],
        },
    }))?)
}

/// The node agent: ServiceAccount `ztunnel`, a pod of it on `node-0007`,
/// and a token bound to that pod (so TokenReview names the pod).
async fn node_agent_token(ns: &TestNamespace) -> Result<PathBuf> {
    let client = ns.env().client();
    ns.create_service_account("ztunnel").await?;
    let mut p = pod(NODE * PODS_PER_NODE)?;
    p.metadata.name = Some("ztunnel-a".into());
    p.metadata.namespace = Some(ns.name().into());
    p.spec.as_mut().context("spec")?.service_account_name = Some("ztunnel".into());
    let created = Api::<Pod>::namespaced(client.clone(), ns.name())
        .create(&PostParams::default(), &p)
        .await?;
    let tr = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![meshca_testsupport::ISTIO_CA_AUDIENCE.into()],
            expiration_seconds: Some(3600),
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some("ztunnel-a".into()),
                uid: created.metadata.uid,
            }),
        },
        ..Default::default()
    };
    let token = Api::<ServiceAccount>::namespaced(client, ns.name())
        .create_token_request("ztunnel", &PostParams::default(), &tr)
        .await?
        .status
        .context("TokenRequest without status")?
        .token;
    let path = ns.temp_dir().join("ztunnel.token");
    std::fs::write(&path, token)?;
    Ok(path)
}

struct Meshca {
    proc: Proc,
    addr: String,
    root: PathBuf,
    ready_s: f64,
}

async fn start_meshca(kubeconfig: &Path, state: &Path, trusted: &str) -> Result<Meshca> {
    let addr = format!("127.0.0.1:{}", free_port());
    let monitoring = format!("127.0.0.1:{}", free_port());
    let started = Instant::now();
    let proc = Proc(
        Command::new(meshca_bin()?)
            .args([
                "server",
                "--listen",
                &addr,
                "--monitoring-listen",
                &monitoring,
            ])
            .args(["--self-signed-key-type", "ecdsa-p256"])
            .arg("--state-dir")
            .arg(state)
            .arg("--root-ca-dir")
            .arg(state.join("no-plugged-ca"))
            .args(["--no-root-configmap", "--no-ca-secret"])
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--trusted-node-accounts", trusted])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    wait_http(
        &format!("http://{monitoring}/readyz"),
        "meshca",
        Duration::from_secs(300),
    )
    .await?;
    Ok(Meshca {
        proc,
        addr,
        root: state.join("ca/root-cert.pem"),
        ready_s: started.elapsed().as_secs_f64(),
    })
}

/// The names of the bench's pods already there.
async fn existing_pods(client: &kube::Client) -> Result<std::collections::HashSet<String>> {
    let api = Api::<Pod>::all(client.clone());
    let mut params = ListParams::default()
        .labels(&format!("pod-template-hash={TEMPLATE_HASH}"))
        .limit(5000);
    let mut names = std::collections::HashSet::new();
    loop {
        let page = api.list_metadata(&params).await?;
        names.extend(page.items.into_iter().filter_map(|p| p.metadata.name));
        match page.metadata.continue_.filter(|c| !c.is_empty()) {
            Some(c) => params = params.continue_token(&c),
            None => return Ok(names),
        }
    }
}

/// Seconds from start to the end of the first list of a pod watch, read as
/// `K`, with `config`; and the pods listed.
async fn first_list<K>(client: &kube::Client, config: watcher::Config) -> Result<(f64, usize)>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
{
    let started = Instant::now();
    let mut events = std::pin::pin!(watcher(Api::<K>::all(client.clone()), config));
    let mut listed = 0;
    while let Some(event) = events.next().await {
        match event? {
            watcher::Event::InitApply(_) => listed += 1,
            watcher::Event::InitDone => return Ok((started.elapsed().as_secs_f64(), listed)),
            _ => {}
        }
    }
    anyhow::bail!("the pod watch ended before its first list")
}

/// The pod watch's first list, with each list strategy and both types: what
/// meshca's ready time is made of (`--lists`).
async fn first_lists(client: &kube::Client, size: usize) -> Result<()> {
    type Strategy = (&'static str, fn() -> watcher::Config);
    let strategies: [Strategy; 5] = [
        ("pages of 500 (kube-rs default)", watcher::Config::default),
        ("pages of 500, any", || {
            watcher::Config::default().any_semantic()
        }),
        ("pages of 5000", || {
            watcher::Config::default().page_size(5000)
        }),
        ("pages of 5000, any", || {
            watcher::Config::default().page_size(5000).any_semantic()
        }),
        ("streaming list (WatchList)", || {
            watcher::Config::default().streaming_lists()
        }),
    ];
    for (what, config) in strategies {
        let (full_s, n) = first_list::<Pod>(client, config()).await?;
        let (watched_s, m) = first_list::<WatchedPod>(client, config()).await?;
        eprintln!(
            "first list of {size} pods, {what}: Pod {full_s:.2} s ({n}), WatchedPod {watched_s:.2} s ({m})"
        );
    }
    Ok(())
}

/// Nanoseconds per impersonation lookup (the caller's pod, then a pod of
/// the account on its node) in a `PodIndex` of `size` pods.
fn lookup_ns(size: usize) -> f64 {
    let mut index = PodIndex::default();
    for i in 0..size {
        index.apply(
            &namespace_of(i),
            &format!("w-{i:06}"),
            PodFacts {
                uid: Some(format!("00000000-0000-4000-8000-{i:012}")),
                service_account: account_of(i),
                node: Some(node_of(i)),
            },
        );
    }
    let asked: Vec<_> = (0..1000)
        .map(|r| (r * 7919) % size)
        .map(|i| {
            (
                namespace_of(i),
                format!("w-{i:06}"),
                node_of(i),
                account_of(i),
            )
        })
        .collect();
    let rounds = 200_000;
    let started = Instant::now();
    let mut found = 0usize;
    for r in 0..rounds {
        let (ns, name, node, sa) = &asked[r % asked.len()];
        found += usize::from(index.pod(ns, name).is_some());
        found += usize::from(index.any_on_node(node, ns, sa));
    }
    assert_eq!(found, 2 * rounds, "every lookup finds its pod");
    started.elapsed().as_nanos() as f64 / rounds as f64
}

#[tokio::main]
async fn main() -> Result<()> {
    let mut sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let lists = std::env::args().any(|a| a == "--lists");
    if sizes.is_empty() {
        sizes = vec![10_000, 50_000, 100_000];
    }
    sizes.sort_unstable();

    let env = TestEnv::get().await;
    let client = env.client();
    let home = env.namespace("scale-pods-bench").await?;
    let tmp = home.temp_dir().to_owned();
    let token = node_agent_token(&home).await?;
    let trusted = format!("{}/ztunnel", home.name());
    let rbac = chart::server_rbac(
        home.name(),
        &[&format!("server.trustedNodeAccounts={{{trusted}}}")],
    )?;
    let identity = home.identity_from_manifest("meshca", &rbac).await?;
    let admin_kubeconfig = PathBuf::from(std::env::var("KUBECONFIG").context("KUBECONFIG")?);
    let workload = NODE * PODS_PER_NODE + 1;
    let impersonated = format!(
        "spiffe://cluster.local/ns/{}/sa/{}",
        namespace_of(workload),
        account_of(workload)
    );

    let with_istiod = env.config().bin("pilot-discovery").is_ok();
    if !with_istiod {
        eprintln!("pilot-discovery is not built (testenv/build istiod): meshca only");
    }
    let namespaces = Api::<Namespace>::all(client.clone());
    create_all(0..NAMESPACES, CREATE_CONCURRENCY, |i| {
        let mut ns = Namespace::default();
        ns.metadata.name = Some(namespace_of(i));
        (namespaces.clone(), ns)
    })
    .await?;

    println!(
        "| pods | CA | start to ready s | RSS after ready MiB | peak RSS MiB | plain p50/p99 ms | impersonated p50/p99 ms | lookup ns |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    // Pods of an earlier run on this testenv are kept: each size can run
    // as its own invocation.
    let mut made = existing_pods(&client).await?;
    for &size in &sizes {
        let missing: Vec<usize> = (0..size)
            .filter(|i| !made.contains(&format!("w-{i:06}")))
            .collect();
        let took = create_all(0..missing.len(), CREATE_CONCURRENCY, |k| {
            let i = missing[k];
            let p = pod(i).expect("the pod template is valid JSON");
            (Api::<Pod>::namespaced(client.clone(), &namespace_of(i)), p)
        })
        .await?;
        eprintln!(
            "created {} pods (now {size}) in {took:.1} s ({:.0}/s)",
            missing.len(),
            missing.len() as f64 / took.max(0.001)
        );
        made.extend(missing.iter().map(|i| format!("w-{i:06}")));
        if lists {
            first_lists(&client, size).await?;
        }

        let m = start_meshca(
            identity.kubeconfig_path(),
            &tmp.join(format!("meshca-{size}")),
            &trusted,
        )
        .await?;
        let pid = m.proc.0.id();
        // Both CAs are measured 5 s after ready (istiod's other caches fill
        // after /ready).
        tokio::time::sleep(Duration::from_secs(5)).await;
        let ready_rss = rss_now_mib(pid);
        let tokens = [token.clone()];
        let plain = loadgen_with(&m.addr, &m.root, Auth::Tokens(&tokens), 2000, 16, &[])?;
        let imp = loadgen_with(
            &m.addr,
            &m.root,
            Auth::Tokens(&tokens),
            2000,
            16,
            &["--impersonate", &impersonated],
        )?;
        anyhow::ensure!(
            imp["ok"].as_u64() == Some(2000),
            "impersonated requests failed: {imp}"
        );
        let peak = rss_mib(pid);
        terminate(m.proc);
        let lookup = lookup_ns(size);
        println!(
            "| {size} | meshca | {:.2} | {ready_rss:.0} | {peak:.0} | {:.1} / {:.1} | {:.1} / {:.1} | {lookup:.0} |",
            m.ready_s,
            plain["p50_ms"].as_f64().unwrap_or(0.0),
            plain["p99_ms"].as_f64().unwrap_or(0.0),
            imp["p50_ms"].as_f64().unwrap_or(0.0),
            imp["p99_ms"].as_f64().unwrap_or(0.0),
        );

        if !with_istiod {
            continue;
        }
        let started = Instant::now();
        let istiod = start_istiod(
            client.clone(),
            &IstiodOptions {
                namespace: "istio-system",
                pod_name: "istiod-scale",
                kubeconfig: &admin_kubeconfig,
                dir: tmp.join(format!("istiod-{size}")),
                args: &[],
                env: &[],
            },
        )
        .await?;
        let ready_s = started.elapsed().as_secs_f64();
        let pid = istiod.proc.0.id();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let (now, peak) = (rss_now_mib(pid), rss_mib(pid));
        terminate(istiod.proc);
        println!("| {size} | istiod | {ready_s:.2} | {now:.0} | {peak:.0} | | | |");
    }
    Ok(())
}
