//! JSON Web Tokens: local verification against issuer keys (running without
//! a cluster) and minting with a local key (`meshca token`). The JWS work
//! (header, algorithm, signature, audience, issuer) is `jsonwebtoken`'s on
//! aws-lc-rs; this module picks the keys and reads the Kubernetes claims.

use anyhow::{Context, Result, bail};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
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
    #[derive(Deserialize)]
    struct Expiry {
        exp: Option<i64>,
    }
    jsonwebtoken::dangerous::insecure_decode_claims::<Expiry>(token)
        .ok()?
        .exp
}

/// The algorithms accepted: RS256 with RSA keys, ES256 with P-256 keys.
const RSA: Algorithm = Algorithm::RS256;
const P256: Algorithm = Algorithm::ES256;

/// One trusted public key and the checks a token signed by it must pass.
struct Key {
    kid: Option<String>,
    key: DecodingKey,
    /// Names the key's one algorithm (`jsonwebtoken` refuses any other
    /// `alg`, `none` included), the audiences and the key file's issuer.
    validation: Validation,
    /// The `iss` required of tokens this key signed.
    issuer: String,
}

/// Public keys of trusted token issuers, from PEM public keys or a JWKS file.
pub struct JwtVerifier {
    keys: Vec<Key>,
}

impl JwtVerifier {
    /// `keys` is a PEM file of SubjectPublicKeyInfo blocks or a JWKS JSON;
    /// tokens its keys sign must carry `iss` = `issuer`.
    pub fn new(keys: &[u8], issuer: &str, audiences: &[String]) -> Result<Self> {
        Self::from_sources(&[(keys, issuer)], audiences)
    }

    /// Several key files (each PEM or JWKS), each with the `iss` required of
    /// the tokens its keys sign: e.g. `--jwt-keys` with `--jwt-issuer`
    /// beside standalone mode's local key with its own issuer. A key is
    /// never trusted for any issuer: an empty issuer is refused.
    pub fn from_sources(sources: &[(&[u8], &str)], audiences: &[String]) -> Result<Self> {
        let mut keys = Vec::new();
        for &(file, issuer) in sources {
            if issuer.is_empty() {
                bail!("a JWT key file needs the issuer its tokens must name");
            }
            let parsed = if file.trim_ascii_start().starts_with(b"{") {
                jwks_keys(file)?
            } else {
                pem_keys(file)?
            };
            for (kid, alg, key) in parsed {
                let mut validation = Validation::new(alg);
                // Time is checked against the caller's `now` in `verify`.
                validation.validate_exp = false;
                validation.validate_nbf = false;
                validation.set_audience(audiences);
                validation.set_issuer(&[issuer]);
                validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
                keys.push(Key {
                    kid,
                    key,
                    validation,
                    issuer: issuer.to_owned(),
                });
            }
        }
        if keys.is_empty() {
            bail!("no usable public key found");
        }
        Ok(JwtVerifier { keys })
    }

    /// Verifies signature, time, audience and issuer; returns `(namespace, service account)`.
    pub fn verify(&self, token: &str, now: i64) -> Result<(String, String)> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| anyhow::anyhow!("not a compact JWS: {e}"))?;
        let kid = header.kid.as_deref();
        let mut claims = None;
        for key in self.keys.iter().filter(|k| {
            k.validation.algorithms.contains(&header.alg)
                && (kid.is_none() || k.kid.is_none() || k.kid.as_deref() == kid)
        }) {
            match jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation) {
                Ok(data) => {
                    claims = Some(data.claims);
                    break;
                }
                // Another key (same alg, no or the same kid) may have signed it.
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                Err(e) => return Err(refusal(e, &key.issuer)),
            }
        }
        let claims = claims.with_context(|| {
            format!(
                "signature does not verify with any trusted key (alg {:?})",
                header.alg
            )
        })?;
        let exp = claims.exp.context("token has no exp")?;
        if now >= exp {
            bail!("token expired");
        }
        if claims.nbf.is_some_and(|nbf| now < nbf) {
            bail!("token not yet valid");
        }
        // Verified: from here on, a failure is a missing identity.
        let no_identity = |what: &str| crate::auth::NoIdentity(what.into());
        let sub = claims.sub.ok_or_else(|| no_identity("token has no sub"))?;
        Ok(parse_service_account(&sub).map_err(|e| no_identity(&format!("sub {e}")))?)
    }
}

