//! Certificate assembly: TBSCertificate fields and extensions, then the signature.

use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use time::OffsetDateTime;

use crate::der;
use crate::key::{SignError, SigningKey};
use crate::san::{SanEntry, san_extension_value};

/// KeyUsage bits (RFC 5280 §4.2.1.3), as bit positions in a `u16`.
pub mod key_usage {
    pub const DIGITAL_SIGNATURE: u16 = 1 << 0;
    pub const CONTENT_COMMITMENT: u16 = 1 << 1;
    pub const KEY_ENCIPHERMENT: u16 = 1 << 2;
    pub const DATA_ENCIPHERMENT: u16 = 1 << 3;
    pub const KEY_AGREEMENT: u16 = 1 << 4;
    pub const KEY_CERT_SIGN: u16 = 1 << 5;
    pub const CRL_SIGN: u16 = 1 << 6;
    pub const ENCIPHER_ONLY: u16 = 1 << 7;
    pub const DECIPHER_ONLY: u16 = 1 << 8;
}

/// ExtendedKeyUsage purposes.
pub mod ext_key_usage {
    pub const ANY: &[u64] = &[2, 5, 29, 37, 0];
    pub const SERVER_AUTH: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 1];
    pub const CLIENT_AUTH: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 2];
    pub const CODE_SIGNING: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 3];
    pub const EMAIL_PROTECTION: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 4];
    pub const IPSEC_END_SYSTEM: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 5];
    pub const IPSEC_TUNNEL: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 6];
    pub const IPSEC_USER: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 7];
    pub const TIME_STAMPING: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 8];
    pub const OCSP_SIGNING: &[u64] = &[1, 3, 6, 1, 5, 5, 7, 3, 9];
    pub const MICROSOFT_SGC: &[u64] = &[1, 3, 6, 1, 4, 1, 311, 10, 3, 3];
    pub const NETSCAPE_SGC: &[u64] = &[2, 16, 840, 1, 113730, 4, 1];
}

const SUBJECT_KEY_IDENTIFIER: &[u64] = &[2, 5, 29, 14];
const KEY_USAGE: &[u64] = &[2, 5, 29, 15];
const SUBJECT_ALT_NAME: &[u64] = &[2, 5, 29, 17];
const BASIC_CONSTRAINTS: &[u64] = &[2, 5, 29, 19];
const AUTHORITY_KEY_IDENTIFIER: &[u64] = &[2, 5, 29, 35];
const EXT_KEY_USAGE: &[u64] = &[2, 5, 29, 37];
const ORGANIZATION: &[u64] = &[2, 5, 4, 10];
const COMMON_NAME: &[u64] = &[2, 5, 4, 3];

/// The DER of one Extension.
fn extension(oid: &[u64], critical: bool, value: &[u8]) -> Vec<u8> {
    let oid = der::oid(oid);
    let value = der::octet_string(value);
    if critical {
        der::sequence(&[&oid, &der::boolean(true), &value])
    } else {
        der::sequence(&[&oid, &value])
    }
}

/// Extensions collected in the order they will be written.
#[derive(Default)]
pub struct Extensions(Vec<Vec<u8>>);

impl Extensions {
    pub fn basic_constraints(&mut self, ca: bool) -> &mut Self {
        let value = if ca {
            der::sequence(&[&der::boolean(true)])
        } else {
            der::sequence(&[])
        };
        self.0.push(extension(BASIC_CONSTRAINTS, true, &value));
        self
    }

    pub fn key_usage(&mut self, bits: u16) -> &mut Self {
        if bits != 0 {
            self.0
                .push(extension(KEY_USAGE, true, &der::named_bits(bits)));
        }
        self
    }

    pub fn ext_key_usage(&mut self, purposes: &[&[u64]]) -> &mut Self {
        if !purposes.is_empty() {
            let oids: Vec<Vec<u8>> = purposes.iter().map(|p| der::oid(p)).collect();
            let parts: Vec<&[u8]> = oids.iter().map(Vec::as_slice).collect();
            self.0
                .push(extension(EXT_KEY_USAGE, false, &der::sequence(&parts)));
        }
        self
    }

