//! Signer benchmark: N CSRs created as fast as the apiserver takes them,
//! each approved right after creation (as istiod does); latency from CSR
//! created to certificate seen on a watch (p50/p99), throughput, and the
//! signer process's peak RSS. Side by side on the same apiserver:
//!
//! - `meshca`: `meshca signer` (a child process) on istiod-shaped CSRs
//!   (one SPIFFE URI SAN, the four istiod usages, signer example.com/bench);
//! - `kcm`: kube-controller-manager's built-in signer (`--controllers=csrsigning`)
//!   on `kubernetes.io/kube-apiserver-client` CSRs (CN/O subject, client auth).
//!
//! Both sign with the same ECDSA P-256 CA; CSR keys are P-256.
//!
//! ```text
//! env="$(testenv/up)" && eval "$env"
//! cargo build --release -p meshca --example bench -p meshca-signer
//! target/release/examples/bench --n 1000 --signer meshca --signer kcm
//! testenv/down
//! ```
//! Options: `--n N`, `--signer meshca|kcm` (repeatable), `--concurrency C`
//! (creations in flight, default 64), `--meshca-bin PATH` (default
//! target/release/meshca), `--meshca-arg ARG` (extra, repeatable),
//! `--kcm-arg ARG` (extra, repeatable), `--backlog` (create and approve all
//! N CSRs first, then start the signer: measures the signer's drain rate
//! alone, without the load generator in the way; latencies then count from
//! the signer's start).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use meshca_pki::profile::{CaCertRequest, self_signed_root};
use meshca_pki::{KeyType, SanEntry, SigningKey, cert, pem};
use meshca_testsupport::{Proc, free_port};
use time::OffsetDateTime;

struct Opts {
    n: usize,
    signers: Vec<String>,
    concurrency: usize,
    meshca_bin: PathBuf,
    meshca_args: Vec<String>,
    kcm_args: Vec<String>,
    backlog: bool,
}

fn parse_args() -> Result<Opts> {
    let mut o = Opts {
        n: 1000,
        signers: Vec::new(),
        concurrency: 64,
        meshca_bin: PathBuf::from("target/release/meshca"),
        meshca_args: Vec::new(),
        kcm_args: Vec::new(),
        backlog: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "--n" => o.n = val()?.parse()?,
            "--signer" => o.signers.push(val()?),
            "--concurrency" => o.concurrency = val()?.parse()?,
            "--meshca-bin" => o.meshca_bin = val()?.into(),
            "--meshca-arg" => o.meshca_args.push(val()?),
            "--kcm-arg" => o.kcm_args.push(val()?),
            "--backlog" => o.backlog = true,
            other => bail!("unknown argument {other}"),
        }
    }
    if o.signers.is_empty() {
        o.signers = vec!["meshca".into(), "kcm".into()];
    }
    Ok(o)
}

