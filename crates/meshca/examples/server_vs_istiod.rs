//! Benchmark: meshca server against istiod's own CA, side by side on the
//! same kube-apiserver, same tokens, same load generator.
//!
//! ```text
//! testenv/build all && testenv/build istiod
//! env="$(testenv/up)" && eval "$env"
//! cargo build --release -p meshca
//! cargo run --release -p meshca --example server_vs_istiod -- [ROUNDS] [REQUESTS] [CONCURRENCY] [BURST] [--burst-only]
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
//! `--burst-only` runs instead, ROUNDS times, where the mass restart's time
//! goes: BURST workloads with fresh tokens at CONCURRENCY clients against
//! meshca with a P-256 CA and with an RSA-2048 CA (TokenReview per
//! request), against meshca with a P-256 CA verifying the same kind of
//! tokens itself (`--standalone --jwt-keys` with the apiserver's
//! service-account key: no apiserver in the path), and the apiserver's
//! TokenReview ceiling alone (the minimal client of
//! [`bench_common::ceiling`], at 32 and 128 in flight). For each run
//! the CPU seconds of meshca, kube-apiserver, etcd and the load generator.
//!
//! Everything listens on 127.0.0.1 and stops by itself.

mod bench_common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use bench_common::{
    Auth, HEADER, IstiodOptions, Proc, ceiling, control_plane, free_port, load_average, loadgen,
    loadgen_with, median, meshca_bin, own_cpu_seconds, row, rss_mib, start_istiod, tokens,
    wait_http,
};
use meshca_testsupport::{TestEnv, chart};

/// `meshca loadgen` flag: every request with its own token (a workload each).
const PER_REQUEST: &[&str] = &["--token-per-request"];

/// A running `meshca server` with its own state directory and CA key type.
struct Meshca {
    proc: Proc,
    addr: String,
    root: PathBuf,
}

