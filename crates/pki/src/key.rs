//! CA signing keys: generate, load (PKCS#1, PKCS#8, SEC1), sign.
//!
//! Keys live inside aws-lc-rs key objects, whose memory AWS-LC cleanses when
//! freed; every intermediate byte buffer holding key material is `Zeroizing`.

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1, ECDSA_P384_SHA384_ASN1, ParsedPublicKey, RSA_PKCS1_2048_8192_SHA256,
    UnparsedPublicKey, VerificationAlgorithm,
};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_ASN1_SIGNING, ECDSA_P384_SHA384_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair,
    KeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
};
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use zeroize::Zeroizing;

use crate::der;
use crate::pem;

/// Key types meshca can generate for a CA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Rsa2048,
    Rsa3072,
    Rsa4096,
    EcdsaP256,
    EcdsaP384,
    Ed25519,
}

impl KeyType {
    pub const ALL: [KeyType; 6] = [
        KeyType::Rsa2048,
        KeyType::Rsa3072,
        KeyType::Rsa4096,
        KeyType::EcdsaP256,
        KeyType::EcdsaP384,
        KeyType::Ed25519,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyType::Rsa2048 => "rsa-2048",
            KeyType::Rsa3072 => "rsa-3072",
            KeyType::Rsa4096 => "rsa-4096",
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Ed25519 => "ed25519",
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for KeyType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        KeyType::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<_> = KeyType::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown key type {s:?}, expected one of {}",
                    names.join(", ")
                )
            })
    }
}

enum Inner {
    Rsa(RsaKeyPair),
    P256(EcdsaKeyPair),
    P384(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
    /// The signer, and its public key parsed once for the verification
    /// of every signature it returns.
    External(Arc<dyn ExternalSigner>, Option<ParsedPublicKey>),
}

/// The algorithm of a key held outside the process (an HSM): the same
/// signature algorithms as file keys of that type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExternalAlgorithm {
    /// RSA PKCS#1 v1.5 with SHA-256; the modulus size in bits.
    Rsa { bits: usize },
    /// ECDSA P-256 with SHA-256.
    EcdsaP256,
    /// ECDSA P-384 with SHA-384.
    EcdsaP384,
}

/// A private key that never enters this process: it signs on request
/// (e.g. through PKCS#11). Implementations do the I/O; this crate verifies
/// every signature they return against their public key before using it.
pub trait ExternalSigner: Send + Sync {
    fn algorithm(&self) -> ExternalAlgorithm;
    /// As [`SigningKey::public_key_bits`]: PKCS#1 RSAPublicKey or an
    /// uncompressed EC point.
    fn public_key_bits(&self) -> &[u8];
    /// A signature over `message` in X.509's encoding (PKCS#1 v1.5 bytes,
    /// or a DER `ECDSA-Sig-Value`), made with the algorithm's hash.
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError>;
    /// Where the key lives, for logs and `Debug` (never key material or a PIN).
    fn location(&self) -> String;
}

/// A private key that signs certificates.
pub struct SigningKey {
    inner: Inner,
}

impl fmt::Debug for SigningKey {
    // Never prints key material.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.describe())
    }
}

/// Why a key file could not be used. Never contains key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("a key in a hardware module cannot be exported")]
    NotExportable,
    #[error("not a PEM private key: {0}")]
    Pem(#[from] pem::PemError),
    #[error("expected one private key PEM block, found {0}")]
    BlockCount(usize),
    #[error(
        "PEM block `{0}` is not a supported private key (PRIVATE KEY, RSA PRIVATE KEY, EC PRIVATE KEY)"
    )]
    Label(String),
    #[error("{0} private key could not be parsed or uses an unsupported algorithm/curve")]
    Parse(&'static str),
    #[error("key generation failed")]
    Generate,
}

