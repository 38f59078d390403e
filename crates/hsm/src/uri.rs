//! RFC 7512 `pkcs11:` URIs naming a CA key: pure parsing, no I/O.
//!
//! `pkcs11:token=meshca;object=ca-key;id=%01%02?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=/run/pin`
//!
//! A key needs its token (`token` or `serial`) and `object` and/or `id`.
//! `pin-value` is refused: a PIN comes from a file or the environment,
//! never from text that ends up in a flag, a config file or a log line.

use std::fmt;
use std::path::PathBuf;

/// A parsed `pkcs11:` URI.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Pkcs11Uri {
    /// Token label (`token=`).
    pub token: Option<String>,
    /// Token serial number (`serial=`).
    pub serial: Option<String>,
    /// Key label (`object=`, CKA_LABEL).
    pub object: Option<String>,
    /// Key id (`id=`, CKA_ID), raw bytes.
    pub id: Option<Vec<u8>>,
    /// The PKCS#11 module (`module-path=` query attribute).
    pub module_path: Option<PathBuf>,
    /// A file holding the PIN (`pin-source=` query attribute; `file:` prefix allowed).
    pub pin_source: Option<PathBuf>,
}

/// Why a URI was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid PKCS#11 URI: {0}")]
pub struct UriError(pub String);

fn err(s: impl Into<String>) -> UriError {
    UriError(s.into())
}

fn pct_decode(value: &str) -> Result<Vec<u8>, UriError> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| err(format!("bad percent-encoding in {value:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

fn text(name: &str, value: &str) -> Result<String, UriError> {
    String::from_utf8(pct_decode(value)?).map_err(|_| err(format!("{name} is not UTF-8")))
}

fn set<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), UriError> {
    if slot.replace(value).is_some() {
        return Err(err(format!("attribute {name} given twice")));
    }
    Ok(())
}

impl Pkcs11Uri {
    /// Parses a URI naming one private key.
    pub fn parse(input: &str) -> Result<Self, UriError> {
        let input = input.trim();
        let rest = input
            .strip_prefix("pkcs11:")
            .ok_or_else(|| err("must start with `pkcs11:`"))?;
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut uri = Pkcs11Uri::default();
        for attr in path.split(';').filter(|a| !a.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| err(format!("path attribute {attr:?} has no `=`")))?;
            match name {
                "token" => set(&mut uri.token, name, text(name, value)?)?,
                "serial" => set(&mut uri.serial, name, text(name, value)?)?,
                "object" => set(&mut uri.object, name, text(name, value)?)?,
                "id" => set(&mut uri.id, name, pct_decode(value)?)?,
                "type" => {
                    if !matches!(value, "private" | "public" | "cert") {
                        return Err(err(format!("type={value} does not name a key")));
                    }
                }
                // Standard attributes that narrow the module/slot: accepted, not needed.
                "manufacturer"
                | "model"
                | "library-manufacturer"
                | "library-description"
                | "library-version"
                | "slot-manufacturer"
                | "slot-description"
                | "slot-id" => {}
                other if other.contains('-') && other.starts_with('x') => {}
                other => return Err(err(format!("unknown path attribute {other:?}"))),
            }
        }
        for attr in query.split('&').filter(|a| !a.is_empty()) {
            let (name, value) = attr
                .split_once('=')
                .ok_or_else(|| err(format!("query attribute {attr:?} has no `=`")))?;
            match name {
                "module-path" => set(
                    &mut uri.module_path,
                    name,
                    PathBuf::from(text(name, value)?),
                )?,
                "pin-source" => {
                    let source = text(name, value)?;
                    let path = source.strip_prefix("file:").unwrap_or(&source);
                    set(&mut uri.pin_source, name, PathBuf::from(path))?
                }
                "pin-value" => {
                    return Err(err(
                        "pin-value is not accepted: give the PIN in a file (pin-source, \
                         --pkcs11-pin-file) or the environment (MESHCA_PKCS11_PIN)",
                    ));
                }
                "module-name" => {}
                other => return Err(err(format!("unknown query attribute {other:?}"))),
            }
        }
        if uri.token.is_none() && uri.serial.is_none() {
            return Err(err("name the token (token= or serial=)"));
        }
        if uri.object.is_none() && uri.id.is_none() {
            return Err(err("name the key (object= and/or id=)"));
        }
        Ok(uri)
    }
}

