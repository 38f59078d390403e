//! Finding a key's objects in the token and reading its public half
//! (algorithm and point or modulus) as the CA certificate must match it.

use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::Session;
use meshca_pki::der;
use meshca_pki::key::ExternalAlgorithm;

use super::{Failure, HsmError, ck};
use crate::uri::Pkcs11Uri;

pub(super) fn key_template(uri: &Pkcs11Uri, class: ObjectClass) -> Vec<Attribute> {
    let mut template = vec![Attribute::Class(class)];
    if let Some(label) = &uri.object {
        template.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        template.push(Attribute::Id(id.clone()));
    }
    template
}

pub(super) fn find_one(
    session: &Session,
    uri: &Pkcs11Uri,
    class: ObjectClass,
) -> Result<Option<ObjectHandle>, (Failure, HsmError)> {
    let found = session
        .find_objects(&key_template(uri, class))
        .map_err(|e| ck("C_FindObjects", e))?;
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        more => Err((
            Failure::Request,
            HsmError::fatal(format!(
                "{uri} names {} {class} objects; name one (object= and id=)",
                more.len()
            )),
        )),
    }
}

/// SEC 2 curve OIDs as CKA_EC_PARAMS carries them (DER OBJECT IDENTIFIER).
pub(super) fn curve_params(algorithm: ExternalAlgorithm) -> Option<Vec<u8>> {
    match algorithm {
        ExternalAlgorithm::EcdsaP256 => Some(der::oid(meshca_pki::key::oids::P256)),
        ExternalAlgorithm::EcdsaP384 => Some(der::oid(meshca_pki::key::oids::P384)),
        ExternalAlgorithm::Rsa { .. } => None,
    }
}

/// CKA_EC_POINT is a DER OCTET STRING around the point (some modules give the bare point).
pub(super) fn ec_point(value: &[u8]) -> Option<Vec<u8>> {
    // An uncompressed P-256 or P-384 point, unwrapped.
    if matches!(value.len(), 65 | 97) && value.first() == Some(&0x04) {
        return Some(value.to_vec());
    }
    if value.first() == Some(&der::OCTET_STRING) {
        let (len, skip) = match value.get(1)? {
            n @ 0..=0x7f => (usize::from(*n), 2),
            0x81 => (usize::from(*value.get(2)?), 3),
            _ => return None,
        };
        let point = value.get(skip..skip + len)?;
        if skip + len == value.len() {
            return Some(point.to_vec());
        }
    }
    None
}

/// The key's algorithm and public key, read from the token.
pub(super) fn read_public(
    session: &Session,
    uri: &Pkcs11Uri,
    private: ObjectHandle,
) -> Result<(ExternalAlgorithm, Vec<u8>), (Failure, HsmError)> {
    let attrs = session
        .get_attributes(private, &[AttributeType::KeyType])
        .map_err(|e| ck("C_GetAttributeValue", e))?;
    let key_type = attrs.iter().find_map(|a| match a {
        Attribute::KeyType(t) => Some(*t),
        _ => None,
    });
    let unsupported = || {
        (
            Failure::Request,
            HsmError::fatal(format!(
                "{uri}: unsupported key (RSA 2048-4096, ECDSA P-256 or P-384 only)"
            )),
        )
    };
    match key_type {
        Some(KeyType::RSA) => {
            let attrs = session
                .get_attributes(
                    private,
                    &[AttributeType::Modulus, AttributeType::PublicExponent],
                )
                .map_err(|e| ck("C_GetAttributeValue", e))?;
            let (mut n, mut e) = (None, None);
            for a in attrs {
                match a {
                    Attribute::Modulus(v) => n = Some(v),
                    Attribute::PublicExponent(v) => e = Some(v),
                    _ => {}
                }
            }
            let (Some(n), Some(e)) = (n, e) else {
                return Err(unsupported());
            };
            let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
            if !(2048..=4096).contains(&bits) {
                return Err(unsupported());
            }
            let public = der::sequence(&[&der::unsigned_integer(&n), &der::unsigned_integer(&e)]);
            Ok((ExternalAlgorithm::Rsa { bits }, public))
        }
        Some(KeyType::EC) => {
            let public = find_one(session, uri, ObjectClass::PUBLIC_KEY)?.ok_or_else(|| {
                (
                    Failure::Request,
                    HsmError::fatal(format!(
                        "{uri}: no public key object beside the EC private key (same label/id)"
                    )),
                )
            })?;
            let attrs = session
                .get_attributes(public, &[AttributeType::EcParams, AttributeType::EcPoint])
                .map_err(|e| ck("C_GetAttributeValue", e))?;
            let (mut params, mut point) = (None, None);
            for a in attrs {
                match a {
                    Attribute::EcParams(v) => params = Some(v),
                    Attribute::EcPoint(v) => point = ec_point(&v),
                    _ => {}
                }
            }
            let algorithm = [ExternalAlgorithm::EcdsaP256, ExternalAlgorithm::EcdsaP384]
                .into_iter()
                .find(|a| curve_params(*a) == params)
                .ok_or_else(unsupported)?;
            Ok((algorithm, point.ok_or_else(unsupported)?))
        }
        _ => Err(unsupported()),
    }
}
