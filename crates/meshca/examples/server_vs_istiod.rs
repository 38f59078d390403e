//! Benchmark: meshca server against istiod's own CA, side by side on the
//! same kube-apiserver, same tokens, same load generator.
//!
//! ```text
//! testenv/build all && testenv/build istiod
//! env="$(testenv/up)" && eval "$env"
//! cargo build --release -p meshca
//! cargo run --release -p meshca --example server_vs_istiod -- [ROUNDS] [REQUESTS] [CONCURRENCY]
//! testenv/down
//! ```
//!
//! Scenarios, each run ROUNDS times alternating the CAs (median reported):
//! 1. renewal-like: 64 workloads' tokens reused; both CAs with an RSA-2048
//!    self-signed root (istiod's default), TokenReview against the same API
//!    server (meshca caches answers within the token's exp and 60 s; istiod
//!    does one TokenReview per request);
//! 2. mass restart: every request from a different workload (a fresh token
//!    each, so meshca too makes one TokenReview per request);
//! 3. meshca alone with an ECDSA P-256 CA at 256 concurrent clients;
//! 4. meshca alone with client-certificate authentication (renewal), RSA-2048
//!    and P-256 CAs, to compare with the PKI core's rate.
//!
//! Everything listens on 127.0.0.1 and stops by itself.

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

