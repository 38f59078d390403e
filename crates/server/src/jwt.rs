//! JSON Web Tokens: local verification against issuer keys (running without
//! a cluster) and minting with a local key (`meshca token`).

use std::collections::HashSet;

use anyhow::{Context, Result, bail};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    self, ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair,
    RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::Deserialize;
use serde_json::Value;

/// The claims meshca reads from a Kubernetes-style token.
#[derive(Debug, Deserialize)]
pub struct Claims {
    pub iss: Option<String>,
    pub sub: Option<String>,
    #[serde(default, deserialize_with = "audiences")]
    pub aud: Vec<String>,
    pub exp: Option<i64>,
    pub nbf: Option<i64>,
}

fn audiences<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => vec![s],
        Value::Array(items) => items
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => vec![],
    })
}

/// Reads the claims without checking the signature: only to bound how long a
/// TokenReview answer may be cached (the token's `exp`).
pub fn unverified_expiry(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let claims: Claims = serde_json::from_slice(&B64URL.decode(payload).ok()?).ok()?;
    claims.exp
}

enum Key {
    Rsa(Vec<u8>),
    P256(Vec<u8>),
}

/// Public keys of trusted token issuers, from PEM public keys or a JWKS file.
pub struct JwtVerifier {
    keys: Vec<(Option<String>, Key)>,
    issuer: Option<String>,
    audiences: HashSet<String>,
}

impl JwtVerifier {
    /// `keys` is a PEM file of SubjectPublicKeyInfo blocks or a JWKS JSON.
    pub fn new(keys: &[u8], issuer: Option<String>, audiences: &[String]) -> Result<Self> {
        let keys = if keys.trim_ascii_start().starts_with(b"{") {
            jwks_keys(keys)?
        } else {
            pem_keys(keys)?
        };
        if keys.is_empty() {
            bail!("no usable public key found");
        }
        Ok(JwtVerifier {
            keys,
            issuer,
            audiences: audiences.iter().cloned().collect(),
        })
    }

    /// Verifies signature, time, audience and issuer; returns `(namespace, service account)`.
    pub fn verify(&self, token: &str, now: i64) -> Result<(String, String)> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            bail!("not a compact JWS");
        };
        let header: Value = serde_json::from_slice(&B64URL.decode(h).context("header encoding")?)?;
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .unwrap_or_default();
        let kid = header.get("kid").and_then(Value::as_str);
        let sig = B64URL.decode(s).context("signature encoding")?;
        let signed = &token[..h.len() + 1 + p.len()];
        let verified = self
            .keys
            .iter()
            .filter(|(k, _)| kid.is_none() || k.is_none() || k.as_deref() == kid)
            .any(|(_, key)| match (alg, key) {
                ("RS256", Key::Rsa(der)) => {
                    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, der)
                        .verify(signed.as_bytes(), &sig)
                        .is_ok()
                }
                ("ES256", Key::P256(point)) => {
                    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
                        .verify(signed.as_bytes(), &sig)
                        .is_ok()
                }
                _ => false,
            });
        if !verified {
            bail!("signature does not verify with any trusted key (alg {alg:?})");
        }
        let claims: Claims =
            serde_json::from_slice(&B64URL.decode(p).context("payload encoding")?)?;
        let exp = claims.exp.context("token has no exp")?;
        if now >= exp {
            bail!("token expired");
        }
        if claims.nbf.is_some_and(|nbf| now < nbf) {
            bail!("token not yet valid");
        }
        if !claims.aud.iter().any(|a| self.audiences.contains(a)) {
            bail!(
                "token audiences {:?} do not include an accepted audience",
                claims.aud
            );
        }
        if let Some(issuer) = &self.issuer
            && claims.iss.as_deref() != Some(issuer)
        {
            bail!("token issuer {:?} is not {issuer:?}", claims.iss);
        }
        // Verified: from here on, a failure is a missing identity.
        let no_identity = |what: &str| crate::auth::NoIdentity(what.into());
        let sub = claims.sub.ok_or_else(|| no_identity("token has no sub"))?;
        Ok(parse_service_account(&sub)
            .ok_or_else(|| no_identity("sub is not system:serviceaccount:<ns>:<sa>"))?)
    }
}

