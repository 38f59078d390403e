//! Benchmark: meshca server against istiod's own CA, side by side on the
//! same kube-apiserver, same tokens, same load generator.
//!
//! ```text
//! testenv/build all && testenv/build istiod
//! env="$(testenv/up)" && eval "$env"
//! cargo build --release -p meshca
//! cargo run --release -p meshca --example server_vs_istiod -- [ROUNDS] [REQUESTS] [CONCURRENCY] [BURST]
//! testenv/down
//! ```
//!
//! Scenarios, each run ROUNDS times alternating the CAs (median reported):
//! 1. renewal-like: 64 workloads' tokens reused; both CAs with an RSA-2048
//!    self-signed root (istiod's default), TokenReview against the same API
//!    server (meshca caches answers within the token's exp and 60 s; istiod
//!    does one TokenReview per request);
//! 2. mass restart: BURST workloads (default 2000), every request from a
//!    different workload (a fresh token each, so meshca too makes one
//!    TokenReview per request);
//! 3. meshca alone with an ECDSA P-256 CA at 256 concurrent clients;
//! 4. meshca alone with client-certificate authentication (renewal), RSA-2048
//!    and P-256 CAs, to compare with the PKI core's rate.
//!
//! Everything listens on 127.0.0.1 and stops by itself.

mod bench_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use bench_common::{
    Auth, HEADER, IstiodOptions, Proc, free_port, loadgen, median, meshca_bin, row, rss_mib,
    start_istiod, tokens, wait_http,
};
use meshca_testsupport::{TestEnv, chart};

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

    let rbac = chart::server_rbac(ns.name(), &[])?;
    let identity = ns.identity_from_manifest("meshca", &rbac).await?;
    let rsa = start_meshca(&tmp, identity.kubeconfig_path(), "rsa-2048").await?;
    let p256 = start_meshca(&tmp, identity.kubeconfig_path(), "ecdsa-p256").await?;

    // istiod (pilot-discovery) with its built-in CA, admin kubeconfig.
    let kubeconfig = PathBuf::from(std::env::var("KUBECONFIG").context("KUBECONFIG")?);
    let istiod = start_istiod(
        env.client(),
        &IstiodOptions {
            namespace: "istio-system",
            pod_name: "istiod-bench",
            kubeconfig: &kubeconfig,
            dir: tmp.join("istiod"),
            args: &[],
            env: &[],
        },
    )
    .await?;
    let (istiod_addr, istiod_root) = (istiod.addr.clone(), istiod.root.clone());

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
    row("istiod", &i, rss_mib(istiod.proc.0.id()));
    println!(
        "\nthroughput meshca/istiod: {:.1}x\n",
        median(&m, "certs_per_second") / median(&i, "certs_per_second").max(1e-9)
    );

    let burst = args.get(3).copied().unwrap_or(2000);
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
    row("istiod", &i, rss_mib(istiod.proc.0.id()));
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