struct Report {
    signer: String,
    n: usize,
    total: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    rss_kib: Option<u64>,
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn make_ca(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let key = SigningKey::generate(KeyType::EcdsaP256).map_err(|e| anyhow::anyhow!("{e}"))?;
    let der = self_signed_root(
        &CaCertRequest {
            subject_der: &cert::organization_name("bench"),
            key: &key,
            ttl: Duration::from_secs(86400 * 30),
        },
        OffsetDateTime::now_utc(),
    )?;
    let cert_pem = pem::encode("CERTIFICATE", &der);
    let key_pem = key.to_pkcs8_pem().map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::write(dir.join("ca-cert.pem"), &cert_pem)?;
    std::fs::write(dir.join("root-cert.pem"), &cert_pem)?;
    std::fs::write(dir.join("cert-chain.pem"), "")?;
    std::fs::write(dir.join("ca-key.pem"), key_pem.as_bytes())?;
    Ok(())
}

fn csr_for(signer: &str, run: &str, i: usize) -> Result<(String, Vec<String>)> {
    let key = SigningKey::generate(KeyType::EcdsaP256).map_err(|e| anyhow::anyhow!("{e}"))?;
    if signer == "kcm" {
        let subject = cert::organization_and_common_name("bench", &format!("user-{run}-{i}"));
        let pem = meshca_pki::csr::build_csr(&key, &subject, &[]).map_err(anyhow::Error::msg)?;
        Ok((
            pem,
            vec![
                "digital signature".into(),
                "key encipherment".into(),
                "client auth".into(),
            ],
        ))
    } else {
        let uri = format!("spiffe://cluster.local/ns/bench/sa/sa-{i}");
        let pem = meshca_pki::csr::build_csr(&key, cert::EMPTY_NAME, &[SanEntry::Uri(uri)])
            .map_err(anyhow::Error::msg)?;
        Ok((
            pem,
            meshca_pki::profile::ISTIOD_USAGES
                .iter()
                .map(|u| u.to_string())
                .collect(),
        ))
    }
}

async fn approve(api: &Api<CertificateSigningRequest>, name: &str) -> Result<()> {
    for _ in 0..20 {
        let mut csr = api.get(name).await?;
        csr.status = Some(CertificateSigningRequestStatus {
            conditions: Some(vec![CertificateSigningRequestCondition {
                type_: "Approved".into(),
                status: "True".into(),
                reason: Some("Bench".into()),
                message: Some("approved by the benchmark".into()),
                ..Default::default()
            }]),
            certificate: None,
        });
        match api
            .replace_subresource("approval", name, &PostParams::default(), &csr)
            .await
        {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
    bail!("approval of {name} kept conflicting")
}

async fn run_one(o: &Opts, client: &kube::Client, kind: &str, work: &Path) -> Result<Report> {
    let kubeconfig = std::env::var("KUBECONFIG").context("KUBECONFIG (run testenv/up)")?;
    let ca_dir = work.join(format!("ca-{kind}"));
    make_ca(&ca_dir)?;
    let run = meshca_testsupport::unique_name("bench");
    let signer_name = if kind == "kcm" {
        "kubernetes.io/kube-apiserver-client".to_string()
    } else {
        "example.com/bench".to_string()
    };
    let mut command = if kind == "kcm" {
        let bin = meshca_testsupport::bin("kube-controller-manager");
        let mut cmd = Command::new(bin);
        cmd.args([
            "--controllers=csrsigning",
            "--leader-elect=false",
            "--secure-port=0",
            "--use-service-account-credentials=false",
        ])
        .arg(format!("--kubeconfig={kubeconfig}"))
        .arg(format!(
            "--cluster-signing-cert-file={}",
            ca_dir.join("ca-cert.pem").display()
        ))
        .arg(format!(
            "--cluster-signing-key-file={}",
            ca_dir.join("ca-key.pem").display()
        ))
        .args(&o.kcm_args);
        cmd
    } else {
        let mut cmd = Command::new(&o.meshca_bin);
        cmd.args([
            "signer",
            "--signer-name",
            &signer_name,
            "--no-trust-bundle",
            "--no-cleaner",
            "--no-leader-election",
        ])
        .arg("--ca-dir")
        .arg(&ca_dir)
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg(format!("--monitoring-listen=127.0.0.1:{}", free_port()))
        .args(&o.meshca_args)
        .env("RUST_LOG", "warn");
        cmd
    };

    let api = Api::<CertificateSigningRequest>::all(client.clone());
    // Pre-generate the CSRs (not timed).
    let csrs: Vec<(String, Vec<String>)> = (0..o.n + 1)
        .map(|i| csr_for(kind, &run, i))
        .collect::<Result<_>>()?;
    let make = |i: usize, (pem, usages): (String, Vec<String>)| CertificateSigningRequest {
        metadata: ObjectMeta {
            name: Some(format!("{run}-{i}")),
            labels: Some([("meshca.io/bench".to_string(), run.clone())].into()),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(pem.into_bytes()),
            signer_name: signer_name.clone(),
            usages: Some(usages),
            expiration_seconds: Some(3600),
            ..Default::default()
        },
        status: None,
    };

    // Watch for certificates.
    let seen: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let wc = watcher::Config::default().labels(&format!("meshca.io/bench={run}"));
    let watch_seen = seen.clone();
    let watch_api = api.clone();
    let watch = tokio::spawn(async move {
        let mut stream = watcher(watch_api, wc).boxed();
        while let Some(ev) = stream.next().await {
            if let Ok(watcher::Event::Apply(csr) | watcher::Event::InitApply(csr)) = ev
                && csr
                    .status
                    .as_ref()
                    .and_then(|s| s.certificate.as_ref())
                    .is_some_and(|c| !c.0.is_empty())
            {
                let name = csr.metadata.name.unwrap_or_default();
                watch_seen
                    .lock()
                    .unwrap()
                    .entry(name)
                    .or_insert_with(Instant::now);
            }
        }
    });

    let mut csrs = csrs.into_iter();
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let create_all = |objs: Vec<CertificateSigningRequest>| {
        let api = api.clone();
        let created = created.clone();
        async move {
            futures::stream::iter(objs)
                .map(|csr| {
                    let api = api.clone();
                    let created = created.clone();
                    async move {
                        let name = csr.metadata.name.clone().unwrap();
                        api.create(&PostParams::default(), &csr).await?;
                        created.lock().unwrap().insert(name.clone(), Instant::now());
                        approve(&api, &name).await
                    }
                })
                .buffer_unordered(o.concurrency)
                .collect::<Vec<Result<()>>>()
                .await
                .into_iter()
                .collect::<Result<Vec<()>>>()
        }
    };
    let _ = csrs.next(); // the warm-up CSR's slot
    let objs: Vec<CertificateSigningRequest> = csrs.enumerate().map(|(i, c)| make(i, c)).collect();
    if o.backlog {
        let t = Instant::now();
        create_all(objs).await?;
        eprintln!(
            "{kind}: backlog of {} created and approved in {:?}",
            o.n,
            t.elapsed()
        );
        let start = Instant::now();
        let log = std::fs::File::create(work.join(format!("{kind}.log")))?;
        let child = Proc(
            command
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .spawn()
                .with_context(|| format!("starting the {kind} signer"))?,
        );
        let observed = Observed {
            api,
            run,
            seen,
            created,
            watch,
        };
        return finish(o, kind, &observed, child, start, true).await;
    }
    let log = std::fs::File::create(work.join(format!("{kind}.log")))?;
    let child = Proc(
        command
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .with_context(|| format!("starting the {kind} signer"))?,
    );

    // Warm-up CSR: the signer is up and signing before the clock starts.
    let warm_csr = csr_for(kind, &run, o.n)?;
    let warm = make(o.n, warm_csr);
    let warm_name = warm.metadata.name.clone().unwrap();
    api.create(&PostParams::default(), &warm).await?;
    approve(&api, &warm_name).await?;
    let t = Instant::now();
    while !seen.lock().unwrap().contains_key(&warm_name) {
        if t.elapsed() > Duration::from_secs(60) {
            bail!("{kind}: the warm-up CSR was not signed in 60 s (see {kind}.log)");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let start = Instant::now();
    create_all(objs).await?;
    let observed = Observed {
        api,
        run,
        seen,
        created,
        watch,
    };
    finish(o, kind, &observed, child, start, false).await
}

/// One run's CSRs: when each was created and when its certificate was seen.
struct Observed {
    api: Api<CertificateSigningRequest>,
    /// The run's label value.
    run: String,
    seen: Arc<Mutex<HashMap<String, Instant>>>,
    created: Arc<Mutex<HashMap<String, Instant>>>,
    watch: tokio::task::JoinHandle<()>,
}

/// Waits until every CSR is signed, then reports and cleans up.
async fn finish(
    o: &Opts,
    kind: &str,
    observed: &Observed,
    signer: Proc,
    start: Instant,
    backlog: bool,
) -> Result<Report> {
    let Observed {
        api,
        run,
        seen,
        created,
        watch,
    } = observed;
    let pid = signer.0.id();
    let want = if backlog { o.n } else { o.n + 1 };
    let deadline = Duration::from_secs(600);
    loop {
        let done = seen.lock().unwrap().len();
        if done >= want {
            break;
        }
        if start.elapsed() > deadline {
            bail!("{kind}: only {done} of {want} signed in {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let seen = seen.lock().unwrap().clone();
    let end = seen.values().max().copied().unwrap_or_else(Instant::now);
    let total = end.duration_since(start);
    let mut lat: Vec<Duration> = created
        .lock()
        .unwrap()
        .iter()
        .map(|(n, c)| seen[n].saturating_duration_since(if backlog { start } else { *c }))
        .collect();
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1];
    let rss_kib = peak_rss_kib(pid);
    watch.abort();
    drop(signer);
    let _ = api
        .delete_collection(
            &DeleteParams::default(),
            &ListParams::default().labels(&format!("meshca.io/bench={run}")),
        )
        .await;
    Ok(Report {
        signer: kind.into(),
        n: o.n,
        total,
        p50: pct(0.50),
        p99: pct(0.99),
        max: *lat.last().unwrap(),
        rss_kib,
    })
}

#[tokio::main]
async fn main() -> Result<()> {
    let o = parse_args()?;
    let env = meshca_testsupport::TestEnv::try_get().await?;
    let client = env.client();
    let work = tempfile::tempdir()?;
    let mut reports = Vec::new();
    for kind in &o.signers {
        let r = run_one(&o, &client, kind, work.path()).await?;
        println!(
            "{:>7}  N={:<6} total {:>8.2?}  throughput {:>8.1}/s  p50 {:>8.1?}  p99 {:>8.1?}  max {:>8.1?}  peak RSS {}",
            r.signer,
            r.n,
            r.total,
            r.n as f64 / r.total.as_secs_f64(),
            r.p50,
            r.p99,
            r.max,
            r.rss_kib
                .map_or("?".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
        );
        reports.push(r);
    }
    if let (Some(m), Some(k)) = (
        reports.iter().find(|r| r.signer == "meshca"),
        reports.iter().find(|r| r.signer == "kcm"),
    ) {
        println!(
            "ratio meshca/kcm: throughput {:.2}x, p99 {:.2}x",
            k.total.as_secs_f64() / m.total.as_secs_f64(),
            m.p99.as_secs_f64() / k.p99.as_secs_f64()
        );
    }
    Ok(())
}
