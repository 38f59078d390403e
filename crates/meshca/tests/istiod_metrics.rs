//! meshca's `citadel_server_*` metrics are istiod's: the real istiod
//! (pilot-discovery with its self-signed CA, built by `testenv/build istiod`)
//! and `meshca server` get the same CreateCertificate requests (successes,
//! an authentication failure, CSR errors, a TTL error), then both `/metrics`
//! are scraped and compared: the exposition format, the `citadel_server_*`
//! series names (what dashboards and alerts query), each family's TYPE and
//! each series' label names.

#[path = "../examples/bench_common/mod.rs"]
mod bench_common;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::{free_port, pem_der};
use meshca_proto::IstioCertificateRequest;
use meshca_proto::istio_certificate_service_client::IstioCertificateServiceClient;
use meshca_testsupport::{Proc, TestEnv, TestNamespace, chart};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// What istiod exposes after [`same_requests`] with its self-signed CA
/// (no cert chain, so no `citadel_server_cert_chain_expiry_*`).
const ISTIOD_AFTER_REQUESTS: [&str; 6] = [
    "citadel_server_authentication_failure_count",
    "citadel_server_csr_count",
    "citadel_server_csr_sign_err_count",
    "citadel_server_root_cert_expiry_seconds",
    "citadel_server_root_cert_expiry_timestamp",
    "citadel_server_success_cert_issuance_count",
];

/// Counters istiod defines (security/pkg/server/ca/monitoring.go) but never
/// records (nothing increments its `CSRError` and `IDExtractionError`), and
/// OpenTelemetry exports an instrument only once recorded. meshca counts
/// them, so they may be the only families istiod lacks.
const ISTIOD_NEVER_RECORDS: [&str; 2] = [
    "citadel_server_csr_parsing_err_count",
    "citadel_server_id_extraction_err_count",
];

/// A CA under test: its gRPC address, the root of its serving certificate,
/// the TLS name it serves and its monitoring address.
struct Ca {
    grpc: String,
    root: PathBuf,
    server_name: String,
    monitoring: String,
}

impl Ca {
    async fn client(&self) -> Result<IstioCertificateServiceClient<Channel>> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(&self.root)?))
            .domain_name(&self.server_name);
        let channel = Endpoint::from_shared(format!("https://{}", self.grpc))?
            .tls_config(tls)?
            .connect()
            .await?;
        Ok(IstioCertificateServiceClient::new(channel))
    }

    /// `/metrics`: the Content-Type and the body.
    fn scrape(&self) -> Result<(String, String)> {
        let out = Command::new("curl")
            .args(["-sf", "-w", "\n%{content_type}"])
            .arg(format!("http://{}/metrics", self.monitoring))
            .output()?;
        if !out.status.success() {
            bail!("scraping {}: curl {}", self.monitoring, out.status);
        }
        let text = String::from_utf8(out.stdout)?;
        let (body, content_type) = text.rsplit_once('\n').context("no content type")?;
        Ok((content_type.to_owned(), body.to_owned()))
    }
}