impl SigningKey {
    pub fn generate(key_type: KeyType) -> Result<Self, KeyError> {
        let inner = match key_type {
            KeyType::Rsa2048 => Inner::Rsa(rsa_generate(KeySize::Rsa2048)?),
            KeyType::Rsa3072 => Inner::Rsa(rsa_generate(KeySize::Rsa3072)?),
            KeyType::Rsa4096 => Inner::Rsa(rsa_generate(KeySize::Rsa4096)?),
            KeyType::EcdsaP256 => Inner::P256(
                EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING)
                    .map_err(|_| KeyError::Generate)?,
            ),
            KeyType::EcdsaP384 => Inner::P384(
                EcdsaKeyPair::generate(&ECDSA_P384_SHA384_ASN1_SIGNING)
                    .map_err(|_| KeyError::Generate)?,
            ),
            KeyType::Ed25519 => {
                Inner::Ed25519(Ed25519KeyPair::generate().map_err(|_| KeyError::Generate)?)
            }
        };
        Ok(SigningKey { inner })
    }

    /// A key held outside the process (e.g. in an HSM).
    pub fn external(signer: Arc<dyn ExternalSigner>) -> Self {
        let parsed = ParsedPublicKey::new(
            verification_algorithm(signer.algorithm()),
            signer.public_key_bits(),
        )
        .ok();
        SigningKey {
            inner: Inner::External(signer, parsed),
        }
    }

    /// Whether the key lives outside the process (and cannot be exported).
    pub fn is_external(&self) -> bool {
        matches!(self.inner, Inner::External(..))
    }

    /// Reads exactly one private key block: PKCS#8 `PRIVATE KEY`, PKCS#1
    /// `RSA PRIVATE KEY` or SEC1 `EC PRIVATE KEY`.
    pub fn from_pem(input: &[u8]) -> Result<Self, KeyError> {
        let blocks = pem::parse_all(input)?;
        let keys: Vec<_> = blocks
            .iter()
            .filter(|b| b.label.contains("PRIVATE KEY"))
            .collect();
        let [block] = keys.as_slice() else {
            return Err(KeyError::BlockCount(keys.len()));
        };
        let der = &block.der[..];
        let inner = match block.label.as_str() {
            "RSA PRIVATE KEY" => {
                Inner::Rsa(RsaKeyPair::from_der(der).map_err(|_| KeyError::Parse("PKCS#1 RSA"))?)
            }
            "EC PRIVATE KEY" => ec_from_sec1(der).ok_or(KeyError::Parse("SEC1 EC"))?,
            "PRIVATE KEY" => pkcs8(der).ok_or(KeyError::Parse("PKCS#8"))?,
            other => return Err(KeyError::Label(other.to_owned())),
        };
        Ok(SigningKey { inner })
    }

    /// PKCS#8 PEM, for writing key files.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        Ok(Zeroizing::new(pem::encode(
            "PRIVATE KEY",
            &self.to_pkcs8_der()?,
        )))
    }

    /// PKCS#8 DER (for handing the key to rustls).
    pub fn to_pkcs8_der(&self) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        Ok(Zeroizing::new(match &self.inner {
            Inner::Rsa(k) => k
                .as_der()
                .map_err(|_| KeyError::Generate)?
                .as_ref()
                .to_vec(),
            Inner::P256(k) | Inner::P384(k) => k
                .to_pkcs8v1()
                .map_err(|_| KeyError::Generate)?
                .as_ref()
                .to_vec(),
            Inner::Ed25519(k) => k
                .to_pkcs8v1()
                .map_err(|_| KeyError::Generate)?
                .as_ref()
                .to_vec(),
            Inner::External(..) => return Err(KeyError::NotExportable),
        }))
    }

    /// The public key as it appears inside a SubjectPublicKeyInfo BIT STRING
    /// (PKCS#1 RSAPublicKey, an uncompressed EC point, or 32 Ed25519 bytes).
    pub fn public_key_bits(&self) -> &[u8] {
        match &self.inner {
            Inner::Rsa(k) => k.public_key().as_ref(),
            Inner::P256(k) | Inner::P384(k) => k.public_key().as_ref(),
            Inner::Ed25519(k) => k.public_key().as_ref(),
            Inner::External(k, _) => k.public_key_bits(),
        }
    }

    fn external_algorithm(&self) -> ExternalAlgorithm {
        match &self.inner {
            Inner::Rsa(k) => ExternalAlgorithm::Rsa {
                bits: k.public_modulus_len() * 8,
            },
            Inner::P256(_) => ExternalAlgorithm::EcdsaP256,
            Inner::P384(_) => ExternalAlgorithm::EcdsaP384,
            // Ed25519 has no external variant; callers match it first.
            Inner::Ed25519(_) => ExternalAlgorithm::EcdsaP256,
            Inner::External(k, _) => k.algorithm(),
        }
    }

    /// DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> Vec<u8> {
        let algorithm = if matches!(self.inner, Inner::Ed25519(_)) {
            der::sequence(&[&der::oid(oids::ED25519)])
        } else {
            match self.external_algorithm() {
                ExternalAlgorithm::Rsa { .. } => {
                    der::sequence(&[&der::oid(oids::RSA_ENCRYPTION), &[der::NULL, 0]])
                }
                ExternalAlgorithm::EcdsaP256 => {
                    der::sequence(&[&der::oid(oids::EC_PUBLIC_KEY), &der::oid(oids::P256)])
                }
                ExternalAlgorithm::EcdsaP384 => {
                    der::sequence(&[&der::oid(oids::EC_PUBLIC_KEY), &der::oid(oids::P384)])
                }
            }
        };
        der::sequence(&[&algorithm, &der::bit_string(self.public_key_bits())])
    }

    /// The AlgorithmIdentifier of the signatures this key makes, as Go's
    /// crypto/x509 chooses it for a CA key: SHA-256 with RSA and P-256,
    /// SHA-384 with P-384, pure Ed25519.
    pub fn signature_algorithm_der(&self) -> Vec<u8> {
        if matches!(self.inner, Inner::Ed25519(_)) {
            return der::sequence(&[&der::oid(oids::ED25519)]);
        }
        match self.external_algorithm() {
            ExternalAlgorithm::Rsa { .. } => {
                der::sequence(&[&der::oid(oids::SHA256_WITH_RSA), &[der::NULL, 0]])
            }
            ExternalAlgorithm::EcdsaP256 => der::sequence(&[&der::oid(oids::ECDSA_SHA256)]),
            ExternalAlgorithm::EcdsaP384 => der::sequence(&[&der::oid(oids::ECDSA_SHA384)]),
        }
    }

    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
        let rng = SystemRandom::new();
        match &self.inner {
            Inner::Rsa(k) => {
                let mut signature = vec![0u8; k.public_modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &rng, message, &mut signature)
                    .map_err(|_| SignError::Crypto)?;
                Ok(signature)
            }
            Inner::P256(k) | Inner::P384(k) => Ok(k
                .sign(&rng, message)
                .map_err(|_| SignError::Crypto)?
                .as_ref()
                .to_vec()),
            Inner::Ed25519(k) => Ok(k.sign(message).as_ref().to_vec()),
            Inner::External(k, parsed) => {
                let signature = k.sign(message)?;
                // A module answering with a wrong key, or a swapped token,
                // must never produce a certificate that does not verify.
                let verified = match parsed {
                    Some(key) => key.verify_sig(message, &signature).is_ok(),
                    None => {
                        verify_signature(k.algorithm(), k.public_key_bits(), message, &signature)
                    }
                };
                if !verified {
                    return Err(SignError::SignatureMismatch);
                }
                Ok(signature)
            }
        }
    }

    /// "RSA 2048", "ECDSA P-256", "Ed25519".
    pub fn describe(&self) -> String {
        match &self.inner {
            Inner::Rsa(k) => format!("RSA {}", k.public_modulus_len() * 8),
            Inner::P256(_) => "ECDSA P-256".into(),
            Inner::P384(_) => "ECDSA P-384".into(),
            Inner::Ed25519(_) => "Ed25519".into(),
            Inner::External(k, _) => {
                let algorithm = match k.algorithm() {
                    ExternalAlgorithm::Rsa { bits } => format!("RSA {bits}"),
                    ExternalAlgorithm::EcdsaP256 => "ECDSA P-256".into(),
                    ExternalAlgorithm::EcdsaP384 => "ECDSA P-384".into(),
                };
                format!("{algorithm} in {}", k.location())
            }
        }
    }
}

