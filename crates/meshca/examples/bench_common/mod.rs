//! Helpers shared by the benchmark examples (`server_vs_istiod`,
//! `ra_vs_istiod`, `scale_namespaces`, `scale_pods`): child processes,
//! ports, readiness, `meshca loadgen`, tokens, bulk creation, istiod
//! (pilot-discovery), memory and the result tables.
// Each example uses its own subset.
#![allow(dead_code)]

pub mod ceiling;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, PostParams};
pub use meshca_testsupport::{Proc, free_port};
use meshca_testsupport::{TestNamespace, TokenOptions};

/// The `meshca` binary next to the example (same profile).
pub fn meshca_bin() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/<name> -> target/<profile>/meshca
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .context("exe path")?
        .join("meshca");
    anyhow::ensure!(
        bin.exists(),
        "{} missing: run `cargo build --release -p meshca` first",
        bin.display()
    );
    Ok(bin)
}

/// Waits until `url` answers 2xx (curl), at most `limit`.
pub async fn wait_http(url: &str, what: &str, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if Command::new("curl")
            .args(["-sfk", "-o", "/dev/null", url])
            .status()?
            .success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("{what} not ready at {url} after {limit:?}")
}

pub enum Auth<'a> {
    Tokens(&'a [PathBuf]),
    ClientCert(&'a Path),
}

/// `meshca loadgen --json` with RSA-2048 CSRs, at most 64 connections and
/// 300 s (unless `extra` has `--max-duration`); returns its report.
pub fn loadgen(
    addr: &str,
    root: &Path,
    auth: Auth<'_>,
    requests: usize,
    concurrency: usize,
) -> Result<serde_json::Value> {
    loadgen_with(addr, root, auth, requests, concurrency, &[])
}

/// [`loadgen`] with extra `meshca loadgen` arguments.
pub fn loadgen_with(
    addr: &str,
    root: &Path,
    auth: Auth<'_>,
    requests: usize,
    concurrency: usize,
    extra: &[&str],
) -> Result<serde_json::Value> {
    let mut cmd = Command::new(meshca_bin()?);
    cmd.args([
        "loadgen",
        "--json",
        "--addr",
        addr,
        "--key-type",
        "rsa-2048",
    ])
    .arg("--root")
    .arg(root)
    .args([
        "--requests",
        &requests.to_string(),
        "--concurrency",
        &concurrency.to_string(),
    ])
    .args(["--connections", &concurrency.clamp(1, 64).to_string()])
    .args(extra);
    // 300 s unless `extra` says otherwise (clap refuses a flag twice).
    if !extra.contains(&"--max-duration") {
        cmd.args(["--max-duration", "300s"]);
    }
    match auth {
        Auth::Tokens(tokens) => {
            for t in tokens {
                cmd.arg("--token-file").arg(t);
            }
        }
        Auth::ClientCert(dir) => {
            cmd.arg("--client-cert")
                .arg(dir.join("cert-chain.pem"))
                .arg("--client-key")
                .arg(dir.join("key.pem"));
        }
    }
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let mut stderr = child.stderr.take().context("loadgen stderr")?;
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let mut text = String::new();
    child
        .stdout
        .take()
        .context("loadgen stdout")?
        .read_to_string(&mut text)?;
    // Its CPU time, read while it is a zombie (not yet waited for).
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_state(pid).is_some_and(|s| s != 'Z') && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
    let cpu = cpu_seconds(pid);
    child.wait()?;
    let errors = errors.join().unwrap_or_default();
    let mut report: serde_json::Value = serde_json::from_str(text.trim())
        .with_context(|| format!("loadgen output: {text} {errors}"))?;
    if let Some(cpu) = cpu {
        report["loadgen_cpu_s"] = cpu.into();
    }
    Ok(report)
}

/// The fields of `/proc/<pid>/stat` after the command name (state first).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn process_state(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// CPU seconds (user + system) a process has used so far (clock ticks of
/// 1/100 s, Linux's USER_HZ on this platform).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let f = stat_fields(pid)?;
    let ticks = |i: usize| f.get(i)?.parse::<f64>().ok();
    // utime and stime: fields 14 and 15 of stat, 11 and 12 after the state's 3.
    Some((ticks(11)? + ticks(12)?) / 100.0)
}

