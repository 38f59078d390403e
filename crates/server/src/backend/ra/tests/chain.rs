//! What the signer returned, checked and laid out.

use super::*;
use crate::backend::ra::*;

#[test]
fn a_verified_chain_gets_the_roots_as_its_last_element_once() {
    let pki = pki();
    let (_, pem_csr) = csr_with(&[SanEntry::Uri(ID.into())]);
    let csr = meshca_pki::validate_csr(pem_csr.as_bytes(), &CsrPolicy::default()).unwrap();
    let roots = pki.roots();
    for with_root in [false, true] {
        let issued = pki.issue(&pem_csr, &ids(), with_root);
        let chain = assemble_chain(&issued, &roots, &csr, &ids(), UnixTime::now()).unwrap();
        assert_eq!(chain.len(), 3, "{with_root}");
        assert_eq!(chain[1], pki.intermediate.signing_cert_pem());
        assert_eq!(chain[2], roots.pem());
    }
}

#[test]
fn chains_that_do_not_verify_or_name_someone_else_are_refused() {
    let other_signer = pki();
    let pki = pki();
    let (_, pem_csr) = csr_with(&[SanEntry::Uri(ID.into())]);
    let csr = meshca_pki::validate_csr(pem_csr.as_bytes(), &CsrPolicy::default()).unwrap();
    let now = UnixTime::now();
    let is_chain_error = |r: Result<Vec<String>, RaError>| {
        assert!(matches!(r, Err(RaError::Chain(_))), "{r:?}");
    };
    // Another signer's root.
    let issued = pki.issue(&pem_csr, &ids(), false);
    is_chain_error(assemble_chain(
        &issued,
        &other_signer.roots(),
        &csr,
        &ids(),
        now,
    ));
    // The intermediate missing.
    let leaf_only = meshca_pki::pem::parse_all(&issued).unwrap()[0].der.clone();
    let leaf_only = pem::encode("CERTIFICATE", &leaf_only);
    is_chain_error(assemble_chain(
        leaf_only.as_bytes(),
        &pki.roots(),
        &csr,
        &ids(),
        now,
    ));
    // A certificate for another key.
    let (_, other_csr) = csr_with(&[SanEntry::Uri(ID.into())]);
    let swapped = pki.issue(&other_csr, &ids(), false);
    is_chain_error(assemble_chain(&swapped, &pki.roots(), &csr, &ids(), now));
    // Another identity, or two.
    let other = vec!["spiffe://cluster.local/ns/app/sa/admin".to_string()];
    let foreign = pki.issue(&pem_csr, &other, false);
    is_chain_error(assemble_chain(&foreign, &pki.roots(), &csr, &ids(), now));
    let two = vec![ID.to_string(), other[0].clone()];
    let double = pki.issue(&pem_csr, &two, false);
    is_chain_error(assemble_chain(&double, &pki.roots(), &csr, &two, now));
    // Nothing at all.
    is_chain_error(assemble_chain(b"", &pki.roots(), &csr, &ids(), now));
}
