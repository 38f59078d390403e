//! meshca's fuzz harness: one function per fuzz target, shared by the
//! libFuzzer binaries (`fuzz_targets/*.rs`, nightly) and the corpus replay
//! tests (`tests/corpus.rs`, stable). Each function takes arbitrary bytes,
//! drives one of meshca's input paths and asserts what must hold of any
//! answer; it never panics on a refusal, only on a broken invariant (or a
//! panic inside meshca, which is the bug being looked for).
//!
//! Each returns whether the input was accepted all the way (a certificate
//! issued, a bundle loaded, a token verified): the replay tests check that
//! the seeds reach that far.
//!
//! Fixed material (CA, JWT key, a CSR key, the time) comes from
//! `fuzz/fixtures`, written by `examples/seed.rs` together with the seed
//! corpora, so the checked-in seeds stay valid: everything time-dependent
//! is judged at the fixtures' `now`, except the gRPC path, which uses the
//! clock as the server does (its CA lives 30 years).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arbitrary::Unstructured;
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
    CertificateSigningRequestStatus,
};
use k8s_openapi::api::core::v1::Secret;
use meshca_ca_store::{Material, Part};
use meshca_pki::profile::{self, ISTIOD_USAGES};
use meshca_pki::{
    CaBundle, CsrPolicy, KubernetesProfile, SanPolicy, SubjectRule, TrustDomains, WorkloadProfile,
    pem, validate_csr,
};
use meshca_server::auth::jwt::{JwtIssuer, JwtVerifier};
use meshca_server::auth::{Authenticator, ClientCertIssuers, TokenCache};
use meshca_server::backend::local::LocalBackend;
use meshca_server::backend::ra::{Roots, assemble_chain};
use meshca_server::grpc::service::CaService;
use meshca_server::grpc::tls::ConnInfo;
use meshca_server::metrics::Metrics;
use meshca_signer::decide::{Action, SignerPolicy, decide as signer_decide};
use time::OffsetDateTime;

/// Separates the parts of a multi-part input (files of a bundle, keys and
/// token, chain and roots).
pub const SEP: &[u8] = b"\n@@@@\n";
/// The issuer and audience of the fixture tokens.
pub const ISSUER: &str = "meshca-fuzz";
pub const AUDIENCE: &str = "istio-ca";
/// The signer name `decide`'s policies answer to.
pub const SIGNER: &str = "meshca.io/fuzz";
/// The identity the RA chain and the gRPC caller carry.
pub const IDENTITY: &str = "spiffe://cluster.local/ns/default/sa/default";
/// The trust domain of the fixtures.
pub const TRUST_DOMAIN: &str = "cluster.local";

/// `fuzz/fixtures`.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Splits `data` at each [`SEP`].
pub fn split(data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(SEP.len()).position(|w| w == SEP) {
        parts.push(&rest[..at]);
        rest = &rest[at + SEP.len()..];
    }
    parts.push(rest);
    parts
}

/// Joins parts with [`SEP`] (the seeds' layout).
pub fn join(parts: &[&[u8]]) -> Vec<u8> {
    parts.join(SEP)
}

/// The material every target shares, read once per process.
pub struct Fixtures {
    /// The fixtures' time, as a Unix timestamp.
    pub now: i64,
    /// The intermediate CA (cacerts layout: ca-cert, ca-key, cert-chain, root-cert).
    pub ca: CaBundle,
    /// The self-signed root above it.
    pub root: CaBundle,
    pub root_pem: Vec<u8>,
    /// PKCS#8 DER of the P-256 token signing key.
    pub jwt_key: Vec<u8>,
    /// A P-256 CSR (empty subject, URI SAN [`IDENTITY`]).
    pub csr_pem: Vec<u8>,
}

impl Fixtures {
    pub fn now(&self) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(self.now).expect("fixture time")
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run `fuzz/run --seed-only` to write the fixtures)",
            path.display()
        )
    })
}