/// Checks a signature the way a relying party will: with the public key
/// and the algorithm the certificate announces. `true` if it verifies.
pub fn verify_signature(
    algorithm: ExternalAlgorithm,
    public_key_bits: &[u8],
    message: &[u8],
    signature: &[u8],
) -> bool {
    UnparsedPublicKey::new(verification_algorithm(algorithm), public_key_bits)
        .verify(message, signature)
        .is_ok()
}

fn verification_algorithm(algorithm: ExternalAlgorithm) -> &'static dyn VerificationAlgorithm {
    match algorithm {
        ExternalAlgorithm::Rsa { .. } => &RSA_PKCS1_2048_8192_SHA256,
        ExternalAlgorithm::EcdsaP256 => &ECDSA_P256_SHA256_ASN1,
        ExternalAlgorithm::EcdsaP384 => &ECDSA_P384_SHA384_ASN1,
    }
}

/// A raw PKCS#11 ECDSA signature (`r || s`, each the curve's size) as the
/// DER `ECDSA-Sig-Value` X.509 carries. `None` for an odd or empty input.
pub fn ecdsa_raw_to_der(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.is_empty() || raw.len() % 2 != 0 {
        return None;
    }
    let (r, s) = raw.split_at(raw.len() / 2);
    Some(der::sequence(&[
        &der::unsigned_integer(r),
        &der::unsigned_integer(s),
    ]))
}