enum Auth<'a> {
    Tokens(&'a [PathBuf]),
    ClientCert(&'a Path),
}

fn loadgen(
    addr: &str,
    root: &Path,
    auth: Auth<'_>,
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
    .args([
        "--connections",
        &concurrency.clamp(1, 64).to_string(),
        "--max-duration",
        "300s",
    ]);
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

/// A running `meshca server` with its own state directory and CA key type.
struct Meshca {
    proc: Proc,
    addr: String,
    root: PathBuf,
}

async fn start_meshca(tmp: &Path, kubeconfig: &Path, key_type: &str) -> Result<Meshca> {
    let addr = format!("127.0.0.1:{}", free_port());
    let mon = format!("127.0.0.1:{}", free_port());
    let state = tmp.join(format!("meshca-{key_type}"));
    let proc = Proc(
        Command::new(meshca_bin()?)
            .args(["server", "--listen", &addr, "--monitoring-listen", &mon])
            .args(["--self-signed-key-type", key_type])
            .arg("--state-dir")
            .arg(&state)
            .arg("--root-ca-dir")
            .arg(tmp.join("none"))
            .arg("--no-root-configmap")
            .arg("--no-ca-secret")
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .arg("--no-impersonation")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?,
    );
    wait_http(
        &format!("http://{mon}/readyz"),
        "meshca",
        Duration::from_secs(30),
    )
    .await?;
    Ok(Meshca {
        proc,
        addr,
        root: state.join("ca/root-cert.pem"),
    })
}

async fn tokens(
    ns: &meshca_testsupport::TestNamespace,
    prefix: &str,
    count: usize,
) -> Result<Vec<PathBuf>> {
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
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
        out.push(path);
    }
    Ok(out)
}

fn median(v: &[serde_json::Value], key: &str) -> f64 {
    let mut xs: Vec<f64> = v.iter().filter_map(|r| r[key].as_f64()).collect();
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

fn row(name: &str, runs: &[serde_json::Value], rss: f64) {
    println!(
        "| {name} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} |",
        median(runs, "certs_per_second"),
        median(runs, "p50_ms"),
        median(runs, "p99_ms"),
        median(runs, "p999_ms"),
        rss
    );
}

const HEADER: &str =
    "| CA | certs/s | p50 ms | p99 ms | p99.9 ms | peak RSS MiB |\n|---|---|---|---|---|---|";

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let rounds = args.first().copied().unwrap_or(3);
    let requests = args.get(1).copied().unwrap_or(3000);
    let concurrency = args.get(2).copied().unwrap_or(64);

    let env = TestEnv::get().await;
    let ns = env.namespace("bench").await?;
    let tmp = ns.temp_dir().to_owned();
    let renewal_tokens = tokens(&ns, "w", 64).await?;

    let identity = ns.identity_from_manifest("meshca", SERVER_RBAC).await?;
    let rsa = start_meshca(&tmp, identity.kubeconfig_path(), "rsa-2048").await?;
    let p256 = start_meshca(&tmp, identity.kubeconfig_path(), "ecdsa-p256").await?;

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
        "## 1. renewal-like: {rounds} rounds x {requests} requests, concurrency {concurrency}, 64 workloads, RSA-2048 roots\n"
    );
    let (mut m, mut i) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        m.push(loadgen(
            &rsa.addr,
            &rsa.root,
            Auth::Tokens(&renewal_tokens),
            requests,
            concurrency,
        )?);
        i.push(loadgen(
            &istiod_addr,
            &istiod_root,
            Auth::Tokens(&renewal_tokens),
            requests,
            concurrency,
        )?);
    }
    println!("{HEADER}");
    row("meshca", &m, rss_mib(rsa.proc.0.id()));
    row("istiod", &i, rss_mib(istiod.0.id()));
    println!(
        "\nthroughput meshca/istiod: {:.1}x\n",
        median(&m, "certs_per_second") / median(&i, "certs_per_second").max(1e-9)
    );

    let burst = requests.min(2000);
    println!(
        "## 2. mass restart: {burst} workloads, one request each with its own token, concurrency {concurrency}\n"
    );
    let (mut m, mut i) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let fresh_m = tokens(&ns, &format!("m{round}x"), burst).await?;
        let fresh_i = tokens(&ns, &format!("i{round}x"), burst).await?;
        m.push(loadgen(
            &rsa.addr,
            &rsa.root,
            Auth::Tokens(&fresh_m),
            burst,
            concurrency.min(burst),
        )?);
        i.push(loadgen(
            &istiod_addr,
            &istiod_root,
            Auth::Tokens(&fresh_i),
            burst,
            concurrency.min(burst),
        )?);
    }
    println!("{HEADER}");
    row("meshca", &m, rss_mib(rsa.proc.0.id()));
    row("istiod", &i, rss_mib(istiod.0.id()));
    println!(
        "\nthroughput meshca/istiod: {:.1}x\n",
        median(&m, "certs_per_second") / median(&i, "certs_per_second").max(1e-9)
    );

    println!("## 3. meshca with an ECDSA P-256 CA, 256 concurrent clients, {requests} requests\n");
    let runs: Vec<_> = (0..rounds)
        .map(|_| {
            loadgen(
                &p256.addr,
                &p256.root,
                Auth::Tokens(&renewal_tokens),
                requests,
                256,
            )
        })
        .collect::<Result<_>>()?;
    println!("{HEADER}");
    row("meshca P-256 CA", &runs, rss_mib(p256.proc.0.id()));

    println!(
        "\n## 4. meshca, client-certificate authentication (renewal), concurrency {concurrency}\n"
    );
    println!("{HEADER}");
    for (name, server) in [("meshca RSA-2048 CA", &rsa), ("meshca P-256 CA", &p256)] {
        let dir = tmp.join(format!("client-{}", free_port()));
        let status = Command::new(meshca_bin()?)
            .args([
                "request",
                "--addr",
                &server.addr,
                "--key-type",
                "ecdsa-p256",
            ])
            .arg("--root")
            .arg(&server.root)
            .arg("--token-file")
            .arg(&renewal_tokens[0])
            .arg("--out")
            .arg(&dir)
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "meshca request failed");
        let runs: Vec<_> = (0..rounds)
            .map(|_| {
                loadgen(
                    &server.addr,
                    &server.root,
                    Auth::ClientCert(&dir),
                    requests,
                    concurrency,
                )
            })
            .collect::<Result<_>>()?;
        row(name, &runs, rss_mib(server.proc.0.id()));
    }
    drop((rsa, p256, istiod));
    ns.cleanup().await
}
