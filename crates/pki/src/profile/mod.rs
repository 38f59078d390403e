//! Issuance profiles: what a certificate contains, decided from policy and
//! authenticated identities. Request fields never flow into a certificate
//! except the public key and, where a profile says so, the subject and SANs.

use std::time::Duration;

use time::OffsetDateTime;

use crate::bundle::CaBundle;
use crate::cert::{self, Extensions, TbsFields, ext_key_usage, key_usage};
use crate::csr::{CsrKey, ValidatedCsr};
use crate::error::{Error, PolicyViolation};
use crate::san::{SanEntry, SpiffeId};

mod ca_cert;
pub use ca_cert::{CaCertRequest, intermediate_ca, self_signed_root};

/// istiod's workload certificate rules (istio-ca.md §3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadProfile {
    /// DEFAULT_WORKLOAD_CERT_TTL, applied when the request asks for <= 0.
    pub default_ttl: Duration,
    /// MAX_WORKLOAD_CERT_TTL; a longer request is refused, not clamped.
    pub max_ttl: Duration,
}

impl Default for WorkloadProfile {
    fn default() -> Self {
        WorkloadProfile {
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(90 * 24 * 3600),
        }
    }
}

/// istiod backdates workload certificates by two minutes for clock skew.
const WORKLOAD_BACKDATE: Duration = Duration::from_secs(120);

/// Issues an Istio workload (or, with `for_ca`, CA) certificate for the
/// authenticated `identities`. Returns DER.
pub fn issue_workload(
    profile: &WorkloadProfile,
    bundle: &CaBundle,
    csr: &ValidatedCsr,
    identities: &[String],
    requested_ttl_secs: i64,
    for_ca: bool,
    now: OffsetDateTime,
) -> Result<Vec<u8>, Error> {
    let max = secs(profile.max_ttl);
    if requested_ttl_secs > max {
        return Err(Error::TtlTooLong {
            requested: requested_ttl_secs,
            max,
        });
    }
    let ttl = if requested_ttl_secs <= 0 {
        secs(profile.default_ttl)
    } else {
        requested_ttl_secs
    };
    check_signer_validity(bundle, now)?;
    if identities.is_empty() {
        return Err(Error::CertGeneration(
            "no subject identities to certify".into(),
        ));
    }
    let not_after = (now + Duration::from_secs(ttl as u64)).min(bundle.not_after());
    workload_leaf(
        bundle,
        csr,
        identities,
        for_ca,
        now - WORKLOAD_BACKDATE,
        not_after,
    )
}

/// An Istio workload certificate (the profile of [`issue_workload`]) with
/// the validity window given: PodCertificateRequests need the lifetime
/// (`notAfter - notBefore`) to fit `maxExpirationSeconds` exactly, backdate
/// included; `not_after` is clamped to the CA's.
pub fn issue_workload_window(
    bundle: &CaBundle,
    csr: &ValidatedCsr,
    identities: &[String],
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> Result<Vec<u8>, Error> {
    check_signer_validity(bundle, now)?;
    let not_after = not_after.min(bundle.not_after());
    if identities.is_empty() {
        return Err(Error::CertGeneration(
            "no subject identities to certify".into(),
        ));
    }
    workload_leaf(bundle, csr, identities, false, not_before, not_after)
}

fn workload_leaf(
    bundle: &CaBundle,
    csr: &ValidatedCsr,
    identities: &[String],
    for_ca: bool,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<Vec<u8>, Error> {
    let sans: Vec<SanEntry> = identities
        .iter()
        .map(|id| SanEntry::from_identity(id))
        .collect();

    // Istio: CN only when the CSR had one, and then the first identity.
    // RFC 5280 caps a CN at 64 characters; a longer identity stays SAN-only.
    let subject = match identities.first() {
        Some(first) if csr.has_common_name && first.len() <= 64 => cert::common_name(first),
        _ => cert::EMPTY_NAME.to_vec(),
    };

    let mut extensions = Extensions::default();
    if for_ca {
        extensions
            .key_usage(
                key_usage::KEY_CERT_SIGN | key_usage::CRL_SIGN | key_usage::DIGITAL_SIGNATURE,
            )
            .basic_constraints(true)
            .subject_key_id(&cert::key_identifier(&csr.public_key_bits));
    } else {
        let usage = key_usage::DIGITAL_SIGNATURE | key_usage::KEY_ENCIPHERMENT;
        extensions
            .key_usage(usage_for_key(usage, csr.key))
            .ext_key_usage(&[ext_key_usage::SERVER_AUTH, ext_key_usage::CLIENT_AUTH])
            .basic_constraints(false)
            .subject_key_id(&cert::key_identifier(&csr.public_key_bits));
    }
    extensions.authority_key_id(bundle.key_id());
    extensions
        .subject_alt_names(&sans, true)
        .map_err(Error::CertGeneration)?;

    sign(bundle, &subject, csr, not_before, not_after, extensions)
}

/// Which subject a Kubernetes-signed certificate gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubjectRule {
    /// The CSR's subject, byte for byte (repeated `O=`/`DC=` kept). Only
    /// where no one trusts this CA by subject (e.g. as an apiserver client CA).
    CopyFromCsr,
    /// The CSR's subject must be empty, or only an empty `O=` (Istio's
    /// template); the certificate's subject is empty. `meshca signer`'s
    /// default.
    RequireEmpty,
}

/// Which trust domains SPIFFE URI SANs may name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustDomains {
    Any,
    Only(Vec<String>),
}

