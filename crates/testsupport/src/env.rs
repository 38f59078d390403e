//! The running test environment: its settings (from the variables `testenv/up`
//! exports), the paths of its binaries, and [`TestEnv`], the handle with an
//! admin client that tests start from.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use kube::Client;

use crate::identity::client_from_kubeconfig;

const HOW_TO_START: &str = "no running test environment: KUBECONFIG / MESHCA_TESTENV_DIR / \
MESHCA_TESTENV_BIN are not set.\n\
Start one from the repository root and run the tests in the same shell:\n\
\n    eval \"$(testenv/up)\"\n    cargo test ...\n    testenv/down\n\n\
or run the whole suite with ./test (it does the same). These tests never skip.";

/// Settings of the running test environment, read from the environment variables
/// that `testenv/up` prints.
#[derive(Debug, Clone)]
pub struct TestEnvConfig {
    /// `KUBECONFIG`: the admin kubeconfig (system:masters). Setup only.
    pub kubeconfig: PathBuf,
    /// `MESHCA_TESTENV_DIR`: the environment's temp dir (pids, logs, PKI).
    pub dir: PathBuf,
    /// `MESHCA_TESTENV_BIN`: directory of the built binaries.
    pub bin_dir: PathBuf,
    /// `MESHCA_TESTENV_APISERVER`: `https://127.0.0.1:<port>`.
    pub apiserver: String,
    /// `MESHCA_TESTENV_CA`: PEM of the CA that signed the apiserver's serving cert.
    pub ca_pem_path: PathBuf,
    /// `MESHCA_TESTENV_SA_ISSUER`: issuer of ServiceAccount tokens.
    pub sa_issuer: Option<String>,
}

impl TestEnvConfig {
    /// Reads the variables; errors with the instructions when they are absent.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let var = |name: &str| get(name).filter(|v| !v.is_empty());
        let (Some(kubeconfig), Some(dir), Some(bin_dir), Some(apiserver), Some(ca)) = (
            var("KUBECONFIG"),
            var("MESHCA_TESTENV_DIR"),
            var("MESHCA_TESTENV_BIN"),
            var("MESHCA_TESTENV_APISERVER"),
            var("MESHCA_TESTENV_CA"),
        ) else {
            bail!("{HOW_TO_START}");
        };
        let cfg = TestEnvConfig {
            kubeconfig: kubeconfig.into(),
            dir: dir.into(),
            bin_dir: bin_dir.into(),
            apiserver,
            ca_pem_path: ca.into(),
            sa_issuer: var("MESHCA_TESTENV_SA_ISSUER"),
        };
        if !cfg.dir.join("env").is_file() {
            bail!(
                "MESHCA_TESTENV_DIR={} is not a running testenv (it was stopped?).\n{HOW_TO_START}",
                cfg.dir.display()
            );
        }
        Ok(cfg)
    }

    /// Path of a testenv binary (`kube-apiserver`, `kube-controller-manager`,
    /// `etcd`, `zlint`, `istio-client`, and after `testenv/build istiod` also
    /// `pilot-discovery`, `pilot-agent`). Errors if it is not there.
    pub fn bin(&self, name: &str) -> Result<PathBuf> {
        let p = self.bin_dir.join(name);
        if !p.is_file() {
            let hint = if name.starts_with("pilot-") {
                "run `testenv/build istiod` first (Istio's own binaries are built on demand)"
            } else {
                "run `testenv/build` (or `testenv/up`, which builds)"
            };
            bail!("testenv binary {} is missing: {hint}", p.display());
        }
        Ok(p)
    }
}

/// Path of a testenv binary; panics with a clear message when the environment
/// is not set up or the binary is missing. See [`TestEnvConfig::bin`].
pub fn bin(name: &str) -> PathBuf {
    TestEnvConfig::from_env()
        .and_then(|c| c.bin(name))
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// A handle on the running test environment with an admin client.
#[derive(Clone)]
pub struct TestEnv {
    config: TestEnvConfig,
    client: Client,
}

impl std::fmt::Debug for TestEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestEnv")
            .field("config", &self.config)
            .finish()
    }
}

impl TestEnv {
    /// Connects to the running test environment (async; call it inside the test's
    /// tokio runtime). Panics, with instructions how to start one, when there is none.
    pub async fn get() -> TestEnv {
        match Self::try_get().await {
            Ok(env) => env,
            Err(e) => panic!("meshca-testsupport: {e:#}"),
        }
    }

    /// Like [`TestEnv::get`] but returns the error.
    pub async fn try_get() -> Result<TestEnv> {
        let config = TestEnvConfig::from_env()?;
        let client = client_from_kubeconfig(&config.kubeconfig).await?;
        Ok(TestEnv { config, client })
    }

    /// The admin client (system:masters). Use it for setup and inspection only:
    /// code under test gets an [`Identity`](crate::Identity) with its own RBAC.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Settings read from the environment.
    pub fn config(&self) -> &TestEnvConfig {
        &self.config
    }

    /// `https://127.0.0.1:<port>` of the kube-apiserver.
    pub fn apiserver_url(&self) -> &str {
        &self.config.apiserver
    }

    /// Path of the apiserver CA certificate (PEM).
    pub fn ca_pem_path(&self) -> &Path {
        &self.config.ca_pem_path
    }

    /// Contents of the apiserver CA certificate (PEM).
    pub fn ca_pem(&self) -> Result<String> {
        std::fs::read_to_string(&self.config.ca_pem_path)
            .with_context(|| format!("reading {}", self.config.ca_pem_path.display()))
    }

    /// Path of a testenv binary; see [`TestEnvConfig::bin`]. Panics if missing.
    pub fn bin(&self, name: &str) -> PathBuf {
        self.config.bin(name).unwrap_or_else(|e| panic!("{e:#}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_env_says_how_to_start() {
        let e = TestEnvConfig::from_vars(|_| None).unwrap_err().to_string();
        assert!(e.contains("eval \"$(testenv/up)\""), "{e}");
        assert!(e.contains("./test"), "{e}");
    }
}