/// `system:serviceaccount:<ns>:<sa>` -> `(ns, sa)`.
pub fn parse_service_account(username: &str) -> Option<(String, String)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, sa) = rest.split_once(':')?;
    if ns.is_empty() || sa.is_empty() || sa.contains(':') {
        return None;
    }
    Some((ns.to_owned(), sa.to_owned()))
}

fn pem_keys(input: &[u8]) -> Result<Vec<(Option<String>, Key)>> {
    use x509_parser::prelude::FromDer;
    use x509_parser::x509::SubjectPublicKeyInfo;
    let mut out = Vec::new();
    for block in meshca_pki::pem::parse_all(input)? {
        if block.label != "PUBLIC KEY" {
            continue;
        }
        let (_, spki) = SubjectPublicKeyInfo::from_der(&block.der)
            .map_err(|e| anyhow::anyhow!("public key: {e}"))?;
        let bits = spki.subject_public_key.data.to_vec();
        let alg = spki.algorithm.algorithm.to_id_string();
        match alg.as_str() {
            "1.2.840.113549.1.1.1" => out.push((None, Key::Rsa(bits))),
            "1.2.840.10045.2.1" => out.push((None, Key::P256(bits))),
            other => bail!("unsupported public key algorithm {other}"),
        }
    }
    Ok(out)
}

fn jwks_keys(input: &[u8]) -> Result<Vec<(Option<String>, Key)>> {
    let jwks: Value = serde_json::from_slice(input).context("JWKS is not JSON")?;
    let mut out = Vec::new();
    for jwk in jwks
        .get("keys")
        .and_then(Value::as_array)
        .context("JWKS has no keys array")?
    {
        let field = |name: &str| -> Result<Vec<u8>> {
            let v = jwk
                .get(name)
                .and_then(Value::as_str)
                .with_context(|| format!("JWK lacks {name}"))?;
            Ok(B64URL.decode(v)?)
        };
        let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_owned);
        match jwk.get("kty").and_then(Value::as_str) {
            Some("RSA") => {
                let components = signature::RsaPublicKeyComponents {
                    n: field("n")?,
                    e: field("e")?,
                };
                out.push((
                    kid,
                    Key::Rsa(rsa_public_key_der(&components.n, &components.e)),
                ));
            }
            Some("EC") if jwk.get("crv").and_then(Value::as_str) == Some("P-256") => {
                let mut point = vec![4u8];
                point.extend(field("x")?);
                point.extend(field("y")?);
                out.push((kid, Key::P256(point)));
            }
            _ => {}
        }
    }
    Ok(out)
}

/// PKCS#1 RSAPublicKey DER, which aws-lc-rs verifies with.
fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Vec<u8> {
    use meshca_pki::der;
    der::sequence(&[&der::unsigned_integer(n), &der::unsigned_integer(e)])
}

/// A local ES256 token issuer (standalone mode's `meshca token`).
pub struct JwtIssuer {
    key: EcdsaKeyPair,
    issuer: String,
}

