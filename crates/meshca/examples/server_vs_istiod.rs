//! Benchmark: meshca server against istiod's own CA, side by side on the
//! same kube-apiserver, same tokens, same load generator.
//!
//! ```text
//! testenv/build all && testenv/build istiod
//! env="$(testenv/up)" && eval "$env"
//! cargo build --release -p meshca
//! cargo run --release -p meshca --example server_vs_istiod -- [ROUNDS] [REQUESTS] [CONCURRENCY] [TOKENS]
//! testenv/down
//! ```
//!
//! Both CAs use an RSA-2048 self-signed root (istiod's default) and verify
//! every token with TokenReview against the same API server; meshca caches
//! TokenReview answers (bounded by the token's exp and 60 s), istiod does
//! one TokenReview per request. Everything listens on 127.0.0.1 and stops by
//! itself.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, PostParams};
use meshca_testsupport::{TestEnv, TokenOptions};

const SERVER_RBAC: &str = include_str!("../../../deploy/server/rbac.yaml");

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn meshca_bin() -> Result<PathBuf> {
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

async fn wait_http(url: &str, what: &str, limit: Duration) -> Result<()> {
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

fn loadgen(
    addr: &str,
    root: &Path,
    tokens: &[PathBuf],
    requests: usize,
    concurrency: usize,
) -> Result<serde_json::Value> {
    let mut cmd = Command::new(meshca_bin()?);
    cmd.args([
        "loadgen",
        "--json",
        "--addr",
        addr,
        "--key-type",
        "ecdsa-p256",
    ])
    .arg("--root")
    .arg(root)
    .args([
        "--requests",
        &requests.to_string(),
        "--concurrency",
        &concurrency.to_string(),
    ])
    .args([
        "--connections",
        &concurrency.clamp(1, 64).to_string(),
        "--max-duration",
        "300s",
    ]);
    for t in tokens {
        cmd.arg("--token-file").arg(t);
    }
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| {
        format!(
            "loadgen output: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = args.first().copied().unwrap_or(3);
    let requests = args.get(1).copied().unwrap_or(3000);
    let concurrency = args.get(2).copied().unwrap_or(64);
    let token_count = args.get(3).copied().unwrap_or(64);

    let env = TestEnv::get().await;
    let ns = env.namespace("bench").await?;
    let tmp = ns.temp_dir().to_owned();
    let mut tokens = Vec::new();
    for i in 0..token_count {
        let sa = format!("w{i}");
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
        let path = tmp.join(format!("{sa}.token"));
        std::fs::write(&path, token)?;
        tokens.push(path);
    }

    // meshca, with exactly its manifest's RBAC.
    let identity = ns.identity_from_manifest("meshca", SERVER_RBAC).await?;
    let meshca_addr = format!("127.0.0.1:{}", free_port());
    let meshca_mon = format!("127.0.0.1:{}", free_port());
    let state = tmp.join("meshca-state");
    let meshca = Proc(
        Command::new(meshca_bin()?)
            .args([
                "server",
                "--listen",
                &meshca_addr,
                "--monitoring-listen",
                &meshca_mon,
            ])
            .arg("--state-dir")
            .arg(&state)
            .arg("--root-ca-dir")
            .arg(tmp.join("none"))
            .arg("--kubeconfig")
            .arg(identity.kubeconfig_path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    wait_http(
        &format!("http://{meshca_mon}/readyz"),
        "meshca",
        Duration::from_secs(30),
    )
    .await?;
    let meshca_root = state.join("ca/root-cert.pem");

    // istiod (pilot-discovery) with its built-in CA, admin kubeconfig.
    let namespaces = Api::<Namespace>::all(env.client());
    if namespaces.get_opt("istio-system").await?.is_none() {
        let mut n = Namespace::default();
        n.metadata.name = Some("istio-system".into());
        namespaces.create(&PostParams::default(), &n).await?;
    }
    let istiod_dir = tmp.join("istiod");
    std::fs::create_dir_all(&istiod_dir)?;
    let ports: Vec<u16> = (0..5).map(|_| free_port()).collect();
    let istiod_addr = format!("127.0.0.1:{}", ports[2]);
    let kubeconfig = std::env::var("KUBECONFIG").context("KUBECONFIG")?;
    let istiod_log = std::fs::File::create(tmp.join("istiod.log"))?;
    let istiod = Proc(
        Command::new(meshca_testsupport::bin("pilot-discovery"))
            .current_dir(&istiod_dir)
            .args([
                "discovery",
                "--kubeconfig",
                &kubeconfig,
                "--clusterID",
                "Kubernetes",
            ])
            .args(["--httpAddr", &format!("127.0.0.1:{}", ports[0])])
            .args(["--grpcAddr", &format!("127.0.0.1:{}", ports[1])])
            .args(["--secureGRPCAddr", &istiod_addr])
            .args(["--httpsAddr", &format!("127.0.0.1:{}", ports[3])])
            .args(["--monitoringAddr", &format!("127.0.0.1:{}", ports[4])])
            .env("POD_NAMESPACE", "istio-system")
            .env("POD_NAME", "istiod-bench")
            .env("CLOUD_PLATFORM", "none")
            .env("PILOT_ENABLE_ANALYSIS", "false")
            .stdout(istiod_log.try_clone()?)
            .stderr(istiod_log)
            .spawn()?,
    );
    wait_http(
        &format!("http://127.0.0.1:{}/ready", ports[0]),
        "istiod",
        Duration::from_secs(120),
    )
    .await?;
    let secrets = Api::<Secret>::namespaced(env.client(), "istio-system");
    let secret = secrets
        .get("istio-ca-secret")
        .await
        .context("istiod's CA secret")?;
    let root = secret
        .data
        .as_ref()
        .and_then(|d| d.get("ca-cert.pem"))
        .context("ca-cert.pem in istio-ca-secret")?;
    let istiod_root = tmp.join("istiod-root.pem");
    std::fs::write(&istiod_root, &root.0)?;

    println!(
        "{} rounds x {requests} requests, concurrency {concurrency}, {token_count} ServiceAccount tokens",
        rounds
    );
    let mut results: Vec<(&str, Vec<serde_json::Value>)> =
        vec![("meshca", vec![]), ("istiod", vec![])];
    for round in 0..rounds {
        for (name, addr, root) in [
            ("meshca", &meshca_addr, &meshca_root),
            ("istiod", &istiod_addr, &istiod_root),
        ] {
            let r = loadgen(addr, root, &tokens, requests, concurrency)?;
            println!("round {round} {name:7} {r}");
            results
                .iter_mut()
                .find(|(n, _)| *n == name)
                .unwrap()
                .1
                .push(r);
        }
    }
    let median = |v: &[serde_json::Value], key: &str| -> f64 {
        let mut xs: Vec<f64> = v.iter().filter_map(|r| r[key].as_f64()).collect();
        xs.sort_by(f64::total_cmp);
        xs.get(xs.len() / 2).copied().unwrap_or(0.0)
    };
    println!("\nmedian of {rounds} rounds:");
    println!("| CA | certs/s | p50 ms | p99 ms | p99.9 ms | peak RSS MiB |");
    println!("|---|---|---|---|---|---|");
    for ((name, rs), pid) in results.iter().zip([meshca.0.id(), istiod.0.id()]) {
        println!(
            "| {name} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} |",
            median(rs, "certs_per_second"),
            median(rs, "p50_ms"),
            median(rs, "p99_ms"),
            median(rs, "p999_ms"),
            rss_mib(pid)
        );
    }
    let ratio = median(&results[0].1, "certs_per_second")
        / median(&results[1].1, "certs_per_second").max(1e-9);
    println!("\nthroughput ratio meshca/istiod: {ratio:.2}x");
    drop((meshca, istiod));
    ns.cleanup().await
}
