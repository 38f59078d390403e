//! Faults (issue 13, part 1): the kube-apiserver is SIGKILLed in the middle
//! of a burst and started again on the same etcd, under a `meshca server`
//! that authenticates every request with TokenReview (token cache off, so
//! every request needs the apiserver). Each answer is classified:
//!
//! - **ok**: a chain whose leaf names the caller and verifies to the root;
//! - **clean error**: a gRPC status (istio-agent retries it);
//! - **wrong**: anything else (a chain that does not verify, or names
//!   someone else). Must be 0.
//!
//! meshca is not restarted: once the apiserver is back, requests succeed
//! again. This test binary runs alone (cargo runs test binaries one after
//! another), so killing the shared apiserver disturbs no other test.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use common::{Proc, free_port, leaf_uris};
use meshca_pki::csr::build_csr;
use meshca_pki::{KeyType, SigningKey, cert};
use meshca_proto::IstioCertificateRequest;
use meshca_proto::istio_certificate_service_client::IstioCertificateServiceClient;
use meshca_testsupport::{TestEnv, TokenOptions, chart};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
use x509_parser::prelude::*;

#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    ok: usize,
    clean: usize,
    wrong: usize,
}

/// Does `chain` (leaf first, root last) name `spiffe` and verify to `root`?
fn verifies(chain: &[String], root_der: &[u8], spiffe: &str) -> bool {
    let ders: Vec<Vec<u8>> = chain.iter().map(|c| common::pem_der(c)).collect();
    if leaf_uris(chain) != [spiffe.to_string()] || ders.last().map(Vec::as_slice) != Some(root_der)
    {
        return false;
    }
    ders.windows(2).all(|pair| {
        match (
            X509Certificate::from_der(&pair[0]),
            X509Certificate::from_der(&pair[1]),
        ) {
            (Ok((_, child)), Ok((_, parent))) => {
                child.verify_signature(Some(parent.public_key())).is_ok()
            }
            _ => false,
        }
    })
}

/// The apiserver's command line and log, from its pid file.
fn apiserver(dir: &Path) -> Result<(u32, Vec<String>)> {
    let pid: u32 = std::fs::read_to_string(dir.join("pids/kube-apiserver.pid"))?
        .trim()
        .parse()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    let args = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    Ok((pid, args))
}