/// What SANs a Kubernetes CSR may carry. The default is what istiod sends:
/// exactly one SPIFFE URI SAN in `cluster.local`, nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SanPolicy {
    pub min_uris: usize,
    pub max_uris: usize,
    pub spiffe_only: bool,
    pub trust_domains: TrustDomains,
    pub allow_dns: bool,
    pub allow_ip: bool,
    pub allow_email: bool,
}

impl Default for SanPolicy {
    fn default() -> Self {
        SanPolicy {
            min_uris: 1,
            max_uris: 1,
            spiffe_only: true,
            trust_domains: TrustDomains::Only(vec!["cluster.local".into()]),
            allow_dns: false,
            allow_ip: false,
            allow_email: false,
        }
    }
}

/// A signer's rules for `certificates.k8s.io/v1` CSRs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubernetesProfile {
    /// Used when `spec.expirationSeconds` is absent.
    pub default_ttl: Duration,
    /// Longer requests are shortened to this (kube-controller-manager semantics).
    pub max_ttl: Duration,
    /// `Default`: copy, as kube-controller-manager does; `meshca signer`
    /// sets `RequireEmpty` unless told otherwise.
    pub subject: SubjectRule,
    pub sans: SanPolicy,
    /// Usage strings (`spec.usages` spelling) this signer grants.
    pub allowed_usages: Vec<String>,
}

impl Default for KubernetesProfile {
    fn default() -> Self {
        KubernetesProfile {
            default_ttl: Duration::from_secs(24 * 3600),
            max_ttl: Duration::from_secs(365 * 24 * 3600),
            subject: SubjectRule::CopyFromCsr,
            sans: SanPolicy::default(),
            allowed_usages: ISTIOD_USAGES.iter().map(|u| (*u).to_owned()).collect(),
        }
    }
}

/// The usages istiod puts on every workload CSR.
pub const ISTIOD_USAGES: [&str; 4] = [
    "digital signature",
    "key encipherment",
    "server auth",
    "client auth",
];

/// kube-controller-manager's minimum duration and backdating rules.
const KUBE_MIN_TTL: Duration = Duration::from_secs(600);
const KUBE_BACKDATE: Duration = Duration::from_secs(300);
const KUBE_SHORT_TTL: Duration = Duration::from_secs(8 * 3600);

/// The certificate lifetime kube-controller-manager would grant.
pub fn kubernetes_ttl(profile: &KubernetesProfile, expiration_seconds: Option<i64>) -> Duration {
    match expiration_seconds {
        None => profile.default_ttl.min(profile.max_ttl),
        Some(s) => Duration::from_secs(s.max(0) as u64)
            .clamp(KUBE_MIN_TTL, profile.max_ttl.max(KUBE_MIN_TTL)),
    }
}