/// `meshca server` as the mesh CA (self-signed CA in a temp dir), checking
/// tokens with TokenReview under exactly the chart's RBAC for that configuration.
async fn start_meshca(ns: &TestNamespace, dir: &Path) -> Result<(Proc, Ca)> {
    let rbac = chart::server_rbac(ns.name(), &[])?;
    let identity = ns.identity_from_manifest("meshca", &rbac).await?;
    let grpc = format!("127.0.0.1:{}", free_port());
    let monitoring = format!("127.0.0.1:{}", free_port());
    let state = dir.join("meshca");
    let proc = Proc(
        Command::new(env!("CARGO_BIN_EXE_meshca"))
            .args(["server", "--listen", &grpc])
            .args(["--monitoring-listen", &monitoring])
            .arg("--state-dir")
            .arg(&state)
            .arg("--root-ca-dir")
            .arg(dir.join("no-plugged-ca"))
            .args([
                "--no-root-configmap",
                "--no-ca-secret",
                "--no-impersonation",
            ])
            .arg("--kubeconfig")
            .arg(identity.kubeconfig_path())
            .stdout(Stdio::null())
            .spawn()
            .context("starting meshca server")?,
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !Command::new("curl")
        .args(["-sf", &format!("http://{monitoring}/readyz")])
        .stdout(Stdio::null())
        .status()?
        .success()
    {
        anyhow::ensure!(Instant::now() < deadline, "meshca server not ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ca = Ca {
        grpc,
        root: state.join("ca/root-cert.pem"),
        server_name: "istiod.istio-system.svc".into(),
        monitoring,
    };
    Ok((proc, ca))
}

/// istiod with its own self-signed CA (no EXTERNAL_CA), its namespace the
/// test's.
async fn start_istiod(env: &TestEnv, ns: &TestNamespace, dir: &Path) -> Result<(Proc, Ca)> {
    let kubeconfig = PathBuf::from(std::env::var("KUBECONFIG").context("KUBECONFIG")?);
    let istiod = bench_common::start_istiod(
        env.client(),
        &bench_common::IstiodOptions {
            namespace: ns.name(),
            pod_name: "istiod-metrics",
            kubeconfig: &kubeconfig,
            dir: dir.join("istiod"),
            args: &[],
            env: &[],
        },
    )
    .await?;
    let ca = Ca {
        grpc: istiod.addr.clone(),
        root: istiod.root.clone(),
        server_name: format!("istiod.{}.svc", ns.name()),
        monitoring: istiod.monitoring.clone(),
    };
    Ok((istiod.proc, ca))
}

fn request(csr: String, ttl: i64, token: &str) -> tonic::Request<IstioCertificateRequest> {
    let mut req = tonic::Request::new(IstioCertificateRequest::from_agent(csr, ttl, ""));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

fn csr_pem() -> String {
    let key = meshca_pki::SigningKey::generate(meshca_pki::KeyType::EcdsaP256).unwrap();
    meshca_pki::csr::build_csr(&key, meshca_pki::cert::EMPTY_NAME, &[]).unwrap()
}

/// The same requests to a CA; each must get the answer both CAs give.
async fn same_requests(ca: &Ca, token: &str, what: &str) -> Result<()> {
    let mut client = ca.client().await?;
    let expect =
        |result: Result<tonic::Response<_>, tonic::Status>, code: Code, case: &str| match result {
            Ok(_) => bail!("{what}, {case}: a certificate was issued"),
            Err(status) if status.code() == code => Ok(()),
            Err(status) => bail!("{what}, {case}: {status:?}, expected {code:?}"),
        };
    for _ in 0..2 {
        client
            .create_certificate(request(csr_pem(), 3600, token))
            .await
            .with_context(|| format!("{what}: a good request"))?;
    }
    expect(
        client
            .create_certificate(request(csr_pem(), 3600, "x.y.z"))
            .await,
        Code::Unauthenticated,
        "bad token",
    )?;
    expect(
        client
            .create_certificate(request("garbage".into(), 3600, token))
            .await,
        Code::InvalidArgument,
        "not a CSR",
    )?;
    let mut broken = pem_der(&csr_pem());
    let last = broken.len() - 1;
    broken[last] ^= 0x01;
    let broken = meshca_pki::pem::encode("CERTIFICATE REQUEST", &broken);
    expect(
        client
            .create_certificate(request(broken, 3600, token))
            .await,
        Code::InvalidArgument,
        "broken CSR signature",
    )?;
    expect(
        client
            .create_certificate(request(csr_pem(), 91 * 24 * 3600, token))
            .await,
        Code::InvalidArgument,
        "TTL above the maximum",
    )?;
    Ok(())
}

/// What Prometheus stores from a text 0.0.4 exposition, restricted to
/// `citadel_server_*`: each TYPE line's family and type, and each series
/// name with the label names its samples carry.
#[derive(Debug, PartialEq, Eq)]
struct Exposition {
    types: BTreeMap<String, String>,
    series: BTreeMap<String, BTreeSet<Vec<String>>>,
}

fn citadel(text: &str) -> Result<Exposition> {
    let mut types = BTreeMap::new();
    let mut series: BTreeMap<String, BTreeSet<Vec<String>>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').context("TYPE line")?;
            if name.starts_with("citadel_server_") {
                types.insert(name.to_owned(), kind.to_owned());
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).context("sample line")?;
        let name = &line[..name_end];
        if !name.starts_with("citadel_server_") {
            continue;
        }
        let labels = if line[name_end..].starts_with('{') {
            label_names(&line[name_end + 1..])?
        } else {
            vec![]
        };
        series.entry(name.to_owned()).or_default().insert(labels);
    }
    Ok(Exposition { types, series })
}

/// The label names of `a="x",b="y"}...`, sorted (values may hold escaped quotes).
fn label_names(mut rest: &str) -> Result<Vec<String>> {
    let mut names = vec![];
    loop {
        rest = rest.trim_start_matches(',');
        if rest.starts_with('}') {
            break;
        }
        let (name, after) = rest.split_once("=\"").context("label")?;
        names.push(name.to_owned());
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    chars.next();
                }
                '"' => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        rest = &after[end.context("unterminated label value")? + 1..];
    }
    names.sort();
    Ok(names)
}

/// The media type and `version` parameter of a Content-Type.
fn format_of(content_type: &str) -> (String, Option<String>) {
    let mut parts = content_type.split(';').map(str::trim);
    let media = parts.next().unwrap_or_default().to_ascii_lowercase();
    let version = parts
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| k.eq_ignore_ascii_case("version"))
        .map(|(_, v)| v.to_owned());
    (media, version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshca_exposes_istiods_citadel_metrics_after_the_same_requests() -> Result<()> {
    tokio::time::timeout(Duration::from_secs(240), async {
        let env = TestEnv::get().await;
        let ns = env.namespace("istiod-metrics").await?;
        let dir = ns.temp_dir().to_path_buf();
        let (_meshca_proc, meshca) = start_meshca(&ns, &dir).await?;
        let (_istiod_proc, istiod) = start_istiod(&env, &ns, &dir).await?;

        ns.create_service_account("workload").await?;
        let token = ns.token("workload").await?;
        same_requests(&istiod, &token, "istiod").await?;
        same_requests(&meshca, &token, "meshca").await?;

        let (istiod_type, istiod_text) = istiod.scrape()?;
        let (meshca_type, meshca_text) = meshca.scrape()?;
        let dump = format!("istiod:\n{istiod_text}\nmeshca:\n{meshca_text}");
        assert_eq!(
            format_of(&meshca_type),
            format_of(&istiod_type),
            "exposition format"
        );
        let istiod_families = citadel(&istiod_text)?;
        let mut meshca_families = citadel(&meshca_text)?;
        assert_eq!(
            istiod_families.series.keys().collect::<Vec<_>>(),
            ISTIOD_AFTER_REQUESTS.iter().collect::<Vec<_>>(),
            "istiod's citadel_server_* series\n{dump}"
        );
        // meshca's counters istiod never records: same definition (a
        // counter without labels), then out of the comparison.
        for name in ISTIOD_NEVER_RECORDS {
            if istiod_families.series.contains_key(name) {
                continue;
            }
            if let Some(labels) = meshca_families.series.remove(name) {
                assert_eq!(labels, BTreeSet::from([vec![]]), "{name} labels");
                let kind = meshca_families.types.remove(name);
                assert_eq!(kind.as_deref(), Some("counter"), "{name} TYPE");
            }
        }
        assert_eq!(
            meshca_families.series.keys().collect::<Vec<_>>(),
            istiod_families.series.keys().collect::<Vec<_>>(),
            "citadel_server_* series names\n{dump}"
        );
        assert_eq!(
            meshca_families.types, istiod_families.types,
            "TYPE lines\n{dump}"
        );
        assert_eq!(
            meshca_families.series, istiod_families.series,
            "label names\n{dump}"
        );
        ns.cleanup().await
    })
    .await
    .context("test timed out")?
}
