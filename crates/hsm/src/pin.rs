//! Where the token PIN comes from: a file or an environment variable,
//! never a flag value. Held zeroized; never formatted.

use std::path::PathBuf;

use zeroize::Zeroizing;

/// The default environment variable holding the PIN.
pub const PIN_ENV: &str = "MESHCA_PKCS11_PIN";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PinSource {
    /// A file whose content (one trailing newline removed) is the PIN.
    File(PathBuf),
    /// An environment variable holding the PIN.
    Env(String),
}

/// A PIN read from its source. `Debug` prints no digit.
pub struct Pin(pub(crate) Zeroizing<String>);

impl std::fmt::Debug for Pin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pin(..)")
    }
}

impl PinSource {
    pub fn read(&self) -> Result<Pin, String> {
        let mut pin = match self {
            PinSource::File(path) => {
                let bytes = Zeroizing::new(
                    std::fs::read(path)
                        .map_err(|e| format!("reading the PIN file {}: {e}", path.display()))?,
                );
                Zeroizing::new(
                    std::str::from_utf8(&bytes)
                        .map_err(|_| format!("the PIN file {} is not UTF-8", path.display()))?
                        .to_owned(),
                )
            }
            PinSource::Env(name) => Zeroizing::new(
                std::env::var(name)
                    .map_err(|_| format!("environment variable {name} (the PIN) is not set"))?,
            ),
        };
        while pin.ends_with('\n') || pin.ends_with('\r') {
            pin.pop();
        }
        if pin.is_empty() {
            return Err(format!("{self}: the PIN is empty"));
        }
        Ok(Pin(pin))
    }
}

impl std::fmt::Display for PinSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PinSource::File(p) => write!(f, "PIN file {}", p.display()),
            PinSource::Env(n) => write!(f, "PIN environment variable {n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pin_file_loses_its_trailing_newline_and_debug_hides_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pin");
        std::fs::write(&path, "4711\n").unwrap();
        let pin = PinSource::File(path).read().unwrap();
        assert_eq!(pin.0.as_str(), "4711");
        assert_eq!(format!("{pin:?}"), "Pin(..)");
    }

    #[test]
    fn a_missing_or_empty_pin_is_an_error_naming_its_source() {
        let dir = tempfile::tempdir().unwrap();
        let missing = PinSource::File(dir.path().join("nope")).read().unwrap_err();
        assert!(missing.contains("nope"), "{missing}");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        assert!(PinSource::File(empty).read().is_err());
        let unset = PinSource::Env("MESHCA_TEST_UNSET_PIN_VARIABLE".into())
            .read()
            .unwrap_err();
        assert!(unset.contains("MESHCA_TEST_UNSET_PIN_VARIABLE"));
    }
}
