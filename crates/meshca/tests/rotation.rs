//! CA rotation under load (issue 13, part 1), against the real testenv:
//!
//! - `meshca server` with a plugged-in CA whose files are swapped under a
//!   burst: to a new intermediate of the same root (file by file, slower
//!   than a poll, so a poll sees the new certificate beside the old key),
//!   then to a new root in Istio's two steps (both roots in
//!   `root-cert.pem` first, the new root's intermediate once they are
//!   published);
//! - `meshca server` with the self-signed CA in Secret `istio-ca-secret`,
//!   its root re-issued every two seconds under a burst;
//! - `meshca signer` whose CA Secret is replaced under a burst of CSRs, the
//!   same two ways as the plugged-in CA.
//!
//! Every answer is classified: **ok** (the leaf names the caller and
//! verifies, through the answer's own chain, to the trust bundle published
//! at the moment it arrived: ConfigMap `istio-ca-root-cert` for the server,
//! Secret `external-ca-cert` for the signer, each recorded by a watch),
//! **clean** (a gRPC error, or a CSR Failed/Denied), **wrong** (anything
//! else). A rotation must fail nothing: clean and wrong are both 0.
//!
//! The tests run one at a time: each server writes `istio-ca-root-cert`
//! into every namespace, so two at once would overwrite each other's.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use common::fault::{self, Gauges};
use common::{Proc, ders, free_port, meshca, uris, wait_ready_blocking};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use meshca_pki::csr::build_csr;
use meshca_pki::{KeyType, SanEntry, SigningKey, cert};
use meshca_proto::IstioCertificateRequest;
use meshca_proto::istio_certificate_service_client::IstioCertificateServiceClient;
use meshca_testsupport::{TestEnv, TestNamespace, TokenOptions, chart};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use x509_parser::prelude::*;

static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Workloads (distinct keys) per server burst, and the tasks asking for them.
const WORKLOADS: usize = 2000;
const TASKS: usize = 64;

// ---- verification ---------------------------------------------------------

fn issued(child: &X509Certificate<'_>, parent: &X509Certificate<'_>) -> bool {
    child.issuer().as_raw() == parent.subject().as_raw()
        && child.verify_signature(Some(parent.public_key())).is_ok()
}

fn is_ca(cert: &X509Certificate<'_>) -> bool {
    cert.basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|b| b.value.ca)
}

/// Whether the leaf (first of `chain`) names exactly `spiffe` and verifies,
/// through the chain's own CA certificates, to one of `anchors` (a trust
/// anchor is its subject and key, as in path validation: a root re-issued
/// with the same key and subject anchors the same leaves), every certificate
/// on the path within its validity now.
fn verifies_to(chain: &[Vec<u8>], anchors: &[Vec<u8>], spiffe: &str) -> bool {
    let Ok(certs) = chain
        .iter()
        .map(|d| X509Certificate::from_der(d).map(|(_, c)| c))
        .collect::<Result<Vec<_>, _>>()
    else {
        return false;
    };
    let Ok(anchors) = anchors
        .iter()
        .map(|d| X509Certificate::from_der(d).map(|(_, c)| c))
        .collect::<Result<Vec<_>, _>>()
    else {
        return false;
    };
    if certs.is_empty() || uris(&certs[0]) != [spiffe.to_string()] {
        return false;
    }
    let mut at = 0;
    for _ in 0..8 {
        let cert = &certs[at];
        if !cert.validity().is_valid() {
            return false;
        }
        if anchors
            .iter()
            .any(|a| a.validity().is_valid() && issued(cert, a))
        {
            return true;
        }
        match (at + 1..certs.len()).find(|&j| is_ca(&certs[j]) && issued(cert, &certs[j])) {
            Some(j) => at = j,
            None => return false,
        }
    }
    false
}

fn fingerprint(der: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    der.hash(&mut h);
    h.finish()
}

// ---- the published trust bundle, recorded over time -----------------------

/// Roots (DER) as published, and when the test saw them.
type Version = (Instant, Vec<Vec<u8>>);

/// Every version of a published trust bundle, with the moment the test saw it.
#[derive(Clone, Default)]
struct Published(Arc<Mutex<Vec<Version>>>);

impl Published {
    fn push(&self, roots: Vec<Vec<u8>>) {
        let mut h = self.0.lock().unwrap();
        if !roots.is_empty() && h.last().map(|(_, r)| r) != Some(&roots) {
            h.push((Instant::now(), roots));
        }
    }

