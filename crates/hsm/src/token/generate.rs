//! Key generation inside the token (`meshca ca init --pkcs11`).

use std::sync::Arc;

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, ObjectClass};
use meshca_pki::key::ExternalAlgorithm;

use super::{HsmError, Module, ck, curve_params, find_one, find_slot, login};
use crate::pin::PinSource;
use crate::uri::Pkcs11Uri;

/// Generates a key pair inside the token named by `uri`: the private key
/// sensitive and non-extractable, both objects labelled and identified by
/// the URI. Refuses if a private key with that label/id exists.
pub fn generate(
    module: &Arc<Module>,
    uri: &Pkcs11Uri,
    pin: &PinSource,
    algorithm: ExternalAlgorithm,
) -> Result<(), HsmError> {
    let _busy = module.enter();
    let (ctx, _) = module.context()?;
    let slot = find_slot(&ctx, uri).map_err(|(_, e)| e)?;
    let session = ctx
        .open_rw_session(slot)
        .map_err(|e| ck("C_OpenSession", e).1)?;
    let pin = pin.read().map_err(HsmError::fatal)?;
    login(&session, &pin).map_err(|(_, e)| e)?;
    if find_one(&session, uri, ObjectClass::PRIVATE_KEY)
        .map_err(|(_, e)| e)?
        .is_some()
    {
        return Err(HsmError::fatal(format!(
            "{uri}: a private key with this label/id already exists in the token"
        )));
    }
    let mut common = Vec::new();
    if let Some(label) = &uri.object {
        common.push(Attribute::Label(label.as_bytes().to_vec()));
    }
    if let Some(id) = &uri.id {
        common.push(Attribute::Id(id.clone()));
    }
    let mut public = vec![Attribute::Token(true), Attribute::Verify(true)];
    public.extend(common.iter().cloned());
    let mut private = vec![
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        Attribute::Extractable(false),
        Attribute::Sign(true),
    ];
    private.extend(common);
    let mechanism = match algorithm {
        ExternalAlgorithm::Rsa { bits } => {
            public.push(Attribute::ModulusBits((bits as u64).into()));
            public.push(Attribute::PublicExponent(vec![1, 0, 1]));
            Mechanism::RsaPkcsKeyPairGen
        }
        ec => {
            public.push(Attribute::EcParams(curve_params(ec).unwrap_or_default()));
            Mechanism::EccKeyPairGen
        }
    };
    session
        .generate_key_pair(&mechanism, &public, &private)
        .map_err(|e| ck("C_GenerateKeyPair", e).1)?;
    Ok(())
}
