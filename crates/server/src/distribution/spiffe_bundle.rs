//! The trust domain's SPIFFE bundle endpoint (SPIFFE Federation, profile
//! `https_web`): the roots workloads trust, as the JWK Set of the SPIFFE
//! Trust Domain and Bundle specification, over HTTPS with a configured
//! (web PKI) serving certificate. Another trust domain (SPIRE, go-spiffe,
//! Istio with federation) polls it to trust meshca's SVIDs.
//!
//! The document: one `x509-svid` JWK per root, with the root in `x5c` and
//! its public key in the JWK's own parameters, `spiffe_sequence` (grows on
//! every root change) and `spiffe_refresh_hint` (seconds).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use meshca_kube::CancellationToken;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use x509_parser::oid_registry as oids;
use x509_parser::public_key::PublicKey;

/// Where and how the bundle endpoint serves.
#[derive(Debug, Clone)]
pub struct SpiffeBundleConfig {
    pub listen: SocketAddr,
    /// The serving certificate chain (PEM) and its key: a certificate the
    /// consumers' web PKI roots trust, for the endpoint's DNS name. Re-read
    /// when the files change (e.g. renewed by cert-manager).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// `spiffe_refresh_hint`: how often consumers should poll.
    pub refresh_hint: Duration,
}

/// One JWK for a root certificate (DER): its public key parameters, `use`
/// `x509-svid` and the certificate itself in `x5c`.
fn x509_svid_jwk(root_der: &[u8]) -> Result<Value> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(root_der).map_err(|e| anyhow::anyhow!("{e}"))?;
    let spki = cert.public_key();
    let b64 = |bytes: &[u8]| URL_SAFE_NO_PAD.encode(bytes);
    let unsigned = |bytes: &[u8]| {
        let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
        b64(&bytes[start..])
    };
    let mut jwk = match spki.parsed().map_err(|e| anyhow::anyhow!("{e}"))? {
        PublicKey::RSA(rsa) => json!({
            "kty": "RSA",
            "n": unsigned(rsa.modulus),
            "e": unsigned(rsa.exponent),
        }),
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .context("EC key without a named curve")?;
            let (crv, size) = if curve == oids::OID_EC_P256 {
                ("P-256", 32)
            } else if curve == oids::OID_NIST_EC_P384 {
                ("P-384", 48)
            } else {
                bail!("curve {curve} has no JWK name");
            };
            let raw = point.data();
            if raw.len() != 1 + 2 * size || raw[0] != 4 {
                bail!("EC point is not uncompressed {crv}");
            }
            json!({
                "kty": "EC",
                "crv": crv,
                "x": b64(&raw[1..=size]),
                "y": b64(&raw[1 + size..]),
            })
        }
        _ => bail!("root key type has no JWK form here (RSA and EC only)"),
    };
    jwk["use"] = "x509-svid".into();
    jwk["x5c"] = json!([STANDARD.encode(root_der)]);
    Ok(jwk)
}

/// The bundle document for these roots (PEM).
pub fn bundle_document(roots_pem: &str, sequence: u64, refresh_hint: Duration) -> Result<String> {
    let keys = meshca_pki::pem::parse_all(roots_pem.as_bytes())?
        .iter()
        .filter(|b| b.label == "CERTIFICATE")
        .map(|b| x509_svid_jwk(&b.der))
        .collect::<Result<Vec<_>>>()?;
    if keys.is_empty() {
        bail!("no root certificate to publish");
    }
    Ok(serde_json::to_string_pretty(&json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": refresh_hint.as_secs().max(1),
    }))?)
}

