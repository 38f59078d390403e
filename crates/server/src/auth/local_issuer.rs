//! Standalone mode's token issuer: a key created once in the state
//! directory, whose public key the server trusts for JWT authentication
//! (`meshca token` mints with it).

use std::path::Path;

use anyhow::{Context, Result};
use meshca_ca_store::dir::{self, OutFile};

use super::jwt::JwtIssuer;

/// The issuer name of locally minted tokens.
pub const LOCAL_ISSUER: &str = "meshca-local";
const JWT_KEY: &str = "jwt-signing-key.pem";
const JWT_PUBLIC: &str = "jwt-public-key.pem";

/// The local issuer of `state_dir`, created first if `create`.
pub fn local_issuer(state_dir: &Path, create: bool) -> Result<JwtIssuer> {
    let dir = state_dir.join("jwt");
    let key_path = dir.join(JWT_KEY);
    if !key_path.exists() {
        anyhow::ensure!(
            create,
            "{}: missing (start `meshca server` once to create it)",
            key_path.display()
        );
        let der = JwtIssuer::generate_pkcs8()?;
        let pem_text = zeroize::Zeroizing::new(meshca_pki::pem::encode("PRIVATE KEY", &der));
        let issuer = JwtIssuer::from_pkcs8(&der, LOCAL_ISSUER)?;
        dir::write_all(
            &dir,
            &[
                OutFile {
                    name: JWT_KEY,
                    contents: pem_text.as_bytes(),
                    secret: true,
                },
                OutFile {
                    name: JWT_PUBLIC,
                    contents: issuer.public_key_pem().as_bytes(),
                    secret: false,
                },
            ],
            false,
        )?;
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read(&key_path).with_context(|| format!("reading {}", key_path.display()))?,
    );
    let blocks = meshca_pki::pem::parse_all(&text)?;
    let block = blocks.first().context("empty JWT key file")?;
    JwtIssuer::from_pkcs8(&block.der, LOCAL_ISSUER)
}
