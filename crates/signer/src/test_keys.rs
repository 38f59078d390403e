//! Test doubles of CA keys shared by the decision tests.

use std::sync::atomic::{AtomicBool, Ordering};

use meshca_pki::SigningKey;
use meshca_pki::key::{ExternalAlgorithm, ExternalSigner, SignError};

/// A P-256 CA key in a "token" that can be pulled out: it signs until
/// [`Pullable::pull_out`], then answers `KeyUnavailable`.
pub(crate) struct Pullable {
    key: SigningKey,
    present: AtomicBool,
}

impl Pullable {
    /// A token holding a copy of `key`.
    pub(crate) fn copy_of(key: &SigningKey) -> Pullable {
        let pem = key.to_pkcs8_pem().expect("a software key");
        Pullable {
            key: SigningKey::from_pem(pem.as_bytes()).expect("its own PEM"),
            present: AtomicBool::new(true),
        }
    }

    pub(crate) fn pull_out(&self) {
        self.present.store(false, Ordering::SeqCst);
    }
}

impl ExternalSigner for Pullable {
    fn algorithm(&self) -> ExternalAlgorithm {
        ExternalAlgorithm::EcdsaP256
    }
    fn public_key_bits(&self) -> &[u8] {
        self.key.public_key_bits()
    }
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        if !self.present.load(Ordering::SeqCst) {
            return Err(SignError::KeyUnavailable("token removed".into()));
        }
        self.key.sign(message)
    }
    fn location(&self) -> String {
        "pkcs11:token=t;object=k".into()
    }
}
