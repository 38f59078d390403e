//! Benchmark of the RA path: workload certificates issued through the
//! Kubernetes CSR API (client -> CA server -> CSR create + approve -> signer
//! -> watch -> CSR delete -> client), `meshca server` in RA mode against
//! istiod in RA mode, both forwarding to the same `meshca signer` on the
//! same kube-apiserver.
//!
//! ```text
//! testenv/build all && testenv/build istiod
//! env="$(testenv/up)" && eval "$env"
//! cargo build --release -p meshca --examples
//! target/release/examples/ra_vs_istiod [ROUNDS] [WORKLOADS] [--istiod-lifted | --meshca-only] [--clients N] [--ceiling [--ceiling-concurrency 16,32,64]] [--signer-no-events]
//! testenv/down "$MESHCA_TESTENV_DIR"
//! ```
//!
//! One `meshca signer` (release binary, exactly the Helm chart's signer
//! RBAC, default settings: kube-rs has no client-side QPS limiter, at most
//! 64 CSRs in progress) signs for `<namespace>.example.com/foo` with an
//! ECDSA P-256 intermediate. Both RA clients create and approve their own
//! CSRs (`/approval`), as istiod does:
//! - `meshca server` in RA mode with exactly the Helm chart's RBAC +
//!   rbac-ra.yaml (its defaults: at most 64 API calls in flight, admitted
//!   requests' calls before new requests' TokenReviews);
//! - istiod (`pilot-discovery`, `EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API`,
//!   `K8S_SIGNER`, the signer's root in `./etc/external-ca-cert/`), as a
//!   service account bound to cluster-admin, with its kube client's default
//!   limits (`--kubernetesApiQPS 80 --kubernetesApiBurst 160`: part of what
//!   is measured); with `--istiod-lifted` also a second istiod with QPS 1000 /
//!   burst 2000. `--meshca-only` runs no istiod (to study meshca alone).
//!
//! All three talk to the apiserver as service accounts, so API Priority and
//! Fairness treats them alike (none is exempt like system:masters).
//!
//! Each round is a mass restart: WORKLOADS (default 1000) service accounts,
//! each with its own fresh token (audience istio-ca), ask once, all at the
//! same time (`meshca loadgen --concurrency WORKLOADS --token-per-request
//! --san-from-token`, RSA-2048 CSRs with the workload's SPIFFE ID, 64 TLS
//! connections, 1 h TTL, 300 s at most). The CAs take turns, the order
//! alternating between rounds (default 2); medians are reported.
//! `--clients N` lets at most N workloads ask at once instead.
//!
//! `--ceiling` adds the apiserver's own ceiling for this path to every
//! round: a minimal kube-rs client that is not meshca
//! ([`bench_common::ceiling`], as a service account bound to cluster-admin,
//! so in the same priority level) making the same calls per certificate
//! (TokenReview, create, approval, the signer's status write, delete) for
//! WORKLOADS fresh tokens, at the concurrency that served it best in a
//! sweep before the rounds (`--ceiling-concurrency`, 1000 workloads each);
//! meshca's throughput is reported as a share of it.
//!
//! Besides latency and throughput, each run records the requests API
//! Priority and Fairness rejected (429, from the apiserver's /metrics) and,
//! on an admin watch of the CSRs, when each was created, approved, issued and
//! deleted, to show where the time goes. The logs of the CAs and the signer
//! (RUST_LOG from $MESHCA_BENCH_RUST_LOG, default warn) are copied to
//! `$TMPDIR/ra_vs_istiod-<namespace>/`.
//! Everything listens on 127.0.0.1 and stops by itself.

mod bench_common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bench_common::{
    Auth, IstiodOptions, Proc, ceiling, control_plane, cpu_seconds, free_port, load_average,
    loadgen_with, median, meshca_bin, own_cpu_seconds, rss_mib, start_istiod, tokens, wait_http,
};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, ListParams, WatchEvent, WatchParams};
use meshca_testsupport::{RbacSpec, TestEnv, TestNamespace, chart};
use tokio::task::JoinHandle;

