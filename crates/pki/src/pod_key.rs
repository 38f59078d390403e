//! The key of a Kubernetes PodCertificateRequest (certificates.k8s.io/v1beta1):
//! a DER SubjectPublicKeyInfo (`spec.pkixPublicKey`) and a proof of
//! possession (`spec.proofOfPossession`), a signature over the ASCII bytes of
//! the pod's UID, as kube-apiserver checks it at creation:
//!
//! - Ed25519: over the UID bytes (Go `ed25519.Sign`);
//! - ECDSA: ASN.1 signature over SHA-256 of the UID (Go `ecdsa.SignASN1`),
//!   SHA-256 for P-384 too;
//! - RSA: RSASSA-PSS with SHA-256 over the UID (Go `rsa.SignPSS` with nil
//!   options, which signs with the longest salt and verifies any salt
//!   length); the kubelet's signatures have the longest salt, other signers'
//!   usually the digest's length: both are accepted.
//!
//! The signer checks again what the apiserver checked: an apiserver with
//! validation off, or an object restored from a backup, must not get a key
//! certified that its requester does not hold.

use aws_lc_rs::signature::{self, RsaPssSaltLength, UnparsedPublicKey};
use x509_parser::prelude::FromDer;
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::csr::{CsrKey, CsrPolicy, ValidatedCsr, check_key, classify_key};
use crate::error::CsrError;

/// kube-apiserver's limits on `pkixPublicKey` and `proofOfPossession`.
pub const MAX_PUBLIC_KEY_BYTES: usize = 10 * 1024;
pub const MAX_PROOF_BYTES: usize = 10 * 1024;

/// The key types the PodCertificateRequest API allows: RSA 3072 or 4096,
/// ECDSA P-256 or P-384, Ed25519 (P-521 passes the apiserver's
/// validation, but meshca certifies no P-521 key).
pub fn pod_key_policy() -> CsrPolicy {
    CsrPolicy {
        rsa_min_bits: 3072,
        rsa_max_bits: 4096,
        ..CsrPolicy::default()
    }
}

