//! What the signer returned, checked and laid out as Istio answers.

use meshca_pki::bundle::certificates;
use meshca_pki::{Source, ValidatedCsr};
use rustls_pki_types::UnixTime;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use super::RaError;
use super::trust::Roots;

/// Checks what the signer returned and builds Istio's response: the chain
/// verifies to `roots` (as a client certificate), the leaf carries the CSR's
/// key and exactly one URI SAN, which is one of the caller's identities.
/// Layout: leaf, each intermediate, all roots in the last element.
pub fn assemble_chain(
    issued_pem: &[u8],
    roots: &Roots,
    csr: &ValidatedCsr,
    identities: &[String],
    now: UnixTime,
) -> Result<Vec<String>, RaError> {
    let chain = certificates(Source {
        name: "status.certificate",
        bytes: issued_pem,
    })
    .map_err(|e| RaError::Chain(e.to_string()))?;
    let (leaf, rest) = chain
        .split_first()
        .ok_or_else(|| RaError::Chain("status.certificate holds no certificate".into()))?;
    meshca_pki::chain::verify_chain(leaf, rest, &roots.der, now)
        .map_err(|e| RaError::Chain(format!("does not verify to the configured roots: {e}")))?;

    let (_, parsed) = x509_parser::certificate::X509Certificate::from_der(leaf)
        .map_err(|e| RaError::Chain(format!("leaf: {e}")))?;
    if parsed.public_key().subject_public_key.data.as_ref() != csr.public_key_bits.as_slice() {
        return Err(RaError::Chain(
            "the leaf's public key is not the CSR's".into(),
        ));
    }
    let uris: Vec<&str> = parsed
        .subject_alternative_name()
        .map_err(|e| RaError::Chain(format!("leaf SAN: {e}")))?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    match uris.as_slice() {
        [uri] if identities.iter().any(|id| id == uri) => {}
        _ => {
            return Err(RaError::Chain(format!(
                "the leaf's URI SANs {uris:?} are not exactly the caller's identity {identities:?}"
            )));
        }
    }

    let mut out = Vec::with_capacity(chain.len() + 1);
    out.push(meshca_pki::pem::encode("CERTIFICATE", leaf));
    out.extend(
        rest.iter()
            .filter(|c| !roots.der.contains(c))
            .map(|c| meshca_pki::pem::encode("CERTIFICATE", c)),
    );
    out.push(roots.pem().to_owned());
    Ok(out)
}