/// The sequence of the next bundle: above the previous one, and at least the
/// current Unix time, so it also grows across restarts of this process (a
/// consumer never sees it go back for a change it has not seen).
pub fn next_sequence(previous: Option<u64>, now_unix: u64) -> u64 {
    previous.map_or(now_unix, |p| now_unix.max(p + 1))
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The served document, replaced on every root change.
type Document = watch::Receiver<Option<Arc<String>>>;

/// Follows the roots: a new document (and sequence) for every change.
async fn follow_roots(
    mut roots: watch::Receiver<String>,
    tx: watch::Sender<Option<Arc<String>>>,
    refresh_hint: Duration,
) {
    let mut sequence = None;
    loop {
        let pem = roots.borrow_and_update().clone();
        let seq = next_sequence(sequence, now_unix());
        match bundle_document(&pem, seq, refresh_hint) {
            Ok(doc) => {
                sequence = Some(seq);
                tracing::info!(spiffe_sequence = seq, "SPIFFE bundle updated");
                tx.send_replace(Some(Arc::new(doc)));
            }
            // Keep serving the last good bundle.
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "roots not publishable as a SPIFFE bundle")
            }
        }
        if roots.changed().await.is_err() {
            return;
        }
    }
}

async fn bundle(State(document): State<Document>) -> axum::response::Response {
    match document.borrow().clone() {
        Some(doc) => (
            [
                (header::CONTENT_TYPE, "application/json"),
                (header::CACHE_CONTROL, "no-store"),
            ],
            doc.as_str().to_owned(),
        )
            .into_response(),
        None => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "no bundle yet\n",
        )
            .into_response(),
    }
}

fn load_tls(cfg: &SpiffeBundleConfig) -> Result<Arc<rustls::ServerConfig>> {
    let certs = CertificateDer::pem_file_iter(&cfg.cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("reading {}", cfg.cert_file.display()))?;
    if certs.is_empty() {
        bail!("{} holds no certificate", cfg.cert_file.display());
    }
    let key = PrivateKeyDer::from_pem_file(&cfg.key_file)
        .with_context(|| format!("reading the key {}", cfg.key_file.display()))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("the bundle endpoint's serving certificate and key")?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn modified(cfg: &SpiffeBundleConfig) -> Option<(std::time::SystemTime, std::time::SystemTime)> {
    let m = |p: &PathBuf| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(&cfg.cert_file)?, m(&cfg.key_file)?))
}

/// Re-reads the serving certificate when its files change; a broken pair
/// never replaces a working one.
async fn reload_tls(cfg: SpiffeBundleConfig, tx: watch::Sender<Arc<rustls::ServerConfig>>) {
    let mut seen = modified(&cfg);
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let now = modified(&cfg);
        if now == seen {
            continue;
        }
        seen = now;
        match load_tls(&cfg) {
            Ok(config) => {
                tracing::info!("SPIFFE bundle endpoint: serving certificate reloaded");
                tx.send_replace(config);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "SPIFFE bundle endpoint: keeping the previous serving certificate")
            }
        }
    }
}

/// Hands axum connections whose TLS handshake is done; each handshake runs
/// in its own task under a timeout, so a slow client holds up nobody.
struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ended (shutdown): park until axum stops.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_HANDSHAKES: usize = 256;

async fn accept_loop(
    tcp: TcpListener,
    tls: watch::Receiver<Arc<rustls::ServerConfig>>,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "SPIFFE bundle endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // Too many handshakes in flight: drop the newcomer.
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            continue;
        };
        let acceptor = TlsAcceptor::from(tls.borrow().clone());
        let ready = ready.clone();
        tokio::spawn(async move {
            let _permit = permit;
            if let Ok(Ok(conn)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
            {
                let _ = ready.send((conn, peer)).await;
            }
        });
    }
}

/// The bound endpoint, ready to serve.
pub struct Endpoint {
    config: SpiffeBundleConfig,
    tcp: TcpListener,
    tls: Arc<rustls::ServerConfig>,
}

