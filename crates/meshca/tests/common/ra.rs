//! RA mode with the real `meshca signer`: the signer's CA, the signer
//! process (the chart's signer RBAC), `meshca server` in RA mode (the
//! chart's server RBAC for RA), requests as istio-agent sends them, and the
//! checks on what they leave behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, ListParams};
use meshca_proto::IstioCertificateRequest;
use meshca_proto::istio_certificate_service_client::IstioCertificateServiceClient;
use meshca_testsupport::{Identity, Proc, TestEnv, TestNamespace, chart, free_port};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use super::meshca;

/// The chart's RBAC for a server in RA mode forwarding to `signer` (its
/// ClusterRole uniquely named: tests in one namespace use other signers).
pub fn server_ra_rbac(ns: &TestNamespace, signer: &str) -> Result<String> {
    chart::server_rbac(
        ns.name(),
        &[
            "server.ra.enabled=true",
            &format!("server.ra.signer={signer}"),
            &format!("server.name={}", ns.unique_name("meshca")),
        ],
    )
}

/// The signer's CA: a root and an intermediate (Istio's cacerts layout).
pub struct SignerCa {
    pub dir: PathBuf,
    pub root_pem: String,
    /// The token holding the intermediate's key, if it is in one.
    pub hsm: Option<meshca_testsupport::softhsm::SoftHsm>,
}

pub fn signer_ca(base: &Path) -> Result<SignerCa> {
    make_signer_ca(base, None)
}

/// The signer's CA with the intermediate's key generated in a SoftHSM2 token.
pub fn signer_ca_in_token(base: &Path) -> Result<SignerCa> {
    let hsm = meshca_testsupport::softhsm::SoftHsm::new("ra-signer", "1111");
    make_signer_ca(base, Some(hsm))
}

fn make_signer_ca(
    base: &Path,
    hsm: Option<meshca_testsupport::softhsm::SoftHsm>,
) -> Result<SignerCa> {
    let root = base.join("signer-root");
    let dir = base.join("signer-ca");
    let (root_s, dir_s) = (root.to_str().unwrap(), dir.to_str().unwrap());
    meshca(&[
        "ca",
        "init",
        "--out",
        root_s,
        "--key-type",
        "ecdsa-p256",
        "--org",
        "ra-signer",
    ])?;
    let mut args = vec![
        "ca",
        "init",
        "--out",
        dir_s,
        "--intermediate-of",
        root_s,
        "--key-type",
        "ecdsa-p256",
        "--org",
        "ra-signer",
    ];
    let uri = hsm.as_ref().map(|h| h.uri("signer-intermediate"));
    if let Some(uri) = &uri {
        args.extend(["--pkcs11", uri]);
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshca"));
    cmd.args(&args);
    if let Some(h) = &hsm {
        cmd.envs(h.env())
            .env("MESHCA_PKCS11_PIN_FILE", h.pin_file());
    }
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "meshca {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let root_pem = std::fs::read_to_string(root.join("root-cert.pem"))?;
    Ok(SignerCa { dir, root_pem, hsm })
}

/// The identity `meshca signer` runs as: exactly the chart's RBAC for
/// `signers`, with the Lease `signer-ca-leader` in the test namespace when
/// `leader_election`.
pub async fn signer_identity(
    ns: &TestNamespace,
    signers: &[&str],
    leader_election: bool,
) -> Result<Identity> {
    let election = format!("leaderElection.enabled={leader_election}");
    let rbac = chart::signer_rbac(
        ns.name(),
        &ns.unique_name("m"),
        signers,
        ns.name(),
        &[&election, "signer.trustBundle=false"],
    )?;
    ns.identity_from_manifest("signer-ca-controller-manager", &rbac)
        .await
}

/// `meshca signer` for `signers` as `identity`, with `extra` flags (without
/// leader election unless they configure it) and its /metrics on
/// `monitoring` (if any); its log goes to `stderr`.
pub fn spawn_signer(
    identity: &Identity,
    signers: &[&str],
    ca: &SignerCa,
    trust_domains: &str,
    extra: &[&str],
    monitoring: Option<&str>,
    stderr: Stdio,
) -> Result<Proc> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshca"));
    if let Some(h) = &ca.hsm {
        cmd.envs(h.env())
            .env("MESHCA_PKCS11_PIN_FILE", h.pin_file());
    }
    let child = cmd
        .args(["signer", "--signer-name", &signers.join(","), "--ca-dir"])
        .arg(&ca.dir)
        .arg("--kubeconfig")
        .arg(identity.kubeconfig_path())
        .args(["--trust-domains", trust_domains])
        .args(["--no-trust-bundle", "--monitoring-listen"])
        .arg(monitoring.unwrap_or("none"))
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .context("starting meshca signer")?;
    Ok(Proc(child))
}

/// `meshca signer` for `signer` with the chart's RBAC for it, one replica.
pub async fn start_signer(
    ns: &TestNamespace,
    signer: &str,
    ca: &SignerCa,
    trust_domains: &str,
) -> Result<Proc> {
    let identity = signer_identity(ns, &[signer], false).await?;
    spawn_signer(
        &identity,
        &[signer],
        ca,
        trust_domains,
        &["--no-leader-election"],
        None,
        Stdio::inherit(),
    )
}

/// `meshca server` in RA mode with exactly the chart's RBAC for it.
pub struct Server {
    pub child: Proc,
    pub addr: String,
    /// /healthz, /readyz, /metrics.
    pub monitoring: String,
    pub state: tempfile::TempDir,
}