/// One CA under test.
struct Ca {
    name: &'static str,
    /// The minimal client at this concurrency instead of a gRPC CA.
    ceiling: Option<usize>,
    /// The signer name its CSRs carry.
    signer: String,
    /// Its kube client's limits, for the table.
    limits: &'static str,
    addr: String,
    root: PathBuf,
    server_name: String,
    pid: u32,
    runs: Vec<serde_json::Value>,
}

fn meshca(args: &[&str]) -> Result<()> {
    let out = Command::new(meshca_bin()?).args(args).output()?;
    if !out.status.success() {
        bail!(
            "meshca {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Requests the apiserver's API Priority and Fairness rejected so far (429,
/// all priority levels), from its /metrics with the admin certificate.
fn apf_rejections(env: &TestEnv) -> f64 {
    let (dir, cfg) = (&env.config().dir, env.config());
    let out = Command::new("curl")
        .arg("-sf")
        .arg("--cacert")
        .arg(&cfg.ca_pem_path)
        .arg("--cert")
        .arg(dir.join("pki/admin.crt"))
        .arg("--key")
        .arg(dir.join("pki/admin.key"))
        .arg(format!("{}/metrics", cfg.apiserver))
        .output();
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("apiserver_flowcontrol_rejected_requests_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    })
    .unwrap_or(f64::NAN)
}

/// RUST_LOG of meshca server and signer: $MESHCA_BENCH_RUST_LOG, default warn.
fn rust_log() -> String {
    std::env::var("MESHCA_BENCH_RUST_LOG").unwrap_or_else(|_| "warn".into())
}

/// The signer's CA: a P-256 root and intermediate (Istio's cacerts layout).
fn signer_ca(base: &Path) -> Result<(PathBuf, PathBuf)> {
    let root = base.join("signer-root");
    let dir = base.join("signer-ca");
    let (root_s, dir_s) = (root.to_str().unwrap(), dir.to_str().unwrap());
    meshca(&[
        "ca",
        "init",
        "--out",
        root_s,
        "--key-type",
        "ecdsa-p256",
        "--org",
        "ra-bench",
    ])?;
    meshca(&[
        "ca",
        "init",
        "--out",
        dir_s,
        "--intermediate-of",
        root_s,
        "--key-type",
        "ecdsa-p256",
        "--org",
        "ra-bench",
    ])?;
    Ok((dir, root.join("root-cert.pem")))
}

/// `meshca signer` with exactly the chart's signer RBAC; returns it
/// and its monitoring address.
async fn start_signer(
    ns: &TestNamespace,
    signer: &str,
    ca_dir: &Path,
    no_events: bool,
) -> Result<(Proc, String)> {
    let rbac = chart::signer_rbac(
        ns.name(),
        &ns.unique_name("bench"),
        &[signer],
        ns.name(),
        &["leaderElection.enabled=false", "signer.trustBundle=false"],
    )?;
    let identity = ns
        .identity_from_manifest("signer-ca-controller-manager", &rbac)
        .await?;
    let mon = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(ns.temp_dir().join("signer.log"))?;
    let proc = Proc(
        Command::new(meshca_bin()?)
            .args(["signer", "--signer-name", signer, "--ca-dir"])
            .arg(ca_dir)
            .arg("--kubeconfig")
            .arg(identity.kubeconfig_path())
            .args(["--trust-domains", "cluster.local", "--no-trust-bundle"])
            .arg("--no-leader-election")
            .args(["--monitoring-listen", &mon])
            .args(no_events.then_some("--no-events"))
            .env("RUST_LOG", rust_log())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting meshca signer")?,
    );
    wait_http(
        &format!("http://{mon}/readyz"),
        "meshca signer",
        Duration::from_secs(30),
    )
    .await?;
    Ok((proc, mon))
}

/// `meshca server` in RA mode with exactly the chart's RBAC for it.
async fn start_meshca_ra(
    ns: &TestNamespace,
    signer: &str,
    root_file: &Path,
) -> Result<(Proc, String, PathBuf)> {
    let rbac = chart::server_rbac(
        ns.name(),
        &[
            "server.ra.enabled=true",
            &format!("server.ra.signer={signer}"),
        ],
    )?;
    let identity = ns.identity_from_manifest("meshca", &rbac).await?;
    let state = ns.temp_dir().join("meshca");
    let addr = format!("127.0.0.1:{}", free_port());
    let mon = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(ns.temp_dir().join("meshca.log"))?;
    let proc = Proc(
        Command::new(meshca_bin()?)
            .args(["server", "--listen", &addr, "--monitoring-listen", &mon])
            .arg("--root-ca-dir")
            .arg(state.join("no-plugged-ca"))
            .arg("--state-dir")
            .arg(&state)
            .arg("--kubeconfig")
            .arg(identity.kubeconfig_path())
            .arg("--no-impersonation")
            .args(["--self-signed-key-type", "ecdsa-p256"])
            .arg("--no-root-configmap")
            .arg("--no-ca-secret")
            .arg("--external-ca-root")
            .arg(root_file)
            .env("EXTERNAL_CA", "ISTIOD_RA_KUBERNETES_API")
            .env("K8S_SIGNER", signer)
            .env("RUST_LOG", rust_log())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting meshca server")?,
    );
    wait_http(
        &format!("http://{mon}/readyz"),
        "meshca server",
        Duration::from_secs(30),
    )
    .await?;
    Ok((proc, addr, state.join("ca/root-cert.pem")))
}

/// When the admin's watch saw each CSR of the signer: created, approved,
/// issued (status.certificate set), deleted.
#[derive(Default, Clone)]
struct Seen {
    created: Option<Instant>,
    approved: Option<Instant>,
    issued: Option<Instant>,
    deleted: Option<Instant>,
}

type Timeline = Arc<Mutex<HashMap<String, Seen>>>;

/// A copy of the ceiling's entry (no runs).
fn probe_of(ca: &Ca) -> Ca {
    Ca {
        name: ca.name,
        ceiling: ca.ceiling,
        signer: ca.signer.clone(),
        limits: ca.limits,
        addr: String::new(),
        root: PathBuf::new(),
        server_name: String::new(),
        pid: 0,
        runs: Vec::new(),
    }
}

/// Records the CSRs' timeline (as the admin, whom API Priority and Fairness
/// exempts) until aborted.
async fn record(client: kube::Client, signer: &str) -> Result<(JoinHandle<()>, Timeline)> {
    let api = Api::<CertificateSigningRequest>::all(client);
    let fields = format!("spec.signerName={signer}");
    let version = api
        .list(&ListParams::default().fields(&fields))
        .await?
        .metadata
        .resource_version
        .unwrap_or_default();
    let wp = WatchParams::default().fields(&fields).timeout(290);
    let mut events = api.watch(&wp, &version).await?.boxed();
    let timeline = Timeline::default();
    let out = timeline.clone();
    let task = tokio::spawn(async move {
        while let Ok(Some(event)) = events.try_next().await {
            let now = Instant::now();
            let (csr, deleted) = match event {
                WatchEvent::Added(c) | WatchEvent::Modified(c) => (c, false),
                WatchEvent::Deleted(c) => (c, true),
                _ => continue,
            };
            let mut map = out.lock().unwrap();
            let seen = map
                .entry(csr.metadata.name.unwrap_or_default())
                .or_default();
            seen.created.get_or_insert(now);
            let status = csr.status.unwrap_or_default();
            if status
                .conditions
                .iter()
                .flatten()
                .any(|c| c.type_ == "Approved")
            {
                seen.approved.get_or_insert(now);
            }
            if status.certificate.is_some() {
                seen.issued.get_or_insert(now);
            }
            if deleted {
                seen.deleted.get_or_insert(now);
            }
        }
    });
    Ok((task, timeline))
}

/// p50 and p99 (ms) of the phases: created -> approved (the RA client's
/// approval), approved -> issued (the signer), issued -> deleted (the RA
/// client seeing the certificate and deleting the CSR), and the spread of
/// creations (first -> last CSR created: the RA clients' TokenReviews and
/// creates of the whole burst).
fn phases(timeline: &Timeline) -> serde_json::Value {
    let map = timeline.lock().unwrap();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let pct = |mut v: Vec<f64>| -> serde_json::Value {
        v.sort_by(f64::total_cmp);
        let at = |p: f64| {
            v.get(((v.len() as f64 * p).ceil() as usize).clamp(1, v.len().max(1)) - 1)
                .copied()
                .unwrap_or(0.0)
        };
        serde_json::json!({"n": v.len(), "p50": at(0.5), "p99": at(0.99)})
    };
    let phase =
        |f: &dyn Fn(&Seen) -> Option<Duration>| pct(map.values().filter_map(f).map(ms).collect());
    let created: Vec<Instant> = map.values().filter_map(|s| s.created).collect();
    let spread = match (created.iter().min(), created.iter().max()) {
        (Some(a), Some(b)) => ms(*b - *a),
        _ => 0.0,
    };
    serde_json::json!({
        "csrs": map.len(),
        "creation_spread_ms": spread,
        "create_to_approved": phase(&|s| Some(s.approved?.saturating_duration_since(s.created?))),
        "approved_to_issued": phase(&|s| Some(s.issued?.saturating_duration_since(s.approved?))),
        "issued_to_deleted": phase(&|s| Some(s.deleted?.saturating_duration_since(s.issued?))),
    })
}

/// Waits until neither CA has a CSR of `signer` left (both delete theirs).
async fn wait_csrs_gone(client: kube::Client, signer: &str) -> Result<()> {
    let csrs = Api::<CertificateSigningRequest>::all(client);
    let lp = ListParams::default().fields(&format!("spec.signerName={signer}"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = csrs.list(&lp).await?.items.len();
        if left == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{left} CSRs of {signer} still there after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn run(
    ca: &Ca,
    tokens: &[PathBuf],
    clients: usize,
    ceiling: Option<&(kube::Client, ceiling::Fixtures)>,
) -> Result<serde_json::Value> {
    if let (Some(concurrency), Some((client, fixtures))) = (ca.ceiling, ceiling) {
        let calls = ceiling::Calls::Ra {
            signer: ca.signer.clone(),
        };
        let tokens = ceiling::read_tokens(tokens)?;
        return Ok(ceiling::run(client, &tokens, &calls, concurrency.min(clients), fixtures).await);
    }
    loadgen_with(
        &ca.addr,
        &ca.root,
        Auth::Tokens(tokens),
        tokens.len(),
        clients,
        &[
            "--token-per-request",
            "--san-from-token",
            "--server-name",
            &ca.server_name,
        ],
    )
}

#[tokio::main]
async fn main() -> Result<()> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let lifted = argv.iter().any(|a| a == "--istiod-lifted");
    let meshca_only = argv.iter().any(|a| a == "--meshca-only");
    let with_ceiling = argv.iter().any(|a| a == "--ceiling");
    // The signer's one Event per certificate (an etcd write the ceiling
    // does not make) off, to measure what it costs.
    let no_events = argv.iter().any(|a| a == "--signer-no-events");
    let value = |flag: &str| -> Option<&String> {
        argv.iter()
            .position(|a| a == flag)
            .and_then(|i| argv.get(i + 1))
    };
    // --clients N: at most N workloads asking at once (default: all of them).
    let clients: Option<usize> = value("--clients").and_then(|v| v.parse().ok());
    let sweep: Vec<usize> = value("--ceiling-concurrency")
        .map_or("16,32,64,128", |v| v.as_str())
        .split(',')
        .filter_map(|c| c.parse().ok())
        .collect();
    let nums: Vec<usize> = argv
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            *i == 0 || !["--clients", "--ceiling-concurrency"].contains(&argv[i - 1].as_str())
        })
        .filter_map(|(_, a)| a.parse().ok())
        .collect();
    let rounds = nums.first().copied().unwrap_or(2);
    let workloads = nums.get(1).copied().unwrap_or(1000);
    let clients = clients.unwrap_or(workloads).min(workloads);

    let env = TestEnv::get().await;
    let ns = env.namespace("bench-ra").await?;
    let tmp = ns.temp_dir().to_owned();
    let signer = format!("{}.example.com/foo", ns.name());

    let (ca_dir, signer_root) = signer_ca(&tmp)?;
    let (signer_proc, signer_mon) = start_signer(&ns, &signer, &ca_dir, no_events).await?;
    let (meshca_proc, meshca_addr, meshca_root) = start_meshca_ra(&ns, &signer, &signer_root)
        .await
        .with_context(|| format!("see {}", tmp.join("meshca.log").display()))?;

    // istiod as a service account with cluster-admin (not system:masters,
    // which API Priority and Fairness exempts), its namespace ours.
    let istiod_id = ns
        .identity("istiod", &[RbacSpec::Existing("cluster-admin".into())])
        .await?;
    let ra_env = [
        ("EXTERNAL_CA", "ISTIOD_RA_KUBERNETES_API"),
        ("K8S_SIGNER", signer.as_str()),
    ];
    let mut istiods = vec![("istiod", "QPS 80 / burst 160 (default)", &[][..])];
    if meshca_only {
        istiods.clear();
    }
    if lifted && !meshca_only {
        istiods.push((
            "istiod-lifted",
            "QPS 1000 / burst 2000 (lifted)",
            &["--kubernetesApiQPS", "1000", "--kubernetesApiBurst", "2000"][..],
        ));
    }
    let mut istiod_procs = Vec::new();
    let mut cas = vec![Ca {
        name: "meshca server (RA)",
        ceiling: None,
        signer: signer.clone(),
        limits: "64 calls in flight, admitted requests first (default)",
        addr: meshca_addr,
        root: meshca_root,
        server_name: "istiod.istio-system.svc".into(),
        pid: meshca_proc.0.id(),
        runs: Vec::new(),
    }];
    for (name, limits, args) in istiods {
        let dir = tmp.join(name);
        std::fs::create_dir_all(dir.join("etc/external-ca-cert"))?;
        std::fs::copy(&signer_root, dir.join("etc/external-ca-cert/root-cert.pem"))?;
        let istiod = start_istiod(
            env.client(),
            &IstiodOptions {
                namespace: ns.name(),
                pod_name: name,
                kubeconfig: istiod_id.kubeconfig_path(),
                dir,
                args,
                env: &ra_env,
            },
        )
        .await?;
        cas.push(Ca {
            ceiling: None,
            signer: signer.clone(),
            name: if args.is_empty() {
                "istiod (RA)"
            } else {
                "istiod (RA), QPS lifted"
            },
            limits,
            addr: istiod.addr.clone(),
            root: istiod.root.clone(),
            server_name: format!("istiod.{}.svc", ns.name()),
            pid: istiod.proc.0.id(),
            runs: Vec::new(),
        });
        istiod_procs.push(istiod);
    }

    // Warm-up (not measured): 8 workloads each, so that every path (TLS,
    // TokenReview, CSR API, the signer's watch) has run once.
    let warm = tokens(&ns, "warm", 8).await?;
    for ca in &cas {
        let r = run(ca, &warm, warm.len(), None).await?;
        anyhow::ensure!(r["ok"] == 8, "warm-up of {}: {r}", ca.name);
    }
    wait_csrs_gone(env.client(), &signer).await?;

    // The ceiling: the minimal client's best concurrency first.
    let mut ceiling_client = None;
    if with_ceiling {
        let id = ns
            .identity("ceiling", &[RbacSpec::Existing("cluster-admin".into())])
            .await?;
        let client = (id.client().await?, ceiling::Fixtures::new()?);
        let own = format!("{}.example.com/ceiling", ns.name());
        let probe = Ca {
            name: "ceiling",
            ceiling: Some(1),
            signer: own.clone(),
            limits: "",
            addr: String::new(),
            root: PathBuf::new(),
            server_name: String::new(),
            pid: 0,
            runs: Vec::new(),
        };
        let r = run(&probe, &warm, warm.len(), Some(&client)).await?;
        anyhow::ensure!(r["ok"] == 8, "warm-up of the ceiling client: {r}");
        let mut best = (0.0, 1);
        for &c in &sweep {
            let fresh = tokens(&ns, &format!("sweep{c}w"), 1000.min(workloads)).await?;
            let probe = Ca {
                ceiling: Some(c),
                ..probe_of(&probe)
            };
            let r = run(&probe, &fresh, fresh.len(), Some(&client)).await?;
            eprintln!("ceiling sweep, concurrency {c}: {r}");
            let rate = r["certs_per_second"].as_f64().unwrap_or(0.0);
            if rate > best.0 {
                best = (rate, c);
            }
        }
        eprintln!(
            "ceiling: best concurrency {} ({:.1} certs/s)",
            best.1, best.0
        );
        cas.push(Ca {
            name: "ceiling: minimal kube-rs client",
            ceiling: Some(best.1),
            limits: "none; best concurrency of the sweep",
            ..probe_of(&probe)
        });
        ceiling_client = Some(client);
    }

    // Fresh service accounts and tokens for every run, made up front.
    let started = Instant::now();
    let mut fresh = Vec::new();
    for round in 0..rounds {
        let mut per_ca = Vec::new();
        for i in 0..cas.len() {
            per_ca.push(tokens(&ns, &format!("r{round}c{i}w"), workloads).await?);
        }
        fresh.push(per_ca);
    }
    eprintln!(
        "{} tokens made in {:.0?}",
        rounds * cas.len() * workloads,
        started.elapsed()
    );

    let mut loads = Vec::new();
    for (round, per_ca) in fresh.iter().enumerate() {
        let mut order: Vec<usize> = (0..cas.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            tokio::time::sleep(Duration::from_secs(5)).await;
            let (recorder, timeline) = record(env.client(), &cas[i].signer).await?;
            let (before, rejected) = (load_average(), apf_rejections(&env));
            // CPU seconds of everyone on the path during the run.
            let mut pids = control_plane(&env);
            pids.push(("signer", signer_proc.0.id()));
            if cas[i].pid != 0 {
                pids.push(("ca", cas[i].pid));
            }
            let cpu_before: Vec<f64> = pids
                .iter()
                .map(|(_, p)| cpu_seconds(*p).unwrap_or(0.0))
                .collect();
            let own = own_cpu_seconds();
            let mut r = run(&cas[i], &per_ca[i], clients, ceiling_client.as_ref()).await?;
            let after = load_average();
            r["apf_rejected"] = (apf_rejections(&env) - rejected).into();
            for ((name, pid), b) in pids.iter().zip(cpu_before) {
                r["cpu_s"][*name] = (cpu_seconds(*pid).unwrap_or(0.0) - b).into();
            }
            r["cpu_s"]["client"] = match r.get("loadgen_cpu_s") {
                Some(cpu) => cpu.clone(),
                None => (own_cpu_seconds() - own).into(),
            };
            wait_csrs_gone(env.client(), &cas[i].signer).await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            recorder.abort();
            r["phases"] = phases(&timeline);
            eprintln!(
                "round {round} {}: {r} (load average {before} -> {after})",
                cas[i].name
            );
            loads.push(before);
            loads.push(after);
            cas[i].runs.push(r);
        }
    }

    let metrics = Command::new("curl")
        .args(["-sf", &format!("http://{signer_mon}/metrics")])
        .output()?;
    let signed = String::from_utf8_lossy(&metrics.stdout)
        .lines()
        .find(|l| l.starts_with("meshca_signer_signed_total"))
        .unwrap_or("")
        .to_string();

    println!(
        "## RA path: {workloads} workloads, {clients} at once, one request each (fresh token), {rounds} rounds, median\n"
    );
    println!(
        "| CA | kube client limits | certs/s | p50 ms | p99 ms | p99.9 ms | ok | errors | APF 429s | peak RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for ca in &cas {
        let errors: Vec<String> = ca
            .runs
            .iter()
            .filter(|r| r["errors"].as_object().is_some_and(|e| !e.is_empty()))
            .map(|r| r["errors"].to_string())
            .collect();
        println!(
            "| {} | {} | {:.1} | {:.0} | {:.0} | {:.0} | {} | {} | {:.0} | {} |",
            ca.name,
            ca.limits,
            median(&ca.runs, "certs_per_second"),
            median(&ca.runs, "p50_ms"),
            median(&ca.runs, "p99_ms"),
            median(&ca.runs, "p999_ms"),
            ca.runs
                .iter()
                .map(|r| r["ok"].to_string())
                .collect::<Vec<_>>()
                .join("/"),
            if errors.is_empty() {
                "none".to_string()
            } else {
                errors.join(" ")
            },
            median(&ca.runs, "apf_rejected"),
            if ca.pid == 0 {
                "-".to_string()
            } else {
                format!("{:.0}", rss_mib(ca.pid))
            },
        );
    }
    println!(
        "| signer: meshca signer | none (kube-rs), --concurrency 64 (default) | | | | | | | | {:.0} |",
        rss_mib(signer_proc.0.id())
    );
    println!();
    for ca in cas.iter().filter(|c| c.ceiling.is_some()) {
        println!(
            "meshca / {} (concurrency {}): {:.0}% of its throughput",
            ca.name,
            ca.ceiling.unwrap_or(0),
            100.0 * median(&cas[0].runs, "certs_per_second")
                / median(&ca.runs, "certs_per_second").max(1e-9),
        );
    }
    for ca in cas[1..].iter().filter(|c| c.ceiling.is_none()) {
        println!(
            "meshca/{}: throughput {:.1}x, p99 {:.1}x lower, p50 {:.1}x lower",
            ca.name,
            median(&cas[0].runs, "certs_per_second")
                / median(&ca.runs, "certs_per_second").max(1e-9),
            median(&ca.runs, "p99_ms") / median(&cas[0].runs, "p99_ms").max(1e-9),
            median(&ca.runs, "p50_ms") / median(&cas[0].runs, "p50_ms").max(1e-9),
        );
    }
    println!("\nPhases seen on an admin watch of the CSRs, ms (median of the runs' p50 / p99):\n");
    println!(
        "| CA | creation spread (TokenReview + create of the burst) | created -> approved | approved -> issued (signer) | issued -> deleted |"
    );
    println!("|---|---|---|---|---|");
    for ca in &cas {
        let ph: Vec<serde_json::Value> = ca.runs.iter().map(|r| r["phases"].clone()).collect();
        let sub = |phase: &str, key: &str| -> f64 {
            let v: Vec<serde_json::Value> = ph.iter().map(|p| p[phase].clone()).collect();
            median(&v, key)
        };
        println!(
            "| {} | {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.0} / {:.0} |",
            ca.name,
            median(&ph, "creation_spread_ms"),
            sub("create_to_approved", "p50"),
            sub("create_to_approved", "p99"),
            sub("approved_to_issued", "p50"),
            sub("approved_to_issued", "p99"),
            sub("issued_to_deleted", "p50"),
            sub("issued_to_deleted", "p99"),
        );
    }
    println!(
        "\nCPU per certificate, µs (median of the runs; the client is meshca loadgen, or the minimal client in this process):\n"
    );
    println!("| CA | CA server | signer | kube-apiserver | etcd | client | all |");
    println!("|---|---|---|---|---|---|---|");
    for ca in &cas {
        let per_cert = |who: &str| -> Option<f64> {
            let mut v: Vec<f64> = ca
                .runs
                .iter()
                .filter_map(|r| Some(r["cpu_s"][who].as_f64()? / r["ok"].as_f64()?.max(1.0)))
                .collect();
            v.sort_by(f64::total_cmp);
            v.get(v.len() / 2).map(|s| s * 1e6)
        };
        let cols = ["ca", "signer", "kube-apiserver", "etcd", "client"];
        let vals: Vec<Option<f64>> = cols.iter().map(|c| per_cert(c)).collect();
        let show = |v: &Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        println!(
            "| {} | {} | {} |",
            ca.name,
            vals.iter().map(show).collect::<Vec<_>>().join(" | "),
            vals.iter().flatten().sum::<f64>().round()
        );
    }
    println!("\nper run (round order alternates):");
    for ca in &cas {
        for (round, r) in ca.runs.iter().enumerate() {
            println!(
                "- round {round} {}: {:.1} certs/s, p50 {:.0} ms, p99 {:.0} ms, {:.1} s, {} APF 429s",
                ca.name,
                r["certs_per_second"].as_f64().unwrap_or(0.0),
                r["p50_ms"].as_f64().unwrap_or(0.0),
                r["p99_ms"].as_f64().unwrap_or(0.0),
                r["seconds"].as_f64().unwrap_or(0.0),
                r["apf_rejected"],
            );
        }
    }
    println!("\nload average before/after each run: {}", loads.join(", "));
    println!("signer: {signed}");

    drop(istiod_procs);
    drop((meshca_proc, signer_proc));
    // The logs outlive the namespace's temp dir.
    let logs = std::env::temp_dir().join(format!("ra_vs_istiod-{}", ns.name()));
    std::fs::create_dir_all(&logs)?;
    for entry in std::fs::read_dir(&tmp)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "log") {
            std::fs::copy(&path, logs.join(path.file_name().unwrap()))?;
        }
    }
    println!("logs: {}", logs.display());
    ns.cleanup().await
}
