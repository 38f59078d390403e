//! `meshca server` against Istio's own Go client and a real kube-apiserver:
//! real TokenRequest tokens, TokenReview with the server's manifest RBAC,
//! and every refusal with Istio's gRPC code while the server keeps serving.

mod common;

use common::{free_port, leaf_uris, meshca, pem_der};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;
use meshca_proto::IstioCertificateRequest;
use meshca_proto::istio_certificate_service_client::IstioCertificateServiceClient;
use meshca_testsupport::{TestEnv, TestNamespace, TokenOptions, chart};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use x509_parser::prelude::*;

/// A running `meshca server`, killed on drop.
struct Server {
    child: Child,
    addr: String,
    monitoring: String,
    state: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts meshca as the mesh CA, authenticating with TokenReview as a
    /// ServiceAccount bound to exactly the chart's RBAC for that configuration.
    async fn start(ns: &TestNamespace, extra: &[&str]) -> Result<Server> {
        let rbac = chart::server_rbac(ns.name(), &[])?;
        let identity = ns.identity_from_manifest("meshca", &rbac).await?;
        let state = tempfile::tempdir()?;
        let addr = format!("127.0.0.1:{}", free_port());
        let monitoring = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshca"));
        cmd.args([
            "server",
            "--listen",
            &addr,
            "--monitoring-listen",
            &monitoring,
        ]);
        if !extra.contains(&"--root-ca-dir") {
            cmd.arg("--root-ca-dir")
                .arg(state.path().join("no-plugged-ca"));
        }
        let child = cmd
            .arg("--state-dir")
            .arg(state.path())
            .arg("--no-root-configmap")
            .arg("--no-ca-secret")
            .arg("--kubeconfig")
            .arg(identity.kubeconfig_path())
            .arg("--no-impersonation")
            .args(["--self-signed-key-type", "ecdsa-p256"])
            .args(extra)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting meshca server")?;
        let mut server = Server {
            child,
            addr,
            monitoring,
            state,
        };
        server.wait_ready().await?;
        Ok(server)
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("meshca server exited with {status} before becoming ready");
            }
            if let Ok(out) = Command::new("curl")
                .args(["-sf", &format!("http://{}/readyz", self.monitoring)])
                .output()
                && out.status.success()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("meshca server did not become ready within 20 s")
    }

    fn root(&self) -> PathBuf {
        self.state.path().join("ca/root-cert.pem")
    }

    fn metrics(&self) -> String {
        let out = Command::new("curl")
            .args(["-sf", &format!("http://{}/metrics", self.monitoring)])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap()
    }

    async fn grpc(&self) -> Result<IstioCertificateServiceClient<Channel>> {
        self.grpc_with_root(&self.root()).await
    }

    async fn grpc_with_root(&self, root: &Path) -> Result<IstioCertificateServiceClient<Channel>> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(std::fs::read(root)?))
            .domain_name("istiod.istio-system.svc");
        let channel = Endpoint::from_shared(format!("https://{}", self.addr))?
            .tls_config(tls)?
            .connect()
            .await?;
        Ok(IstioCertificateServiceClient::new(channel))
    }
}

/// Runs Istio's own CA client; returns the chain elements and the key PEM.
fn istio_client(server: &Server, args: &[&str]) -> Result<(Vec<String>, String)> {
    let out = Command::new(meshca_testsupport::bin("istio-client"))
        .args(["-addr", &server.addr, "-json", "-timeout", "20s"])
        .arg("-root-cert")
        .arg(server.root())
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "istio-client failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let chain = json["chain"]
        .as_array()
        .context("no chain")?
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    Ok((chain, json["key"].as_str().unwrap_or_default().to_owned()))
}

fn leaf_lifetime(chain: &[String]) -> i64 {
    let der = pem_der(&chain[0]);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    cert.validity().not_after.timestamp() - ::time::OffsetDateTime::now_utc().unix_timestamp()
}

