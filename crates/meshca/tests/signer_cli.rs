//! `meshca signer` started as a user starts it, with its CA as two separate
//! files (signer-ca's `--ca-cert-path`/`--ca-key-path`, or `caCertPath`/
//! `caKeyPath`/`caRootsPath` in a `--config` file), against a real
//! kube-apiserver: running with exactly the Helm chart's RBAC for it, it
//! signs a CSR approved by an identity with what the chart grants istiod.

mod common;

use common::{Proc, meshca};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::Api;
use meshca_testsupport::{Identity, TestEnv, TestNamespace, chart};

/// A root and an intermediate under it (`meshca ca init`, cacerts layout);
/// returns the intermediate's directory.
fn make_ca(base: &Path) -> Result<PathBuf> {
    let root = base.join("root");
    let dir = base.join("intermediate");
    let (root_s, dir_s) = (root.to_str().unwrap(), dir.to_str().unwrap());
    meshca(&[
        "ca",
        "init",
        "--out",
        root_s,
        "--key-type",
        "ecdsa-p256",
        "--org",
        "signer-cli",
    ])?;
    meshca(&[
        "ca",
        "init",
        "--out",
        dir_s,
        "--intermediate-of",
        root_s,
        "--key-type",
        "ecdsa-p256",
        "--org",
        "signer-cli",
    ])?;
    Ok(dir)
}

/// The signer's and istiod's identities, with exactly the chart's RBAC.
async fn identities(ns: &TestNamespace, signer: &str) -> Result<(Identity, kube::Client)> {
    let name = ns.unique_name("m");
    let rbac = chart::signer_rbac(ns.name(), &name, &[signer], ns.name(), &[])?;
    let controller = ns
        .identity_from_manifest("signer-ca-controller-manager", &rbac)
        .await?;
    let istiod_rbac = chart::istiod_ra_rbac(ns.name(), &name, &[signer], ns.name())?;
    let istiod = ns
        .identity_from_manifest("istiod", &istiod_rbac)
        .await?
        .client()
        .await?;
    Ok((controller, istiod))
}

/// `meshca signer ARGS` as `identity`, as deployed: leader election (on by
/// default) on the chart's Lease in its own namespace.
fn start_signer(identity: &Identity, namespace: &str, args: &[&str]) -> Result<Proc> {
    let child = Command::new(env!("CARGO_BIN_EXE_meshca"))
        .arg("signer")
        .args(args)
        .arg("--kubeconfig")
        .arg(identity.kubeconfig_path())
        .args(["--no-trust-bundle", "--monitoring-listen", "none"])
        .env("POD_NAMESPACE", namespace)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting meshca signer")?;
    Ok(Proc(child))
}

/// Creates an istiod-shaped CSR for `signer` and approves it, as istiod.
async fn approved_csr(ns: &TestNamespace, istiod: &kube::Client, signer: &str) -> Result<String> {
    let key = meshca_pki::SigningKey::generate(meshca_pki::KeyType::EcdsaP256)?;
    let spiffe = format!("spiffe://cluster.local/ns/{}/sa/workload", ns.name());
    let pem = meshca_pki::csr::build_csr(
        &key,
        meshca_pki::cert::EMPTY_NAME,
        &[meshca_pki::SanEntry::Uri(spiffe)],
    )
    .map_err(anyhow::Error::msg)?;
    let name = ns.unique_name("csr");
    ns.delete_csr_on_cleanup(&name);
    let api = Api::<CertificateSigningRequest>::all(istiod.clone());
    common::create_approved_csr(&api, &name, signer, pem).await?;
    Ok(name)
}