/// Polls the apiserver's /readyz (admin client certificate) until it answers.
async fn wait_apiserver_ready() -> Result<Duration> {
    let var = |k: &str| std::env::var(k).with_context(|| k.to_string());
    let (url, ca, cert, key) = (
        var("MESHCA_TESTENV_APISERVER")?,
        var("MESHCA_TESTENV_CA")?,
        var("MESHCA_TESTENV_ADMIN_CERT")?,
        var("MESHCA_TESTENV_ADMIN_KEY")?,
    );
    let t = Instant::now();
    loop {
        let ok = Command::new("curl")
            .args([
                "-fsS",
                "--max-time",
                "2",
                "--cacert",
                &ca,
                "--cert",
                &cert,
                "--key",
                &key,
            ])
            .arg(format!("{url}/readyz"))
            .output()?
            .status
            .success();
        if ok {
            return Ok(t.elapsed());
        }
        ensure!(
            t.elapsed() < Duration::from_secs(120),
            "apiserver not ready again after 120 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apiserver_killed_mid_burst_loses_nothing_and_meshca_recovers() -> Result<()> {
    let env = TestEnv::get().await;
    let ns = env.namespace("fault-apiserver").await?;
    let testenv_dir = env.config().dir.clone();

    // meshca server with the chart's RBAC, every request a TokenReview.
    let rbac = chart::server_rbac(ns.name(), &[])?;
    let identity = ns.identity_from_manifest("meshca", &rbac).await?;
    let state = tempfile::tempdir()?;
    let addr = format!("127.0.0.1:{}", free_port());
    let monitoring = format!("127.0.0.1:{}", free_port());
    let _server = Proc(
        Command::new(env!("CARGO_BIN_EXE_meshca"))
            .args([
                "server",
                "--listen",
                &addr,
                "--monitoring-listen",
                &monitoring,
            ])
            .arg("--root-ca-dir")
            .arg(state.path().join("no-plugged-ca"))
            .arg("--state-dir")
            .arg(state.path())
            .args([
                "--no-root-configmap",
                "--no-ca-secret",
                "--no-impersonation",
            ])
            .args([
                "--self-signed-key-type",
                "ecdsa-p256",
                "--token-cache-ttl",
                "0",
            ])
            .arg("--kubeconfig")
            .arg(identity.kubeconfig_path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let t = Instant::now();
    while !Command::new("curl")
        .args(["-sf", &format!("http://{monitoring}/readyz")])
        .output()?
        .status
        .success()
    {
        ensure!(
            t.elapsed() < Duration::from_secs(20),
            "meshca server not ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let root_pem = std::fs::read_to_string(state.path().join("ca/root-cert.pem"))?;
    let root_der = common::pem_der(&root_pem);

    // 100 workloads over 10 accounts.
    let mut workloads = Vec::new();
    for a in 0..10 {
        ns.create_service_account(&format!("w{a}")).await?;
    }
    for i in 0..100 {
        let sa = format!("w{}", i % 10);
        let token = ns
            .token_with(
                &sa,
                &TokenOptions {
                    expiration_seconds: 3600,
                    ..Default::default()
                },
            )
            .await?;
        let key = SigningKey::generate(KeyType::EcdsaP256)?;
        let spiffe = format!("spiffe://cluster.local/ns/{}/sa/{sa}", ns.name());
        let csr = build_csr(&key, cert::EMPTY_NAME, &[]).map_err(anyhow::Error::msg)?;
        workloads.push((token, spiffe, csr));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&root_pem))
                .domain_name("istiod.istio-system.svc"),
        )?
        .timeout(Duration::from_secs(30))
        .connect_lazy();

    // The burst: every workload asks again and again; phases by time.
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (token, spiffe, csr) in workloads {
        let (channel, stop, root_der) = (channel.clone(), stop.clone(), root_der.clone());
        tasks.push(tokio::spawn(async move {
            let mut grpc = IstioCertificateServiceClient::new(channel);
            let mut seen = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let mut req =
                    tonic::Request::new(IstioCertificateRequest::from_agent(csr.clone(), 3600, ""));
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse().unwrap());
                let outcome = match grpc.create_certificate(req).await {
                    Ok(resp) if verifies(&resp.get_ref().cert_chain, &root_der, &spiffe) => "ok",
                    Ok(_) => "wrong",
                    Err(_) => "clean",
                };
                seen.push((start.elapsed(), outcome));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            seen
        }));
    }

    // Mid-burst: SIGKILL the apiserver, keep it down 5 s, start it again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (pid, args) = apiserver(&testenv_dir)?;
    let killed_at = start.elapsed();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(testenv_dir.join("logs/kube-apiserver.log"))?;
    let child = Command::new(&args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("restarting kube-apiserver")?;
    // testenv/down stops it by this pid file.
    std::fs::write(
        testenv_dir.join("pids/kube-apiserver.pid"),
        child.id().to_string(),
    )?;
    std::mem::forget(child);
    let restarted_at = start.elapsed();
    let ready_after = wait_apiserver_ready().await?;
    let back_at = start.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::SeqCst);

    let mut before = Tally::default();
    let mut during = Tally::default();
    let mut after = Tally::default();
    let mut first_ok_after_kill = None;
    for task in tasks {
        for (at, outcome) in task.await? {
            let tally = if at < killed_at {
                &mut before
            } else if at < back_at + Duration::from_secs(2) {
                &mut during
            } else {
                &mut after
            };
            match outcome {
                "ok" => tally.ok += 1,
                "clean" => tally.clean += 1,
                _ => tally.wrong += 1,
            }
            if outcome == "ok" && at > restarted_at {
                first_ok_after_kill = Some(first_ok_after_kill.map_or(at, |f: Duration| f.min(at)));
            }
        }
    }
    let recovery = first_ok_after_kill.map(|t| t.saturating_sub(restarted_at));
    eprintln!(
        "apiserver SIGKILLed at {killed_at:?}, restarted at {restarted_at:?}, ready {ready_after:?} later; \
         before {before:?}, during {during:?}, after {after:?}; first ok {recovery:?} after the restart"
    );
    ensure!(
        before.wrong + during.wrong + after.wrong == 0,
        "wrong answers: {before:?} {during:?} {after:?}"
    );
    ensure!(
        before.ok > 0 && before.clean == 0,
        "the burst did not run cleanly before the fault: {before:?}"
    );
    ensure!(
        during.clean > 0,
        "the outage was not seen (token cache on?): {during:?}"
    );
    ensure!(
        after.ok > 0 && after.clean == 0,
        "meshca did not recover without a restart once the apiserver was back: {after:?}"
    );
    if recovery.is_none() {
        bail!("no successful request after the restart");
    }
    ns.cleanup().await
}