impl JwtIssuer {
    pub fn generate_pkcs8() -> Result<zeroize::Zeroizing<Vec<u8>>> {
        let doc =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| anyhow::anyhow!("key generation failed"))?;
        Ok(zeroize::Zeroizing::new(doc.as_ref().to_vec()))
    }

    pub fn from_pkcs8(der: &[u8], issuer: &str) -> Result<Self> {
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|e| anyhow::anyhow!("JWT signing key: {e}"))?;
        Ok(JwtIssuer {
            key,
            issuer: issuer.to_owned(),
        })
    }

    /// The public key as PEM SubjectPublicKeyInfo.
    pub fn public_key_pem(&self) -> String {
        use aws_lc_rs::signature::KeyPair;
        use meshca_pki::der;
        let algorithm = der::sequence(&[
            &der::oid(&[1, 2, 840, 10045, 2, 1]),
            &der::oid(&[1, 2, 840, 10045, 3, 1, 7]),
        ]);
        let spki = der::sequence(&[&algorithm, &der::bit_string(self.key.public_key().as_ref())]);
        meshca_pki::pem::encode("PUBLIC KEY", &spki)
    }

    pub fn mint(
        &self,
        namespace: &str,
        service_account: &str,
        audience: &str,
        ttl_secs: i64,
        now: i64,
    ) -> Result<String> {
        let header = serde_json::json!({"alg": "ES256", "typ": "JWT"});
        let claims = serde_json::json!({
            "iss": self.issuer,
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            "aud": [audience],
            "iat": now,
            "nbf": now,
            "exp": now + ttl_secs,
        });
        let signed = format!(
            "{}.{}",
            B64URL.encode(serde_json::to_vec(&header)?),
            B64URL.encode(serde_json::to_vec(&claims)?)
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), signed.as_bytes())
            .map_err(|_| anyhow::anyhow!("signing failed"))?;
        Ok(format!("{signed}.{}", B64URL.encode(sig.as_ref())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> JwtIssuer {
        JwtIssuer::from_pkcs8(&JwtIssuer::generate_pkcs8().unwrap(), "meshca-local").unwrap()
    }

    #[test]
    fn minted_tokens_verify_and_name_the_service_account() {
        let issuer = issuer();
        let verifier = JwtVerifier::new(
            issuer.public_key_pem().as_bytes(),
            Some("meshca-local".into()),
            &["istio-ca".into()],
        )
        .unwrap();
        let token = issuer.mint("ns1", "sa1", "istio-ca", 600, 1_000).unwrap();
        assert_eq!(
            verifier.verify(&token, 1_100).unwrap(),
            ("ns1".into(), "sa1".into())
        );
        assert_eq!(unverified_expiry(&token), Some(1_600));
    }

    #[test]
    fn expired_wrong_audience_and_tampered_tokens_are_refused() {
        let issuer = issuer();
        let verifier = JwtVerifier::new(
            issuer.public_key_pem().as_bytes(),
            None,
            &["istio-ca".into()],
        )
        .unwrap();
        let token = issuer.mint("ns1", "sa1", "istio-ca", 600, 1_000).unwrap();
        assert!(
            verifier
                .verify(&token, 1_600)
                .unwrap_err()
                .to_string()
                .contains("expired")
        );
        let other = issuer.mint("ns1", "sa1", "other", 600, 1_000).unwrap();
        assert!(
            verifier
                .verify(&other, 1_100)
                .unwrap_err()
                .to_string()
                .contains("audiences")
        );
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = B64URL.encode(
            br#"{"sub":"system:serviceaccount:kube-system:admin","aud":"istio-ca","exp":99999}"#,
        );
        parts[1] = &forged;
        assert!(
            verifier
                .verify(&parts.join("."), 1_100)
                .unwrap_err()
                .to_string()
                .contains("signature")
        );
        let stranger = self::issuer()
            .mint("ns1", "sa1", "istio-ca", 600, 1_000)
            .unwrap();
        assert!(verifier.verify(&stranger, 1_100).is_err());
    }

    #[test]
    fn service_account_usernames_parse_strictly() {
        assert_eq!(
            parse_service_account("system:serviceaccount:a:b"),
            Some(("a".into(), "b".into()))
        );
        assert_eq!(parse_service_account("system:serviceaccount:a"), None);
        assert_eq!(parse_service_account("system:serviceaccount::b"), None);
        assert_eq!(parse_service_account("system:serviceaccount:a:b:c"), None);
        assert_eq!(parse_service_account("admin"), None);
    }
}