    /// The bundle as published at `t` (the last version seen by then).
    fn at(&self, t: Instant) -> Vec<Vec<u8>> {
        let h = self.0.lock().unwrap();
        h.iter()
            .rev()
            .find(|(at, _)| *at <= t)
            .map(|(_, r)| r.clone())
            .unwrap_or_default()
    }

    fn versions(&self) -> usize {
        self.0.lock().unwrap().len()
    }

    /// Waits (up to 30 s) for a version holding every root of `want`.
    async fn wait_holding(&self, want: &[Vec<u8>], what: &str) -> Result<Instant> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let found = self
                .0
                .lock()
                .unwrap()
                .iter()
                .find(|(_, r)| want.iter().all(|w| r.contains(w)))
                .map(|(t, _)| *t);
            if let Some(t) = found {
                return Ok(t);
            }
            ensure!(Instant::now() < deadline, "{what}: not published in 30 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Records every version of object `name`'s PEM (as `pem_of` finds it).
fn record<K>(api: Api<K>, name: &str, pem_of: fn(&K) -> Option<String>) -> Published
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let published = Published::default();
    let out = published.clone();
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    tokio::spawn(async move {
        let mut events = watcher(api, config).default_backoff().boxed();
        while let Some(event) = events.next().await {
            if let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = event
                && let Some(pem) = pem_of(&o)
            {
                out.push(ders(&pem));
            }
        }
    });
    published
}

fn configmap_roots(cm: &ConfigMap) -> Option<String> {
    cm.data.as_ref()?.get("root-cert.pem").cloned()
}

fn secret_roots(s: &Secret) -> Option<String> {
    let b = s.data.as_ref()?.get("root-cert.pem")?;
    String::from_utf8(b.0.clone()).ok()
}

// ---- tallies ----------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    Clean,
    Wrong,
}

/// One answer: when it came, what it was, and which CA certificate signed
/// the leaf (a fingerprint of its DER).
#[derive(Debug, Clone, Copy)]
struct Answer {
    at: Instant,
    outcome: Outcome,
    issuer: Option<u64>,
}

#[derive(Debug, Default)]
struct Tally {
    requests: usize,
    ok: usize,
    clean: usize,
    wrong: usize,
}

fn tally(answers: &[Answer]) -> Tally {
    let mut t = Tally {
        requests: answers.len(),
        ..Default::default()
    };
    for a in answers {
        match a.outcome {
            Outcome::Ok => t.ok += 1,
            Outcome::Clean => t.clean += 1,
            Outcome::Wrong => t.wrong += 1,
        }
    }
    t
}

/// The first answer from the CA certificate `issuer` (its DER), after `from`.
fn first_from(answers: &[Answer], issuer: &[u8], from: Instant) -> Option<Instant> {
    let f = fingerprint(issuer);
    answers
        .iter()
        .filter(|a| a.issuer == Some(f) && a.at >= from)
        .map(|a| a.at)
        .min()
}

/// Peak and current resident memory of `pid`, in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kib| kib / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

// ---- CAs on disk --------------------------------------------------------------

/// `meshca ca init` of a root (`org`) or an intermediate of `parent`.
fn ca_init(out: &Path, org: &str, parent: Option<&Path>) -> Result<()> {
    let out_s = out.to_str().context("path")?;
    let mut args = vec![
        "ca",
        "init",
        "--out",
        out_s,
        "--key-type",
        "ecdsa-p256",
        "--org",
        org,
    ];
    let parent_s;
    if let Some(p) = parent {
        parent_s = p.to_str().context("path")?.to_owned();
        args.extend(["--intermediate-of", &parent_s]);
    }
    meshca(&args)
}

fn read(dir: &Path, name: &str) -> Result<Vec<u8>> {
    std::fs::read(dir.join(name)).with_context(|| format!("reading {}/{name}", dir.display()))
}

/// Replaces `dir/name` as one rename (each file on its own, as a person or a
/// script copying files in does).
fn replace(dir: &Path, name: &str, contents: &[u8]) -> Result<()> {
    let tmp = dir.join(format!(".{name}.new"));
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, dir.join(name))?;
    Ok(())
}

/// The signing certificate's DER in a cacerts directory.
fn signing_der(dir: &Path) -> Result<Vec<u8>> {
    ders(&String::from_utf8(read(dir, "ca-cert.pem")?)?)
        .into_iter()
        .next()
        .context("no certificate")
}