impl Endpoint {
    /// Reads the serving certificate and binds the port: a bad file or a
    /// taken port is an error at startup.
    pub async fn bind(config: SpiffeBundleConfig) -> Result<Endpoint> {
        let tls = load_tls(&config)?;
        let tcp = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding the SPIFFE bundle endpoint {}", config.listen))?;
        Ok(Endpoint { config, tcp, tls })
    }

    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.tcp.local_addr()?)
    }

    /// Serves the bundle of `roots` until `stop`.
    pub async fn serve(self, roots: watch::Receiver<String>, stop: CancellationToken) {
        let Endpoint { config, tcp, tls } = self;
        let local = match tcp.local_addr() {
            Ok(a) => a,
            Err(_) => config.listen,
        };
        let (doc_tx, document) = watch::channel(None);
        let (tls_tx, tls_rx) = watch::channel(tls);
        let (ready_tx, ready) = mpsc::channel(MAX_HANDSHAKES);
        let background = async {
            tokio::join!(
                follow_roots(roots, doc_tx, config.refresh_hint),
                reload_tls(config.clone(), tls_tx),
                accept_loop(tcp, tls_rx, ready_tx),
            )
        };
        let app = Router::new().route("/", get(bundle)).with_state(document);
        let server = axum::serve(TlsListener { local, ready }, app)
            .with_graceful_shutdown(stop.clone().cancelled_owned());
        tracing::info!(listen = %local, "SPIFFE bundle endpoint (https_web) ready");
        tokio::select! {
            _ = background => {}
            result = server => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "SPIFFE bundle endpoint stopped");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshca_pki::profile::{CaCertRequest, self_signed_root};
    use meshca_pki::{KeyType, SigningKey, cert};

    fn root_pem(key_type: KeyType) -> String {
        let key = SigningKey::generate(key_type).unwrap();
        let der = self_signed_root(
            &CaCertRequest {
                subject_der: &cert::organization_name("bundle test"),
                key: &key,
                ttl: Duration::from_secs(3600),
            },
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
        meshca_pki::pem::encode("CERTIFICATE", &der)
    }

    #[test]
    fn every_root_becomes_an_x509_svid_jwk_with_its_key() {
        let pems = format!(
            "{}{}{}",
            root_pem(KeyType::Rsa2048),
            root_pem(KeyType::EcdsaP256),
            root_pem(KeyType::EcdsaP384)
        );
        let doc: Value =
            serde_json::from_str(&bundle_document(&pems, 7, Duration::from_secs(300)).unwrap())
                .unwrap();
        assert_eq!(doc["spiffe_sequence"], 7);
        assert_eq!(doc["spiffe_refresh_hint"], 300);
        let keys = doc["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 3);
        for k in keys {
            assert_eq!(k["use"], "x509-svid");
            assert_eq!(k["x5c"].as_array().unwrap().len(), 1);
        }
        assert_eq!(keys[0]["kty"], "RSA");
        assert_eq!(keys[0]["e"], "AQAB");
        // 2048-bit modulus: 256 bytes, no leading zero.
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(keys[0]["n"].as_str().unwrap())
                .unwrap()
                .len(),
            256
        );
        assert_eq!(
            (keys[1]["kty"].as_str(), keys[1]["crv"].as_str()),
            (Some("EC"), Some("P-256"))
        );
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(keys[1]["x"].as_str().unwrap())
                .unwrap()
                .len(),
            32
        );
        assert_eq!(keys[2]["crv"], "P-384");
        assert_eq!(
            URL_SAFE_NO_PAD
                .decode(keys[2]["y"].as_str().unwrap())
                .unwrap()
                .len(),
            48
        );
        // x5c is the root itself.
        let der = STANDARD
            .decode(keys[1]["x5c"][0].as_str().unwrap())
            .unwrap();
        let block = &meshca_pki::pem::parse_all(pems.as_bytes()).unwrap()[1];
        assert_eq!(der, block.der.to_vec());
    }

    #[test]
    fn no_roots_or_garbage_is_an_error_not_an_empty_bundle() {
        assert!(bundle_document("", 1, Duration::from_secs(1)).is_err());
        let garbage = meshca_pki::pem::encode("CERTIFICATE", b"not a certificate");
        assert!(bundle_document(&garbage, 1, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn the_sequence_only_grows() {
        assert_eq!(next_sequence(None, 1_000), 1_000);
        assert_eq!(next_sequence(Some(1_000), 1_000), 1_001);
        assert_eq!(next_sequence(Some(5_000), 1_000), 5_001);
        assert_eq!(next_sequence(Some(1_000), 2_000), 2_000);
    }
}
