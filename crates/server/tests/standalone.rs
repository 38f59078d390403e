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
use meshca_server::{Limits, Server, ServerConfig};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

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
        spiffe_bundle: None,
        limits: Limits::default(),
    }
}

async fn ask(addr: SocketAddr, root_pem: &str, token: &str) -> Result<Vec<String>, tonic::Status> {
    ask_with(addr, root_pem, None, Some(token)).await
}

/// A client certificate: the chain (leaf first, without the root) and its key, PEM.
struct ClientCert {
    chain: String,
    key: String,
}

/// A CertificateRequest with a client certificate and/or a bearer token.
async fn ask_with(
    addr: SocketAddr,
    root_pem: &str,
    client: Option<&ClientCert>,
    token: Option<&str>,
) -> Result<Vec<String>, tonic::Status> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name("istiod.istio-system.svc");
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(&client.chain, &client.key));
    }
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("connecting: {e:?}")))?;
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let csr = build_csr(&key, cert::EMPTY_NAME, &[]).unwrap();
    let mut request = tonic::Request::new(IstioCertificateRequest::from_agent(csr, 3600, ""));
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
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

// Client certificates: only leaves of this server's signing CA (or one it
// rotated from), identified by their one SPIFFE URI SAN in the trust domain.

const DAY: Duration = Duration::from_secs(86400);

/// A CA in the cacerts layout in `dir`: a root, or an intermediate of `issuer`.
fn new_ca(dir: &Path, issuer: Option<&meshca_pki::CaBundle>) -> meshca_pki::CaBundle {
    use meshca_ca_store::dir::{NewCa, create};
    let spec = NewCa {
        pkcs11: None,
        key_type: KeyType::EcdsaP256,
        org: "cluster.local",
        ttl: DAY * 30,
        issuer,
    };
    create(dir, &spec, true).unwrap().0
}

/// A client leaf signed by `ca` carrying exactly `sans`, with its chain.
fn client_leaf(ca: &meshca_pki::CaBundle, sans: &[meshca_pki::SanEntry]) -> ClientCert {
    use meshca_pki::cert::{Extensions, TbsFields, ext_key_usage, key_usage};
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let mut extensions = Extensions::default();
    extensions
        .key_usage(key_usage::DIGITAL_SIGNATURE)
        .ext_key_usage(&[ext_key_usage::SERVER_AUTH, ext_key_usage::CLIENT_AUTH])
        .basic_constraints(false)
        .authority_key_id(ca.key_id())
        .subject_alt_names(sans, true)
        .unwrap();
    let now = time::OffsetDateTime::now_utc();
    let der = cert::sign_certificate(
        ca.key(),
        &TbsFields {
            serial: &cert::random_serial().unwrap(),
            issuer_der: ca.subject_der(),
            not_before: now - Duration::from_secs(60),
            not_after: now + Duration::from_secs(3600),
            subject_der: cert::EMPTY_NAME,
            spki_der: &key.spki_der(),
            extensions,
        },
    )
    .unwrap();
    ClientCert {
        chain: format!(
            "{}{}",
            meshca_pki::pem::encode("CERTIFICATE", &der),
            ca.cert_chain_pem()
        ),
        key: key.to_pkcs8_pem().unwrap().to_string(),
    }
}

/// A client leaf for `identity` issued by `ca` as the server issues workload certificates.
fn workload_leaf(ca: &meshca_pki::CaBundle, identity: &str) -> ClientCert {
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let csr = build_csr(&key, cert::EMPTY_NAME, &[]).unwrap();
    let csr = meshca_pki::validate_csr(csr.as_bytes(), &Default::default()).unwrap();
    let der = meshca_pki::profile::issue_workload(
        &WorkloadProfile::default(),
        ca,
        &csr,
        &[identity.to_owned()],
        3600,
        false,
        time::OffsetDateTime::now_utc(),
    )
    .unwrap();
    ClientCert {
        chain: format!(
            "{}{}",
            meshca_pki::pem::encode("CERTIFICATE", &der),
            ca.cert_chain_pem()
        ),
        key: key.to_pkcs8_pem().unwrap().to_string(),
    }
}