/// Why a token whose signature verified (or that could not be read) is refused.
fn refusal(e: jsonwebtoken::errors::Error, issuer: &str) -> anyhow::Error {
    match e.into_kind() {
        ErrorKind::InvalidAudience => {
            anyhow::anyhow!("token audiences do not include an accepted audience")
        }
        ErrorKind::InvalidIssuer => anyhow::anyhow!("token issuer is not {issuer:?}"),
        ErrorKind::MissingRequiredClaim(claim) => anyhow::anyhow!("token has no {claim}"),
        ErrorKind::InvalidClaimFormat(claim) => anyhow::anyhow!("token's {claim} is malformed"),
        kind => anyhow::anyhow!("token refused: {}", jsonwebtoken::errors::Error::from(kind)),
    }
}

/// `system:serviceaccount:<ns>:<sa>` -> `(ns, sa)`, the namespace a DNS-1123
/// label and the account a DNS-1123 subdomain
/// ([`meshca_pki::san::check_workload_account`]): the one parse of a token's
/// `sub` and of a TokenReview username.
pub fn parse_service_account(username: &str) -> Result<(String, String), String> {
    let (ns, sa) = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|rest| rest.split_once(':'))
        .ok_or_else(|| format!("{username:?} is not system:serviceaccount:<ns>:<sa>"))?;
    meshca_pki::san::check_workload_account(ns, sa).map_err(|e| format!("{username:?}: {e}"))?;
    Ok((ns.to_owned(), sa.to_owned()))
}

fn pem_keys(input: &[u8]) -> Result<Vec<(Option<String>, Algorithm, DecodingKey)>> {
    use x509_parser::prelude::FromDer;
    use x509_parser::x509::SubjectPublicKeyInfo;
    let mut out = Vec::new();
    for block in meshca_pki::pem::parse_all(input)? {
        if block.label != "PUBLIC KEY" {
            continue;
        }
        let (_, spki) = SubjectPublicKeyInfo::from_der(&block.der)
            .map_err(|e| anyhow::anyhow!("public key: {e}"))?;
        // The BIT STRING holds PKCS#1 RSAPublicKey or the EC point, which is
        // what the aws-lc-rs verifiers take.
        let bits = &spki.subject_public_key.data;
        let alg = spki.algorithm.algorithm.to_id_string();
        match alg.as_str() {
            "1.2.840.113549.1.1.1" => out.push((None, RSA, DecodingKey::from_rsa_der(bits))),
            "1.2.840.10045.2.1" => out.push((None, P256, DecodingKey::from_ec_der(bits))),
            other => bail!("unsupported public key algorithm {other}"),
        }
    }
    Ok(out)
}

fn jwks_keys(input: &[u8]) -> Result<Vec<(Option<String>, Algorithm, DecodingKey)>> {
    let jwks: JwkSet = serde_json::from_slice(input).context("JWKS is not a JWK set")?;
    let mut out = Vec::new();
    for jwk in &jwks.keys {
        let kid = jwk.common.key_id.clone();
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => RSA,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => P256,
            AlgorithmParameters::Other(other) => {
                // An RSA or P-256 key without its numbers is a broken file,
                // not a key type to skip (keys on other curves are skipped).
                let field = |name| other.fields.get(name).and_then(Value::as_str);
                match (field("kty"), field("crv")) {
                    (Some("RSA"), _) | (Some("EC"), Some("P-256")) => {
                        bail!("JWK {kid:?} lacks its key parameters")
                    }
                    _ => continue,
                }
            }
            _ => continue,
        };
        let key = DecodingKey::from_jwk(jwk).with_context(|| format!("JWK {kid:?}"))?;
        out.push((kid, alg, key));
    }
    Ok(out)
}

