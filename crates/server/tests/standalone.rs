//! Tier 2: the standalone server, started in-process and called through
//! tonic as istio-agent calls it. No cluster, no other process.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use meshca_kube::CancellationToken;
use meshca_pki::csr::build_csr;
use meshca_pki::{KeyType, SigningKey, WorkloadProfile, cert};
use meshca_proto::IstioCertificateRequest;
use meshca_proto::istio_certificate_service_client::IstioCertificateServiceClient;
use meshca_server::auth::local_issuer::local_issuer;
use meshca_server::distribution::DistributionConfig;
use meshca_server::grpc::service::REASON_HEADER;
use meshca_server::grpc::tls::ServingNames;
use meshca_server::{Server, ServerConfig};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

fn standalone(state_dir: &Path) -> ServerConfig {
    ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        monitoring_listen: None,
        trust_domain: "cluster.local".into(),
        workload: WorkloadProfile::default(),
        ca_dir: None,
        state_dir: state_dir.to_owned(),
        self_signed_key_type: KeyType::EcdsaP256,
        self_signed_ttl: Duration::from_secs(86400 * 30),
        token_audiences: vec!["istio-ca".into()],
        cluster_id: "Kubernetes".into(),
        cluster_aliases: vec![],
        trusted_node_accounts: vec![],
        kube: None,
        kube_api_concurrency: 8,
        jwt_keys: None,
        jwt_issuer: None,
        local_token_issuer: true,
        serving: ServingNames {
            dns: vec!["istiod.istio-system.svc".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
            ttl: Duration::from_secs(3600),
        },
        token_cache_ttl: Duration::from_secs(60),
        token_cache_size: 1000,
        max_message_bytes: 64 * 1024,
        reload_interval: Duration::from_secs(5),
        ra: None,
        distribution: DistributionConfig {
            configmaps: false,
            cluster_trust_bundle: false,
            election: None,
        },
        ca_secret: None,
    }
}

async fn ask(addr: SocketAddr, root_pem: &str, token: &str) -> Result<Vec<String>, tonic::Status> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name("istiod.istio-system.svc");
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("the server accepts TLS connections");
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let csr = build_csr(&key, cert::EMPTY_NAME, &[]).unwrap();
    let mut request = tonic::Request::new(IstioCertificateRequest::from_agent(csr, 3600, ""));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let response = IstioCertificateServiceClient::new(channel)
        .create_certificate(request)
        .await?;
    Ok(response.into_inner().cert_chain)
}

fn der(pem: &str) -> Vec<Vec<u8>> {
    meshca_pki::pem::parse_all(pem.as_bytes())
        .unwrap()
        .into_iter()
        .map(|b| b.der.to_vec())
        .collect()
}