pub fn fixtures() -> &'static Fixtures {
    static FIXTURES: OnceLock<Fixtures> = OnceLock::new();
    FIXTURES.get_or_init(|| {
        let dir = fixtures_dir();
        let now: i64 = String::from_utf8(read(&dir.join("now")))
            .expect("fixtures/now")
            .trim()
            .parse()
            .expect("fixtures/now");
        let at = OffsetDateTime::from_unix_timestamp(now).expect("fixtures/now");
        let ca = meshca_ca_store::dir::load(&dir.join("ca"), at).expect("fixtures/ca");
        let root = meshca_ca_store::dir::load(&dir.join("root"), at).expect("fixtures/root");
        Fixtures {
            now,
            ca,
            root,
            root_pem: read(&dir.join("root/root-cert.pem")),
            jwt_key: read(&dir.join("jwt-key.der")),
            csr_pem: read(&dir.join("csr.pem")),
        }
    })
}

/// The Kubernetes profiles a validated CSR is checked against: the default
/// (subject copied, one SPIFFE URI), `meshca signer`'s (empty subject), and
/// one that allows every SAN type.
fn kubernetes_profiles() -> [KubernetesProfile; 3] {
    let permissive = SanPolicy {
        min_uris: 0,
        max_uris: 8,
        spiffe_only: false,
        trust_domains: TrustDomains::Any,
        allow_dns: true,
        allow_ip: true,
        allow_email: true,
    };
    [
        KubernetesProfile::default(),
        KubernetesProfile {
            subject: SubjectRule::RequireEmpty,
            ..KubernetesProfile::default()
        },
        KubernetesProfile {
            sans: permissive,
            ..KubernetesProfile::default()
        },
    ]
}