/// Two roots and three intermediates: A1 and A2 under root A, B1 under root B.
struct Cas {
    root_a: PathBuf,
    a1: PathBuf,
    a2: PathBuf,
    root_b: PathBuf,
    b1: PathBuf,
}

impl Cas {
    fn make(base: &Path) -> Result<Cas> {
        let cas = Cas {
            root_a: base.join("root-a"),
            a1: base.join("a1"),
            a2: base.join("a2"),
            root_b: base.join("root-b"),
            b1: base.join("b1"),
        };
        ca_init(&cas.root_a, "rotation-a", None)?;
        ca_init(&cas.root_b, "rotation-b", None)?;
        ca_init(&cas.a1, "rotation-a", Some(&cas.root_a))?;
        ca_init(&cas.a2, "rotation-a", Some(&cas.root_a))?;
        ca_init(&cas.b1, "rotation-b", Some(&cas.root_b))?;
        Ok(cas)
    }

    fn root_a(&self) -> Result<Vec<u8>> {
        signing_der(&self.root_a)
    }

    fn root_b(&self) -> Result<Vec<u8>> {
        signing_der(&self.root_b)
    }

    /// root-cert.pem of both roots, A first (Istio's combined root file).
    fn both_roots_pem(&self) -> Result<Vec<u8>> {
        let mut both = read(&self.root_a, "root-cert.pem")?;
        both.extend(read(&self.root_b, "root-cert.pem")?);
        Ok(both)
    }
}

// ---- meshca server under a burst ------------------------------------------------

/// `meshca server ARGS` as `identity` in `ns`, publishing the root ConfigMap
/// (leader election on, short lease), ready. Returns it and its address.
async fn start_server(
    ns: &TestNamespace,
    rbac_sets: &[&str],
    state: &Path,
    args: &[&str],
) -> Result<Started> {
    let mut sets = vec!["server.rootConfigMap=true", "leaderElection.enabled=true"];
    sets.extend(rbac_sets);
    let rbac = chart::server_rbac(ns.name(), &sets)?;
    let identity = ns.identity_from_manifest("meshca", &rbac).await?;
    let addr = format!("127.0.0.1:{}", free_port());
    let monitoring = format!("127.0.0.1:{}", free_port());
    let mut proc = Proc(
        Command::new(env!("CARGO_BIN_EXE_meshca"))
            .args(["server", "--listen", &addr])
            .args(["--monitoring-listen", &monitoring])
            .arg("--state-dir")
            .arg(state)
            .arg("--kubeconfig")
            .arg(identity.kubeconfig_path())
            .args(["--no-impersonation", "--self-signed-key-type", "ecdsa-p256"])
            .args(["--leader-election-lease-duration", "2s"])
            .args(args)
            .env("POD_NAMESPACE", ns.name())
            .env("POD_NAME", "rotation")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    wait_ready_blocking(&mut proc, &monitoring)?;
    Ok(Started {
        proc,
        addr,
        monitoring,
    })
}

/// A started process: its gRPC and monitoring addresses.
struct Started {
    proc: Proc,
    addr: String,
    monitoring: String,
}

/// The process's gauges once the burst is over must be back to those
/// before it (no task, fd or request leaked by the rotation).
async fn leaks_nothing(what: &str, monitoring: &str, before: &Gauges) -> Result<String> {
    let after = fault::back_to_idle(what, monitoring, before).await?;
    Ok(format!("idle before {before}, after {after}"))
}

struct Workload {
    token: Arc<str>,
    spiffe: String,
    csr: String,
}

/// `WORKLOADS` workloads over 10 service accounts (one token each).
async fn workloads(ns: &TestNamespace) -> Result<Arc<Vec<Workload>>> {
    let mut tokens = Vec::new();
    for a in 0..10 {
        let sa = format!("w{a}");
        ns.create_service_account(&sa).await?;
        let opts = TokenOptions {
            expiration_seconds: 3600,
            ..Default::default()
        };
        tokens.push((
            sa.clone(),
            Arc::<str>::from(ns.token_with(&sa, &opts).await?),
        ));
    }
    let mut out = Vec::with_capacity(WORKLOADS);
    for i in 0..WORKLOADS {
        let (sa, token) = &tokens[i % tokens.len()];
        let key = SigningKey::generate(KeyType::EcdsaP256)?;
        out.push(Workload {
            token: token.clone(),
            spiffe: format!("spiffe://cluster.local/ns/{}/sa/{sa}", ns.name()),
            csr: build_csr(&key, cert::EMPTY_NAME, &[]).map_err(anyhow::Error::msg)?,
        });
    }
    Ok(Arc::new(out))
}

/// A channel to the server at `addr`, trusting `tls_roots` for the
/// connection (the serving certificate follows the CA).
fn channel(addr: &str, tls_roots: &str) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("https://{addr}"))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(tls_roots))
                .domain_name("istiod.istio-system.svc"),
        )?
        .timeout(Duration::from_secs(30))
        .connect_lazy())
}

