//! CA material as read, before verification: the one place a
//! `meshca_pki::BundleSources` is put together.

use anyhow::Result;
use meshca_pki::{BundleSources, CaBundle, Source};
use time::OffsetDateTime;
use zeroize::Zeroizing;

/// One piece: where it came from (for error messages) and its bytes.
pub struct Part {
    pub name: String,
    pub bytes: Zeroizing<Vec<u8>>,
}

/// The name and the length only: a part may be a private key.
impl std::fmt::Debug for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Part")
            .field("name", &self.name)
            .field("len", &self.bytes.len())
            .finish_non_exhaustive()
    }
}

impl Part {
    pub fn new(name: impl Into<String>, bytes: impl Into<Vec<u8>>) -> Self {
        Part {
            name: name.into(),
            bytes: Zeroizing::new(bytes.into()),
        }
    }

    fn source(&self) -> Source<'_> {
        Source {
            name: &self.name,
            bytes: &self.bytes,
        }
    }
}

/// The signing certificate (intermediates may follow it), its key (PEM, or
/// a `pkcs11:` URI naming a key in a token: see meshca-hsm), the
/// chain up to the root (optional) and the roots (optional: default is the
/// last certificate of the chain). `Debug` shows names and lengths only.
#[derive(Debug)]
pub struct Material {
    pub cert: Part,
    pub key: Part,
    pub chain: Option<Part>,
    pub roots: Option<Part>,
}

impl Material {
    /// Verifies the material (key matches, CA:TRUE, chain to a root, within
    /// validity) into a bundle. Errors name the piece at fault.
    pub fn load(&self, now: OffsetDateTime) -> Result<CaBundle> {
        let sources = BundleSources {
            cert: self.cert.source(),
            key: self.key.source(),
            chain: self.chain.as_ref().map(Part::source),
            roots: self.roots.as_ref().map(Part::source),
        };
        if meshca_hsm::is_uri(&self.key.bytes) {
            // The key file names a key in a token instead of holding one.
            let uri = std::str::from_utf8(&self.key.bytes)
                .map_err(|_| anyhow::anyhow!("{}: a pkcs11: URI must be UTF-8", self.key.name))?
                .trim();
            let key = meshca_hsm::signing_key(uri)
                .map_err(|e| anyhow::anyhow!("{}: {e}", self.key.name))?;
            return Ok(CaBundle::load_with_key(&sources, key, now)?);
        }
        Ok(CaBundle::load(&sources, now)?)
    }
}