/// Checks a Kubernetes CSR against the signer's policy. Pure: the same
/// answer every time, so a controller can decide before it signs.
pub fn check_kubernetes_policy(
    profile: &KubernetesProfile,
    csr: &ValidatedCsr,
    usages: &[String],
) -> Result<(u16, Vec<&'static [u64]>), PolicyViolation> {
    if csr.requests_ca {
        return Err(PolicyViolation::CaRequested);
    }
    if profile.subject == SubjectRule::RequireEmpty && !csr.subject_is_blank {
        return Err(PolicyViolation::SubjectNotEmpty(csr.subject_text()));
    }
    check_sans(&profile.sans, &csr.requested_sans)?;
    let subject_is_empty = profile.subject == SubjectRule::RequireEmpty || csr.subject_is_empty;
    if subject_is_empty && csr.requested_sans.is_empty() {
        return Err(PolicyViolation::NoName);
    }
    let mut ku = 0u16;
    let mut eku = Vec::new();
    for usage in usages {
        let parsed =
            parse_usage(usage).ok_or_else(|| PolicyViolation::UnknownUsage(usage.clone()))?;
        if !profile.allowed_usages.iter().any(|a| a == usage) {
            return Err(PolicyViolation::UsageNotAllowed(usage.clone()));
        }
        match parsed {
            Usage::Key(bit) => ku |= bit,
            Usage::Extended(oid) => eku.push(oid),
        }
    }
    Ok((ku, eku))
}

fn check_sans(policy: &SanPolicy, sans: &[SanEntry]) -> Result<(), PolicyViolation> {
    let mut uris = 0;
    for san in sans {
        match san {
            SanEntry::Uri(uri) => {
                uris += 1;
                match uri.parse::<SpiffeId>() {
                    Ok(id) => {
                        if let TrustDomains::Only(allowed) = &policy.trust_domains
                            && !allowed.iter().any(|td| td == id.trust_domain())
                        {
                            return Err(PolicyViolation::TrustDomain(id.trust_domain().to_owned()));
                        }
                    }
                    Err(_) if policy.spiffe_only => {
                        return Err(PolicyViolation::UriNotSpiffe(uri.clone()));
                    }
                    Err(_) => {}
                }
            }
            SanEntry::Dns(name) if !policy.allow_dns => {
                return Err(PolicyViolation::DnsSan(name.clone()));
            }
            // A wildcard would let one workload answer for every name under
            // it; kube-controller-manager's signers never get one from Istio.
            SanEntry::Dns(name) if name.contains('*') => {
                return Err(PolicyViolation::WildcardDnsSan(name.clone()));
            }
            SanEntry::Ip(ip) if !policy.allow_ip => {
                return Err(PolicyViolation::IpSan(ip.to_string()));
            }
            SanEntry::Email(e) if !policy.allow_email => {
                return Err(PolicyViolation::EmailSan(e.clone()));
            }
            SanEntry::Other(o) => return Err(PolicyViolation::OtherSan(o.clone())),
            _ => {}
        }
    }
    if uris < policy.min_uris || uris > policy.max_uris {
        let expected = if policy.min_uris == policy.max_uris {
            policy.min_uris.to_string()
        } else {
            format!("{}-{}", policy.min_uris, policy.max_uris)
        };
        return Err(PolicyViolation::UriSanCount {
            expected,
            found: uris,
        });
    }
    Ok(())
}