/// A local ES256 token issuer (standalone mode's `meshca token`).
pub struct JwtIssuer {
    /// For the public key only; `encoding` holds the same PKCS#8 key.
    key: EcdsaKeyPair,
    encoding: EncodingKey,
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
            encoding: EncodingKey::from_ec_der(der),
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
        let claims = serde_json::json!({
            "iss": self.issuer,
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
            "aud": [audience],
            "iat": now,
            "nbf": now,
            "exp": now + ttl_secs,
        });
        jsonwebtoken::encode(&Header::new(P256), &claims, &self.encoding)
            .map_err(|e| anyhow::anyhow!("signing the token: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
    use serde_json::json;

    fn issuer() -> JwtIssuer {
        JwtIssuer::from_pkcs8(&JwtIssuer::generate_pkcs8().unwrap(), "meshca-local").unwrap()
    }

    /// A compact JWS built by hand, so that the tests do not check the
    /// crate against itself.
    fn jws(header: &Value, claims: &Value, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
        let signed = format!(
            "{}.{}",
            B64URL.encode(serde_json::to_vec(header).unwrap()),
            B64URL.encode(serde_json::to_vec(claims).unwrap())
        );
        let sig = sign(signed.as_bytes());
        format!("{signed}.{}", B64URL.encode(sig))
    }

    fn claims(aud: &str, exp: i64) -> Value {
        json!({"iss": "https://issuer", "sub": "system:serviceaccount:ns1:sa1", "aud": [aud], "exp": exp})
    }

    fn rsa_key() -> meshca_pki::SigningKey {
        meshca_pki::SigningKey::generate(meshca_pki::KeyType::Rsa2048).unwrap()
    }

    /// An RS256 JWS signed with `key`.
    fn rs256(key: &meshca_pki::SigningKey, kid: Option<&str>, claims: &Value) -> String {
        let mut header = json!({"alg": "RS256", "typ": "JWT"});
        if let Some(kid) = kid {
            header["kid"] = kid.into();
        }
        jws(&header, claims, |m| key.sign(m).unwrap())
    }

    fn rsa_jwk(key: &meshca_pki::SigningKey, kid: &str) -> Value {
        let public = aws_lc_rs::rsa::PublicKey::from_der(key.public_key_bits()).unwrap();
        let c = aws_lc_rs::signature::RsaPublicKeyComponents::<Vec<u8>>::from(&public);
        json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
               "n": B64URL.encode(c.n), "e": B64URL.encode(c.e)})
    }

    fn ec_jwk(issuer: &JwtIssuer, kid: &str) -> Value {
        use aws_lc_rs::signature::KeyPair;
        let point = issuer.key.public_key().as_ref();
        json!({"kty": "EC", "crv": "P-256", "kid": kid,
               "x": B64URL.encode(&point[1..33]), "y": B64URL.encode(&point[33..])})
    }

    fn refusal(verifier: &JwtVerifier, token: &str, now: i64) -> String {
        format!("{:#}", verifier.verify(token, now).unwrap_err())
    }

    #[test]
    fn minted_tokens_verify_and_name_the_service_account() {
        let issuer = issuer();
        let verifier = JwtVerifier::new(
            issuer.public_key_pem().as_bytes(),
            "meshca-local",
            &["istio-ca".into()],
        )
        .unwrap();
        let token = issuer.mint("ns1", "sa1", "istio-ca", 600, 1_000).unwrap();
        assert_eq!(
            verifier.verify(&token, 1_100).unwrap(),
            ("ns1".into(), "sa1".into())
        );
        assert_eq!(unverified_expiry(&token), Some(1_600));
        assert_eq!(unverified_expiry("not.a-token"), None);
    }

