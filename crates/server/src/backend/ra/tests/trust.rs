//! The roots answers are verified against.

use super::*;
use crate::backend::ra::*;
use std::collections::BTreeMap;

#[test]
fn a_signer_with_its_own_roots_uses_them_and_others_the_default() {
    let (a, b) = (pki().roots(), pki().roots());
    let per_signer = BTreeMap::from([("example.com/bar".to_string(), b.clone())]);
    let pick = |default: Option<&Roots>, signer| {
        let trust = TrustAnchors {
            default: default.cloned(),
            per_signer: per_signer.clone(),
        };
        trust.roots_for(signer).map(|r| r.pem().to_owned())
    };
    assert_eq!(pick(Some(&a), "example.com/bar").unwrap(), b.pem());
    assert_eq!(pick(Some(&a), "example.com/foo").unwrap(), a.pem());
    assert_eq!(pick(None, "example.com/bar").unwrap(), b.pem());
    assert_eq!(
        pick(None, "example.com/foo").unwrap_err(),
        RaError::NoRoots("example.com/foo".into())
    );
    let both = TrustAnchors {
        default: Some(a.clone()),
        per_signer,
    };
    assert_eq!(both.all_roots_pem(), format!("{}{}", a.pem(), b.pem()));
}
