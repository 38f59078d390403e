//! TLS for :15012: a serving certificate issued by meshca's own CA and
//! swapped in place before it expires, optional client certificates verified
//! against the roots of the accepted signing certificates (the current CA and
//! those it rotated from; [`ClientCertIssuers`] then checks which one signed
//! the leaf), and connection info (the peer certificate) handed to the gRPC
//! handlers.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, Result};
use meshca_pki::csr::build_csr;
use meshca_pki::{CaBundle, CertOptions, KeyType, LocalCa, SanEntry, SigningKey, cert, pem};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::WebPkiClientVerifier;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::Limits;
use crate::auth::ClientCertIssuers;

/// Names the serving certificate carries.
#[derive(Debug, Clone)]
pub struct ServingNames {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub ttl: Duration,
}

/// The TLS configuration in force and its certificate's expiry; replaced
/// whole on renewal or CA change.
pub struct TlsState {
    config: watch::Sender<(Arc<ServerConfig>, OffsetDateTime)>,
    client_certs: Arc<ClientCertIssuers>,
}

impl TlsState {
    pub fn new(
        ca: &LocalCa,
        names: &ServingNames,
        client_certs: Arc<ClientCertIssuers>,
    ) -> Result<Self> {
        let config = watch::Sender::new(build(ca, names, &client_certs)?);
        Ok(TlsState {
            config,
            client_certs,
        })
    }

    /// Re-issues the serving certificate (and refreshes the client roots
    /// from the accepted signing certificates).
    pub fn renew(&self, ca: &LocalCa, names: &ServingNames) -> Result<()> {
        self.config
            .send_replace(build(ca, names, &self.client_certs)?);
        Ok(())
    }

    /// Renew once half of the serving certificate's life has passed.
    pub fn needs_renewal(&self, names: &ServingNames) -> bool {
        let not_after = self.config.borrow().1;
        OffsetDateTime::now_utc() + names.ttl / 2 >= not_after
    }

    fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(self.config.borrow().0.clone())
    }
}

fn build(
    ca: &LocalCa,
    names: &ServingNames,
    client_certs: &ClientCertIssuers,
) -> Result<(Arc<ServerConfig>, OffsetDateTime)> {
    let bundle: Arc<CaBundle> = ca.bundle().context("CA not ready")?;
    let key = SigningKey::generate(KeyType::EcdsaP256)?;
    let identities: Vec<String> = names
        .dns
        .iter()
        .cloned()
        .chain(names.ips.iter().map(IpAddr::to_string))
        .collect();
    let sans: Vec<SanEntry> = identities
        .iter()
        .map(|i| SanEntry::from_identity(i))
        .collect();
    let csr = build_csr(&key, cert::EMPTY_NAME, &sans).map_err(anyhow::Error::msg)?;
    let options = CertOptions {
        subject_ids: &identities,
        ttl_seconds: i64::try_from(names.ttl.as_secs()).unwrap_or(i64::MAX),
        for_ca: false,
    };
    let chain = ca.sign_with_cert_chain(csr.as_bytes(), &options)?;
    // Serve leaf and intermediates; clients hold the root.
    let mut certs = Vec::new();
    for element in &chain[..chain.len() - 1] {
        for block in pem::parse_all(element.as_bytes())? {
            certs.push(CertificateDer::from(block.der.to_vec()));
        }
    }
    let (_, leaf) =
        x509_parser::parse_x509_certificate(&certs[0]).map_err(|e| anyhow::anyhow!("{e}"))?;
    let not_after = leaf.validity().not_after.to_datetime();

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let mut client_roots = client_certs.roots(OffsetDateTime::now_utc());
    if client_roots.is_empty() {
        client_roots = bundle.roots_der().to_vec();
    }
    for root in &client_roots {
        roots
            .add(CertificateDer::from(root.clone()))
            .context("adding a CA root to the client verifier")?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .context("client certificate verifier")?;
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.to_pkcs8_der()?.to_vec()));
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key_der)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(config), not_after))
}

/// What the gRPC handler learns about the connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// DER of the client's leaf certificate, its chain verified to a root
    /// of an accepted signing certificate.
    pub peer_cert: Option<Arc<Vec<u8>>>,
}

/// A TLS connection that tonic can serve; holds its place under the
/// connection limit until tonic drops it.
pub struct TlsConn {
    stream: TlsStream<TcpStream>,
    /// The first bytes the client sent (read within the handshake timeout),
    /// handed to hyper before the rest of the stream.
    first: Vec<u8>,
    info: ConnInfo,
    _slot: OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.first.is_empty() {
            let n = self.first.len().min(buf.remaining());
            buf.put_slice(&self.first[..n]);
            self.first.drain(..n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, what an HTTP/2 client sends first.
const HTTP2_PREFACE_LEN: usize = 24;

/// Accepts TCP connections and completes TLS handshakes off the accept loop;
/// a slow or broken client never holds up others. At most `max_connections`
/// are open at once (handshakes included): more are closed at accept
/// (reason `connection_limit`), and a slot frees when a connection closes.
/// A handshake not done within `tls_handshake_timeout` is closed, so a
/// slowloris holds a slot no longer than that.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<TlsState>,
    limits: &Limits,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
    let (max_connections, handshake_timeout) =
        (limits.max_connections, limits.tls_handshake_timeout);
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                // Dropping the socket closes it: no handshake, no memory.
                tracing::debug!(%remote, reason = "connection_limit", max_connections, "connection refused");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tls.acceptor();
            let tx = tx.clone();
            tokio::spawn(async move {
                // The handshake and the client's first bytes: a client that
                // completes TLS and then says nothing is a slowloris too
                // (hyper waits for the HTTP/2 preface without a bound).
                let handshake = async {
                    let mut stream = acceptor.accept(tcp).await?;
                    let mut first = vec![0; HTTP2_PREFACE_LEN];
                    let n = stream.read(&mut first).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    first.truncate(n);
                    Ok::<_, io::Error>((stream, first))
                };
                match tokio::time::timeout(handshake_timeout, handshake).await {
                    Ok(Ok((stream, first))) => {
                        let peer_cert = stream
                            .get_ref()
                            .1
                            .peer_certificates()
                            .and_then(|certs| certs.first())
                            .map(|c| Arc::new(c.as_ref().to_vec()));
                        let info = ConnInfo {
                            remote: Some(remote),
                            peer_cert,
                        };
                        let _ = tx
                            .send(Ok(TlsConn {
                                stream,
                                first,
                                info,
                                _slot: slot,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