    #[test]
    fn expired_wrong_audience_and_tampered_tokens_are_refused() {
        let issuer = issuer();
        let verifier = JwtVerifier::new(
            issuer.public_key_pem().as_bytes(),
            "meshca-local",
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
    fn expiry_and_not_before_are_exact_to_the_second() {
        let issuer = issuer();
        let verifier = JwtVerifier::new(
            issuer.public_key_pem().as_bytes(),
            "meshca-local",
            &["istio-ca".into()],
        )
        .unwrap();
        // nbf = 1_000, exp = 1_600: valid on [1_000, 1_600).
        let token = issuer.mint("ns1", "sa1", "istio-ca", 600, 1_000).unwrap();
        assert!(verifier.verify(&token, 1_000).is_ok());
        assert!(verifier.verify(&token, 1_599).is_ok());
        assert_eq!(refusal(&verifier, &token, 1_600), "token expired");
        assert_eq!(refusal(&verifier, &token, 999), "token not yet valid");
    }

    #[test]
    fn duplicate_claims_and_header_fields_are_refused() {
        let rsa = rsa_key();
        let jwks = json!({"keys": [rsa_jwk(&rsa, "k")]}).to_string();
        let verifier =
            JwtVerifier::new(jwks.as_bytes(), "https://issuer", &["istio-ca".into()]).unwrap();
        // Raw JSON: a JSON value cannot hold a key twice.
        let raw = |header: &str, claims: &str| {
            let signed = format!(
                "{}.{}",
                B64URL.encode(header.as_bytes()),
                B64URL.encode(claims.as_bytes())
            );
            let sig = rsa.sign(signed.as_bytes()).unwrap();
            format!("{signed}.{}", B64URL.encode(sig))
        };
        let header = r#"{"alg":"RS256","kid":"k"}"#;
        let good = r#"{"iss":"https://issuer","sub":"system:serviceaccount:ns1:sa1","aud":"istio-ca","exp":1600}"#;
        assert!(verifier.verify(&raw(header, good), 1_100).is_ok());
        for claims in [
            // Which `sub` wins differs between JSON parsers: refuse both.
            r#"{"iss":"https://issuer","sub":"system:serviceaccount:ns1:sa1","sub":"system:serviceaccount:kube-system:admin","aud":"istio-ca","exp":1600}"#,
            r#"{"iss":"https://issuer","sub":"system:serviceaccount:ns1:sa1","aud":"istio-ca","exp":1600,"exp":99999999999}"#,
            r#"{"iss":"https://evil","iss":"https://issuer","sub":"system:serviceaccount:ns1:sa1","aud":"istio-ca","exp":1600}"#,
        ] {
            let err = verifier.verify(&raw(header, claims), 1_100);
            assert!(err.is_err(), "{claims} was accepted as {err:?}");
        }
        let twice = r#"{"alg":"RS256","kid":"k","alg":"none"}"#;
        assert!(verifier.verify(&raw(twice, good), 1_100).is_err());
    }

    #[test]
    fn a_flipped_signature_byte_is_refused() {
        let issuer = issuer();
        let verifier = JwtVerifier::new(
            issuer.public_key_pem().as_bytes(),
            "meshca-local",
            &["istio-ca".into()],
        )
        .unwrap();
        let token = issuer.mint("ns1", "sa1", "istio-ca", 600, 1_000).unwrap();
        let (signed, sig) = token.rsplit_once('.').unwrap();
        let mut sig = B64URL.decode(sig).unwrap();
        sig[10] ^= 1;
        let tampered = format!("{signed}.{}", B64URL.encode(sig));
        assert!(refusal(&verifier, &tampered, 1_100).starts_with("signature does not verify"));
    }

    #[test]
    fn alg_none_and_hmac_with_the_public_key_are_refused() {
        let issuer = issuer();
        let pem = issuer.public_key_pem();
        let verifier =
            JwtVerifier::new(pem.as_bytes(), "meshca-local", &["istio-ca".into()]).unwrap();
        let claims = claims("istio-ca", 1_600);
        let none = jws(&json!({"alg": "none"}), &claims, |_| vec![]);
        assert!(refusal(&verifier, &none, 1_100).starts_with("not a compact JWS"));
        // The classic confusion: the public key used as an HMAC secret.
        let hmac_key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, pem.as_bytes());
        let hs256 = jws(&json!({"alg": "HS256"}), &claims, |m| {
            aws_lc_rs::hmac::sign(&hmac_key, m).as_ref().to_vec()
        });
        assert_eq!(
            refusal(&verifier, &hs256, 1_100),
            "signature does not verify with any trusted key (alg HS256)"
        );
        // An RS256 token where only an EC key is trusted: no key of that alg.
        let rs = rs256(&rsa_key(), None, &claims);
        assert!(refusal(&verifier, &rs, 1_100).contains("(alg RS256)"));
    }

    #[test]
    fn jwks_keys_are_chosen_by_kid_and_algorithm() {
        let rsa = rsa_key();
        let ec = issuer();
        let jwks = json!({"keys": [
            rsa_jwk(&rsa, "rsa-1"),
            ec_jwk(&ec, "ec-1"),
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "P-384", "kid": "p384",
             "x": B64URL.encode([1u8; 48]), "y": B64URL.encode([2u8; 48])},
        ]});
        let verifier = JwtVerifier::new(
            jwks.to_string().as_bytes(),
            "https://issuer",
            &["istio-ca".into(), "other".into()],
        )
        .unwrap();
        let ok = ("ns1".to_string(), "sa1".to_string());
        let claims = claims("istio-ca", 1_600);
        assert_eq!(
            verifier
                .verify(&rs256(&rsa, Some("rsa-1"), &claims), 1_100)
                .unwrap(),
            ok
        );
        assert_eq!(
            verifier.verify(&rs256(&rsa, None, &claims), 1_100).unwrap(),
            ok
        );
        // Any accepted audience will do.
        let other_aud = self::claims("other", 1_600);
        assert_eq!(
            verifier
                .verify(&rs256(&rsa, None, &other_aud), 1_100)
                .unwrap(),
            ok
        );
        // A kid the set does not have, or one naming the EC key, finds no key.
        assert_eq!(
            refusal(&verifier, &rs256(&rsa, Some("rsa-2"), &claims), 1_100),
            "signature does not verify with any trusted key (alg RS256)"
        );
        assert!(
            refusal(&verifier, &rs256(&rsa, Some("ec-1"), &claims), 1_100)
                .starts_with("signature does not verify")
        );
        // ES256 through the JWK's x and y.
        let mut es = json!({"iss": "https://issuer"});
        es["sub"] = "system:serviceaccount:ns1:sa1".into();
        es["aud"] = "istio-ca".into();
        es["exp"] = 1_600.into();
        let es_token = jws(&json!({"alg": "ES256", "kid": "ec-1"}), &es, |m| {
            ec.key
                .sign(&SystemRandom::new(), m)
                .unwrap()
                .as_ref()
                .to_vec()
        });
        assert_eq!(verifier.verify(&es_token, 1_100).unwrap(), ok);
    }