/// Why a signature could not be made. Never contains key bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignError {
    #[error("signing failed in the crypto library")]
    Crypto,
    /// The key's module or token cannot sign now (removed, logged out,
    /// device error); a later request may succeed.
    #[error("the CA key is unavailable: {0}")]
    KeyUnavailable(String),
    #[error("the signature returned for the CA key does not verify against its public key")]
    SignatureMismatch,
}

fn rsa_generate(size: KeySize) -> Result<RsaKeyPair, KeyError> {
    RsaKeyPair::generate(size).map_err(|_| KeyError::Generate)
}

fn ec_from_sec1(der: &[u8]) -> Option<Inner> {
    EcdsaKeyPair::from_private_key_der(&ECDSA_P256_SHA256_ASN1_SIGNING, der)
        .map(Inner::P256)
        .or_else(|_| {
            EcdsaKeyPair::from_private_key_der(&ECDSA_P384_SHA384_ASN1_SIGNING, der)
                .map(Inner::P384)
        })
        .ok()
}

fn pkcs8(der: &[u8]) -> Option<Inner> {
    if let Ok(k) = RsaKeyPair::from_pkcs8(der) {
        return Some(Inner::Rsa(k));
    }
    if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der) {
        return Some(Inner::P256(k));
    }
    if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_ASN1_SIGNING, der) {
        return Some(Inner::P384(k));
    }
    Ed25519KeyPair::from_pkcs8(der).ok().map(Inner::Ed25519)
}

/// Object identifiers meshca writes, as dotted arcs.
pub mod oids {
    pub const RSA_ENCRYPTION: &[u64] = &[1, 2, 840, 113549, 1, 1, 1];
    pub const SHA256_WITH_RSA: &[u64] = &[1, 2, 840, 113549, 1, 1, 11];
    pub const EC_PUBLIC_KEY: &[u64] = &[1, 2, 840, 10045, 2, 1];
    pub const P256: &[u64] = &[1, 2, 840, 10045, 3, 1, 7];
    pub const P384: &[u64] = &[1, 3, 132, 0, 34];
    pub const ECDSA_SHA256: &[u64] = &[1, 2, 840, 10045, 4, 3, 2];
    pub const ECDSA_SHA384: &[u64] = &[1, 2, 840, 10045, 4, 3, 3];
    pub const ED25519: &[u64] = &[1, 3, 101, 112];
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An in-memory key behind the external interface; `lie` makes it
    /// sign with another key, as a swapped token would.
    struct Stand {
        key: SigningKey,
        other: SigningKey,
        lie: bool,
        up: bool,
    }