async fn start_meshca(
    tmp: &Path,
    kubeconfig: &Path,
    key_type: &str,
    extra: &[&std::ffi::OsStr],
) -> Result<Meshca> {
    let addr = format!("127.0.0.1:{}", free_port());
    let mon = format!("127.0.0.1:{}", free_port());
    let state = tmp.join(format!("meshca-{key_type}-{}", free_port()));
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
            .args(extra)
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
    if std::env::args().any(|a| a == "--burst-only") {
        let burst = args.get(3).copied().unwrap_or(10_000);
        burst_breakdown(
            &env,
            &ns,
            identity.kubeconfig_path(),
            rounds,
            burst,
            concurrency,
        )
        .await?;
        return ns.cleanup().await;
    }
    let rsa = start_meshca(&tmp, identity.kubeconfig_path(), "rsa-2048", &[]).await?;
    let p256 = start_meshca(&tmp, identity.kubeconfig_path(), "ecdsa-p256", &[]).await?;

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
        // One token per request: without it loadgen gives each client
        // one token, and meshca's cache answers all but CONCURRENCY of them.
        m.push(loadgen_with(
            &rsa.addr,
            &rsa.root,
            Auth::Tokens(&fresh_m),
            burst,
            concurrency.min(burst),
            PER_REQUEST,
        )?);
        i.push(loadgen_with(
            &istiod_addr,
            &istiod_root,
            Auth::Tokens(&fresh_i),
            burst,
            concurrency.min(burst),
            PER_REQUEST,
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

/// CPU seconds (user + system) a process has used so far; 0 if gone.
fn cpu_seconds(pid: u32) -> f64 {
    bench_common::cpu_seconds(pid).unwrap_or(0.0)
}

/// Where a mass restart's time goes (`--burst-only`).
async fn burst_breakdown(
    env: &TestEnv,
    ns: &meshca_testsupport::TestNamespace,
    kubeconfig: &Path,
    rounds: usize,
    burst: usize,
    concurrency: usize,
) -> Result<()> {
    let tmp = ns.temp_dir().to_owned();
    let cfg = env.config();
    let issuer = cfg
        .sa_issuer
        .clone()
        .unwrap_or_else(|| cfg.apiserver.clone());
    let sa_pub = cfg.dir.join("pki/sa.pub");
    let p256 = start_meshca(&tmp, kubeconfig, "ecdsa-p256", &[]).await?;
    let rsa = start_meshca(&tmp, kubeconfig, "rsa-2048", &[]).await?;
    let local = start_meshca(
        &tmp,
        kubeconfig,
        "ecdsa-p256",
        &[
            "--standalone".as_ref(),
            "--jwt-keys".as_ref(),
            sa_pub.as_os_str(),
            "--jwt-issuer".as_ref(),
            issuer.as_ref(),
        ],
    )
    .await?;
    let id = ns
        .identity(
            "ceiling",
            &[meshca_testsupport::RbacSpec::Existing(
                "cluster-admin".into(),
            )],
        )
        .await?;
    let ceiling_client = id.client().await?;
    let fixtures = ceiling::Fixtures::new()?;
    let servers: [(&str, &Meshca); 3] = [
        ("meshca P-256 CA, TokenReview", &p256),
        ("meshca RSA-2048 CA, TokenReview", &rsa),
        (
            "meshca P-256 CA, tokens verified locally (no apiserver)",
            &local,
        ),
    ];
    let ceilings = [32, 128];
    // Warm-up: every path once.
    let warm = tokens(ns, "warm", 8).await?;
    for (name, m) in servers {
        let r = loadgen(&m.addr, &m.root, Auth::Tokens(&warm), 8, 8)?;
        anyhow::ensure!(r["ok"] == 8, "warm-up of {name}: {r}");
    }
    let plane = control_plane(env);
    let mut runs: Vec<Vec<serde_json::Value>> = vec![Vec::new(); servers.len() + ceilings.len()];
    let mut loads = Vec::new();
    for round in 0..rounds {
        for (i, slot) in runs.iter_mut().enumerate() {
            let fresh = tokens(ns, &format!("b{round}x{i}w"), burst).await?;
            tokio::time::sleep(Duration::from_secs(3)).await;
            loads.push(load_average());
            let pids: Vec<(&str, u32)> = plane
                .iter()
                .copied()
                .chain(servers.get(i).map(|(_, m)| ("meshca", m.proc.0.id())))
                .collect();
            let before: Vec<f64> = pids.iter().map(|(_, p)| cpu_seconds(*p)).collect();
            let own = own_cpu_seconds();
            let mut r = match servers.get(i) {
                Some((_, m)) => loadgen_with(
                    &m.addr,
                    &m.root,
                    Auth::Tokens(&fresh),
                    burst,
                    concurrency.min(burst),
                    PER_REQUEST,
                )?,
                None => {
                    let c = ceilings[i - servers.len()];
                    let tokens = ceiling::read_tokens(&fresh)?;
                    ceiling::run(
                        &ceiling_client,
                        &tokens,
                        &ceiling::Calls::TokenReview,
                        c,
                        &fixtures,
                    )
                    .await
                }
            };
            for ((name, pid), b) in pids.iter().zip(before) {
                r["cpu_s"][*name] = (cpu_seconds(*pid) - b).into();
            }
            // The load generator: loadgen's own CPU, or this process's for
            // the in-process minimal client.
            r["cpu_s"]["loadgen"] = match r.get("loadgen_cpu_s") {
                Some(cpu) => cpu.clone(),
                None => (own_cpu_seconds() - own).into(),
            };
            eprintln!("round {round} run {i}: {r}");
            slot.push(r);
        }
    }
    println!(
        "## Mass restart of {burst} workloads, fresh token each, {concurrency} clients: where the time goes ({rounds} rounds, median)\n"
    );
    println!(
        "| run | all issued in s | certs/s | p50 ms | p99 ms | CPU s: meshca | kube-apiserver | etcd | load generator (or minimal client) | errors |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let names: Vec<String> =
        servers
            .iter()
            .map(|(n, _)| n.to_string())
            .chain(ceilings.iter().map(|c| {
                format!("TokenReview ceiling: minimal kube-rs client, {c} in flight, no CA")
            }))
            .collect();
    for (name, rs) in names.iter().zip(&runs) {
        let cpu = |who: &str| {
            let v: Vec<serde_json::Value> = rs.iter().map(|r| r["cpu_s"].clone()).collect();
            if v.iter().all(|c| c[who].is_null()) {
                "-".to_string()
            } else {
                format!("{:.2}", median(&v, who))
            }
        };
        let errors: Vec<String> = rs
            .iter()
            .filter(|r| r["errors"].as_object().is_some_and(|e| !e.is_empty()))
            .map(|r| r["errors"].to_string())
            .collect();
        println!(
            "| {name} | {:.2} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} |",
            median(rs, "seconds"),
            median(rs, "certs_per_second"),
            median(rs, "p50_ms"),
            median(rs, "p99_ms"),
            cpu("meshca"),
            cpu("kube-apiserver"),
            cpu("etcd"),
            cpu("loadgen"),
            if errors.is_empty() {
                "none".into()
            } else {
                errors.join(" ")
            },
        );
    }
    println!("\nper run:");
    for (name, rs) in names.iter().zip(&runs) {
        for r in rs {
            println!(
                "- {name}: {:.2} s, {:.0}/s, cpu {}",
                r["seconds"].as_f64().unwrap_or(0.0),
                r["certs_per_second"].as_f64().unwrap_or(0.0),
                r["cpu_s"]
            );
        }
    }
    println!("\nload average before each run: {}", loads.join(", "));
    drop((p256, rsa, local));
    Ok(())
}
