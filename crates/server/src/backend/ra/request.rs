//! istiod's checks of a request before any CSR is created: which signer,
//! and whether the CSR has Istio's template and the caller's identity.

use meshca_pki::{CsrPolicy, SanEntry, ValidatedCsr, WorkloadProfile};
use x509_parser::prelude::FromDer;

use super::csr::MIN_EXPIRATION_SECONDS;
use super::{RaConfig, RaError};

/// The signer of one request (istiod's rule): K8S_SIGNER, or with
/// `CertSigner` metadata `<CERT_SIGNER_DOMAIN>/<CertSigner>` when the
/// `CertSigner` is on the allow-list (`--cert-signers`, Istio's mesh config
/// `certificateSigners`); an empty list allows none.
pub fn signer_name(config: &RaConfig, cert_signer: Option<&str>) -> Result<String, RaError> {
    match cert_signer.filter(|s| !s.is_empty()) {
        Some(requested) => match config.signer_domain.as_deref().filter(|d| !d.is_empty()) {
            Some(_) if !config.cert_signers.iter().any(|s| s == requested) => {
                Err(RaError::SignerNotAllowed(requested.to_owned()))
            }
            Some(domain) => Ok(format!("{domain}/{requested}")),
            None => Err(RaError::NoSignerDomain(requested.to_owned())),
        },
        None => config
            .signer
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or(RaError::NoSigner),
    }
}

/// Checks one `--cert-signers` entry: the part of a signer name after
/// `<domain>/`, so a DNS-1123 subdomain (lowercase letters, digits, `-` and
/// `.`, alphanumeric at both ends, at most 253 characters; no `/`).
pub fn validate_cert_signer(name: &str) -> Result<(), String> {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.chars().all(|c| alnum(c) || c == '-' || c == '.')
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label.starts_with(alnum)
                && label.ends_with(alnum)
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "CertSigner {name:?} is not a signer-name segment (a DNS-1123 subdomain: \
             lowercase letters, digits, '-' and '.', no '/')"
        ))
    }
}

/// The OIDs of the extensions a CSR requests (dotted), in order.
fn requested_extension_oids(csr_pem: &[u8]) -> Vec<String> {
    let Some(block) = meshca_pki::pem::parse_all(csr_pem)
        .ok()
        .and_then(|b| b.into_iter().next())
    else {
        return Vec::new();
    };
    let Ok((_, csr)) =
        x509_parser::certification_request::X509CertificationRequest::from_der(&block.der)
    else {
        return Vec::new();
    };
    csr.certification_request_info
        .iter_attributes()
        .filter_map(|a| match a.parsed_attribute() {
            x509_parser::cri_attributes::ParsedCriAttribute::ExtensionRequest(r) => Some(r),
            _ => None,
        })
        .flat_map(|r| r.extensions.iter().map(|e| e.oid.to_id_string()))
        .collect()
}

/// subjectAltName.
const SAN_OID: &str = "2.5.29.17";

/// istiod's checks before a CSR is submitted: no CA requests, TTL within the
/// maximum, the CSR parses with a valid self-signature, its SANs are a subset
/// of the caller's identities (istiod's `ValidateCSR`, which also needs a SAN
/// extension) and it has Istio's template: an empty subject (or only an
/// empty `O=`, as Istio's `GenCSR` writes it), one URI SAN, no DNS, IP or
/// email SANs, no extension but the SAN.
pub fn check_request(
    csr_pem: &[u8],
    identities: &[String],
    ttl_seconds: i64,
    for_ca: bool,
    profile: &WorkloadProfile,
) -> Result<ValidatedCsr, RaError> {
    if for_ca {
        return Err(RaError::ForCa);
    }
    let max = i64::try_from(profile.max_ttl.as_secs()).unwrap_or(i64::MAX);
    if ttl_seconds > max {
        return Err(meshca_pki::Error::TtlTooLong {
            requested: ttl_seconds,
            max,
        }
        .into());
    }
    let csr = meshca_pki::validate_csr(csr_pem, &CsrPolicy::default())
        .map_err(meshca_pki::Error::from)?;
    if csr.requests_ca {
        return Err(RaError::ForCa);
    }
    let mut uris = 0;
    for san in &csr.requested_sans {
        match san {
            SanEntry::Uri(uri) => {
                uris += 1;
                if !identities.iter().any(|id| id == uri) {
                    return Err(RaError::SanNotCallers(uri.clone()));
                }
            }
            other => {
                return Err(RaError::Template(format!(
                    "only a URI SAN is allowed, the CSR has {other}"
                )));
            }
        }
    }
    if uris != 1 {
        return Err(RaError::Template(format!(
            "exactly one URI SAN (the caller's identity) is needed, the CSR has {uris}"
        )));
    }
    if !csr.subject_is_blank {
        return Err(RaError::Template(format!(
            "the subject must be empty (or only an empty O=), the CSR has {}",
            csr.subject_text()
        )));
    }
    if let Some(other) = requested_extension_oids(csr_pem)
        .into_iter()
        .find(|oid| oid != SAN_OID)
    {
        return Err(RaError::Template(format!(
            "extension {other} is not in Istio's CSR template (only subjectAltName)"
        )));
    }
    Ok(csr)
}

/// `spec.expirationSeconds`: the requested TTL (or the default), raised to
/// the API server's minimum.
pub fn expiration_seconds(ttl_seconds: i64, profile: &WorkloadProfile) -> i32 {
    let ttl = if ttl_seconds <= 0 {
        i64::try_from(profile.default_ttl.as_secs()).unwrap_or(i64::MAX)
    } else {
        ttl_seconds
    };
    i32::try_from(ttl.max(MIN_EXPIRATION_SECONDS)).unwrap_or(i32::MAX)
}