    #[test]
    fn issuer_and_required_claims_are_checked() {
        let rsa = rsa_key();
        let jwks = json!({"keys": [rsa_jwk(&rsa, "k")]}).to_string();
        let verifier =
            JwtVerifier::new(jwks.as_bytes(), "https://issuer", &["istio-ca".into()]).unwrap();
        let mut c = claims("istio-ca", 1_600);
        c["iss"] = "https://elsewhere".into();
        assert_eq!(
            refusal(&verifier, &rs256(&rsa, None, &c), 1_100),
            "token issuer is not \"https://issuer\""
        );
        for missing in ["iss", "exp", "sub", "aud"] {
            let mut c = claims("istio-ca", 1_600);
            c.as_object_mut().unwrap().remove(missing);
            assert_eq!(
                refusal(&verifier, &rs256(&rsa, None, &c), 1_100),
                format!("token has no {missing}")
            );
        }
        let mut c = claims("istio-ca", 1_600);
        c["sub"] = "admin".into();
        assert_eq!(
            refusal(&verifier, &rs256(&rsa, None, &c), 1_100),
            "no identity: sub \"admin\" is not system:serviceaccount:<ns>:<sa>",
            "verified, but names no service account: counts in id_extraction_err"
        );
    }

    #[test]
    fn each_key_file_requires_its_own_issuer() {
        // A JWKS from a cluster (its issuer) beside the local key (meshca-local).
        let rsa = rsa_key();
        let jwks = json!({"keys": [rsa_jwk(&rsa, "k")]}).to_string();
        let local = issuer();
        let pem = local.public_key_pem();
        let verifier = JwtVerifier::from_sources(
            &[
                (jwks.as_bytes(), "https://issuer"),
                (pem.as_bytes(), "meshca-local"),
            ],
            &["istio-ca".into()],
        )
        .unwrap();
        let ok = ("ns1".to_string(), "sa1".to_string());
        let cluster = rs256(&rsa, Some("k"), &claims("istio-ca", 1_600));
        assert_eq!(verifier.verify(&cluster, 1_100).unwrap(), ok);
        let minted = local.mint("ns1", "sa1", "istio-ca", 600, 1_000).unwrap();
        assert_eq!(verifier.verify(&minted, 1_100).unwrap(), ok);
        // The cluster's key does not vouch for the local issuer's name.
        let mut c = claims("istio-ca", 1_600);
        c["iss"] = "meshca-local".into();
        assert_eq!(
            refusal(&verifier, &rs256(&rsa, Some("k"), &c), 1_100),
            "token issuer is not \"https://issuer\""
        );
    }