impl Server {
    pub async fn start(
        ns: &TestNamespace,
        signer: &str,
        root_pem: &str,
        extra: &[&str],
    ) -> Result<Self> {
        Self::start_logging_to(ns, signer, root_pem, extra, Stdio::inherit()).await
    }

    /// [`Server::start`] with its log going to `stderr`.
    pub async fn start_logging_to(
        ns: &TestNamespace,
        signer: &str,
        root_pem: &str,
        extra: &[&str],
        stderr: Stdio,
    ) -> Result<Self> {
        let identity = ns
            .identity_from_manifest("meshca", &server_ra_rbac(ns, signer)?)
            .await?;
        let state = tempfile::tempdir()?;
        let root_file = state.path().join("external-ca-cert/root-cert.pem");
        std::fs::create_dir_all(root_file.parent().unwrap())?;
        std::fs::write(&root_file, root_pem)?;
        let addr = format!("127.0.0.1:{}", free_port());
        let monitoring = format!("127.0.0.1:{}", free_port());
        let mut child = Proc(
            Command::new(env!("CARGO_BIN_EXE_meshca"))
                .args(["server", "--listen", &addr])
                .args(["--monitoring-listen", &monitoring])
                .arg("--root-ca-dir")
                .arg(state.path().join("no-plugged-ca"))
                .arg("--state-dir")
                .arg(state.path())
                .arg("--kubeconfig")
                .arg(identity.kubeconfig_path())
                .arg("--no-impersonation")
                .args(["--self-signed-key-type", "ecdsa-p256"])
                // Root distribution has its own test and RBAC.
                .arg("--no-root-configmap")
                .arg("--no-ca-secret")
                .arg("--external-ca-root")
                .arg(&root_file)
                .args(extra)
                .env("EXTERNAL_CA", "ISTIOD_RA_KUBERNETES_API")
                .env("K8S_SIGNER", signer)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .context("starting meshca server")?,
        );
        super::wait_ready(&monitoring, &mut child, "meshca server").await?;
        Ok(Server {
            child,
            addr,
            monitoring,
            state,
        })
    }

    /// The root of the server's own serving certificate (its local CA).
    pub fn serving_root(&self) -> PathBuf {
        self.state.path().join("ca/root-cert.pem")
    }

    pub async fn grpc(&self) -> Result<IstioCertificateServiceClient<Channel>> {
        Ok(IstioCertificateServiceClient::new(
            self.channel()?.connect().await?,
        ))
    }

    /// A channel to the server, connected on first use.
    pub fn channel(&self) -> Result<Endpoint> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(self.serving_root())?))
            .domain_name("istiod.istio-system.svc");
        Ok(Endpoint::from_shared(format!("https://{}", self.addr))?.tls_config(tls)?)
    }
}

/// A CreateCertificate request as istio-agent sends it.
pub fn request(
    csr: String,
    ttl: i64,
    cert_signer: &str,
    token: &str,
) -> tonic::Request<IstioCertificateRequest> {
    let mut req = tonic::Request::new(IstioCertificateRequest::from_agent(csr, ttl, cert_signer));
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

/// A CSR as Istio's agent makes it: P-256, empty subject, one URI SAN.
pub fn workload_csr(spiffe: &str) -> String {
    let key = meshca_pki::SigningKey::generate(meshca_pki::KeyType::EcdsaP256).unwrap();
    meshca_pki::csr::build_csr(
        &key,
        meshca_pki::cert::EMPTY_NAME,
        &[meshca_pki::SanEntry::Uri(spiffe.into())],
    )
    .unwrap()
}

pub fn pem_ders(pem: &str) -> Vec<Vec<u8>> {
    meshca_pki::pem::parse_all(pem.as_bytes())
        .unwrap()
        .into_iter()
        .map(|b| b.der.to_vec())
        .collect()
}

/// `openssl verify` of the leaf against `root_pem` only, the rest untrusted.
pub fn openssl_verify(dir: &Path, chain: &[String], root_pem: &str) -> Result<()> {
    let id = meshca_testsupport::unique_name("v");
    let (leaf, inter, root) = (
        dir.join(format!("{id}-leaf.pem")),
        dir.join(format!("{id}-inter.pem")),
        dir.join(format!("{id}-root.pem")),
    );
    std::fs::write(&leaf, &chain[0])?;
    std::fs::write(&inter, chain[1..].concat())?;
    std::fs::write(&root, root_pem)?;
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&root)
        .arg("-untrusted")
        .arg(&inter)
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

/// The names of `signer`'s CSRs now.
pub async fn csrs_of(client: &kube::Client, signer: &str) -> Result<Vec<String>> {
    let lp = ListParams::default().fields(&format!("spec.signerName={signer}"));
    Ok(Api::<CertificateSigningRequest>::all(client.clone())
        .list(&lp)
        .await?
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect())
}

/// Waits (at most `within`) until no CSR of `signer` is left: the server
/// deletes its CSRs right after answering.
pub async fn wait_csrs_gone(signer: &str, within: Duration) -> Result<()> {
    let env = TestEnv::get().await;
    let deadline = Instant::now() + within;
    loop {
        let left = csrs_of(&env.client(), signer).await?;
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("CSRs of {signer} left behind after {within:?}: {left:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits (briefly) until no CSR of `signer` is left.
pub async fn assert_csrs_gone(signer: &str) {
    wait_csrs_gone(signer, Duration::from_secs(5))
        .await
        .unwrap();
}
