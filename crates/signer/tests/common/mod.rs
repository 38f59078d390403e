//! Shared helpers for the signer's integration tests (real kube-apiserver
//! from testenv; the controller runs as a ServiceAccount bound to exactly
//! the RBAC of deploy/signer, the CSRs come from an identity with istiod's RBAC).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition,
};
use kube::Client;
use kube::api::Api;
use meshca_pki::profile::{CaCertRequest, intermediate_ca, self_signed_root};
use meshca_pki::{CaBundle, KeyType, SigningKey, cert, pem};
#[allow(unused_imports)] // each test binary uses its own subset
pub use meshca_testsupport::csr::{certificate, create_csr, failed, set_approval};
use meshca_testsupport::{Identity, TestEnv, TestNamespace, chart, openssl};
#[allow(unused_imports)] // each test binary uses its own subset
pub use meshca_testsupport::{http_get, metric};
use time::OffsetDateTime;

pub const ISTIOD_USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];

/// A test CA in Istio's cacerts layout: root -> intermediate (signing).
pub struct TestCa {
    pub dir: PathBuf,
    pub root_pem: String,
    pub intermediate_pem: String,
    pub key_pem: String,
}

pub fn make_root(org: &str) -> (SigningKey, Vec<u8>) {
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let der = self_signed_root(
        &CaCertRequest {
            subject_der: &cert::organization_name(org),
            key: &key,
            ttl: Duration::from_secs(86400 * 365),
        },
        OffsetDateTime::now_utc(),
    )
    .unwrap();
    (key, der)
}

/// An intermediate under a fresh root, valid for `ttl`, written to `dir`.
pub fn make_ca(dir: &Path, org: &str, ttl: Duration) -> TestCa {
    let now = OffsetDateTime::now_utc();
    let (root_key, root_der) = make_root(&format!("{org} root"));
    let root = CaBundle::from_parts(
        root_key,
        root_der.clone(),
        vec![],
        vec![root_der.clone()],
        now,
    )
    .unwrap();
    intermediate_under(dir, org, ttl, &root)
}

/// A new intermediate under an existing root bundle, written to `dir`.
pub fn intermediate_under(dir: &Path, org: &str, ttl: Duration, root: &CaBundle) -> TestCa {
    let now = OffsetDateTime::now_utc();
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let der = intermediate_ca(
        &CaCertRequest {
            subject_der: &cert::organization_name(org),
            key: &key,
            ttl,
        },
        root,
        now,
    )
    .unwrap();
    let root_pem = pem::encode("CERTIFICATE", &root.roots_der()[0]);
    let intermediate_pem = pem::encode("CERTIFICATE", &der);
    let key_pem = key.to_pkcs8_pem().unwrap().to_string();
    std::fs::create_dir_all(dir).unwrap();
    write_ca_dir(dir, &intermediate_pem, &key_pem, &root_pem);
    TestCa {
        dir: dir.to_path_buf(),
        root_pem,
        intermediate_pem,
        key_pem,
    }
}

/// Writes the cacerts layout (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem).
pub fn write_ca_dir(dir: &Path, cert_pem: &str, key_pem: &str, roots_pem: &str) {
    // Key first and cert last, each via rename: a poll sees old or new files.
    for (name, text) in [
        ("ca-key.pem", key_pem.to_string()),
        ("root-cert.pem", roots_pem.to_string()),
        ("cert-chain.pem", format!("{cert_pem}{roots_pem}")),
        ("ca-cert.pem", cert_pem.to_string()),
    ] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
}

/// How the chart is rendered for this test: objects in the test namespace
/// (istiod's too), cluster-scoped names unique to the test.
pub struct ManifestOptions {
    pub name: String,
    pub namespace: String,
    pub signer_names: Vec<String>,
}

impl ManifestOptions {
    fn signer_names(&self) -> Vec<&str> {
        self.signer_names.iter().map(String::as_str).collect()
    }
}

pub fn manifest_options(ns: &TestNamespace, signers: &[&str]) -> ManifestOptions {
    ManifestOptions {
        name: ns.unique_name("m"),
        namespace: ns.name().to_string(),
        signer_names: signers.iter().map(|s| s.to_string()).collect(),
    }
}

/// The controller's identity: exactly the chart's RBAC for the signer.
pub async fn controller_identity(ns: &TestNamespace, o: &ManifestOptions) -> Result<Identity> {
    let yaml = chart::signer_rbac(&o.namespace, &o.name, &o.signer_names(), &o.namespace, &[])?;
    ns.identity_from_manifest("signer-ca-controller-manager", &yaml)
        .await
}

/// istiod's identity in RA mode: exactly what the signer's chart grants it.
pub async fn istiod_identity(ns: &TestNamespace, o: &ManifestOptions) -> Result<Identity> {
    let yaml = chart::istiod_ra_rbac(&o.namespace, &o.name, &o.signer_names(), &o.namespace)?;
    ns.identity_from_manifest("istiod", &yaml).await
}

/// A CSR made by openssl: P-256 key, given subject, SAN extension `san`
/// (openssl syntax, e.g. `URI:spiffe://...`) and extra `-addext` values.
pub fn openssl_csr(dir: &Path, subject: &str, exts: &[&str]) -> Result<String> {
    openssl_csr_key(
        dir,
        subject,
        exts,
        &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"],
    )
}