/// `workload`'s certificate request, as istio-agent sends it: the chain's DERs.
async fn ask(
    grpc: &mut IstioCertificateServiceClient<Channel>,
    workload: &Workload,
) -> Result<Vec<Vec<u8>>, tonic::Status> {
    let mut req = tonic::Request::new(IstioCertificateRequest::from_agent(
        workload.csr.clone(),
        3600,
        "",
    ));
    let bearer = format!("Bearer {}", workload.token)
        .parse()
        .map_err(|_| tonic::Status::internal("a token that is not a header value"))?;
    req.metadata_mut().insert("authorization", bearer);
    let resp = grpc.create_certificate(req).await?;
    Ok(resp
        .get_ref()
        .cert_chain
        .iter()
        .flat_map(|c| ders(c))
        .collect())
}

/// A burst against `addr`: `TASKS` tasks ask for the workloads' certificates
/// in turn, without pause, until `stop`; each answer is checked against the
/// bundle `published` when it arrived. The client trusts `tls_roots` for
/// the connection (the serving certificate follows the CA).
fn burst(
    addr: &str,
    tls_roots: &str,
    workloads: Arc<Vec<Workload>>,
    published: Published,
    stop: Arc<AtomicBool>,
) -> Result<tokio::task::JoinHandle<Vec<Answer>>> {
    let channels: Vec<Channel> = (0..4)
        .map(|_| channel(addr, tls_roots))
        .collect::<Result<_>>()?;
    let mut tasks = Vec::new();
    for k in 0..TASKS {
        let (workloads, published, stop) = (workloads.clone(), published.clone(), stop.clone());
        let mut grpc = IstioCertificateServiceClient::new(channels[k % channels.len()].clone());
        tasks.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut i = k;
            while !stop.load(Ordering::SeqCst) {
                let w = &workloads[i % workloads.len()];
                i += TASKS;
                let answer = ask(&mut grpc, w).await;
                let at = Instant::now();
                let (outcome, issuer) = match answer {
                    Ok(chain) => {
                        let ok = verifies_to(&chain, &published.at(at), &w.spiffe);
                        let issuer = chain.get(1).map(|d| fingerprint(d));
                        (if ok { Outcome::Ok } else { Outcome::Wrong }, issuer)
                    }
                    Err(_) => (Outcome::Clean, None),
                };
                answers.push(Answer {
                    at,
                    outcome,
                    issuer,
                });
            }
            answers
        }));
    }
    Ok(tokio::spawn(async move {
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap_or_default());
        }
        all
    }))
}