#[tokio::test]
async fn a_local_token_gets_a_chain_to_the_printed_root_and_a_forged_one_is_refused() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let state = tempfile::tempdir().unwrap();
    let server = Server::build(standalone(state.path())).await.unwrap();
    let addr = server.local_addr().unwrap();
    let root_pem = std::fs::read_to_string(server.started().root_cert).unwrap();
    let stop = CancellationToken::new();
    let serving = tokio::spawn(server.serve(stop.clone()));

    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = local_issuer(state.path(), false)
        .unwrap()
        .mint("default", "demo", "istio-ca", 600, now)
        .unwrap();
    let chain = ask(addr, &root_pem, &token).await.expect("a certificate");
    let leaf = der(&chain[0]).remove(0);
    let rest: Vec<Vec<u8>> = chain[1..].iter().flat_map(|c| der(c)).collect();
    meshca_pki::chain::verify_chain(
        &leaf,
        &rest,
        &der(&root_pem),
        rustls_pki_types::UnixTime::now(),
    )
    .expect("the chain verifies to the root the server printed");
    assert_eq!(chain.last().unwrap().trim(), root_pem.trim(), "roots last");

    // Another issuer's key signs the same claims: refused, nothing issued.
    let other = tempfile::tempdir().unwrap();
    let forged = local_issuer(other.path(), true)
        .unwrap()
        .mint("default", "demo", "istio-ca", 600, now)
        .unwrap();
    let refused = ask(addr, &root_pem, &forged).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        refused.metadata().get(REASON_HEADER).unwrap(),
        "unauthenticated"
    );

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), serving)
        .await
        .expect("the server stops when its token is cancelled")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn jwt_keys_with_their_issuer_and_the_local_issuer_each_check_their_own_tokens() {
    use meshca_server::auth::jwt::JwtIssuer;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let state = tempfile::tempdir().unwrap();
    let corp = JwtIssuer::from_pkcs8(&JwtIssuer::generate_pkcs8().unwrap(), "corp-issuer").unwrap();
    let keys = state.path().join("corp-keys.pem");
    std::fs::write(&keys, corp.public_key_pem()).unwrap();
    let mut config = standalone(state.path());
    config.jwt_keys = Some(keys);
    config.jwt_issuer = Some("corp-issuer".into());
    let server = Server::build(config).await.unwrap();
    let addr = server.local_addr().unwrap();
    let root_pem = std::fs::read_to_string(server.started().root_cert).unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(server.serve(stop.clone()));

    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let local = local_issuer(state.path(), false).unwrap();
    let by_local = local.mint("default", "a", "istio-ca", 600, now).unwrap();
    ask(addr, &root_pem, &by_local)
        .await
        .expect("a local token is checked against the local issuer, not --jwt-issuer");
    let by_corp = corp.mint("default", "b", "istio-ca", 600, now).unwrap();
    ask(addr, &root_pem, &by_corp)
        .await
        .expect("a token of the --jwt-keys issuer");
    // An unknown key that claims the corp issuer: refused.
    let mismatched = JwtIssuer::from_pkcs8(&JwtIssuer::generate_pkcs8().unwrap(), "corp-issuer")
        .unwrap()
        .mint("default", "c", "istio-ca", 600, now)
        .unwrap();
    let refused = ask(addr, &root_pem, &mismatched).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    stop.cancel();
}

#[tokio::test]
async fn a_verified_token_whose_sub_is_no_dns1123_account_gets_no_certificate() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let state = tempfile::tempdir().unwrap();
    let server = Server::build(standalone(state.path())).await.unwrap();
    let addr = server.local_addr().unwrap();
    let root_pem = std::fs::read_to_string(server.started().root_cert).unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(server.serve(stop.clone()));

    // Signed by the trusted local issuer: `sub` is
    // system:serviceaccount:a/sa/b:c, which once became
    // spiffe://cluster.local/ns/a/sa/b/sa/c.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let local = local_issuer(state.path(), false).unwrap();
    for (ns, sa) in [("a/sa/b", "c"), ("default", "x/sa/y"), ("Default", "demo")] {
        let token = local.mint(ns, sa, "istio-ca", 600, now).unwrap();
        let refused = ask(addr, &root_pem, &token).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{ns}:{sa}");
        assert_eq!(
            refused.metadata().get(REASON_HEADER).unwrap(),
            "unauthenticated"
        );
    }
    // The same issuer, a valid account: issued.
    let token = local.mint("default", "demo", "istio-ca", 600, now).unwrap();
    ask(addr, &root_pem, &token).await.expect("a certificate");
    stop.cancel();
}

#[tokio::test]
async fn jwt_keys_without_an_issuer_do_not_start() {
    let state = tempfile::tempdir().unwrap();
    let keys = state.path().join("keys.pem");
    std::fs::write(
        &keys,
        local_issuer(state.path(), true).unwrap().public_key_pem(),
    )
    .unwrap();
    let mut config = standalone(state.path());
    config.jwt_keys = Some(keys);
    let e = Server::build(config).await.err().expect("refused");
    assert!(
        format!("{e:#}").contains("--jwt-keys needs --jwt-issuer"),
        "{e:#}"
    );
}