    impl ExternalSigner for Stand {
        fn algorithm(&self) -> ExternalAlgorithm {
            self.key.external_algorithm()
        }
        fn public_key_bits(&self) -> &[u8] {
            self.key.public_key_bits()
        }
        fn sign(&self, message: &[u8]) -> Result<Vec<u8>, SignError> {
            if !self.up {
                return Err(SignError::KeyUnavailable("token removed".into()));
            }
            if self.lie {
                self.other.sign(message)
            } else {
                self.key.sign(message)
            }
        }
        fn location(&self) -> String {
            "pkcs11:token=test".into()
        }
    }

    fn stand(key_type: KeyType, lie: bool, up: bool) -> (Vec<u8>, SigningKey) {
        let key = SigningKey::generate(key_type).unwrap();
        let spki = key.spki_der();
        let other = SigningKey::generate(key_type).unwrap();
        let ext = SigningKey::external(Arc::new(Stand {
            key,
            other,
            lie,
            up,
        }));
        (spki, ext)
    }

    #[test]
    fn an_external_key_signs_with_the_algorithms_of_a_file_key() {
        for key_type in [KeyType::Rsa2048, KeyType::EcdsaP256, KeyType::EcdsaP384] {
            let file = SigningKey::generate(key_type).unwrap();
            let (spki, ext) = stand(key_type, false, true);
            assert_eq!(ext.spki_der(), spki, "{key_type}");
            assert_eq!(
                ext.signature_algorithm_der(),
                file.signature_algorithm_der(),
                "{key_type}"
            );
            assert!(ext.sign(b"tbs").is_ok(), "{key_type}");
            assert!(
                matches!(ext.inner, Inner::External(_, Some(_))),
                "{key_type}: public key parsed once"
            );
            assert!(ext.is_external());
            assert_eq!(ext.to_pkcs8_der().unwrap_err(), KeyError::NotExportable);
        }
    }

    #[test]
    fn a_signature_by_another_key_is_refused() {
        let (_, ext) = stand(KeyType::EcdsaP256, true, true);
        assert_eq!(ext.sign(b"tbs"), Err(SignError::SignatureMismatch));
        let (_, ext) = stand(KeyType::Rsa2048, true, true);
        assert_eq!(ext.sign(b"tbs"), Err(SignError::SignatureMismatch));
    }

    #[test]
    fn an_unavailable_key_says_so() {
        let (_, ext) = stand(KeyType::EcdsaP384, false, false);
        assert!(matches!(ext.sign(b"x"), Err(SignError::KeyUnavailable(_))));
    }

    #[test]
    fn debug_of_an_external_key_names_its_location_only() {
        let (_, ext) = stand(KeyType::EcdsaP256, false, true);
        assert_eq!(
            format!("{ext:?}"),
            "SigningKey(ECDSA P-256 in pkcs11:token=test)"
        );
    }

    #[test]
    fn raw_ecdsa_signatures_become_der() {
        assert_eq!(ecdsa_raw_to_der(&[]), None);
        assert_eq!(ecdsa_raw_to_der(&[1, 2, 3]), None);
        // r = 0x0001 (leading zero dropped), s = 0x80.. (zero byte prepended)
        assert_eq!(
            ecdsa_raw_to_der(&[0, 1, 0x80, 0]).unwrap(),
            vec![0x30, 0x08, 0x02, 0x01, 0x01, 0x02, 0x03, 0x00, 0x80, 0x00]
        );
    }
}