/// CPU seconds of this process so far (the in-process minimal client).
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds(std::process::id()).unwrap_or(0.0)
}

/// The testenv's kube-apiserver and etcd process ids (from its pid files).
pub fn control_plane(env: &meshca_testsupport::TestEnv) -> Vec<(&'static str, u32)> {
    ["kube-apiserver", "etcd"]
        .into_iter()
        .filter_map(|name| {
            let file = env.config().dir.join(format!("pids/{name}.pid"));
            let pid = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
            Some((name, pid))
        })
        .collect()
}

/// The 1, 5 and 15-minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Peak RSS (VmHWM) of a process, MiB.
pub fn rss_mib(pid: u32) -> f64 {
    proc_status_mib(pid, "VmHWM:")
}

/// Current RSS (VmRSS) of a process, MiB.
pub fn rss_now_mib(pid: u32) -> f64 {
    proc_status_mib(pid, "VmRSS:")
}

fn proc_status_mib(pid: u32, field: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Creates `make(i)` (the API to create in, the object) for `i` in `range`,
/// `concurrency` at a time; one that exists already counts as made (so a
/// run can resume on the same testenv, sizes in increasing order).
/// Returns the seconds taken.
pub async fn create_all<K, F>(
    range: std::ops::Range<usize>,
    concurrency: usize,
    make: F,
) -> Result<f64>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    F: Fn(usize) -> (Api<K>, K),
{
    let start = Instant::now();
    let make = &make;
    futures::stream::iter(range)
        .map(|i| async move {
            let (api, obj) = make(i);
            match api.create(&PostParams::default(), &obj).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                Err(e) => Err(anyhow::Error::from(e).context(format!("creating object {i}"))),
            }
        })
        .buffer_unordered(concurrency.max(1))
        .try_collect::<Vec<()>>()
        .await?;
    Ok(start.elapsed().as_secs_f64())
}