/// Checks a DER certificate that meshca just issued: it parses, names the
/// CA as issuer byte for byte, and carries `spki`.
fn check_issued(der: &[u8], ca: &CaBundle, spki: &[u8]) {
    use x509_parser::prelude::FromDer;
    let (rest, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .expect("an issued certificate must parse");
    assert!(
        rest.is_empty(),
        "trailing bytes after an issued certificate"
    );
    assert_eq!(cert.issuer().as_raw(), ca.subject_der(), "issuer bytes");
    assert_eq!(cert.public_key().raw, spki, "issued key is the CSR's");
}

/// CSR parsing and validation (`validate_csr`, PEM or DER wrapped in PEM)
/// and the profiles that judge a validated CSR: the workload profile and
/// the Kubernetes policy, issuing where they accept.
pub fn csr(data: &[u8]) -> bool {
    let f = fixtures();
    let input = if data.windows(10).any(|w| w == b"-----BEGIN") {
        data.to_vec()
    } else {
        pem::encode("CERTIFICATE REQUEST", data).into_bytes()
    };
    let Ok(v) = validate_csr(&input, &CsrPolicy::default()) else {
        return false;
    };
    let _ = v.subject_text();
    let now = f.now();
    let ids = [IDENTITY.to_owned()];
    let mut issued = false;
    for for_ca in [false, true] {
        if let Ok(der) =
            profile::issue_workload(&WorkloadProfile::default(), &f.ca, &v, &ids, 0, for_ca, now)
        {
            check_issued(&der, &f.ca, &v.spki_der);
            issued = true;
        }
    }
    let usages: Vec<String> = ISTIOD_USAGES.iter().map(|u| (*u).to_owned()).collect();
    for p in kubernetes_profiles() {
        let _ = profile::check_kubernetes_policy(&p, &v, &usages);
        if let Ok(der) = profile::issue_kubernetes(&p, &f.ca, &v, &usages, Some(3600), now) {
            check_issued(&der, &f.ca, &v.spki_der);
        }
    }
    issued
}

/// The CA bundle loader: arbitrary bytes as the files of a `cacerts`
/// directory, of a `kubernetes.io/tls` Secret, of an `istio-ca-secret`, or
/// as parts in memory. Input: a mode byte, then the files joined by [`SEP`]
/// (cert, key, chain, roots; a missing part is an absent file).
pub fn ca_bundle(data: &[u8]) -> bool {
    let f = fixtures();
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let parts = split(rest);
    let part = |i: usize| parts.get(i).copied();
    let now = f.now();
    let named = |name: &str, i: usize| part(i).map(|b| Part::new(name, b));
    let loaded = match mode % 6 {
        // The cacerts layout in memory (what dir::load and the Secret loaders build).
        0 => {
            let (Some(cert), Some(key)) = (named("ca-cert.pem", 0), named("ca-key.pem", 1)) else {
                return false;
            };
            Material {
                cert,
                key,
                chain: named("cert-chain.pem", 2),
                roots: named("root-cert.pem", 3),
            }
            .load(now)
        }
        // A kubernetes.io/tls Secret.
        1 => {
            let mut map = BTreeMap::new();
            for (i, key) in ["tls.crt", "tls.key", "ca.crt"].iter().enumerate() {
                if let Some(b) = part(i) {
                    map.insert((*key).to_owned(), ByteString(b.to_vec()));
                }
            }
            let secret = Secret {
                data: Some(map),
                ..Secret::default()
            };
            meshca_ca_store::secret::load_tls(&secret, now)
        }
        // istio-ca-secret data.
        2 => {
            let mut map = BTreeMap::new();
            for (i, key) in [
                "ca-cert.pem",
                "ca-key.pem",
                "cert-chain.pem",
                "root-cert.pem",
            ]
            .iter()
            .enumerate()
            {
                if let Some(b) = part(i) {
                    map.insert((*key).to_owned(), ByteString(b.to_vec()));
                }
            }
            meshca_ca_store::secret::load_istio(&map, now)
        }
        // A directory on disk, cacerts (3) or tls.* (4) layout.
        m @ (3 | 4) => {
            let names: &[&str] = if m == 3 {
                &[
                    "ca-cert.pem",
                    "ca-key.pem",
                    "cert-chain.pem",
                    "root-cert.pem",
                ]
            } else {
                &["tls.crt", "tls.key", "", "ca.crt"]
            };
            let Ok(dir) = tempfile::tempdir() else {
                return false;
            };
            for (name, bytes) in names.iter().zip(&parts) {
                if !name.is_empty() {
                    std::fs::write(dir.path().join(name), bytes).expect("tempdir write");
                }
            }
            meshca_ca_store::dir::load(dir.path(), now)
        }
        // Parts in memory: CaBundle::from_parts over whatever PEM decodes.
        _ => {
            let certs = |i: usize| {
                part(i)
                    .map(|b| {
                        meshca_pki::bundle::certificates(meshca_pki::Source {
                            name: "p",
                            bytes: b,
                        })
                    })
                    .transpose()
            };
            let (Ok(Some(mut cert)), Ok(chain), Ok(roots), Some(Ok(key))) = (
                certs(0),
                certs(2),
                certs(3),
                part(1).map(meshca_pki::SigningKey::from_pem),
            ) else {
                return false;
            };
            if cert.is_empty() {
                return false;
            }
            let signing = cert.remove(0);
            CaBundle::from_parts(
                key,
                signing,
                chain.unwrap_or_default(),
                roots.unwrap_or_default(),
                now,
            )
            .map_err(Into::into)
        }
    };
    if let Ok(bundle) = loaded {
        assert!(!bundle.roots_der().is_empty(), "a bundle without roots");
        let _ = bundle.cert_chain_pem();
        let _ = bundle.chain_after_leaf();
        let _ = bundle.roots_not_after();
        let _ = meshca_ca_store::secret::istio_data(&bundle);
        return true;
    }
    false
}

fn fixed_verifier() -> &'static JwtVerifier {
    static VERIFIER: OnceLock<JwtVerifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        let issuer = JwtIssuer::from_pkcs8(&fixtures().jwt_key, ISSUER).expect("fixtures/jwt-key");
        let pem = issuer.public_key_pem();
        let jwks = std::fs::read(fixtures_dir().join("jwks.json")).expect("fixtures/jwks.json");
        JwtVerifier::from_sources(
            &[(pem.as_bytes(), ISSUER), (&jwks, "jwks-issuer")],
            &[AUDIENCE.to_owned()],
        )
        .expect("fixture verifier")
    })
}

