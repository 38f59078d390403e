//! CA keys that never leave a hardware module, through PKCS#11 (`cryptoki`).
//!
//! ```text
//! pkcs11: URI (key file content, --pkcs11 flag) ─> uri::Pkcs11Uri
//!   + module path (URI module-path, else --pkcs11-module / MESHCA_PKCS11_MODULE)
//!   + PIN (URI pin-source, else --pkcs11-pin-file, else MESHCA_PKCS11_PIN)
//!   ─> token::TokenKey (session pool; recovers from a removed token)
//!   ─> meshca_pki::SigningKey::external ─> CaBundle, LocalCa (unchanged)
//! ```
//!
//! The process-wide defaults are set once by the binary ([`set_defaults`]);
//! keys are opened once per URI and reused across reloads ([`open_key`]).
#![deny(rust_2018_idioms)]
#![forbid(unsafe_code)]

pub mod pin;
pub mod token;
pub mod uri;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use meshca_pki::SigningKey;
use meshca_pki::key::ExternalAlgorithm;

pub use pin::{PIN_ENV, PinSource};
pub use token::{HsmError, Module, TokenKey};
pub use uri::{Pkcs11Uri, UriError};

/// The module and PIN used for a URI that does not name its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Defaults {
    pub module: Option<PathBuf>,
    pub pin: PinSource,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            module: std::env::var_os("MESHCA_PKCS11_MODULE").map(PathBuf::from),
            pin: PinSource::Env(PIN_ENV.into()),
        }
    }
}

static DEFAULTS: Mutex<Option<Defaults>> = Mutex::new(None);
type KeyCache = HashMap<(PathBuf, String), Arc<TokenKey>>;
static KEYS: Mutex<Option<KeyCache>> = Mutex::new(None);

/// Sets the process-wide module and PIN source (flags of the binary).
pub fn set_defaults(defaults: Defaults) {
    *DEFAULTS.lock().unwrap_or_else(|e| e.into_inner()) = Some(defaults);
}

fn defaults() -> Defaults {
    DEFAULTS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
        .unwrap_or_default()
}

/// Whether a key file's content names a key in a token instead of holding one.
pub fn is_uri(content: &[u8]) -> bool {
    content.trim_ascii_start().starts_with(b"pkcs11:")
}

/// The module, URI and PIN source for a URI text.
pub fn resolve(text: &str) -> Result<(Arc<Module>, Pkcs11Uri, PinSource), HsmError> {
    let uri = Pkcs11Uri::parse(text).map_err(|e| HsmError {
        message: e.to_string(),
        transient: false,
    })?;
    let defaults = defaults();
    let module = uri
        .module_path
        .clone()
        .or(defaults.module)
        .ok_or_else(|| HsmError {
            message: format!(
                "{uri}: no PKCS#11 module (module-path= in the URI, --pkcs11-module or MESHCA_PKCS11_MODULE)"
            ),
            transient: false,
        })?;
    let pin = uri
        .pin_source
        .clone()
        .map(PinSource::File)
        .unwrap_or(defaults.pin);
    Ok((Module::get(&module), uri, pin))
}

/// The key named by a `pkcs11:` URI, opened once per process and shared.
pub fn open_key(text: &str) -> Result<Arc<TokenKey>, HsmError> {
    let (module, uri, pin) = resolve(text)?;
    let cache_key = (module.path().to_owned(), uri.to_string());
    if let Some(key) = KEYS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .get(&cache_key)
    {
        return Ok(key.clone());
    }
    let key = Arc::new(TokenKey::open(module, uri, pin)?);
    KEYS.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(cache_key, key.clone());
    Ok(key)
}

/// The key named by a URI as a `SigningKey` for a CA bundle.
pub fn signing_key(text: &str) -> Result<SigningKey, HsmError> {
    Ok(SigningKey::external(open_key(text)?))
}

/// Generates a key of `key_type` in the token (`meshca ca init --pkcs11`)
/// and opens it.
pub fn generate_key(text: &str, key_type: meshca_pki::KeyType) -> Result<SigningKey, HsmError> {
    use meshca_pki::KeyType;
    let algorithm = match key_type {
        KeyType::Rsa2048 => ExternalAlgorithm::Rsa { bits: 2048 },
        KeyType::Rsa3072 => ExternalAlgorithm::Rsa { bits: 3072 },
        KeyType::Rsa4096 => ExternalAlgorithm::Rsa { bits: 4096 },
        KeyType::EcdsaP256 => ExternalAlgorithm::EcdsaP256,
        KeyType::EcdsaP384 => ExternalAlgorithm::EcdsaP384,
        KeyType::Ed25519 => {
            return Err(HsmError {
                message: "Ed25519 CA keys are not supported in a token (RSA or ECDSA)".into(),
                transient: false,
            });
        }
    };
    let (module, uri, pin) = resolve(text)?;
    token::generate(&module, &uri, &pin, algorithm)?;
    signing_key(text)
}