    #[test]
    fn a_key_file_without_an_issuer_is_refused() {
        let pem = issuer().public_key_pem();
        let err = JwtVerifier::new(pem.as_bytes(), "", &["istio-ca".into()])
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "a JWT key file needs the issuer its tokens must name"
        );
    }

    #[test]
    fn a_verified_sub_naming_a_path_is_no_identity() {
        // `system:serviceaccount:a/sa/b:c` made `spiffe://…/ns/a/sa/b/sa/c`.
        let issuer = issuer();
        let verifier = JwtVerifier::new(
            issuer.public_key_pem().as_bytes(),
            "meshca-local",
            &["istio-ca".into()],
        )
        .unwrap();
        let token = issuer.mint("a/sa/b", "c", "istio-ca", 600, 1_000).unwrap();
        let e = verifier.verify(&token, 1_100).unwrap_err();
        assert!(e.is::<crate::auth::NoIdentity>(), "{e:#}");
        assert_eq!(
            e.to_string(),
            "no identity: sub \"system:serviceaccount:a/sa/b:c\": namespace \"a/sa/b\" is not a DNS-1123 label"
        );
    }

    #[test]
    fn key_files_without_a_usable_key_are_refused() {
        let only_hmac = json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}).to_string();
        let err = JwtVerifier::new(only_hmac.as_bytes(), "iss", &[])
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "no usable public key found");
        for broken in [
            json!({"kty": "RSA", "kid": "k", "e": "AQAB"}),
            json!({"kty": "EC", "kid": "k", "crv": "P-256", "x": "AQAB"}),
        ] {
            let jwks = json!({"keys": [broken]}).to_string();
            let err = JwtVerifier::new(jwks.as_bytes(), "iss", &[]).err().unwrap();
            assert_eq!(err.to_string(), "JWK Some(\"k\") lacks its key parameters");
        }
        // Keys on curves meshca does not verify with are skipped, as before.
        let other_curve =
            json!({"keys": [{"kty": "EC", "crv": "secp256k1", "x": "AQ", "y": "AQ"}]});
        let err = JwtVerifier::new(other_curve.to_string().as_bytes(), "iss", &[])
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "no usable public key found");
        let err = JwtVerifier::new(b"{\"nokeys\": []}", "iss", &[])
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "JWKS is not a JWK set");
        let only_private = meshca_pki::pem::encode("PRIVATE KEY", &[0x30, 0x00]);
        let err = JwtVerifier::new(only_private.as_bytes(), "iss", &[])
            .err()
            .unwrap();
        assert_eq!(err.to_string(), "no usable public key found");
    }

    #[test]
    fn service_account_usernames_parse_strictly() {
        assert_eq!(
            parse_service_account("system:serviceaccount:a:b.c"),
            Ok(("a".into(), "b.c".into()))
        );
        for bad in [
            "system:serviceaccount:a",
            "system:serviceaccount::b",
            "system:serviceaccount:a:",
            "system:serviceaccount:a:b:c",
            "system:serviceaccount:a/sa/b:c",
            "system:serviceaccount:a:b/sa/c",
            "system:serviceaccount:A:b",
            "system:serviceaccount:a.b:c",
            "system:serviceaccount:a:-b",
            "system:serviceaccount:a:b ",
            "admin",
        ] {
            assert!(parse_service_account(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(
            parse_service_account("system:serviceaccount:a/sa/b:c").unwrap_err(),
            "\"system:serviceaccount:a/sa/b:c\": namespace \"a/sa/b\" is not a DNS-1123 label"
        );
    }

    proptest::proptest! {
        /// Whatever a token or TokenReview says, what comes out can only
        /// make Istio's `spiffe://<td>/ns/<label>/sa/<subdomain>`.
        #[test]
        fn parsed_accounts_are_always_dns1123(ns in "\\PC{0,10}|[a-z/.:-]{0,10}", sa in "\\PC{0,10}|[a-z/.:-]{0,10}") {
            let username = format!("system:serviceaccount:{ns}:{sa}");
            if let Ok((n, s)) = parse_service_account(&username) {
                proptest::prop_assert!(meshca_pki::san::is_dns1123_label(&n));
                proptest::prop_assert!(meshca_pki::san::is_dns1123_subdomain(&s));
                let id = meshca_pki::SpiffeId::workload("cluster.local", &n, &s).unwrap();
                proptest::prop_assert_eq!(id.namespace_and_service_account(), Some((&n[..], &s[..])));
            }
        }
    }
}