enum Usage {
    Key(u16),
    Extended(&'static [u64]),
}

/// Kubernetes' `KeyUsage` strings (certificates.k8s.io/v1), as
/// kube-controller-manager maps them.
fn parse_usage(usage: &str) -> Option<Usage> {
    use Usage::{Extended, Key};
    Some(match usage {
        "signing" | "digital signature" => Key(key_usage::DIGITAL_SIGNATURE),
        "content commitment" => Key(key_usage::CONTENT_COMMITMENT),
        "key encipherment" => Key(key_usage::KEY_ENCIPHERMENT),
        "key agreement" => Key(key_usage::KEY_AGREEMENT),
        "data encipherment" => Key(key_usage::DATA_ENCIPHERMENT),
        "cert sign" => Key(key_usage::KEY_CERT_SIGN),
        "crl sign" => Key(key_usage::CRL_SIGN),
        "encipher only" => Key(key_usage::ENCIPHER_ONLY),
        "decipher only" => Key(key_usage::DECIPHER_ONLY),
        "any" => Extended(ext_key_usage::ANY),
        "server auth" => Extended(ext_key_usage::SERVER_AUTH),
        "client auth" => Extended(ext_key_usage::CLIENT_AUTH),
        "code signing" => Extended(ext_key_usage::CODE_SIGNING),
        "email protection" | "s/mime" => Extended(ext_key_usage::EMAIL_PROTECTION),
        "ipsec end system" => Extended(ext_key_usage::IPSEC_END_SYSTEM),
        "ipsec tunnel" => Extended(ext_key_usage::IPSEC_TUNNEL),
        "ipsec user" => Extended(ext_key_usage::IPSEC_USER),
        "timestamping" => Extended(ext_key_usage::TIME_STAMPING),
        "ocsp signing" => Extended(ext_key_usage::OCSP_SIGNING),
        "microsoft sgc" => Extended(ext_key_usage::MICROSOFT_SGC),
        "netscape sgc" => Extended(ext_key_usage::NETSCAPE_SGC),
        _ => return None,
    })
}

/// Issues a certificate for a Kubernetes CSR under the signer's profile.
/// `expiration_seconds` is `spec.expirationSeconds`. Returns DER.
pub fn issue_kubernetes(
    profile: &KubernetesProfile,
    bundle: &CaBundle,
    csr: &ValidatedCsr,
    usages: &[String],
    expiration_seconds: Option<i64>,
    now: OffsetDateTime,
) -> Result<Vec<u8>, Error> {
    let (ku, eku) = check_kubernetes_policy(profile, csr, usages)?;
    check_signer_validity(bundle, now)?;
    let ttl = kubernetes_ttl(profile, expiration_seconds);
    let not_after = if ttl < KUBE_SHORT_TTL {
        now + ttl
    } else {
        now + ttl - KUBE_BACKDATE
    };
    let subject = match profile.subject {
        SubjectRule::CopyFromCsr => csr.subject_der.clone(),
        SubjectRule::RequireEmpty => cert::EMPTY_NAME.to_vec(),
    };
    let subject_is_empty = subject == cert::EMPTY_NAME;
    let mut extensions = Extensions::default();
    extensions
        .key_usage(usage_for_key(ku, csr.key))
        .ext_key_usage(&eku)
        .basic_constraints(false)
        .subject_key_id(&cert::key_identifier(&csr.public_key_bits))
        .authority_key_id(bundle.key_id());
    // RFC 5280: with an empty subject the SAN extension must be critical.
    extensions
        .subject_alt_names(&csr.requested_sans, subject_is_empty)
        .map_err(Error::CertGeneration)?;
    sign(
        bundle,
        &subject,
        csr,
        now - KUBE_BACKDATE,
        not_after.min(bundle.not_after()),
        extensions,
    )
}

/// Key usages the certified key can actually have. istiod and kubelets ask
/// for keyEncipherment whatever the key; it only means something for RSA
/// (RFC 8813 forbids it for ECDSA keys, RFC 8410 for Ed25519), and no TLS
/// stack needs it for an EC key, so it is dropped there instead of issuing
/// a certificate that linters reject.
fn usage_for_key(bits: u16, key: CsrKey) -> u16 {
    match key {
        CsrKey::Rsa { .. } => bits,
        CsrKey::EcdsaP256 | CsrKey::EcdsaP384 => {
            bits & !(key_usage::KEY_ENCIPHERMENT | key_usage::DATA_ENCIPHERMENT)
        }
        CsrKey::Ed25519 => {
            bits & !(key_usage::KEY_ENCIPHERMENT
                | key_usage::DATA_ENCIPHERMENT
                | key_usage::KEY_AGREEMENT
                | key_usage::ENCIPHER_ONLY
                | key_usage::DECIPHER_ONLY)
        }
    }
}

fn check_signer_validity(bundle: &CaBundle, now: OffsetDateTime) -> Result<(), Error> {
    if now >= bundle.not_after() {
        return Err(Error::CaExpired(bundle.not_after().to_string()));
    }
    Ok(())
}

fn sign(
    bundle: &CaBundle,
    subject: &[u8],
    csr: &ValidatedCsr,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    extensions: Extensions,
) -> Result<Vec<u8>, Error> {
    let serial = cert::random_serial().map_err(Error::CertGeneration)?;
    cert::sign_certificate(
        bundle.key(),
        &TbsFields {
            serial: &serial,
            issuer_der: bundle.subject_der(),
            not_before,
            not_after,
            subject_der: subject,
            spki_der: &csr.spki_der,
            extensions,
        },
    )
    .map_err(Error::from)
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}