/// `openssl verify` of the leaf against the last element (the roots).
fn openssl_verify(dir: &Path, chain: &[String]) -> Result<()> {
    std::fs::write(dir.join("leaf.pem"), &chain[0])?;
    std::fs::write(
        dir.join("untrusted.pem"),
        chain[1..chain.len() - 1].concat(),
    )?;
    std::fs::write(dir.join("roots.pem"), &chain[chain.len() - 1])?;
    let mut cmd = Command::new("openssl");
    cmd.current_dir(dir)
        .args(["verify", "-CAfile", "roots.pem"]);
    if chain.len() > 2 {
        cmd.args(["-untrusted", "untrusted.pem"]);
    }
    let out = cmd.arg("leaf.pem").output()?;
    if !out.status.success() {
        bail!(
            "openssl verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// zlint's verdict on a certificate: the names of lints at error or fatal
/// level. The RFC and community lints apply; the CA/Browser Forum, browser
/// and ETSI programmes govern publicly trusted web PKI, not a mesh CA (they
/// demand AIA URLs and certificate policies and forbid URI SANs).
fn zlint_errors(dir: &Path, cert_pem: &str) -> Result<Vec<String>> {
    let path = dir.join("zlint.pem");
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

async fn write_token(ns: &TestNamespace, sa: &str, opts: &TokenOptions) -> Result<PathBuf> {
    let token = ns.token_with(sa, opts).await?;
    let path = ns.temp_dir().join(format!(
        "{sa}-{}.token",
        meshca_testsupport::unique_name("t")
    ));
    std::fs::write(&path, token)?;
    Ok(path)
}

#[tokio::test]
async fn istio_client_gets_verifiable_certificates_for_every_key_type_and_renews_with_them()
-> Result<()> {
    let env = TestEnv::get().await;
    let ns = env.namespace("srv-ok").await?;
    let server = Server::start(&ns, &[]).await?;
    ns.create_service_account("bookinfo").await?;
    let token = write_token(&ns, "bookinfo", &TokenOptions::default()).await?;
    let token = token.to_str().unwrap();
    let expected = format!("spiffe://cluster.local/ns/{}/sa/bookinfo", ns.name());

    for key_type in ["rsa-2048", "ecdsa-p256", "ecdsa-p384"] {
        let (chain, key) = istio_client(&server, &["-token", token, "-key-type", key_type])
            .with_context(|| format!("key type {key_type}"))?;
        assert!(
            chain.len() >= 2,
            "{key_type}: chain of {} elements",
            chain.len()
        );
        assert_eq!(leaf_uris(&chain), vec![expected.clone()], "{key_type}");
        openssl_verify(ns.temp_dir(), &chain).with_context(|| key_type.to_owned())?;
        assert_eq!(
            zlint_errors(ns.temp_dir(), &chain[0])?,
            Vec::<String>::new(),
            "{key_type}: zlint errors"
        );
        assert!(!key.is_empty());
    }

    // Renewal: authenticate with the certificate just issued, no token.
    let (chain, key) = istio_client(&server, &["-token", token, "-key-type", "ecdsa-p256"])?;
    let dir = ns.temp_dir();
    std::fs::write(
        dir.join("client-chain.pem"),
        chain[..chain.len() - 1].concat(),
    )?;
    std::fs::write(dir.join("client-key.pem"), key)?;
    let cert = dir.join("client-chain.pem");
    let key = dir.join("client-key.pem");
    let (renewed, _) = istio_client(
        &server,
        &[
            "-client-cert",
            cert.to_str().unwrap(),
            "-client-key",
            key.to_str().unwrap(),
        ],
    )?;
    assert_eq!(leaf_uris(&renewed), vec![expected]);
    let metrics = server.metrics();
    assert!(
        metrics.contains("meshca_server_authenticated_total{authenticator=\"client_cert\"} 1"),
        "{metrics}"
    );
    ns.cleanup().await
}

fn csr_pem(key_type: meshca_pki::KeyType) -> String {
    let key = meshca_pki::SigningKey::generate(key_type).unwrap();
    meshca_pki::csr::build_csr(&key, meshca_pki::cert::EMPTY_NAME, &[]).unwrap()
}

fn request(
    csr: String,
    ttl: i64,
    token: Option<&str>,
    cluster_id: Option<&str>,
) -> tonic::Request<IstioCertificateRequest> {
    let mut req = tonic::Request::new(IstioCertificateRequest::from_agent(csr, ttl, ""));
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    if let Some(c) = cluster_id {
        req.metadata_mut().insert("clusterid", c.parse().unwrap());
    }
    req
}

/// A ServiceAccount token signed with the testenv's real signing key, so
/// that only its expiry differs from a TokenRequest token.
fn forged_token(ns: &str, sa: &str, uid: &str, exp_offset: i64) -> String {
    let key_path =
        std::env::var("MESHCA_TESTENV_SA_SIGNING_KEY").expect("MESHCA_TESTENV_SA_SIGNING_KEY");
    let issuer = std::env::var("MESHCA_TESTENV_SA_ISSUER").expect("MESHCA_TESTENV_SA_ISSUER");
    let key = meshca_pki::SigningKey::from_pem(&std::fs::read(key_path).unwrap()).unwrap();
    let now = ::time::OffsetDateTime::now_utc().unix_timestamp();
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    let header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
    let claims = serde_json::json!({
        "aud": ["istio-ca"], "iss": issuer, "iat": now - 1200, "nbf": now - 1200, "exp": now + exp_offset,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": uid}},
    });
    let signed = format!(
        "{}.{}",
        b64(&serde_json::to_vec(&header).unwrap()),
        b64(&serde_json::to_vec(&claims).unwrap())
    );
    let sig = key.sign(signed.as_bytes()).unwrap();
    format!("{signed}.{}", b64(&sig))
}

#[tokio::test]
async fn bad_requests_get_istios_codes_nothing_is_issued_and_the_server_keeps_serving() -> Result<()>
{
    use tonic::Code;
    let env = TestEnv::get().await;
    let ns = env.namespace("srv-bad").await?;
    let server = Server::start(&ns, &[]).await?;
    let sa = ns.create_service_account("workload").await?;
    let uid = sa.metadata.uid.clone().unwrap();
    let token = ns.token("workload").await?;
    let mut client = server.grpc().await?;
    let good = || csr_pem(meshca_pki::KeyType::EcdsaP256);

    let expect =
        |result: Result<tonic::Response<meshca_proto::IstioCertificateResponse>, tonic::Status>,
         code: Code,
         what: &str| {
            match result {
                Ok(_) => panic!("{what}: a certificate was issued"),
                Err(status) => assert_eq!(status.code(), code, "{what}: {}", status.message()),
            }
        };

    // CSR problems: InvalidArgument, with the stable reason alongside.
    let status = client
        .create_certificate(request("garbage".into(), 0, Some(&token), None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("CSR signing error ("),
        "{}",
        status.message()
    );
    assert_eq!(
        status.metadata().get("meshca-reason").unwrap(),
        "csr_not_pem"
    );
    let mut broken = pem_der(&good());
    let last = broken.len() - 1;
    broken[last] ^= 0x01;
    let broken = meshca_pki::pem::encode("CERTIFICATE REQUEST", &broken);
    expect(
        client
            .create_certificate(request(broken, 0, Some(&token), None))
            .await,
        Code::InvalidArgument,
        "broken signature",
    );
    let big = format!("{}{}", good(), "A".repeat(40 * 1024));
    let status = client
        .create_certificate(request(big, 0, Some(&token), None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "oversized CSR");
    assert_eq!(
        status.metadata().get("meshca-reason").unwrap(),
        "csr_too_large"
    );
    let huge = "A".repeat(100 * 1024);
    expect(
        client
            .create_certificate(request(huge, 0, Some(&token), None))
            .await,
        Code::OutOfRange,
        "oversized message",
    );
    expect(
        client
            .create_certificate(request(good(), 91 * 24 * 3600, Some(&token), None))
            .await,
        Code::InvalidArgument,
        "TTL above max",
    );

    // Authentication problems: Unauthenticated.
    expect(
        client
            .create_certificate(request(good(), 0, None, None))
            .await,
        Code::Unauthenticated,
        "no token",
    );
    let wrong_audience = ns
        .token_with(
            "workload",
            &TokenOptions {
                audiences: vec!["not-istio".into()],
                expiration_seconds: 600,
            },
        )
        .await?;
    expect(
        client
            .create_certificate(request(good(), 0, Some(&wrong_audience), None))
            .await,
        Code::Unauthenticated,
        "wrong audience",
    );
    expect(
        client
            .create_certificate(request(good(), 0, Some(&token), Some("other-cluster")))
            .await,
        Code::Unauthenticated,
        "clusterid mismatch",
    );
    // A token forged with the real signing key is accepted while valid (so
    // the next refusal is about expiry, nothing else) and refused once expired.
    let live = forged_token(ns.name(), "workload", &uid, 600);
    client
        .create_certificate(request(good(), 0, Some(&live), None))
        .await
        .context("forged live token")?;
    let expired = forged_token(ns.name(), "workload", &uid, -60);
    expect(
        client
            .create_certificate(request(good(), 0, Some(&expired), None))
            .await,
        Code::Unauthenticated,
        "expired token",
    );
    // A token of a ServiceAccount deleted before its first use.
    ns.create_service_account("doomed").await?;
    let doomed = ns.token("doomed").await?;
    let sas = kube::Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(
        env.client(),
        ns.name(),
    );
    sas.delete("doomed", &Default::default()).await?;
    expect(
        client
            .create_certificate(request(good(), 0, Some(&doomed), None))
            .await,
        Code::Unauthenticated,
        "deleted SA",
    );
    let status = client
        .create_certificate(request(good(), 0, Some("x.y.z"), None))
        .await
        .unwrap_err();
    assert_eq!(status.message(), "request authenticate failure");
    // Impersonation is off in this server (--no-impersonation).
    let mut req = request(good(), 0, Some(&token), None);
    req.get_mut().metadata.as_mut().unwrap().fields.insert(
        "ImpersonatedIdentity".into(),
        meshca_proto::prost_types::Value {
            kind: Some(meshca_proto::prost_types::value::Kind::StringValue(
                "spiffe://cluster.local/ns/a/sa/b".into(),
            )),
        },
    );
    expect(
        client.create_certificate(req).await,
        Code::Unauthenticated,
        "impersonation",
    );

    // Still serving: default TTL for zero and negative requests, exact otherwise.
    for (ttl, expected) in [(0, 86_400), (-5, 86_400), (3600, 3600)] {
        let chain = client
            .create_certificate(request(good(), ttl, Some(&token), None))
            .await?
            .into_inner()
            .cert_chain;
        let left = leaf_lifetime(&chain);
        assert!(
            (expected - 10..=expected).contains(&left),
            "ttl {ttl}: {left}s left"
        );
        assert_eq!(
            leaf_uris(&chain),
            vec![format!(
                "spiffe://cluster.local/ns/{}/sa/workload",
                ns.name()
            )]
        );
    }
    let metrics = server.metrics();
    for line in [
        "citadel_server_success_cert_issuance_count 4",
        "citadel_server_csr_sign_err_count{error=\"ttl_too_long\"} 1",
        "citadel_server_csr_sign_err_count{error=\"csr_signature_invalid\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    ns.cleanup().await
}

fn issuer_cn(chain: &[String]) -> String {
    let der = pem_der(&chain[0]);
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    cert.issuer().to_string()
}

#[tokio::test]
async fn a_plugged_in_ca_is_reloaded_without_restart_and_a_broken_update_is_ignored() -> Result<()>
{
    let env = TestEnv::get().await;
    let ns = env.namespace("srv-reload").await?;
    let dir = ns.temp_dir().to_owned();
    let (root, plugged) = (dir.join("root"), dir.join("cacerts"));
    let (root_s, plugged_s) = (root.to_str().unwrap(), plugged.to_str().unwrap());
    meshca(&[
        "ca",
        "init",
        "--out",
        root_s,
        "--key-type",
        "ecdsa-p256",
        "--org",
        "first",
    ])?;
    meshca(&[
        "ca",
        "init",
        "--out",
        plugged_s,
        "--intermediate-of",
        root_s,
        "--key-type",
        "ecdsa-p256",
        "--org",
        "first",
    ])?;
    let server = Server::start(
        &ns,
        &["--root-ca-dir", plugged_s, "--reload-interval", "200ms"],
    )
    .await?;
    ns.create_service_account("app").await?;
    let token = ns.token("app").await?;
    let mut client = server.grpc_with_root(&root.join("root-cert.pem")).await?;
    let first = client
        .create_certificate(request(
            csr_pem(meshca_pki::KeyType::EcdsaP256),
            0,
            Some(&token),
            None,
        ))
        .await?;
    assert!(issuer_cn(&first.get_ref().cert_chain).contains("O=first"));
    assert_eq!(
        first.get_ref().cert_chain.len(),
        3,
        "leaf, intermediate, root"
    );

    // A half-written update (key missing) must not replace the working CA.
    std::fs::remove_file(plugged.join("ca-key.pem"))?;
    std::fs::write(plugged.join("ca-cert.pem"), "garbage")?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let still = client
        .create_certificate(request(
            csr_pem(meshca_pki::KeyType::EcdsaP256),
            0,
            Some(&token),
            None,
        ))
        .await?;
    assert!(issuer_cn(&still.get_ref().cert_chain).contains("O=first"));

    // Rotation to a new intermediate under the same root: picked up live.
    meshca(&[
        "ca",
        "init",
        "--out",
        plugged_s,
        "--intermediate-of",
        root_s,
        "--key-type",
        "ecdsa-p256",
        "--org",
        "second",
        "--force",
    ])?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let chain = client
            .create_certificate(request(
                csr_pem(meshca_pki::KeyType::EcdsaP256),
                0,
                Some(&token),
                None,
            ))
            .await?
            .into_inner()
            .cert_chain;
        if issuer_cn(&chain).contains("O=second") {
            openssl_verify(&dir, &chain)?;
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new intermediate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ns.cleanup().await
}

/// The serving certificate's serial, as a TLS client sees it.
fn serving_serial(addr: &str) -> Result<String> {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            addr,
            "-servername",
            "istiod.istio-system.svc",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    drop(child.stdin.take());
    let out = child.wait_with_output()?;
    let pem = String::from_utf8_lossy(&out.stdout);
    let start = pem
        .find("-----BEGIN CERTIFICATE-----")
        .context("no server certificate")?;
    let end = pem
        .find("-----END CERTIFICATE-----")
        .context("no server certificate")?
        + 25;
    let der = pem_der(&pem[start..end]);
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(cert.raw_serial_as_string())
}

#[tokio::test]
async fn the_serving_certificate_is_renewed_in_place_before_it_expires() -> Result<()> {
    let env = TestEnv::get().await;
    let ns = env.namespace("srv-renew").await?;
    let server = Server::start(
        &ns,
        &["--serving-cert-ttl", "4s", "--reload-interval", "300ms"],
    )
    .await?;
    let first = serving_serial(&server.addr)?;
    // Renewed at half its life: within about 2 s, without a restart.
    let deadline = Instant::now() + Duration::from_secs(10);
    while serving_serial(&server.addr)? == first {
        assert!(Instant::now() < deadline, "serving certificate not renewed");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // And the new one serves requests.
    ns.create_service_account("app").await?;
    let token = ns.token("app").await?;
    let mut client = server.grpc().await?;
    client
        .create_certificate(request(
            csr_pem(meshca_pki::KeyType::EcdsaP256),
            0,
            Some(&token),
            None,
        ))
        .await?;
    ns.cleanup().await
}