/// Waits (up to 30 s) until `workload`'s own requests, sent beside the
/// burst, are answered by CA certificate `issuer`.
async fn wait_issuer(
    addr: &str,
    tls_roots: &str,
    workload: &Workload,
    issuer: &[u8],
    what: &str,
) -> Result<Instant> {
    let mut grpc = IstioCertificateServiceClient::new(channel(addr, tls_roots)?);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(chain) = ask(&mut grpc, workload).await
            && chain.get(1).map(Vec::as_slice) == Some(issuer)
        {
            return Ok(Instant::now());
        }
        ensure!(Instant::now() < deadline, "{what}: not serving in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn report(what: &str, t: &Tally, start: Instant, end: Instant, pid: u32, events: &[String]) {
    let (peak, now) = memory_mib(pid);
    eprintln!(
        "{what}: {} requests in {:.1} s: ok {}, clean errors {}, wrong {}; meshca peak RSS {peak:.1} MiB (now {now:.1}); {}",
        t.requests,
        (end - start).as_secs_f64(),
        t.ok,
        t.clean,
        t.wrong,
        events.join("; ")
    );
}

/// No failed answer (clean errors count), and every CA of the rotation
/// issued at least one certificate after `start`.
fn none_failed_and_each_ca_served(
    t: &Tally,
    answers: &[Answer],
    start: Instant,
    cas: [(&str, &[u8]); 3],
) -> Result<()> {
    ensure!(t.wrong == 0 && t.clean == 0, "failed answers: {t:?}");
    for (name, der) in cas {
        ensure!(
            first_from(answers, der, start).is_some(),
            "no certificate from {name}: {t:?}"
        );
    }
    Ok(())
}

fn since(t: Instant, from: Instant) -> String {
    format!("{:.2} s", t.saturating_duration_since(from).as_secs_f64())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plugged_cacerts_swapped_under_load_fail_nothing() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::get().await;
    let ns = env.namespace("rot-plugged").await?;
    let dir = ns.temp_dir().to_path_buf();
    let cas = Cas::make(&dir)?;
    let (root_a, root_b) = (cas.root_a()?, cas.root_b()?);
    let (a1, a2, b1) = (
        signing_der(&cas.a1)?,
        signing_der(&cas.a2)?,
        signing_der(&cas.b1)?,
    );
    let plugged = dir.join("cacerts");
    std::fs::create_dir_all(&plugged)?;
    for f in [
        "ca-cert.pem",
        "ca-key.pem",
        "cert-chain.pem",
        "root-cert.pem",
    ] {
        std::fs::copy(cas.a1.join(f), plugged.join(f))?;
    }
    let published = record(
        Api::<ConfigMap>::namespaced(env.client(), ns.name()),
        "istio-ca-root-cert",
        configmap_roots,
    );
    let workloads = workloads(&ns).await?;
    let Started {
        proc: server,
        addr,
        monitoring,
    } = start_server(
        &ns,
        &[],
        &dir.join("state"),
        &[
            "--root-ca-dir",
            plugged.to_str().unwrap(),
            "--reload-interval",
            "1s",
        ],
    )
    .await?;
    published
        .wait_holding(std::slice::from_ref(&root_a), "root A")
        .await?;
    // The client trusts both roots for the connection only (its reconnects
    // must not fail on the serving certificate); answers are judged by the
    // published bundle.
    let tls_roots = String::from_utf8(cas.both_roots_pem()?)?;

    let idle_before = fault::gauges(&monitoring).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let load = burst(
        &addr,
        &tls_roots,
        workloads.clone(),
        published.clone(),
        stop.clone(),
    )?;
    let mut events = Vec::new();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 1. A2 (same root) replaces A1 file by file, 1.5 s apart: a poll (1 s)
    //    sees A2's certificate with A1's key, and later A2's key with A1's chain.
    let swap1 = Instant::now();
    for f in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem"] {
        replace(&plugged, f, &read(&cas.a2, f)?)?;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    wait_issuer(&addr, &tls_roots, &workloads[0], &a2, "A2").await?;

    // 2. Root B joins root-cert.pem; A2 still signs. Published before step 3.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let swap2 = Instant::now();
    replace(&plugged, "root-cert.pem", &cas.both_roots_pem()?)?;
    let both_published = published
        .wait_holding(&[root_a.clone(), root_b.clone()], "roots A and B")
        .await?;
    events.push(format!(
        "root B added to root-cert.pem at {}, in the ConfigMap {} later",
        since(swap2, start),
        since(both_published, swap2)
    ));

    // 3. B1 (root B's intermediate) takes over, both roots still trusted.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let swap3 = Instant::now();
    for f in ["ca-cert.pem", "ca-key.pem", "cert-chain.pem"] {
        replace(&plugged, f, &read(&cas.b1, f)?)?;
    }
    let served_b1 = wait_issuer(&addr, &tls_roots, &workloads[0], &b1, "B1").await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let answers = load.await?;
    let end = Instant::now();
    // When the burst itself first got a certificate from each new CA.
    let first = |der: &[u8], from: Instant| {
        first_from(&answers, der, from).map_or("never".into(), |t| since(t, from))
    };
    events.insert(
        0,
        format!(
            "A2 (same root) written file by file (1.5 s apart) from {}, first certificate from it {} after the first file",
            since(swap1, start),
            first(&a2, swap1)
        ),
    );
    events.push(format!(
        "B1 (root B) swapped in at {}, first certificate from it {} later",
        since(swap3, start),
        first(&b1, swap3)
    ));

    let t = tally(&answers);
    let idle = leaks_nothing("meshca server (plugged cacerts)", &monitoring, &idle_before).await?;
    events.push(idle);
    report(
        "plugged cacerts swapped (A1 -> A2 -> roots A+B -> B1)",
        &t,
        start,
        end,
        server.0.id(),
        &events,
    );
    none_failed_and_each_ca_served(&t, &answers, start, [("A1", &a1), ("A2", &a2), ("B1", &b1)])?;
    ensure!(
        first_from(&answers, &a1, served_b1).is_none(),
        "A1 still signed after B1 was served"
    );
    drop(server);
    ns.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn istio_ca_secret_root_reissued_under_load_fails_nothing() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::get().await;
    let ns = env.namespace("rot-secret").await?;
    let dir = ns.temp_dir().to_path_buf();
    let published = record(
        Api::<ConfigMap>::namespaced(env.client(), ns.name()),
        "istio-ca-root-cert",
        configmap_roots,
    );
    let workloads = workloads(&ns).await?;
    // Grace 100 %: every check (every 2 s, plus jitter) re-issues the root.
    let Started {
        proc: server,
        addr,
        monitoring,
    } = start_server(
        &ns,
        &["server.ca=selfSigned"],
        &dir.join("state"),
        &[
            "--root-ca-dir",
            dir.join("no-plugged-ca").to_str().unwrap(),
            "--ca-secret-namespace",
            ns.name(),
            "--self-signed-root-check-interval",
            "2s",
            "--self-signed-root-grace-percentile",
            "100",
        ],
    )
    .await?;
    let secrets = Api::<Secret>::namespaced(env.client(), ns.name());
    let first_root = secrets
        .get("istio-ca-secret")
        .await?
        .data
        .and_then(|d| d.get("root-cert.pem").cloned())
        .context("istio-ca-secret has no root-cert.pem")?;
    // Re-issued roots keep the key and subject: this one anchors the
    // serving certificate throughout.
    let first_root = String::from_utf8(first_root.0)?;
    // The root may be re-issued before the first ConfigMap write: any version.
    published.wait_holding(&[], "the root ConfigMap").await?;

    let idle_before = fault::gauges(&monitoring).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let load = burst(
        &addr,
        &first_root,
        workloads,
        published.clone(),
        stop.clone(),
    )?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    stop.store(true, Ordering::SeqCst);
    let answers = load.await?;
    let end = Instant::now();

    let t = tally(&answers);
    let idle = leaks_nothing("meshca server (istio-ca-secret)", &monitoring, &idle_before).await?;
    let roots: BTreeSet<u64> = answers.iter().filter_map(|a| a.issuer).collect();
    let versions = published.versions();
    report(
        "istio-ca-secret root re-issued every 2 s",
        &t,
        start,
        end,
        server.0.id(),
        &[
            format!(
                "{} roots served, {versions} ConfigMap versions",
                roots.len()
            ),
            idle,
        ],
    );
    ensure!(t.wrong == 0 && t.clean == 0, "failed requests: {t:?}");
    ensure!(
        roots.len() >= 3 && versions >= 3,
        "the root was not re-issued under load ({} roots served, {versions} published)",
        roots.len()
    );
    drop(server);
    ns.cleanup().await
}

// ---- meshca signer under a burst of CSRs ------------------------------------------

const CA_SECRET: &str = "signer-ca-keypair";

/// The signer's CA Secret (kubernetes.io/tls) from a cacerts directory,
/// with `roots` as ca.crt.
fn tls_secret(ns: &str, ca: &Path, roots: Vec<u8>) -> Result<Secret> {
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET.into()),
            namespace: Some(ns.into()),
            ..Default::default()
        },
        type_: Some("kubernetes.io/tls".into()),
        data: Some(BTreeMap::from([
            ("tls.crt".into(), ByteString(read(ca, "ca-cert.pem")?)),
            ("tls.key".into(), ByteString(read(ca, "ca-key.pem")?)),
            ("ca.crt".into(), ByteString(roots)),
        ])),
        ..Default::default()
    })
}