/// Waits for `status.certificate` of CSR `name`; fails at once if the
/// signer exits or the CSR gets a Failed condition.
async fn wait_issued(istiod: &kube::Client, name: &str, signer: &mut Proc) -> Result<String> {
    let api = Api::<CertificateSigningRequest>::all(istiod.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = signer.0.try_wait()? {
            bail!("meshca signer exited: {status}");
        }
        let status = api.get(name).await?.status.unwrap_or_default();
        if let Some(cert) = status.certificate {
            return Ok(String::from_utf8(cert.0)?);
        }
        let conditions = status.conditions.unwrap_or_default();
        if let Some(failed) = conditions.iter().find(|c| c.type_ == "Failed") {
            bail!("CSR {name} failed: {failed:?}");
        }
        if Instant::now() > deadline {
            bail!("CSR {name} not signed in 30 s: {conditions:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `openssl verify` of the chain's leaf against the root file, the rest of
/// the chain untrusted.
fn verify(dir: &Path, chain: &str, root: &Path) -> Result<()> {
    let blocks = meshca_pki::pem::parse_all(chain.as_bytes())?;
    if blocks.len() < 2 {
        bail!(
            "expected leaf and intermediate, got {} blocks",
            blocks.len()
        );
    }
    let leaf = dir.join("leaf.pem");
    let rest = dir.join("untrusted.pem");
    std::fs::write(
        &leaf,
        meshca_pki::pem::encode("CERTIFICATE", &blocks[0].der),
    )?;
    let untrusted: String = blocks[1..]
        .iter()
        .map(|b| meshca_pki::pem::encode("CERTIFICATE", &b.der))
        .collect();
    std::fs::write(&rest, untrusted)?;
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(root)
        .arg("-untrusted")
        .arg(&rest)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_cert_path_and_ca_key_path_flags_sign_an_approved_csr() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let env = TestEnv::get().await;
        let ns = env.namespace("signer-cli-flags").await.unwrap();
        let dir = ns.temp_dir().to_path_buf();
        let signer = format!("{}.example.com/foo", ns.name());
        let (controller, istiod) = identities(&ns, &signer).await.unwrap();
        let ca = make_ca(&dir).unwrap();
        // cert-chain.pem: intermediate then root, so the roots default to its end.
        let mut proc = start_signer(
            &controller,
            ns.name(),
            &[
                "--signer-name",
                &signer,
                "--ca-cert-path",
                ca.join("cert-chain.pem").to_str().unwrap(),
                "--ca-key-path",
                ca.join("ca-key.pem").to_str().unwrap(),
            ],
        )
        .unwrap();
        let name = approved_csr(&ns, &istiod, &signer).await.unwrap();
        let chain = wait_issued(&istiod, &name, &mut proc).await.unwrap();
        verify(&dir, &chain, &dir.join("root/root-cert.pem")).unwrap();
        drop(proc);
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_cert_path_and_ca_key_path_in_a_config_file_sign_an_approved_csr() {
    tokio::time::timeout(Duration::from_secs(90), async {
        let env = TestEnv::get().await;
        let ns = env.namespace("signer-cli-config").await.unwrap();
        let dir = ns.temp_dir().to_path_buf();
        let signer = format!("{}.example.com/foo", ns.name());
        let (controller, istiod) = identities(&ns, &signer).await.unwrap();
        let ca = make_ca(&dir).unwrap();
        let config = dir.join("signers.yaml");
        std::fs::write(
            &config,
            format!(
                "signers:\n\
                 - name: {signer}\n  \
                   caCertPath: {}\n  \
                   caKeyPath: {}\n  \
                   caRootsPath: {}\n",
                ca.join("ca-cert.pem").display(),
                ca.join("ca-key.pem").display(),
                ca.join("root-cert.pem").display(),
            ),
        )
        .unwrap();
        let mut proc = start_signer(
            &controller,
            ns.name(),
            &["--config", config.to_str().unwrap()],
        )
        .unwrap();
        let name = approved_csr(&ns, &istiod, &signer).await.unwrap();
        let chain = wait_issued(&istiod, &name, &mut proc).await.unwrap();
        verify(&dir, &chain, &dir.join("root/root-cert.pem")).unwrap();
        drop(proc);
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}

/// `meshca signer` with `ARGS` and the environment of a SoftHSM2 token.
fn start_signer_with_token(
    identity: &Identity,
    namespace: &str,
    hsm: &meshca_testsupport::softhsm::SoftHsm,
    args: &[&str],
) -> Result<Proc> {
    let child = Command::new(env!("CARGO_BIN_EXE_meshca"))
        .arg("signer")
        .args(args)
        .arg("--kubeconfig")
        .arg(identity.kubeconfig_path())
        .args(["--no-trust-bundle", "--monitoring-listen", "none"])
        .args(["--ca-poll-interval", "200ms"])
        .envs(hsm.env())
        .env("MESHCA_PKCS11_PIN_FILE", hsm.pin_file())
        .env("POD_NAMESPACE", namespace)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting meshca signer")?;
    Ok(Proc(child))
}

/// The DER of the chain's second certificate (the signer's intermediate).
fn issuer_der(chain: &str) -> Vec<u8> {
    meshca_pki::pem::parse_all(chain.as_bytes()).unwrap()[1]
        .der
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signer_moves_from_a_file_key_to_a_token_key_and_waits_out_a_removed_token() {
    tokio::time::timeout(Duration::from_secs(120), async {
        let env = TestEnv::get().await;
        let ns = env.namespace("signer-cli-hsm").await.unwrap();
        let dir = ns.temp_dir().to_path_buf();
        let signer = format!("{}.example.com/foo", ns.name());
        let (controller, istiod) = identities(&ns, &signer).await.unwrap();
        let hsm = meshca_testsupport::softhsm::SoftHsm::new("signer", "2222");
        let ca = make_ca(&dir).unwrap();
        let mut proc = start_signer_with_token(
            &controller,
            ns.name(),
            &hsm,
            &["--signer-name", &signer, "--ca-dir", ca.to_str().unwrap()],
        )
        .unwrap();
        let name = approved_csr(&ns, &istiod, &signer).await.unwrap();
        let chain = wait_issued(&istiod, &name, &mut proc).await.unwrap();
        verify(&dir, &chain, &dir.join("root/root-cert.pem")).unwrap();
        let file_intermediate = issuer_der(&chain);

        // A new intermediate whose key is generated in the token replaces
        // the file-key one in place; the running signer picks it up.
        let next = dir.join("next");
        let out = Command::new(env!("CARGO_BIN_EXE_meshca"))
            .args(["ca", "init", "--out", next.to_str().unwrap()])
            .args(["--intermediate-of", dir.join("root").to_str().unwrap()])
            .args(["--key-type", "ecdsa-p384", "--org", "signer-cli"])
            .args(["--pkcs11", &hsm.uri("signer-ca")])
            .envs(hsm.env())
            .env("MESHCA_PKCS11_PIN_FILE", hsm.pin_file())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for f in [
            "ca-key.pem",
            "ca-cert.pem",
            "cert-chain.pem",
            "root-cert.pem",
        ] {
            std::fs::rename(next.join(f), ca.join(f)).unwrap();
        }
        let token_intermediate = std::fs::read_to_string(ca.join("ca-cert.pem")).unwrap();
        let token_intermediate = meshca_pki::pem::parse_all(token_intermediate.as_bytes()).unwrap()
            [0]
        .der
        .to_vec();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let name = approved_csr(&ns, &istiod, &signer).await.unwrap();
            let chain = wait_issued(&istiod, &name, &mut proc).await.unwrap();
            verify(&dir, &chain, &dir.join("root/root-cert.pem")).unwrap();
            let issuer = issuer_der(&chain);
            if issuer == token_intermediate {
                break;
            }
            assert_eq!(issuer, file_intermediate);
            assert!(Instant::now() < deadline, "the token key was not picked up");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }

        // Token away: the CSR waits (no Failed condition); token back: signed.
        hsm.remove_tokens();
        let name = approved_csr(&ns, &istiod, &signer).await.unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        let api = Api::<CertificateSigningRequest>::all(istiod.clone());
        let status = api.get(&name).await.unwrap().status.unwrap_or_default();
        assert!(status.certificate.is_none(), "signed without the token");
        assert!(
            !status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Failed"),
            "a removed token must not fail the CSR for good"
        );
        hsm.restore_tokens();
        let chain = wait_issued(&istiod, &name, &mut proc).await.unwrap();
        verify(&dir, &chain, &dir.join("root/root-cert.pem")).unwrap();
        assert_eq!(issuer_der(&chain), token_intermediate);
        drop(proc);
        ns.cleanup().await.unwrap();
    })
    .await
    .expect("test timed out");
}
