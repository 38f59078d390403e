//! SoftHSM2, the real PKCS#11 token of meshca's HSM tests: a token of its
//! own in a temporary directory, selected by `SOFTHSM2_CONF`.
//!
//! Needs Debian's `softhsm2` (`scripts/softhsm` installs it; `./test` calls
//! that). Without it the tests fail and say so; they never skip.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian's package puts the module.
pub const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const SO_PIN: &str = "87654321";

/// A SoftHSM2 configuration with one initialised token; removed on drop.
pub struct SoftHsm {
    dir: tempfile::TempDir,
    pub label: String,
    pub pin: String,
}

fn require_softhsm() {
    let installed = Path::new(SOFTHSM_MODULE).exists()
        && Command::new("softhsm2-util")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    assert!(
        installed,
        "SoftHSM2 is not installed ({SOFTHSM_MODULE}, softhsm2-util): run scripts/softhsm \
         (or `apt-get install -y softhsm2`); the HSM tests need a real PKCS#11 module"
    );
}

impl SoftHsm {
    /// A new configuration whose token directory holds one token `label`
    /// (user PIN `pin`).
    pub fn new(label: &str, pin: &str) -> SoftHsm {
        require_softhsm();
        let dir = tempfile::tempdir().expect("temp dir");
        let hsm = SoftHsm {
            dir,
            label: label.into(),
            pin: pin.into(),
        };
        std::fs::create_dir_all(hsm.token_dir()).expect("token dir");
        std::fs::write(
            hsm.conf(),
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n",
                hsm.token_dir().display()
            ),
        )
        .expect("softhsm2.conf");
        std::fs::write(hsm.pin_file(), format!("{pin}\n")).expect("pin file");
        hsm.init_token(label, pin);
        hsm
    }

    /// Initialises one more token in the same configuration.
    pub fn init_token(&self, label: &str, pin: &str) {
        let out = Command::new("softhsm2-util")
            .env("SOFTHSM2_CONF", self.conf())
            .args([
                "--init-token",
                "--free",
                "--label",
                label,
                "--pin",
                pin,
                "--so-pin",
                SO_PIN,
            ])
            .output()
            .expect("running softhsm2-util");
        assert!(
            out.status.success(),
            "softhsm2-util --init-token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("softhsm2.conf")
    }
    pub fn token_dir(&self) -> PathBuf {
        self.dir.path().join("tokens")
    }
    /// A file with the user PIN.
    pub fn pin_file(&self) -> PathBuf {
        self.dir.path().join("pin")
    }
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The environment a process using this token needs.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("SOFTHSM2_CONF".into(), self.conf().display().to_string()),
            ("MESHCA_PKCS11_MODULE".into(), SOFTHSM_MODULE.into()),
        ]
    }

    /// A URI for a key `object` in this token.
    pub fn uri(&self, object: &str) -> String {
        format!("pkcs11:token={};object={object}", self.label)
    }

    /// Takes every token's files away, as if the token were pulled out.
    pub fn remove_tokens(&self) {
        let aside = self.dir.path().join("tokens.removed");
        std::fs::rename(self.token_dir(), &aside).expect("moving the tokens aside");
        std::fs::create_dir_all(self.token_dir()).expect("empty token dir");
    }

    /// Puts the tokens taken by [`SoftHsm::remove_tokens`] back.
    pub fn restore_tokens(&self) {
        let aside = self.dir.path().join("tokens.removed");
        std::fs::remove_dir_all(self.token_dir()).expect("removing the empty token dir");
        std::fs::rename(&aside, self.token_dir()).expect("moving the tokens back");
    }
}