async fn replace_secret(api: &Api<Secret>, secret: Secret) -> Result<()> {
    let mut secret = secret;
    secret.metadata.resource_version = api.get(CA_SECRET).await?.metadata.resource_version;
    api.replace(CA_SECRET, &PostParams::default(), &secret)
        .await?;
    Ok(())
}

/// Creates and approves (as `api`'s identity) an istiod-shaped CSR for
/// `spiffe` with a new key.
async fn approved_csr(
    api: &Api<CertificateSigningRequest>,
    name: &str,
    signer: &str,
    spiffe: &str,
) -> Result<()> {
    let key = SigningKey::generate(KeyType::EcdsaP256)?;
    let pem = build_csr(&key, cert::EMPTY_NAME, &[SanEntry::Uri(spiffe.into())])
        .map_err(anyhow::Error::msg)?;
    common::create_approved_csr(api, name, signer, pem).await
}

/// What the test saw of one CSR: when its certificate (or Failed/Denied) came.
#[derive(Default)]
struct Seen {
    answers: Mutex<BTreeMap<String, CsrAnswer>>,
}

/// When the test saw it, and the certificate (PEM) or the Failed/Denied condition.
type CsrAnswer = (Instant, Result<String, String>);

/// Records, for every CSR of `signer`, the first time it carried a
/// certificate or a Failed/Denied condition.
fn record_csrs(client: kube::Client, signer: &str) -> Arc<Seen> {
    let seen = Arc::new(Seen::default());
    let out = seen.clone();
    let api = Api::<CertificateSigningRequest>::all(client);
    let config = watcher::Config::default().fields(&format!("spec.signerName={signer}"));
    tokio::spawn(async move {
        let mut events = watcher(api, config).default_backoff().boxed();
        while let Some(event) = events.next().await {
            let Ok(watcher::Event::Apply(csr) | watcher::Event::InitApply(csr)) = event else {
                continue;
            };
            let (Some(name), Some(status)) = (csr.metadata.name, csr.status) else {
                continue;
            };
            let answer = if let Some(cert) = status.certificate {
                Ok(String::from_utf8_lossy(&cert.0).into_owned())
            } else if let Some(c) = status
                .conditions
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "Failed" || c.type_ == "Denied")
            {
                Err(format!("{}: {}", c.type_, c.message.unwrap_or_default()))
            } else {
                continue;
            };
            out.answers
                .lock()
                .unwrap()
                .entry(name)
                .or_insert((Instant::now(), answer));
        }
    });
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signer_ca_secret_replaced_under_a_burst_of_csrs_fails_nothing() -> Result<()> {
    let _serial = SERIAL.lock().await;
    let env = TestEnv::get().await;
    let ns = env.namespace("rot-signer").await?;
    let dir = ns.temp_dir().to_path_buf();
    let cas = Cas::make(&dir)?;
    let (root_a, root_b) = (cas.root_a()?, cas.root_b()?);
    let (a1, a2, b1) = (
        signing_der(&cas.a1)?,
        signing_der(&cas.a2)?,
        signing_der(&cas.b1)?,
    );
    let signer = format!("{}.example.com/rotation", ns.name());
    let secrets = Api::<Secret>::namespaced(env.client(), ns.name());
    secrets
        .create(
            &PostParams::default(),
            &tls_secret(ns.name(), &cas.a1, read(&cas.root_a, "root-cert.pem")?)?,
        )
        .await?;

    let name = ns.unique_name("m");
    let rbac = chart::signer_rbac(ns.name(), &name, &[&signer], ns.name(), &[])?;
    let controller = ns
        .identity_from_manifest("signer-ca-controller-manager", &rbac)
        .await?;
    let istiod_rbac = chart::istiod_ra_rbac(ns.name(), &name, &[&signer], ns.name())?;
    let istiod = ns
        .identity_from_manifest("istiod", &istiod_rbac)
        .await?
        .client()
        .await?;
    let published = record(secrets.clone(), "external-ca-cert", secret_roots);
    let seen = record_csrs(env.client(), &signer);
    let monitoring = format!("127.0.0.1:{}", free_port());
    let mut proc = Proc(
        Command::new(env!("CARGO_BIN_EXE_meshca"))
            .args(["signer", "--signer-name", &signer])
            .args(["--ca-secret", &format!("{}/{CA_SECRET}", ns.name())])
            .args(["--trust-bundle-namespace", ns.name()])
            .args(["--monitoring-listen", &monitoring])
            .arg("--kubeconfig")
            .arg(controller.kubeconfig_path())
            .env("POD_NAMESPACE", ns.name())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?,
    );
    wait_ready_blocking(&mut proc, &monitoring)?;
    published
        .wait_holding(std::slice::from_ref(&root_a), "root A")
        .await?;

    // The burst: 8 creators, each creating and approving CSRs one after
    // another until stopped.
    let idle_before = fault::gauges(&monitoring).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let created = Arc::new(Mutex::new(Vec::<String>::new()));
    let spiffe = format!("spiffe://cluster.local/ns/{}/sa/workload", ns.name());
    let start = Instant::now();
    let mut creators = Vec::new();
    for c in 0..8 {
        let api = Api::<CertificateSigningRequest>::all(istiod.clone());
        let (stop, created, signer, spiffe) = (
            stop.clone(),
            created.clone(),
            signer.clone(),
            spiffe.clone(),
        );
        let prefix = ns.unique_name(&format!("c{c}"));
        creators.push(tokio::spawn(async move {
            let mut n = 0;
            let mut errors = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                let name = format!("{prefix}-{n}");
                n += 1;
                created.lock().unwrap().push(name.clone());
                if let Err(e) = approved_csr(&api, &name, &signer, &spiffe).await {
                    errors.push(format!("{name}: {e:#}"));
                }
            }
            errors
        }));
    }
    let first_signed_by = |issuer: Vec<u8>, from: Instant, what: &'static str| {
        let seen = seen.clone();
        async move {
            let f = fingerprint(&issuer);
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let first = seen
                    .answers
                    .lock()
                    .unwrap()
                    .values()
                    .filter(|(at, a)| {
                        *at >= from
                            && a.as_ref().is_ok_and(|pem| {
                                ders(pem).get(1).map(|d| fingerprint(d)) == Some(f)
                            })
                    })
                    .map(|(at, _)| *at)
                    .min();
                if let Some(t) = first {
                    return Ok::<_, anyhow::Error>(t);
                }
                ensure!(Instant::now() < deadline, "{what}: not signing in 30 s");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let mut events = Vec::new();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 1. A2 (same root) replaces A1 in the Secret.
    let swap1 = Instant::now();
    replace_secret(
        &secrets,
        tls_secret(ns.name(), &cas.a2, read(&cas.root_a, "root-cert.pem")?)?,
    )
    .await?;
    let served_a2 = first_signed_by(a2.clone(), swap1, "A2").await?;
    events.push(format!(
        "A2 (same root) in the Secret at {}, first certificate from it {} later",
        since(swap1, start),
        since(served_a2, swap1)
    ));

    // 2. Root B joins ca.crt; A2 still signs. Published before step 3.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let swap2 = Instant::now();
    replace_secret(
        &secrets,
        tls_secret(ns.name(), &cas.a2, cas.both_roots_pem()?)?,
    )
    .await?;
    let both_published = published
        .wait_holding(&[root_a.clone(), root_b.clone()], "roots A and B")
        .await?;
    events.push(format!(
        "root B added to ca.crt at {}, in external-ca-cert {} later",
        since(swap2, start),
        since(both_published, swap2)
    ));

    // 3. B1 (root B) takes over.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let swap3 = Instant::now();
    replace_secret(
        &secrets,
        tls_secret(ns.name(), &cas.b1, cas.both_roots_pem()?)?,
    )
    .await?;
    let served_b1 = first_signed_by(b1.clone(), swap3, "B1").await?;
    events.push(format!(
        "B1 (root B) in the Secret at {}, first certificate from it {} later",
        since(swap3, start),
        since(served_b1, swap3)
    ));
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    let mut create_errors = Vec::new();
    for c in creators {
        create_errors.extend(c.await?);
    }
    let created = std::mem::take(&mut *created.lock().unwrap());
    for name in &created {
        ns.delete_csr_on_cleanup(name);
    }
    ensure!(create_errors.is_empty(), "creating CSRs: {create_errors:?}");

    // Every CSR answered (within 60 s of the end of the burst).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let answered = seen.answers.lock().unwrap().len();
        if answered >= created.len() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{} of {} CSRs never answered",
            created.len() - answered,
            created.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let end = Instant::now();
    let mut answers = Vec::new();
    for (at, answer) in seen.answers.lock().unwrap().values() {
        let (outcome, issuer) = match answer {
            Ok(pem) => {
                let chain = ders(pem);
                let ok = verifies_to(&chain, &published.at(*at), &spiffe);
                (
                    if ok { Outcome::Ok } else { Outcome::Wrong },
                    chain.get(1).map(|d| fingerprint(d)),
                )
            }
            Err(_) => (Outcome::Clean, None),
        };
        answers.push(Answer {
            at: *at,
            outcome,
            issuer,
        });
    }
    let t = tally(&answers);
    let idle = leaks_nothing("meshca signer", &monitoring, &idle_before).await?;
    events.push(idle);
    report(
        "signer CA Secret replaced (A1 -> A2 -> roots A+B -> B1)",
        &t,
        start,
        end,
        proc.0.id(),
        &events,
    );
    none_failed_and_each_ca_served(&t, &answers, start, [("A1", &a1), ("A2", &a2), ("B1", &b1)])?;
    drop(proc);
    ns.cleanup().await
}