/// Sends SIGTERM and waits at most 20 s for the process to end (istiod and
/// meshca release their leases on SIGTERM), then kills it.
pub fn terminate(mut proc: Proc) {
    let _ = Command::new("kill")
        .args(["-TERM", &proc.0.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = proc.0.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Dropping `proc` kills it.
}

/// `count` new service accounts `<prefix><i>`, each with a 1 h token of
/// audience istio-ca written to a file (made 16 at a time, returned in order).
pub async fn tokens(ns: &TestNamespace, prefix: &str, count: usize) -> Result<Vec<PathBuf>> {
    futures::stream::iter(0..count)
        .map(|i| async move {
            let sa = format!("{prefix}{i}");
            ns.create_service_account(&sa).await?;
            let token = ns
                .token_with(
                    &sa,
                    &TokenOptions {
                        expiration_seconds: 3600,
                        ..TokenOptions::default()
                    },
                )
                .await?;
            let path = ns.temp_dir().join(format!("{sa}.token"));
            std::fs::write(&path, token)?;
            Ok::<_, anyhow::Error>(path)
        })
        .buffered(16)
        .try_collect()
        .await
}

pub fn median(v: &[serde_json::Value], key: &str) -> f64 {
    let mut xs: Vec<f64> = v.iter().filter_map(|r| r[key].as_f64()).collect();
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

pub fn row(name: &str, runs: &[serde_json::Value], rss: f64) {
    println!(
        "| {name} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} |",
        median(runs, "certs_per_second"),
        median(runs, "p50_ms"),
        median(runs, "p99_ms"),
        median(runs, "p999_ms"),
        rss
    );
}

pub const HEADER: &str =
    "| CA | certs/s | p50 ms | p99 ms | p99.9 ms | peak RSS MiB |\n|---|---|---|---|---|---|";

/// How to run istiod (pilot-discovery).
pub struct IstiodOptions<'a> {
    /// POD_NAMESPACE: where its CA Secret istio-ca-secret lives.
    pub namespace: &'a str,
    pub pod_name: &'a str,
    pub kubeconfig: &'a Path,
    /// Working directory (`./etc/...` files are read from here) and log
    /// `<dir>.log`.
    pub dir: PathBuf,
    /// Extra command-line flags, e.g. `--kubernetesApiQPS`.
    pub args: &'a [&'a str],
    /// Extra environment, e.g. EXTERNAL_CA and K8S_SIGNER.
    pub env: &'a [(&'a str, &'a str)],
}

/// A running istiod.
pub struct Istiod {
    pub proc: Proc,
    /// Its secure gRPC address (the CA).
    pub addr: String,
    /// The root of its serving certificate (from istio-ca-secret).
    pub root: PathBuf,
    pub log: PathBuf,
    /// Its monitoring address (`/metrics`).
    pub monitoring: String,
}

/// Starts istiod and waits (120 s at most) until it is ready; its serving
/// certificate's root is written next to its directory (`<dir>-root.pem`).
pub async fn start_istiod(client: kube::Client, o: &IstiodOptions<'_>) -> Result<Istiod> {
    let namespaces = Api::<Namespace>::all(client.clone());
    if namespaces.get_opt(o.namespace).await?.is_none() {
        let mut n = Namespace::default();
        n.metadata.name = Some(o.namespace.into());
        namespaces.create(&PostParams::default(), &n).await?;
    }
    std::fs::create_dir_all(&o.dir)?;
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let addr = format!("127.0.0.1:{}", ports[2]);
    let log = o.dir.with_extension("log");
    let log_file = std::fs::File::create(&log)?;
    let mut cmd = Command::new(meshca_testsupport::bin("pilot-discovery"));
    cmd.current_dir(&o.dir)
        .arg("discovery")
        .arg("--kubeconfig")
        .arg(o.kubeconfig)
        .args(["--clusterID", "Kubernetes"])
        .args(["--httpAddr", &format!("127.0.0.1:{}", ports[0])])
        .args(["--grpcAddr", &format!("127.0.0.1:{}", ports[1])])
        .args(["--secureGRPCAddr", &addr])
        .args(["--httpsAddr", &format!("127.0.0.1:{}", ports[3])])
        .args(["--monitoringAddr", &format!("127.0.0.1:{}", ports[4])])
        .args(o.args)
        .env("POD_NAMESPACE", o.namespace)
        .env("POD_NAME", o.pod_name)
        .env("CLOUD_PLATFORM", "none")
        .env("PILOT_ENABLE_ANALYSIS", "false");
    for (k, v) in o.env {
        cmd.env(k, v);
    }
    let proc = Proc(
        cmd.stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .context("starting pilot-discovery")?,
    );
    wait_http(
        &format!("http://127.0.0.1:{}/ready", ports[0]),
        "istiod",
        Duration::from_secs(120),
    )
    .await
    .with_context(|| format!("see {}", log.display()))?;
    // A plugged-in CA (./etc/cacerts) has its root there; else istiod made
    // its self-signed CA in istio-ca-secret.
    let plugged = o.dir.join("etc/cacerts/root-cert.pem");
    let root_pem = if plugged.exists() {
        std::fs::read(&plugged)?
    } else {
        let secrets = Api::<Secret>::namespaced(client, o.namespace);
        let secret = secrets
            .get("istio-ca-secret")
            .await
            .context("istiod's CA secret")?;
        secret
            .data
            .and_then(|mut d| d.remove("ca-cert.pem"))
            .context("ca-cert.pem in istio-ca-secret")?
            .0
    };
    let root = o.dir.with_file_name(format!(
        "{}-root.pem",
        o.dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("istiod")
    ));
    std::fs::write(&root, &root_pem)?;
    Ok(Istiod {
        proc,
        addr,
        root,
        log,
        monitoring: format!("127.0.0.1:{}", ports[4]),
    })
}