/// JWT/JWKS verification. One part: a token checked against the fixture
/// keys (PEM and JWKS). Two or more: a key file (PEM or JWKS), a token, the
/// issuer and comma-separated audiences.
pub fn jwt(data: &[u8]) -> bool {
    let f = fixtures();
    let parts = split(data);
    let text = |i: usize| {
        parts
            .get(i)
            .map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let token = text(if parts.len() == 1 { 0 } else { 1 }).unwrap_or_default();
    let _ = meshca_server::auth::jwt::unverified_expiry(&token);
    if parts.len() == 1 {
        let Ok((ns, sa)) = fixed_verifier().verify(&token, f.now) else {
            return false;
        };
        assert!(meshca_pki::san::check_workload_account(&ns, &sa).is_ok());
        return true;
    }
    let issuer = text(2).unwrap_or_else(|| ISSUER.to_owned());
    let audiences: Vec<String> = text(3)
        .map(|a| a.split(',').map(str::to_owned).collect())
        .unwrap_or_else(|| vec![AUDIENCE.to_owned()]);
    if let Ok(verifier) = JwtVerifier::new(parts[0], &issuer, &audiences)
        && let Ok((ns, sa)) = verifier.verify(&token, f.now)
    {
        assert!(meshca_pki::san::check_workload_account(&ns, &sa).is_ok());
        return true;
    }
    false
}

struct Grpc {
    rt: tokio::runtime::Runtime,
    service: CaService,
    token: String,
    client_cert: Arc<Vec<u8>>,
    ca: tokio::sync::watch::Sender<Option<Arc<CaBundle>>>,
}

fn grpc_service() -> &'static Grpc {
    static GRPC: OnceLock<Grpc> = OnceLock::new();
    GRPC.get_or_init(|| {
        let f = fixtures();
        let dir = fixtures_dir().join("ca");
        let now = OffsetDateTime::now_utc();
        let bundle = Arc::new(meshca_ca_store::dir::load(&dir, now).expect("fixtures/ca"));
        let (tx, rx) = tokio::sync::watch::channel(Some(bundle.clone()));
        let issuer = JwtIssuer::from_pkcs8(&f.jwt_key, ISSUER).expect("fixtures/jwt-key");
        let token = issuer
            .mint(
                "default",
                "default",
                AUDIENCE,
                24 * 3600,
                now.unix_timestamp(),
            )
            .expect("token");
        let jwt = JwtVerifier::new(
            issuer.public_key_pem().as_bytes(),
            ISSUER,
            &[AUDIENCE.to_owned()],
        )
        .expect("verifier");
        let workload = WorkloadProfile::default();
        // A client certificate this CA issued, for the client-certificate path.
        let csr = validate_csr(&f.csr_pem, &CsrPolicy::default()).expect("fixtures/csr.pem");
        let client_cert = profile::issue_workload(
            &workload,
            &bundle,
            &csr,
            &["spiffe://cluster.local/ns/fuzz/sa/client".to_owned()],
            0,
            false,
            now,
        )
        .expect("client certificate");
        let auth = Authenticator {
            trust_domain: TRUST_DOMAIN.into(),
            client_certs: Arc::new(ClientCertIssuers::new(Some(&bundle), workload.max_ttl)),
            cluster_id: "Kubernetes".into(),
            cluster_aliases: vec![],
            token_review: None,
            jwt: Some(jwt),
            // No cache: every request proves its token.
            cache: TokenCache::new(Duration::ZERO, 0),
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let service = CaService {
            backend: Arc::new(LocalBackend::new(rx, workload)),
            auth,
            metrics: Arc::new(Metrics::new(&mut registry)),
            impersonation: None,
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        Grpc {
            rt,
            service,
            token,
            client_cert: Arc::new(client_cert),
            ca: tx,
        }
    })
}

/// The gRPC request path, bytes to decision: a flags byte, then the
/// protobuf `IstioCertificateRequest`, decoded as tonic would, passed to
/// `CaService::create_certificate` in-process with the fixture token
/// (flags bit 0 clear), the fixture client certificate (bit 1) and a
/// foreign `clusterid` (bit 2); the local CA signs.
pub fn grpc(data: &[u8]) -> bool {
    use meshca_proto::istio_certificate_service_server::IstioCertificateService;
    use prost::Message;
    let Some((&flags, body)) = data.split_first() else {
        return false;
    };
    let Ok(body) = meshca_proto::IstioCertificateRequest::decode(body) else {
        return false;
    };
    let g = grpc_service();
    let mut request = tonic::Request::new(body);
    if flags & 1 == 0 {
        let value = format!("Bearer {}", g.token).parse().expect("header");
        request.metadata_mut().insert("authorization", value);
    }
    if flags & 2 != 0 {
        request.extensions_mut().insert(ConnInfo {
            remote: None,
            peer_cert: Some(g.client_cert.clone()),
        });
    }
    if flags & 4 != 0 {
        request
            .metadata_mut()
            .insert("clusterid", "elsewhere".parse().expect("header"));
    }
    let answer = g.rt.block_on(g.service.create_certificate(request));
    if let Ok(response) = answer {
        let chain = response.into_inner().cert_chain;
        assert!(chain.len() >= 2, "a chain is the leaf and the roots");
        let leaf = pem::parse_all(chain[0].as_bytes()).expect("leaf PEM");
        let bundle = g.service_bundle();
        check_issued_leaf(&leaf[0].der, &bundle);
        return true;
    }
    false
}

impl Grpc {
    fn service_bundle(&self) -> Arc<CaBundle> {
        self.ca.borrow().clone().expect("CA loaded")
    }
}

fn check_issued_leaf(der: &[u8], ca: &CaBundle) {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .expect("an issued certificate must parse");
    assert_eq!(cert.issuer().as_raw(), ca.subject_der(), "issuer bytes");
}

/// The signer's pure `decide` over a CertificateSigningRequest object. Four
/// knob bytes (policy, CA, clock), then either a JSON object (starts with
/// `{`) or bytes that `arbitrary` shapes into one.
pub fn decide(data: &[u8]) -> bool {
    let f = fixtures();
    if data.len() < 4 {
        return false;
    }
    let (knobs, rest) = data.split_at(4);
    let mut policy = SignerPolicy::istiod(SIGNER);
    match knobs[0] % 4 {
        0 => {}
        1 => policy.profile = KubernetesProfile::default(),
        2 => {
            policy.profile = kubernetes_profiles()[2].clone();
            policy.include_root = true;
        }
        _ => policy.csr_policy.allow_rsa = false,
    }
    let ca = match knobs[1] % 3 {
        0 => Some(&f.ca),
        1 => Some(&f.root),
        _ => None,
    };
    let now = match knobs[2] % 3 {
        0 => f.now(),
        // Past the CA's life, and before it.
        1 => f.now() + Duration::from_secs(40 * 365 * 24 * 3600),
        _ => f.now() - Duration::from_secs(3600),
    };
    let object = if rest.first() == Some(&b'{') {
        match serde_json::from_slice::<CertificateSigningRequest>(rest) {
            Ok(o) => o,
            Err(_) => return false,
        }
    } else {
        match arbitrary_csr(rest, knobs[3]) {
            Ok(o) => o,
            Err(_) => return false,
        }
    };
    let action = signer_decide(&object, &policy, ca, now);
    if let Action::Issue { certificate } = action {
        let ca = ca.expect("issued without a CA");
        let blocks = pem::parse_all(certificate.as_bytes()).expect("issued PEM");
        let v = validate_csr(&object.spec.request.0, &policy.csr_policy)
            .expect("issued for a CSR that does not validate");
        check_issued(&blocks[0].der, ca, &v.spki_der);
        return true;
    }
    false
}

fn arbitrary_csr(bytes: &[u8], knob: u8) -> arbitrary::Result<CertificateSigningRequest> {
    let f = fixtures();
    let mut u = Unstructured::new(bytes);
    let pick = |u: &mut Unstructured<'_>, known: &[&str]| -> arbitrary::Result<String> {
        let i = u.int_in_range(0..=known.len())?;
        Ok(match known.get(i) {
            Some(s) => (*s).to_owned(),
            None => u.arbitrary()?,
        })
    };
    let signer_name = pick(&mut u, &[SIGNER, "kubernetes.io/kube-apiserver-client"])?;
    let mut conditions = Vec::new();
    for _ in 0..u.int_in_range(0..=3)? {
        conditions.push(CertificateSigningRequestCondition {
            type_: pick(&mut u, &["Approved", "Denied", "Failed"])?,
            status: pick(&mut u, &["True", "False", "Unknown"])?,
            ..Default::default()
        });
    }
    let certificate: Option<Vec<u8>> = u.arbitrary()?;
    let usages = if u.arbitrary::<bool>()? {
        let mut usages = Vec::new();
        for _ in 0..u.int_in_range(0..=5)? {
            usages.push(pick(
                &mut u,
                &[
                    "digital signature",
                    "key encipherment",
                    "server auth",
                    "client auth",
                    "cert sign",
                    "any",
                ],
            )?);
        }
        Some(usages)
    } else {
        None
    };
    let expiration_seconds: Option<i32> = u.arbitrary()?;
    // The fixture CSR (to reach the profile), or the rest as PEM or DER.
    let request = match knob % 3 {
        0 => f.csr_pem.clone(),
        1 => u.take_rest().to_vec(),
        _ => pem::encode("CERTIFICATE REQUEST", u.take_rest()).into_bytes(),
    };
    Ok(CertificateSigningRequest {
        spec: CertificateSigningRequestSpec {
            signer_name,
            request: ByteString(request),
            usages,
            expiration_seconds,
            ..Default::default()
        },
        status: Some(CertificateSigningRequestStatus {
            certificate: certificate.map(ByteString),
            conditions: Some(conditions),
        }),
        ..Default::default()
    })
}

/// The RA chain check: what a signer wrote into `status.certificate`,
/// checked against roots, the CSR's key and the caller's identity. Parts:
/// the issued PEM, then optionally the roots PEM, a CSR PEM and
/// comma-separated identities (fixtures otherwise).
pub fn ra_chain(data: &[u8]) -> bool {
    let f = fixtures();
    let parts = split(data);
    let roots_pem = parts.get(1).copied().unwrap_or(f.root_pem.as_slice());
    let Ok(roots) = Roots::parse("roots", roots_pem) else {
        return false;
    };
    let csr_pem = parts.get(2).copied().unwrap_or(f.csr_pem.as_slice());
    let Ok(csr) = validate_csr(csr_pem, &CsrPolicy::default()) else {
        return false;
    };
    let identities: Vec<String> = match parts.get(3) {
        Some(ids) => String::from_utf8_lossy(ids)
            .split(',')
            .map(str::to_owned)
            .collect(),
        None => vec![IDENTITY.to_owned()],
    };
    let now = rustls_pki_types::UnixTime::since_unix_epoch(Duration::from_secs(f.now as u64));
    if let Ok(chain) = assemble_chain(parts[0], &roots, &csr, &identities, now) {
        assert!(chain.len() >= 2, "leaf and roots at least");
        assert_eq!(chain.last().map(String::as_str), Some(roots.pem()));
        return true;
    }
    false
}

/// The objects a `pcr` input carries: the request and what the signer read
/// of its pod, account and node (each may be absent).
#[derive(serde::Deserialize, serde::Serialize, Default)]
pub struct PcrInput {
    pub pcr: Option<k8s_openapi::api::certificates::v1beta1::PodCertificateRequest>,
    pub pod: Option<k8s_openapi::api::core::v1::Pod>,
    pub sa: Option<k8s_openapi::api::core::v1::ServiceAccount>,
    pub node: Option<k8s_openapi::api::core::v1::Node>,
}

/// The signer's pure PodCertificateRequest decision. Four knob bytes
/// (policy, CA, clock, roots published), then a JSON [`PcrInput`]. An
/// issued certificate must name the CA, carry the request's key and the
/// SPIFFE ID of the account the pod really runs as, and every fact the
/// request names must have matched; its times must be inside the API's
/// and the policy's bounds.
pub fn pcr(data: &[u8]) -> bool {
    use meshca_signer::pcr::{Facts, PcrAction, decide as pcr_decide};
    let f = fixtures();
    if data.len() < 4 {
        return false;
    }
    let (knobs, rest) = data.split_at(4);
    let Ok(input) = serde_json::from_slice::<PcrInput>(rest) else {
        return false;
    };
    let Some(request) = input.pcr.as_ref() else {
        return false;
    };
    let mut policy = meshca_signer::PodCertPolicy::new(TRUST_DOMAIN);
    match knobs[0] % 4 {
        0 => {}
        1 => {
            policy.keys.allow_rsa = false;
            policy.keys.allow_ed25519 = false;
        }
        2 => policy.namespaces = vec!["default".into()],
        _ => policy.max_ttl = Duration::from_secs(3600),
    }
    let ca = match knobs[1] % 3 {
        0 => Some(&f.ca),
        1 => Some(&f.root),
        _ => None,
    };
    let now = match knobs[2] % 3 {
        0 => f.now(),
        1 => f.now() + Duration::from_secs(40 * 365 * 24 * 3600),
        _ => f.now() - Duration::from_secs(3600),
    };
    let roots_published = knobs[3] % 2 == 0;
    let facts = Facts {
        pod: input.pod.as_ref(),
        service_account: input.sa.as_ref(),
        node: input.node.as_ref(),
    };
    let action = pcr_decide(request, SIGNER, &policy, ca, facts, roots_published, now);
    let PcrAction::Issue {
        chain,
        not_before,
        not_after,
        begin_refresh_at,
    } = action
    else {
        return false;
    };
    assert!(roots_published, "issued before the roots were published");
    let ca = ca.expect("issued without a CA");
    let spec = &request.spec;
    let pod = input.pod.as_ref().expect("issued without reading the pod");
    let sa = input.sa.as_ref().expect("issued without reading the account");
    let node = input.node.as_ref().expect("issued without reading the node");
    assert_eq!(pod.metadata.uid.as_deref(), Some(spec.pod_uid.as_str()));
    let pod_spec = pod.spec.as_ref().expect("issued for a pod without spec");
    assert_eq!(pod_spec.node_name.as_deref(), Some(spec.node_name.as_str()));
    assert_eq!(
        pod_spec.service_account_name.as_deref(),
        Some(spec.service_account_name.as_str())
    );
    assert_eq!(sa.metadata.uid.as_deref(), Some(spec.service_account_uid.as_str()));
    assert_eq!(node.metadata.uid.as_deref(), Some(spec.node_uid.as_str()));
    assert_eq!(sa.metadata.name.as_deref(), Some(spec.service_account_name.as_str()));
    assert_eq!(node.metadata.name.as_deref(), Some(spec.node_name.as_str()));
    let blocks = pem::parse_all(chain.as_bytes()).expect("issued PEM");
    check_issued(&blocks[0].der, ca, &spec.pkix_public_key.0);
    let namespace = request.metadata.namespace.as_deref().unwrap_or_default();
    let expected = format!(
        "spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{}",
        spec.service_account_name
    );
    assert_eq!(uri_sans(&blocks[0].der), [expected], "identity");
    let lifetime = (not_after - not_before).whole_seconds();
    let asked = i64::from(spec.max_expiration_seconds.unwrap_or(86400));
    assert!(lifetime >= 3600, "shorter than the API's minimum: {lifetime}");
    assert!(lifetime <= asked, "longer than asked: {lifetime} > {asked}");
    assert!(lifetime as u64 <= policy.max_ttl.as_secs(), "longer than the policy");
    assert!(begin_refresh_at >= not_before + Duration::from_secs(600));
    assert!(begin_refresh_at <= not_after - Duration::from_secs(600));
    true
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).expect("parses");
    cert.subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}
