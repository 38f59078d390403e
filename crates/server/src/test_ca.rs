//! Test fixture: a root and an intermediate under it, as a CA or a signer
//! holds them. Shared by the unit tests that need a chain.

use std::time::Duration;

use meshca_pki::profile::{CaCertRequest, intermediate_ca, self_signed_root};
use meshca_pki::{CaBundle, KeyType, SigningKey, cert};

/// A self-signed P-256 root living `root_ttl`, and an intermediate under it
/// living `intermediate_ttl`.
pub fn root_and_intermediate(
    root_ttl: Duration,
    intermediate_ttl: Duration,
) -> (CaBundle, CaBundle) {
    let now = time::OffsetDateTime::now_utc();
    let root_key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let root_der = self_signed_root(
        &CaCertRequest {
            subject_der: &cert::organization_name("test root"),
            key: &root_key,
            ttl: root_ttl,
        },
        now,
    )
    .unwrap();
    let root = CaBundle::from_parts(
        root_key,
        root_der.clone(),
        vec![],
        vec![root_der.clone()],
        now,
    )
    .unwrap();
    let key = SigningKey::generate(KeyType::EcdsaP256).unwrap();
    let inter_der = intermediate_ca(
        &CaCertRequest {
            subject_der: &cert::organization_name("test intermediate"),
            key: &key,
            ttl: intermediate_ttl,
        },
        &root,
        now,
    )
    .unwrap();
    let intermediate = CaBundle::from_parts(key, inter_der, vec![], vec![root_der], now).unwrap();
    (root, intermediate)
}