    pub fn subject_alt_names(
        &mut self,
        sans: &[SanEntry],
        critical: bool,
    ) -> Result<&mut Self, String> {
        if !sans.is_empty() {
            self.0.push(extension(
                SUBJECT_ALT_NAME,
                critical,
                &san_extension_value(sans)?,
            ));
        }
        Ok(self)
    }

    pub fn authority_key_id(&mut self, key_id: &[u8]) -> &mut Self {
        let value = der::sequence(&[&der::tlv(der::context(0, false), &[key_id])]);
        self.0
            .push(extension(AUTHORITY_KEY_IDENTIFIER, false, &value));
        self
    }

    pub fn subject_key_id(&mut self, key_id: &[u8]) -> &mut Self {
        self.0.push(extension(
            SUBJECT_KEY_IDENTIFIER,
            false,
            &der::octet_string(key_id),
        ));
        self
    }
}

/// Everything in a TBSCertificate except the signature algorithm, which the
/// signing key decides.
pub struct TbsFields<'a> {
    pub serial: &'a [u8],
    pub issuer_der: &'a [u8],
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    pub subject_der: &'a [u8],
    pub spki_der: &'a [u8],
    pub extensions: Extensions,
}

/// Builds the TBSCertificate, signs it, and returns the certificate DER.
pub fn sign_certificate(key: &SigningKey, fields: &TbsFields<'_>) -> Result<Vec<u8>, SignError> {
    let version = der::tlv(der::context(0, true), &[&der::small_integer(2)]);
    let serial = der::unsigned_integer(fields.serial);
    let signature_algorithm = key.signature_algorithm_der();
    let validity = der::sequence(&[&der::time(fields.not_before), &der::time(fields.not_after)]);
    let extension_parts: Vec<&[u8]> = fields.extensions.0.iter().map(Vec::as_slice).collect();
    let extensions = if extension_parts.is_empty() {
        Vec::new()
    } else {
        der::tlv(der::context(3, true), &[&der::sequence(&extension_parts)])
    };
    let tbs = der::sequence(&[
        &version,
        &serial,
        &signature_algorithm,
        fields.issuer_der,
        &validity,
        fields.subject_der,
        fields.spki_der,
        &extensions,
    ]);
    let signature = key.sign(&tbs)?;
    Ok(der::sequence(&[
        &tbs,
        &signature_algorithm,
        &der::bit_string(&signature),
    ]))
}

/// A random positive serial number below 2^128, as Istio and RFC 5280 want.
pub fn random_serial() -> Result<[u8; 16], String> {
    let mut serial = [0u8; 16];
    SystemRandom::new()
        .fill(&mut serial)
        .map_err(|_| "random number generator failed".to_string())?;
    if serial.iter().all(|b| *b == 0) {
        serial[15] = 1;
    }
    Ok(serial)
}

/// RFC 5280 §4.2.1.2 method 1: SHA-1 of the subjectPublicKey bits.
pub fn key_identifier(public_key_bits: &[u8]) -> Vec<u8> {
    digest::digest(&digest::SHA1_FOR_LEGACY_USE_ONLY, public_key_bits)
        .as_ref()
        .to_vec()
}

/// `O=<org>` as a DER Name (Istio's CA subject).
pub fn organization_name(org: &str) -> Vec<u8> {
    single_attribute_name(ORGANIZATION, org)
}

/// `CN=<cn>` as a DER Name.
pub fn common_name(cn: &str) -> Vec<u8> {
    single_attribute_name(COMMON_NAME, cn)
}

/// `O=<org>, CN=<cn>` as a DER Name.
pub fn organization_and_common_name(org: &str, cn: &str) -> Vec<u8> {
    let o = attribute(ORGANIZATION, org);
    let c = attribute(COMMON_NAME, cn);
    der::sequence(&[&der::tlv(der::SET, &[&o]), &der::tlv(der::SET, &[&c])])
}

pub const EMPTY_NAME: &[u8] = &[der::SEQUENCE, 0];

fn attribute(oid: &[u64], value: &str) -> Vec<u8> {
    der::sequence(&[
        &der::oid(oid),
        &der::tlv(der::UTF8_STRING, &[value.as_bytes()]),
    ])
}

fn single_attribute_name(oid: &[u64], value: &str) -> Vec<u8> {
    der::sequence(&[&der::tlv(der::SET, &[&attribute(oid, value)])])
}
