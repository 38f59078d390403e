//! Path validation of an issued chain, as a TLS peer of the workload would do it.

use rustls_pki_types::{CertificateDer, UnixTime};
use webpki::{EndEntityCert, KeyUsage, anchor_from_trusted_cert};

/// Verifies `leaf` through `intermediates` to one of `roots` at `now`, for
/// client authentication (mesh certificates serve both ends; the check
/// passes when the leaf has no EKU or includes clientAuth). Certificates in
/// `intermediates` that the path does not need (a root sent along) are ignored.
pub fn verify_chain(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    roots: &[Vec<u8>],
    now: UnixTime,
) -> Result<(), String> {
    let leaf_der = CertificateDer::from(leaf);
    let leaf_cert = EndEntityCert::try_from(&leaf_der).map_err(|e| format!("leaf: {e}"))?;
    let root_ders: Vec<CertificateDer<'_>> = roots
        .iter()
        .map(|r| CertificateDer::from(r.as_slice()))
        .collect();
    let anchors = root_ders
        .iter()
        .map(|r| anchor_from_trusted_cert(r).map_err(|e| format!("root: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    leaf_cert
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            &intermediates,
            now,
            KeyUsage::client_auth(),
            None,
            None,
        )
        .map(drop)
        .map_err(|e| e.to_string())
}
