//! CA material in Kubernetes Secrets: a `kubernetes.io/tls` Secret
//! (`tls.crt`, `tls.key`, optional `ca.crt`), and Istio's `istio-ca-secret`
//! (type `istio.io/ca-root`) data to and from a bundle.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use meshca_pki::CaBundle;
use time::OffsetDateTime;

use crate::material::{Material, Part};

/// Istio's self-signed CA Secret and its keys.
pub const ISTIO_CA_SECRET: &str = "istio-ca-secret";
pub const ISTIO_CA_SECRET_TYPE: &str = "istio.io/ca-root";
pub const CA_CERT: &str = "ca-cert.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const CERT_CHAIN: &str = "cert-chain.pem";
pub const KEY: &str = "key.pem";
pub const ROOT_CERT: &str = "root-cert.pem";

fn place(secret: &Secret) -> String {
    format!(
        "Secret {}/{}",
        secret.metadata.namespace.as_deref().unwrap_or_default(),
        secret.metadata.name.as_deref().unwrap_or_default()
    )
}

/// A key of the Secret's data, copied into a zeroized buffer.
fn part(secret_name: &str, data: &BTreeMap<String, ByteString>, key: &str) -> Option<Part> {
    data.get(key)
        .map(|b| Part::new(format!("{secret_name} {key}"), b.0.as_slice()))
}

/// Loads a CA from the three keys of a `kubernetes.io/tls` Secret.
pub fn load_tls(secret: &Secret, now: OffsetDateTime) -> Result<CaBundle> {
    let name = place(secret);
    let empty = BTreeMap::new();
    let data = secret.data.as_ref().unwrap_or(&empty);
    let Some(cert) = part(&name, data, "tls.crt") else {
        bail!("{name}: no tls.crt")
    };
    let Some(key) = part(&name, data, "tls.key") else {
        bail!("{name}: no tls.key")
    };
    let roots =
        part(&name, data, "ca.crt").filter(|r| !r.bytes.iter().all(u8::is_ascii_whitespace));
    Material {
        cert,
        key,
        chain: None,
        roots,
    }
    .load(now)
}

/// The bundle held by an `istio-ca-secret`'s data.
pub fn load_istio(data: &BTreeMap<String, ByteString>, now: OffsetDateTime) -> Result<CaBundle> {
    let get = |key: &str| {
        part(ISTIO_CA_SECRET, data, key)
            .with_context(|| format!("Secret {ISTIO_CA_SECRET}: key {key} missing"))
    };
    Material {
        cert: get(CA_CERT)?,
        key: get(CA_KEY)?,
        chain: Some(
            part(ISTIO_CA_SECRET, data, CERT_CHAIN)
                .unwrap_or_else(|| Part::new(format!("{ISTIO_CA_SECRET} {CERT_CHAIN}"), vec![])),
        ),
        roots: Some(get(ROOT_CERT)?),
    }
    .load(now)
}

/// The `istio-ca-secret` data of a self-signed bundle, in Istio's layout
/// (`cert-chain.pem` and `key.pem` empty, as istiod writes them).
pub fn istio_data(bundle: &CaBundle) -> Result<BTreeMap<String, ByteString>> {
    let key = bundle.key().to_pkcs8_pem()?;
    let mut data = BTreeMap::new();
    let mut put = |k: &str, v: &[u8]| {
        data.insert(k.to_owned(), ByteString(v.to_vec()));
    };
    put(CA_CERT, bundle.signing_cert_pem().as_bytes());
    put(CA_KEY, key.as_bytes());
    put(CERT_CHAIN, b"");
    put(KEY, b"");
    put(ROOT_CERT, bundle.roots_pem().as_bytes());
    Ok(data)
}
