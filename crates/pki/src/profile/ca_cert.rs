//! CA certificates as Istio makes them: a self-signed root, and
//! intermediates under a CA.

use std::time::Duration;

use time::OffsetDateTime;

use super::{WORKLOAD_BACKDATE, check_signer_validity};
use crate::bundle::CaBundle;
use crate::cert::{self, Extensions, TbsFields, key_usage};
use crate::error::Error;
use crate::key::SigningKey;

/// A CA certificate as Istio makes its self-signed root: `O=<org>`, no CN,
/// CA:TRUE, keyCertSign (+cRLSign), a subject key identifier.
pub struct CaCertRequest<'a> {
    pub subject_der: &'a [u8],
    pub key: &'a SigningKey,
    pub ttl: Duration,
}

/// A self-signed root. Returns DER.
pub fn self_signed_root(req: &CaCertRequest<'_>, now: OffsetDateTime) -> Result<Vec<u8>, Error> {
    let key_id = cert::key_identifier(req.key.public_key_bits());
    let mut extensions = Extensions::default();
    extensions
        .key_usage(key_usage::KEY_CERT_SIGN | key_usage::CRL_SIGN)
        .basic_constraints(true)
        .subject_key_id(&key_id);
    let serial = cert::random_serial().map_err(Error::CertGeneration)?;
    cert::sign_certificate(
        req.key,
        &TbsFields {
            serial: &serial,
            issuer_der: req.subject_der,
            not_before: now - WORKLOAD_BACKDATE,
            not_after: now + req.ttl,
            subject_der: req.subject_der,
            spki_der: &req.key.spki_der(),
            extensions,
        },
    )
    .map_err(Error::from)
}

/// An intermediate CA signed by `issuer`, valid no longer than the issuer.
pub fn intermediate_ca(
    req: &CaCertRequest<'_>,
    issuer: &CaBundle,
    now: OffsetDateTime,
) -> Result<Vec<u8>, Error> {
    check_signer_validity(issuer, now)?;
    let mut extensions = Extensions::default();
    extensions
        .key_usage(key_usage::KEY_CERT_SIGN | key_usage::CRL_SIGN)
        .basic_constraints(true)
        .subject_key_id(&cert::key_identifier(req.key.public_key_bits()))
        .authority_key_id(issuer.key_id());
    let serial = cert::random_serial().map_err(Error::CertGeneration)?;
    cert::sign_certificate(
        issuer.key(),
        &TbsFields {
            serial: &serial,
            issuer_der: issuer.subject_der(),
            not_before: now - WORKLOAD_BACKDATE,
            not_after: (now + req.ttl).min(issuer.not_after()),
            subject_der: req.subject_der,
            spki_der: &req.key.spki_der(),
            extensions,
        },
    )
    .map_err(Error::from)
}