fn encode(out: &mut String, bytes: &[u8], all: bool) {
    for b in bytes {
        let c = *b as char;
        if !all && (c.is_ascii_alphanumeric() || "-._~:[]@!$'()*+,".contains(c)) {
            out.push(c);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

/// The URI in RFC 7512 form (it never holds a PIN).
impl fmt::Display for Pkcs11Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut out = String::from("pkcs11:");
        let mut attrs = Vec::new();
        for (name, value) in [
            ("token", &self.token),
            ("serial", &self.serial),
            ("object", &self.object),
        ] {
            if let Some(v) = value {
                let mut s = format!("{name}=");
                encode(&mut s, v.as_bytes(), false);
                attrs.push(s);
            }
        }
        if let Some(id) = &self.id {
            let mut s = String::from("id=");
            encode(&mut s, id, true);
            attrs.push(s);
        }
        out.push_str(&attrs.join(";"));
        let mut query = Vec::new();
        if let Some(p) = &self.module_path {
            let mut s = String::from("module-path=");
            encode(&mut s, p.to_string_lossy().as_bytes(), false);
            query.push(s.replace("%2F", "/"));
        }
        if let Some(p) = &self.pin_source {
            let mut s = String::from("pin-source=");
            encode(&mut s, p.to_string_lossy().as_bytes(), false);
            query.push(s.replace("%2F", "/"));
        }
        if !query.is_empty() {
            out.push('?');
            out.push_str(&query.join("&"));
        }
        f.write_str(&out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_object_and_id_are_read_and_percent_decoded() {
        let uri = Pkcs11Uri::parse("pkcs11:token=my%20token;object=ca-key;id=%01%ab").unwrap();
        assert_eq!(uri.token.as_deref(), Some("my token"));
        assert_eq!(uri.object.as_deref(), Some("ca-key"));
        assert_eq!(uri.id.as_deref(), Some(&[1u8, 0xab][..]));
        assert_eq!(uri.module_path, None);
    }

    #[test]
    fn module_path_and_pin_source_come_from_the_query() {
        let uri = Pkcs11Uri::parse(
            "pkcs11:serial=42;id=%02?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/run/pin",
        )
        .unwrap();
        assert_eq!(uri.serial.as_deref(), Some("42"));
        assert_eq!(
            uri.module_path.as_deref(),
            Some(std::path::Path::new("/usr/lib/softhsm/libsofthsm2.so"))
        );
        assert_eq!(
            uri.pin_source.as_deref(),
            Some(std::path::Path::new("/run/pin"))
        );
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "pkcs11:token=meshca;object=ca%20key;id=%01%FF",
            "pkcs11:token=t;object=k?module-path=/usr/lib/x.so&pin-source=/run/pin",
        ] {
            let uri = Pkcs11Uri::parse(text).unwrap();
            assert_eq!(uri.to_string(), text);
            assert_eq!(Pkcs11Uri::parse(&uri.to_string()).unwrap(), uri);
        }
    }

    #[test]
    fn a_pin_value_is_refused_and_never_echoed() {
        let e = Pkcs11Uri::parse("pkcs11:token=t;object=k?pin-value=123456").unwrap_err();
        assert!(e.to_string().contains("pin-value is not accepted"));
        assert!(!e.to_string().contains("123456"));
    }

    #[test]
    fn incomplete_or_malformed_uris_are_refused() {
        for bad in [
            "token=t;object=k",
            "pkcs11:object=k",
            "pkcs11:token=t",
            "pkcs11:token=t;token=u;object=k",
            "pkcs11:token=t;object=k;id=%zz",
            "pkcs11:token=t;object=k;colour=blue",
            "pkcs11:token=t;object=k?foo=bar",
            "pkcs11:token=t;object",
            "pkcs11:token=t;object=k;type=secret-key",
            "pkcs11:token=%ff%fe;object=k",
        ] {
            assert!(Pkcs11Uri::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arbitrary_input_never_panics() {
        for input in [
            "pkcs11:",
            "pkcs11:%",
            "pkcs11:id=%",
            "pkcs11:?",
            "pkcs11:;;=?&=",
        ] {
            let _ = Pkcs11Uri::parse(input);
        }
    }
}