/// The chain of an issued response as a client certificate (roots dropped).
fn issued(chain: &[String], key: SigningKey) -> ClientCert {
    ClientCert {
        chain: chain[..chain.len() - 1].concat(),
        key: key.to_pkcs8_pem().unwrap().to_string(),
    }
}

/// Like `ask`, but returns the new key too.
async fn ask_for_cert(addr: SocketAddr, root_pem: &str, token: &str) -> ClientCert {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem))
        .domain_name("istiod.istio-system.svc");
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let csr = build_csr(&key, cert::EMPTY_NAME, &[]).unwrap();
    let mut request = tonic::Request::new(IstioCertificateRequest::from_agent(csr, 3600, ""));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let chain = IstioCertificateServiceClient::new(channel)
        .create_certificate(request)
        .await
        .expect("a certificate for the token")
        .into_inner()
        .cert_chain;
    issued(&chain, key)
}

fn leaf_uris(chain: &[String]) -> Vec<String> {
    let leaf = der(&chain[0]).remove(0);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

fn assert_refused(result: Result<Vec<String>, tonic::Status>, what: &str) {
    let refused = result.expect_err(what);
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{what}");
    assert_eq!(
        refused.metadata().get(REASON_HEADER).unwrap(),
        "unauthenticated",
        "{what}"
    );
}

/// A server whose plugged CA is intermediate A under a root that also has
/// a sibling intermediate B (another CA's).
struct SiblingCas {
    addr: SocketAddr,
    root_pem: String,
    a: meshca_pki::CaBundle,
    b: meshca_pki::CaBundle,
    /// A local token for default/demo.
    token: String,
    stop: CancellationToken,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

impl Drop for SiblingCas {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

const ZTUNNEL: &str = "spiffe://cluster.local/ns/istio-system/sa/ztunnel";
const DEMO: &str = "spiffe://cluster.local/ns/default/sa/demo";

async fn sibling_cas() -> SiblingCas {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let state = tempfile::tempdir().unwrap();
    let cas = tempfile::tempdir().unwrap();
    let root = new_ca(&cas.path().join("root"), None);
    let a = new_ca(&cas.path().join("a"), Some(&root));
    let b = new_ca(&cas.path().join("b"), Some(&root));
    let mut config = standalone(state.path());
    config.ca_dir = Some(cas.path().join("a"));
    let server = Server::build(config).await.unwrap();
    let addr = server.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(server.serve(stop.clone()));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = local_issuer(state.path(), false)
        .unwrap()
        .mint("default", "demo", "istio-ca", 600, now)
        .unwrap();
    SiblingCas {
        addr,
        root_pem: root.roots_pem().to_owned(),
        a,
        b,
        token,
        stop,
        _dirs: (state, cas),
    }
}

#[tokio::test]
async fn a_leaf_this_server_issued_renews_with_the_certificate_alone() {
    let s = sibling_cas().await;
    let mine = ask_for_cert(s.addr, &s.root_pem, &s.token).await;
    let renewed = ask_with(s.addr, &s.root_pem, Some(&mine), None)
        .await
        .expect("a leaf of this CA authenticates");
    assert_eq!(leaf_uris(&renewed), [DEMO]);
    // So does one its signing certificate made for ztunnel.
    let renewed = ask_with(
        s.addr,
        &s.root_pem,
        Some(&workload_leaf(&s.a, ZTUNNEL)),
        None,
    )
    .await
    .expect("a leaf of this CA's signing certificate authenticates");
    assert_eq!(leaf_uris(&renewed), [ZTUNNEL]);
}

#[tokio::test]
async fn a_leaf_of_a_sibling_intermediate_under_the_same_root_is_refused() {
    let s = sibling_cas().await;
    let sibling = workload_leaf(&s.b, ZTUNNEL);
    assert_refused(
        ask_with(s.addr, &s.root_pem, Some(&sibling), None).await,
        "a leaf of a sibling intermediate",
    );
    // With a valid token as well, the token decides who calls.
    let by_token = ask_with(s.addr, &s.root_pem, Some(&sibling), Some(&s.token))
        .await
        .expect("the token authenticates");
    assert_eq!(leaf_uris(&by_token), [DEMO]);
}

#[tokio::test]
async fn a_dns_san_spelling_a_spiffe_id_is_no_identity() {
    use meshca_pki::SanEntry;
    let s = sibling_cas().await;
    let dns = client_leaf(&s.a, &[SanEntry::Dns(ZTUNNEL.into())]);
    assert_refused(
        ask_with(s.addr, &s.root_pem, Some(&dns), None).await,
        "a DNS SAN that reads like a SPIFFE ID",
    );
}

#[tokio::test]
async fn a_spiffe_id_of_another_trust_domain_or_two_of_them_are_refused() {
    use meshca_pki::SanEntry;
    let s = sibling_cas().await;
    let foreign = workload_leaf(&s.a, "spiffe://other.domain/ns/istio-system/sa/ztunnel");
    assert_refused(
        ask_with(s.addr, &s.root_pem, Some(&foreign), None).await,
        "a SPIFFE ID of another trust domain",
    );
    let two = client_leaf(
        &s.a,
        &[SanEntry::Uri(ZTUNNEL.into()), SanEntry::Uri(DEMO.into())],
    );
    assert_refused(
        ask_with(s.addr, &s.root_pem, Some(&two), None).await,
        "two SPIFFE IDs",
    );
}

#[tokio::test]
async fn after_the_plugged_ca_is_replaced_leaves_of_the_previous_one_still_authenticate() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let state = tempfile::tempdir().unwrap();
    let cas = tempfile::tempdir().unwrap();
    let plugged = cas.path().join("plugged");
    let old_root = new_ca(&cas.path().join("old-root"), None);
    let old = new_ca(&plugged, Some(&old_root));
    let mut config = standalone(state.path());
    config.ca_dir = Some(plugged.clone());
    config.reload_interval = Duration::from_millis(100);
    let server = Server::build(config).await.unwrap();
    let addr = server.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(server.serve(stop.clone()));
    let before = workload_leaf(&old, DEMO);
    ask_with(addr, old_root.roots_pem(), Some(&before), None)
        .await
        .expect("a leaf of the current CA");

    // A new root and intermediate replace the plugged CA on disk.
    let new_root = new_ca(&cas.path().join("new-root"), None);
    let new = new_ca(&plugged, Some(&new_root));
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let token = local_issuer(state.path(), false)
        .unwrap()
        .mint("default", "demo", "istio-ca", 600, now)
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        // The new CA serves once a token's certificate chains to the new root.
        if let Ok(chain) = ask_with(addr, new_root.roots_pem(), None, Some(&token)).await
            && chain.last().unwrap().trim() == new_root.roots_pem().trim()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the new CA never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let renewed = ask_with(addr, new_root.roots_pem(), Some(&before), None)
        .await
        .expect("a leaf of the replaced CA still authenticates until it expires");
    assert_eq!(leaf_uris(&renewed), [DEMO]);
    let after = workload_leaf(&new, DEMO);
    ask_with(addr, new_root.roots_pem(), Some(&after), None)
        .await
        .expect("a leaf of the new CA");
    stop.cancel();
}

/// A TLS connection to the server offering `h2`, as a gRPC client opens one.
async fn tls_connection(
    addr: SocketAddr,
    root_pem: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    use std::sync::Arc;
    let mut roots = rustls::RootCertStore::empty();
    for root in der(root_pem) {
        roots
            .add(rustls_pki_types::CertificateDer::from(root))
            .unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from("istiod.istio-system.svc").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// An HTTP/2 client connection; the task drives it (abort it to close).
async fn h2_connection(
    addr: SocketAddr,
    root_pem: &str,
) -> std::io::Result<(
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
)> {
    let tls = tls_connection(addr, root_pem).await?;
    let (send, connection) = h2::client::handshake(tls)
        .await
        .map_err(std::io::Error::other)?;
    let task = tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok((send, task))
}

/// HTTP/2 frames by hand, for a client that ignores the server's SETTINGS
/// (the `h2` client queues streams beyond the limit itself).
mod raw_h2 {
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const GOAWAY: u8 = 0x7;
    pub const CONTINUATION: u8 = 0x9;
    pub const END_HEADERS: u8 = 0x4;
    pub const ACK: u8 = 0x1;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const FRAME_SIZE_ERROR: u32 = 0x6;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
        let mut out = vec![len[1], len[2], len[3], kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    /// HPACK: each a literal field without indexing, new name, no Huffman.
    pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.push(0x00);
            for text in [name, value] {
                assert!(text.len() < 127);
                out.push(u8::try_from(text.len()).unwrap());
                out.extend_from_slice(text.as_bytes());
            }
        }
        out
    }

    /// Reads one frame: (type, flags, stream, payload).
    pub async fn read_frame(
        io: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> std::io::Result<(u8, u8, u32, Vec<u8>)> {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 9];
        io.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        io.read_exact(&mut payload).await?;
        Ok((head[3], head[4], stream, payload))
    }
}

#[tokio::test]
async fn one_connection_holds_at_most_100_stalled_streams_and_others_are_still_served() {
    use raw_h2::*;
    use tokio::io::AsyncWriteExt;
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let state = tempfile::tempdir().unwrap();
    let server = Server::build(standalone(state.path())).await.unwrap();
    let addr = server.local_addr().unwrap();
    let root_pem = std::fs::read_to_string(server.started().root_cert).unwrap();
    let _serving = tokio::spawn(server.serve(CancellationToken::new()));

    let mut conn = tls_connection(addr, &root_pem).await.unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    conn.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    // The server's first frame is its SETTINGS.
    let (kind, _, _, settings) = read_frame(&mut conn).await.unwrap();
    assert_eq!(kind, SETTINGS);
    let told = settings
        .chunks(6)
        .find(|s| u16::from_be_bytes([s[0], s[1]]) == MAX_CONCURRENT_STREAMS)
        .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
    conn.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
    // 150 requests whose bodies never come, ignoring what the server said.
    let path = "/istio.v1.auth.IstioCertificateService/CreateCertificate";
    let authority = addr.to_string();
    let block = header_block(&[
        (":method", "POST"),
        (":scheme", "https"),
        (":path", path),
        (":authority", &authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]);
    for i in 0..150u32 {
        conn.write_all(&frame(HEADERS, END_HEADERS, 2 * i + 1, &block))
            .await
            .unwrap();
    }
    conn.flush().await.unwrap();
    // Count the streams the server refuses while holding the others.
    let mut refused = std::collections::BTreeSet::new();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        while let Ok((kind, _, stream, payload)) = read_frame(&mut conn).await {
            if kind == RST_STREAM && payload[..] == REFUSED_STREAM.to_be_bytes() {
                refused.insert(stream);
            }
        }
    })
    .await;

    // Meanwhile a client on another connection is served at once.
    let token = local_token(state.path());
    let served = tokio::time::timeout(Duration::from_secs(1), ask(addr, &root_pem, &token)).await;
    drop(conn);

    assert_eq!(told, Some(100), "SETTINGS_MAX_CONCURRENT_STREAMS");
    assert_eq!(
        refused.len(),
        50,
        "streams beyond 100 refused, the first 100 held"
    );
    assert!(refused.iter().all(|s| *s > 2 * 100), "{refused:?}");
    served
        .expect("served within 1 s during the flood")
        .expect("a certificate");
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused_until_one_closes() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let state = tempfile::tempdir().unwrap();
    let mut config = standalone(state.path());
    config.limits.max_connections = 5;
    let server = Server::build(config).await.unwrap();
    let addr = server.local_addr().unwrap();
    let root_pem = std::fs::read_to_string(server.started().root_cert).unwrap();
    let _serving = tokio::spawn(server.serve(CancellationToken::new()));

    let mut connections = Vec::new();
    for i in 0..5 {
        let connection = h2_connection(addr, &root_pem)
            .await
            .unwrap_or_else(|e| panic!("connection {i} within the limit: {e}"));
        connections.push(connection);
    }
    let refused = h2_connection(addr, &root_pem).await;
    assert!(refused.is_err(), "the 6th connection is refused");

    // Closing one frees its slot.
    let (send, task) = connections.pop().unwrap();
    drop(send);
    task.abort();
    let again = tokio::time::timeout(Duration::from_secs(2), async {
        loop {
            if let Ok(connection) = h2_connection(addr, &root_pem).await {
                return connection;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(again.is_ok(), "a connection is accepted once one closed");
}

/// A token of the server's local issuer for default/demo.
fn local_token(state: &Path) -> String {
    local_issuer(state, false)
        .unwrap()
        .mint(
            "default",
            "demo",
            "istio-ca",
            600,
            time::OffsetDateTime::now_utc().unix_timestamp(),
        )
        .unwrap()
}

/// Serves `config` (its state in `state`) until the test ends: the address,
/// the root (PEM) and a token of the local issuer.
async fn serving(config: ServerConfig, state: &Path) -> (SocketAddr, String, String) {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let server = Server::build(config).await.unwrap();
    let addr = server.local_addr().unwrap();
    let root_pem = std::fs::read_to_string(server.started().root_cert).unwrap();
    tokio::spawn(server.serve(CancellationToken::new()));
    (addr, root_pem, local_token(state))
}

/// Reads until the server closes the connection; how long that took.
async fn closed_within(
    io: &mut (impl tokio::io::AsyncRead + Unpin),
    limit: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(limit, async {
        while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
    })
    .await
    .ok()
    .map(|()| started.elapsed())
}

#[tokio::test]
async fn stalled_tls_handshakes_are_closed_after_the_timeout_and_free_their_slots() {
    use tokio::io::AsyncWriteExt;
    let state = tempfile::tempdir().unwrap();
    let mut config = standalone(state.path());
    config.limits.max_connections = 3;
    config.limits.tls_handshake_timeout = Duration::from_millis(800);
    let (addr, root_pem, token) = serving(config, state.path()).await;

    // A slowloris: a handshake record announcing 512 bytes, one of them sent.
    let mut partial = tokio::net::TcpStream::connect(addr).await.unwrap();
    partial
        .write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .await
        .unwrap();
    // A client that completes TLS and then sends nothing (no HTTP/2 preface).
    let mut silent = tls_connection(addr, &root_pem).await.unwrap();

    // Both hold a slot; the third serves a client at once.
    let served = tokio::time::timeout(Duration::from_secs(2), ask(addr, &root_pem, &token)).await;
    served
        .expect("served within 2 s beside two stalled handshakes")
        .expect("a certificate");

    // Each is closed once the handshake timeout has passed, not before.
    let limit = Duration::from_secs(5);
    let partial_closed = closed_within(&mut partial, limit).await;
    let silent_closed = closed_within(&mut silent, limit).await;
    for (what, closed) in [
        ("partial ClientHello", partial_closed),
        ("silent TLS", silent_closed),
    ] {
        let closed = closed.unwrap_or_else(|| panic!("{what}: still open after {limit:?}"));
        assert!(
            closed < Duration::from_secs(3),
            "{what}: closed after {closed:?}, the timeout is 800 ms"
        );
    }
    assert!(
        partial_closed.unwrap() + silent_closed.unwrap() >= Duration::from_millis(400),
        "closed before the timeout: {partial_closed:?} {silent_closed:?}"
    );

    // Their slots are free again: three connections at once.
    let mut connections = Vec::new();
    for i in 0..3 {
        let connection = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                if let Ok(c) = h2_connection(addr, &root_pem).await {
                    return c;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("connection {i}: the stalled handshakes' slots were not freed"));
        connections.push(connection);
    }
}

#[tokio::test]
async fn an_oversized_message_is_refused_and_the_connection_keeps_serving() {
    let state = tempfile::tempdir().unwrap();
    let (addr, root_pem, token) = serving(standalone(state.path()), state.path()).await;

    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&root_pem))
                .domain_name("istiod.istio-system.svc"),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = IstioCertificateServiceClient::new(channel);
    let request = |csr: String| {
        let mut r = tonic::Request::new(IstioCertificateRequest::from_agent(csr, 3600, ""));
        r.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        r
    };
    // 1 MiB against the 64 KiB limit.
    let status = client
        .create_certificate(request("A".repeat(1 << 20)))
        .await
        .expect_err("a 1 MiB message");
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");

    // The same connection goes on serving.
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let csr = build_csr(&key, cert::EMPTY_NAME, &[]).unwrap();
    let chain = client
        .create_certificate(request(csr))
        .await
        .expect("a certificate on the same connection");
    assert_eq!(chain.into_inner().cert_chain.len(), 2);
}

#[tokio::test]
async fn garbage_and_oversized_frames_get_the_connection_closed_and_others_are_served() {
    use raw_h2::*;
    use tokio::io::AsyncWriteExt;
    let state = tempfile::tempdir().unwrap();
    let (addr, root_pem, token) = serving(standalone(state.path()), state.path()).await;
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let limit = Duration::from_secs(3);

    // Garbage instead of a ClientHello.
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = tcp.write_all(&garbage).await;
    assert!(
        closed_within(&mut tcp, limit).await.is_some(),
        "garbage before TLS: still open after {limit:?}"
    );

    // Garbage instead of the HTTP/2 preface.
    let mut tls = tls_connection(addr, &root_pem).await.unwrap();
    let _ = tls.write_all(&garbage).await;
    assert!(
        closed_within(&mut tls, limit).await.is_some(),
        "garbage after TLS: still open after {limit:?}"
    );

    // A header list over SETTINGS_MAX_HEADER_LIST_SIZE (16 KiB), in HEADERS
    // and CONTINUATION: the stream is refused, the connection stays.
    let mut tls = tls_connection(addr, &root_pem).await.unwrap();
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tls.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    let authority = addr.to_string();
    let value = "v".repeat(100);
    let names: Vec<String> = (0..160).map(|i| format!("x-big-{i}")).collect();
    let mut fields = vec![
        (":method", "POST"),
        (":scheme", "https"),
        (
            ":path",
            "/istio.v1.auth.IstioCertificateService/CreateCertificate",
        ),
        (":authority", authority.as_str()),
        ("content-type", "application/grpc"),
    ];
    fields.extend(names.iter().map(|n| (n.as_str(), value.as_str())));
    let block = header_block(&fields);
    let (head, rest) = block.split_at(16_000);
    tls.write_all(&frame(HEADERS, 0, 1, head)).await.unwrap();
    tls.write_all(&frame(CONTINUATION, END_HEADERS, 1, rest))
        .await
        .unwrap();
    let refused = tokio::time::timeout(limit, async {
        while let Ok((kind, _, stream, _)) = read_frame(&mut tls).await {
            if kind == RST_STREAM && stream == 1 {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        refused,
        Ok(true),
        "RST_STREAM for {} header bytes",
        block.len()
    );

    // A DATA frame announcing 16 MiB, over SETTINGS_MAX_FRAME_SIZE (16 KiB):
    // GOAWAY FRAME_SIZE_ERROR, then the connection closes.
    let mut tls = tls_connection(addr, &root_pem).await.unwrap();
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    tls.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    let mut big = frame(0x0, 0, 1, &[0u8; 1024]);
    big[..3].copy_from_slice(&[0xff, 0xff, 0xff]);
    let _ = tls.write_all(&big).await;
    let goaway = tokio::time::timeout(limit, async {
        while let Ok((kind, _, _, payload)) = read_frame(&mut tls).await {
            if kind == GOAWAY && payload.len() >= 8 {
                return Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
            }
        }
        None
    })
    .await;
    assert_eq!(
        goaway,
        Ok(Some(FRAME_SIZE_ERROR)),
        "GOAWAY with FRAME_SIZE_ERROR"
    );
    assert!(
        closed_within(&mut tls, limit).await.is_some(),
        "oversized frame: still open"
    );

    // The server goes on serving.
    ask(addr, &root_pem, &token)
        .await
        .expect("a certificate after the floods");
}
