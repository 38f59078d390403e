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
        limits: Limits::default(),
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
    pub const END_HEADERS: u8 = 0x4;
    pub const ACK: u8 = 0x1;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const REFUSED_STREAM: u32 = 0x7;

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
    let token = local_issuer(state.path(), false)
        .unwrap()
        .mint(
            "default",
            "demo",
            "istio-ca",
            600,
            time::OffsetDateTime::now_utc().unix_timestamp(),
        )
        .unwrap();
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