/// Checks `spki_der` against `policy` and the proof of possession over
/// `pod_uid`. Returns the key as a [`ValidatedCsr`] with an empty subject and
/// no SANs, for the issuance profiles.
pub fn validate_pod_key(
    spki_der: &[u8],
    proof: &[u8],
    pod_uid: &str,
    policy: &CsrPolicy,
) -> Result<ValidatedCsr, CsrError> {
    if spki_der.len() > MAX_PUBLIC_KEY_BYTES {
        return Err(CsrError::TooLarge {
            size: spki_der.len(),
            limit: MAX_PUBLIC_KEY_BYTES,
        });
    }
    if proof.len() > MAX_PROOF_BYTES {
        return Err(CsrError::TooLarge {
            size: proof.len(),
            limit: MAX_PROOF_BYTES,
        });
    }
    let (rest, spki) = SubjectPublicKeyInfo::from_der(spki_der)
        .map_err(|e| CsrError::Malformed(format!("public key: {e}")))?;
    if !rest.is_empty() {
        return Err(CsrError::TrailingData(rest.len()));
    }
    let key = classify_key(&spki)?;
    check_key(key, policy)?;
    let bits = spki.subject_public_key.data.as_ref();
    let uid = pod_uid.as_bytes();
    let verified = match key {
        CsrKey::Ed25519 => UnparsedPublicKey::new(&signature::ED25519, bits)
            .verify(uid, proof)
            .is_ok(),
        CsrKey::EcdsaP256 => UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_ASN1, bits)
            .verify(uid, proof)
            .is_ok(),
        CsrKey::EcdsaP384 => UnparsedPublicKey::new(&signature::ECDSA_P384_SHA256_ASN1, bits)
            .verify(uid, proof)
            .is_ok(),
        CsrKey::Rsa { .. } => {
            const MAX_SALT: signature::RsaParameters =
                signature::RSA_PSS_2048_8192_SHA256.with_pss_salt_length(RsaPssSaltLength::Max);
            UnparsedPublicKey::new(&MAX_SALT, bits)
                .verify(uid, proof)
                .is_ok()
                || UnparsedPublicKey::new(&signature::RSA_PSS_2048_8192_SHA256, bits)
                    .verify(uid, proof)
                    .is_ok()
        }
    };
    if !verified {
        return Err(CsrError::ProofOfPossession);
    }
    Ok(ValidatedCsr {
        spki_der: spki_der.to_vec(),
        public_key_bits: bits.to_vec(),
        key,
        subject_der: crate::cert::EMPTY_NAME.to_vec(),
        subject_is_empty: true,
        subject_is_blank: true,
        has_common_name: false,
        requested_sans: Vec::new(),
        requests_ca: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::{KeyType, SigningKey};
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::rsa::KeySize;
    use aws_lc_rs::signature::{KeyPair, RsaKeyPair};

    const UID: &str = "0f4ba9e4-5d39-4c61-a0a4-4b6a1f5f7a2e";

    fn signed_by(key_type: KeyType, uid: &str) -> (Vec<u8>, Vec<u8>) {
        let key = SigningKey::generate(key_type).unwrap();
        (key.spki_der(), key.sign(uid.as_bytes()).unwrap())
    }

    fn rsa_pss(size: KeySize, salt: RsaPssSaltLength, uid: &str) -> (Vec<u8>, Vec<u8>) {
        let pair = RsaKeyPair::generate(size).unwrap();
        let spki = pair.public_key().as_der().unwrap().as_ref().to_vec();
        let mut sig = vec![0; pair.public_modulus_len()];
        let encoding = signature::RSA_PSS_SHA256.with_pss_salt_length(salt);
        let encoding: &'static signature::RsaSignatureEncoding = Box::leak(Box::new(encoding));
        pair.sign(encoding, &SystemRandom::new(), uid.as_bytes(), &mut sig)
            .unwrap();
        (spki, sig)
    }

    #[test]
    fn ed25519_and_p256_proofs_over_the_pod_uid_verify() {
        for kt in [KeyType::Ed25519, KeyType::EcdsaP256] {
            let (spki, proof) = signed_by(kt, UID);
            let v = validate_pod_key(&spki, &proof, UID, &pod_key_policy()).unwrap();
            assert_eq!(v.spki_der, spki);
            assert!(v.requested_sans.is_empty() && !v.requests_ca);
        }
    }

    #[test]
    fn rsa_pss_proofs_with_the_kubelets_salt_and_the_digests_verify() {
        for salt in [RsaPssSaltLength::Max, RsaPssSaltLength::Digest] {
            let (spki, proof) = rsa_pss(KeySize::Rsa3072, salt, UID);
            let v = validate_pod_key(&spki, &proof, UID, &pod_key_policy()).unwrap();
            assert_eq!(v.key, CsrKey::Rsa { bits: 3072 });
        }
    }

    #[test]
    fn a_proof_over_another_uid_or_garbage_is_refused() {
        let (spki, proof) = signed_by(KeyType::EcdsaP256, "another-pod-uid");
        let e = validate_pod_key(&spki, &proof, UID, &pod_key_policy()).unwrap_err();
        assert_eq!(e.reason(), "pop_signature_invalid");
        let (spki, _) = signed_by(KeyType::Ed25519, UID);
        let e = validate_pod_key(&spki, b"", UID, &pod_key_policy()).unwrap_err();
        assert_eq!(e.reason(), "pop_signature_invalid");
        let (spki, proof) = rsa_pss(KeySize::Rsa3072, RsaPssSaltLength::Digest, "x");
        let e = validate_pod_key(&spki, &proof, UID, &pod_key_policy()).unwrap_err();
        assert_eq!(e.reason(), "pop_signature_invalid");
    }

    #[test]
    fn keys_outside_the_policy_are_refused_before_the_proof() {
        let (spki, proof) = rsa_pss(KeySize::Rsa2048, RsaPssSaltLength::Digest, UID);
        let e = validate_pod_key(&spki, &proof, UID, &pod_key_policy()).unwrap_err();
        assert_eq!(e.reason(), "csr_key_size");
        let no_ed = CsrPolicy {
            allow_ed25519: false,
            ..pod_key_policy()
        };
        let (spki, proof) = signed_by(KeyType::Ed25519, UID);
        assert_eq!(
            validate_pod_key(&spki, &proof, UID, &no_ed)
                .unwrap_err()
                .reason(),
            "csr_key_algorithm"
        );
        let mut trailing = spki.clone();
        trailing.push(0);
        assert_eq!(
            validate_pod_key(&trailing, &proof, UID, &pod_key_policy())
                .unwrap_err()
                .reason(),
            "csr_trailing_data"
        );
        assert_eq!(
            validate_pod_key(b"\x30\x00", &proof, UID, &pod_key_policy())
                .unwrap_err()
                .reason(),
            "csr_malformed"
        );
        let big = vec![0u8; MAX_PUBLIC_KEY_BYTES + 1];
        assert_eq!(
            validate_pod_key(&big, &proof, UID, &pod_key_policy())
                .unwrap_err()
                .reason(),
            "csr_too_large"
        );
    }
}