pub fn openssl_csr_key(dir: &Path, subject: &str, exts: &[&str], key: &[&str]) -> Result<String> {
    let name = meshca_testsupport::unique_name("csr");
    let keyfile = format!("{name}.key");
    let csrfile = format!("{name}.csr");
    let mut args = vec!["req", "-new"];
    args.extend_from_slice(key);
    args.extend_from_slice(&[
        "-nodes", "-keyout", &keyfile, "-subj", subject, "-out", &csrfile,
    ]);
    for e in exts {
        args.push("-addext");
        args.push(e);
    }
    openssl::run(dir, &args)?;
    Ok(std::fs::read_to_string(dir.join(csrfile))?)
}

/// A CSR with Istio's template: empty subject, one URI SAN.
pub fn spiffe_csr(dir: &Path, uri: &str) -> String {
    openssl_csr(dir, "/", &[&format!("subjectAltName=URI:{uri}")]).unwrap()
}

/// Polls `name` until `done` holds, at most `timeout`.
pub async fn wait_for(
    client: &Client,
    name: &str,
    timeout: Duration,
    done: impl Fn(&CertificateSigningRequest) -> bool,
) -> Result<CertificateSigningRequest> {
    let api = Api::<CertificateSigningRequest>::all(client.clone());
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let csr = api.get(name).await?;
        if done(&csr) {
            return Ok(csr);
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "CSR {name}: condition not reached in {timeout:?}: {:?}",
                csr.status
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn wait_issued(client: &Client, name: &str) -> Result<String> {
    let csr = wait_for(client, name, Duration::from_secs(20), |c| {
        certificate(c).is_some() || failed(c).is_some()
    })
    .await?;
    certificate(&csr).with_context(|| format!("CSR {name} failed: {:?}", failed(&csr)))
}

pub async fn wait_failed(
    client: &Client,
    name: &str,
) -> Result<CertificateSigningRequestCondition> {
    let csr = wait_for(client, name, Duration::from_secs(20), |c| {
        certificate(c).is_some() || failed(c).is_some()
    })
    .await?;
    failed(&csr).with_context(|| format!("CSR {name} was signed, expected Failed"))
}

/// The PEM blocks of a chain, in order.
pub fn split_pem(text: &str) -> Vec<String> {
    pem::parse_all(text.as_bytes())
        .unwrap()
        .into_iter()
        .map(|b| {
            assert_eq!(b.label, "CERTIFICATE");
            pem::encode("CERTIFICATE", &b.der)
        })
        .collect()
}

/// `openssl verify` of a leaf against `root_pem` with the rest of `chain` untrusted.
pub fn openssl_verify(dir: &Path, chain: &str, root_pem: &str) -> Result<()> {
    let blocks = split_pem(chain);
    let id = meshca_testsupport::unique_name("v");
    let leaf = dir.join(format!("{id}-leaf.pem"));
    let inter = dir.join(format!("{id}-inter.pem"));
    let root = dir.join(format!("{id}-root.pem"));
    std::fs::write(&leaf, &blocks[0])?;
    std::fs::write(&inter, blocks[1..].concat())?;
    std::fs::write(&root, root_pem)?;
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&root)
        .arg("-untrusted")
        .arg(&inter)
        .arg("-purpose")
        .arg("sslclient")
        .arg(&leaf)
        .output()?;
    if !out.status.success() {
        bail!(
            "openssl verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// zlint's error/fatal lints for a certificate (RFC and community sources;
/// the web-PKI programmes do not govern a mesh CA).
pub fn zlint_errors(dir: &Path, cert_pem: &str) -> Result<Vec<String>> {
    let path = dir.join(format!("{}.pem", meshca_testsupport::unique_name("zlint")));
    std::fs::write(&path, cert_pem)?;
    let out = Command::new(meshca_testsupport::bin("zlint"))
        .args([
            "-includeSources",
            "RFC5280,RFC5480,RFC5891,RFC8813,RFC3279,Community",
        ])
        .arg(&path)
        .output()?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("zlint output: {}", String::from_utf8_lossy(&out.stderr)))?;
    Ok(json
        .as_object()
        .context("zlint JSON")?
        .iter()
        .filter(|(_, v)| matches!(v["result"].as_str(), Some("error" | "fatal")))
        .map(|(k, _)| k.clone())
        .collect())
}

/// A signer name unique to one test, so tests running at once never sign
/// each other's CSRs.
pub fn unique_signer(ns: &TestNamespace) -> String {
    format!("{}.example.com/foo", ns.name())
}

/// What most signer tests start from: a namespace, its own signer name, and
/// the controller's and istiod's identities with exactly their manifests' RBAC.
pub struct Setup {
    pub ns: TestNamespace,
    pub dir: PathBuf,
    pub signer: String,
    pub controller_id: Identity,
    /// istiod's client.
    pub istiod: Client,
}

pub async fn setup(env: &TestEnv, prefix: &str) -> Setup {
    let ns = env.namespace(prefix).await.unwrap();
    let dir = ns.temp_dir().to_path_buf();
    let signer = unique_signer(&ns);
    let o = manifest_options(&ns, &[&signer]);
    let controller_id = controller_identity(&ns, &o).await.unwrap();
    let istiod = istiod_identity(&ns, &o)
        .await
        .unwrap()
        .client()
        .await
        .unwrap();
    Setup {
        ns,
        dir,
        signer,
        controller_id,
        istiod,
    }
}
