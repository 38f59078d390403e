//! Test support for meshca's integration tests, on a real kube-apiserver.
//!
//! The control plane comes from `testenv/` at the repository root: real
//! kube-apiserver v1.35.4 and etcd built from their Go modules, started on
//! 127.0.0.1 by `testenv/up`, which exports `KUBECONFIG` and `MESHCA_TESTENV_*`.
//! This crate never starts or fakes a cluster and never skips: without those
//! variables [`TestEnv::get`] panics with the command to run.
//!
//! ```text
//! eval "$(testenv/up)"; cargo test -p meshca-testsupport; testenv/down
//! ```
//!
//! Typical use in an async test (`#[tokio::test]`):
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use meshca_testsupport::{RbacSpec, TestEnv};
//! let env = TestEnv::get().await;                 // panics with instructions if no testenv
//! let ns = env.namespace("csr").await?;            // unique namespace, cleaned up on drop
//! ns.create_service_account("signer").await?;
//! let signer = ns.identity("signer", &[RbacSpec::Existing("meshca-signer".into())]).await?;
//! let client = signer.client().await?;             // runs with exactly that RBAC
//! let token = ns.token("signer").await?;           // TokenRequest, audience istio-ca
//! # let _ = (client, token); Ok(()) }
//! ```
//!
//! Runtime: every async function here runs on the caller's tokio runtime; each
//! [`TestEnv::get`] builds a fresh admin [`kube::Client`] bound to that runtime,
//! so it is safe to call from many `#[tokio::test]`s. Cleanup in `Drop` runs on a
//! separate thread with its own runtime, so it also works after the test's
//! runtime is gone; call [`TestNamespace::cleanup`] to clean up explicitly and
//! see errors.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::authentication::v1::{
    TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec, TokenReviewStatus,
};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The audience Istio's CA expects in workload tokens.
pub const ISTIO_CA_AUDIENCE: &str = "istio-ca";

/// Label put on every object this crate creates.
pub const TESTSUPPORT_LABEL: &str = "meshca.io/testsupport";

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

/// A child process killed (and reaped) when dropped, so that a failed
/// assertion leaves nothing running.
pub struct Proc(pub std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
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
    /// code under test gets an [`Identity`] with its own RBAC.
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

    /// Creates a namespace named `<prefix>-<unique suffix>`; it and the cluster
    /// objects made through it are deleted on [`TestNamespace::cleanup`] or drop.
    pub async fn namespace(&self, prefix: &str) -> Result<TestNamespace> {
        let name = unique_name(prefix);
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(labels()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(TestNamespace {
            env: self.clone(),
            name,
            tmp: tempfile::Builder::new()
                .prefix("meshca-testsupport-")
                .tempdir()?,
            owned: Mutex::new(Vec::new()),
            cleaned: false,
        })
    }

    /// Runs a TokenReview (as admin) for `token` with the given audiences.
    pub async fn token_review(&self, token: &str, audiences: &[&str]) -> Result<TokenReviewStatus> {
        token_review(&self.client, token, audiences).await
    }
}

/// Runs a TokenReview for `token` with the given audiences, as `client`'s identity
/// (it needs `create` on `tokenreviews.authentication.k8s.io`).
pub async fn token_review(
    client: &Client,
    token: &str,
    audiences: &[&str],
) -> Result<TokenReviewStatus> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
        },
        ..Default::default()
    };
    let out = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .context("TokenReview")?;
    out.status.context("TokenReview returned no status")
}

/// Which permissions an [`Identity`] gets.
#[derive(Debug, Clone)]
pub enum RbacSpec {
    /// Bind an existing ClusterRole by name (e.g. one applied with
    /// [`TestNamespace::apply_cluster_role`] from the component's manifest).
    Existing(String),
    /// Create a uniquely named ClusterRole with these rules (deleted on cleanup)
    /// and bind it cluster-wide.
    Rules(Vec<PolicyRule>),
    /// Create a Role with these rules in `namespace` (`None`: the test namespace)
    /// and bind it there.
    NamespacedRules {
        namespace: Option<String>,
        rules: Vec<PolicyRule>,
    },
}

/// Shorthand for a [`PolicyRule`].
pub fn rule(
    api_groups: &[&str],
    resources: &[&str],
    resource_names: &[&str],
    verbs: &[&str],
) -> PolicyRule {
    let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    PolicyRule {
        api_groups: Some(v(api_groups)),
        resources: Some(v(resources)),
        resource_names: if resource_names.is_empty() {
            None
        } else {
            Some(v(resource_names))
        },
        verbs: v(verbs),
        non_resource_urls: None,
    }
}

/// Options of a TokenRequest.
#[derive(Debug, Clone)]
pub struct TokenOptions {
    /// Audiences; empty means the apiserver's own audience (its issuer).
    pub audiences: Vec<String>,
    /// Lifetime in seconds; the apiserver requires at least 600.
    pub expiration_seconds: i64,
}

impl Default for TokenOptions {
    fn default() -> Self {
        TokenOptions {
            audiences: vec![ISTIO_CA_AUDIENCE.to_string()],
            expiration_seconds: 600,
        }
    }
}

#[derive(Debug, Clone)]
enum Owned {
    ClusterRole(String),
    ClusterRoleBinding(String),
    Csr(String),
    Role(String, String),
    RoleBinding(String, String),
}

/// A unique namespace for one test. Deleted (with the cluster-scoped objects
/// created through it) by [`TestNamespace::cleanup`] or on drop.
pub struct TestNamespace {
    env: TestEnv,
    name: String,
    tmp: tempfile::TempDir,
    owned: Mutex<Vec<Owned>>,
    cleaned: bool,
}

impl std::fmt::Debug for TestNamespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestNamespace")
            .field("name", &self.name)
            .finish()
    }
}

impl TestNamespace {
    /// The namespace name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The environment this namespace lives in.
    pub fn env(&self) -> &TestEnv {
        &self.env
    }

    /// A temp directory that lives as long as this namespace (kubeconfigs are
    /// written here).
    pub fn temp_dir(&self) -> &Path {
        self.tmp.path()
    }

    /// A name unique to this namespace, for cluster-scoped objects a test creates.
    pub fn unique_name(&self, what: &str) -> String {
        unique_name(&format!("{}-{what}", self.name))
    }

    /// Creates a ServiceAccount in this namespace.
    pub async fn create_service_account(&self, name: &str) -> Result<ServiceAccount> {
        let sa = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.to_string()),
                labels: Some(labels()),
                ..Default::default()
            },
            ..Default::default()
        };
        Api::<ServiceAccount>::namespaced(self.env.client(), &self.name)
            .create(&PostParams::default(), &sa)
            .await
            .with_context(|| format!("creating ServiceAccount {}/{name}", self.name))
    }

    /// Mints a token for ServiceAccount `sa` with audience `istio-ca`, 600 s.
    pub async fn token(&self, sa: &str) -> Result<String> {
        self.token_with(sa, &TokenOptions::default()).await
    }

    /// Mints a token for ServiceAccount `sa` (TokenRequest) with the given options.
    pub async fn token_with(&self, sa: &str, opts: &TokenOptions) -> Result<String> {
        let tr = TokenRequest {
            spec: TokenRequestSpec {
                audiences: opts.audiences.clone(),
                expiration_seconds: Some(opts.expiration_seconds),
                bound_object_ref: None,
            },
            ..Default::default()
        };
        let out = Api::<ServiceAccount>::namespaced(self.env.client(), &self.name)
            .create_token_request(sa, &PostParams::default(), &tr)
            .await
            .with_context(|| format!("TokenRequest for {}/{sa}", self.name))?;
        Ok(out.status.context("TokenRequest returned no status")?.token)
    }

    /// Mints a token (see [`TestNamespace::token_with`]) and writes it to a file in
    /// [`TestNamespace::temp_dir`], e.g. for `istio-client -token` or pilot-agent.
    pub async fn token_file(&self, sa: &str, opts: &TokenOptions) -> Result<PathBuf> {
        let token = self.token_with(sa, opts).await?;
        let path = self.tmp.path().join(format!("{}.token", unique_name(sa)));
        std::fs::write(&path, token).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }

    /// Applies a ClusterRole object as given (e.g. parsed from a component's
    /// manifest), keeping its name. It is shared between tests and not deleted.
    pub async fn apply_cluster_role(&self, role: &ClusterRole) -> Result<String> {
        let name = role
            .metadata
            .name
            .clone()
            .context("ClusterRole without a name")?;
        let mut role = role.clone();
        role.metadata.resource_version = None;
        Api::<ClusterRole>::all(self.env.client())
            .patch(
                &name,
                &PatchParams::apply("meshca-testsupport").force(),
                &Patch::Apply(&role),
            )
            .await
            .with_context(|| format!("applying ClusterRole {name}"))?;
        Ok(name)
    }

    /// Grants ServiceAccount `sa` of this namespace the given permissions.
    pub async fn grant(&self, sa: &str, spec: &RbacSpec) -> Result<()> {
        let subject = Subject {
            kind: "ServiceAccount".into(),
            name: sa.into(),
            namespace: Some(self.name.clone()),
            api_group: None,
        };
        let client = self.env.client();
        let pp = PostParams::default();
        match spec {
            RbacSpec::Existing(_) | RbacSpec::Rules(_) => {
                let role_name = match spec {
                    RbacSpec::Existing(n) => n.clone(),
                    RbacSpec::Rules(rules) => {
                        let n = self.unique_name(sa);
                        let role = ClusterRole {
                            metadata: meta(&n, None),
                            rules: Some(rules.clone()),
                            ..Default::default()
                        };
                        self.own(Owned::ClusterRole(n.clone()));
                        Api::<ClusterRole>::all(client.clone())
                            .create(&pp, &role)
                            .await
                            .with_context(|| format!("creating ClusterRole {n}"))?;
                        n
                    }
                    RbacSpec::NamespacedRules { .. } => unreachable!(),
                };
                let n = self.unique_name(&format!("{sa}-binding"));
                let binding = ClusterRoleBinding {
                    metadata: meta(&n, None),
                    role_ref: RoleRef {
                        api_group: "rbac.authorization.k8s.io".into(),
                        kind: "ClusterRole".into(),
                        name: role_name,
                    },
                    subjects: Some(vec![subject]),
                };
                self.own(Owned::ClusterRoleBinding(n.clone()));
                Api::<ClusterRoleBinding>::all(client)
                    .create(&pp, &binding)
                    .await
                    .with_context(|| format!("creating ClusterRoleBinding {n}"))?;
            }
            RbacSpec::NamespacedRules { namespace, rules } => {
                let ns = namespace.clone().unwrap_or_else(|| self.name.clone());
                let n = self.unique_name(sa);
                let role = Role {
                    metadata: meta(&n, Some(&ns)),
                    rules: Some(rules.clone()),
                };
                self.own(Owned::Role(ns.clone(), n.clone()));
                Api::<Role>::namespaced(client.clone(), &ns)
                    .create(&pp, &role)
                    .await
                    .with_context(|| format!("creating Role {ns}/{n}"))?;
                let binding = RoleBinding {
                    metadata: meta(&n, Some(&ns)),
                    role_ref: RoleRef {
                        api_group: "rbac.authorization.k8s.io".into(),
                        kind: "Role".into(),
                        name: n.clone(),
                    },
                    subjects: Some(vec![subject]),
                };
                self.own(Owned::RoleBinding(ns.clone(), n.clone()));
                Api::<RoleBinding>::namespaced(client, &ns)
                    .create(&pp, &binding)
                    .await
                    .with_context(|| format!("creating RoleBinding {ns}/{n}"))?;
            }
        }
        Ok(())
    }

    /// An identity for ServiceAccount `sa` (created if it does not exist) with
    /// exactly the given permissions: a token for the apiserver's own audience
    /// (1 h) and a kubeconfig using it.
    pub async fn identity(&self, sa: &str, grants: &[RbacSpec]) -> Result<Identity> {
        let sas = Api::<ServiceAccount>::namespaced(self.env.client(), &self.name);
        if sas.get_opt(sa).await?.is_none() {
            self.create_service_account(sa).await?;
        }
        for g in grants {
            self.grant(sa, g).await?;
        }
        let token = self
            .token_with(
                sa,
                &TokenOptions {
                    audiences: Vec::new(),
                    expiration_seconds: 3600,
                },
            )
            .await?;
        let kubeconfig_path = self.tmp.path().join(format!("{sa}.kubeconfig"));
        let ca_pem = self.env.ca_pem()?;
        let kc = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "testenv", "cluster": {
                "server": self.env.apiserver_url(),
                "certificate-authority-data": b64(ca_pem.as_bytes()),
            }}],
            "users": [{"name": sa, "user": {"token": token}}],
            "contexts": [{"name": "testenv", "context": {
                "cluster": "testenv", "user": sa, "namespace": self.name,
            }}],
            "current-context": "testenv",
        });
        std::fs::write(&kubeconfig_path, serde_json::to_vec_pretty(&kc)?)
            .with_context(|| format!("writing {}", kubeconfig_path.display()))?;
        Ok(Identity {
            namespace: self.name.clone(),
            service_account: sa.to_string(),
            token,
            kubeconfig_path,
        })
    }

    /// An identity for ServiceAccount `sa` with exactly the RBAC of a component's
    /// manifest (YAML, one or more documents): every `ClusterRole` in it is applied
    /// under its own name (see [`TestNamespace::apply_cluster_role`]) and bound to
    /// `sa` cluster-wide; every `Role` gets its rules in its `metadata.namespace`
    /// (default: the test namespace), bound there. Other kinds (the manifest's own
    /// ServiceAccounts and bindings) are ignored: the bindings made here name `sa`.
    pub async fn identity_from_manifest(&self, sa: &str, manifest_yaml: &str) -> Result<Identity> {
        let grants = self.grants_from_manifest(manifest_yaml).await?;
        if grants.is_empty() {
            bail!("the manifest has no ClusterRole or Role");
        }
        self.identity(sa, &grants).await
    }

    async fn grants_from_manifest(&self, manifest_yaml: &str) -> Result<Vec<RbacSpec>> {
        let docs: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(manifest_yaml).context("parsing the YAML manifest")?;
        let mut grants = Vec::new();
        for doc in docs {
            match doc.get("kind").and_then(|k| k.as_str()) {
                Some("ClusterRole") => {
                    let role: ClusterRole =
                        serde_json::from_value(doc).context("a ClusterRole in the manifest")?;
                    grants.push(RbacSpec::Existing(self.apply_cluster_role(&role).await?));
                }
                Some("Role") => {
                    let role: Role =
                        serde_json::from_value(doc).context("a Role in the manifest")?;
                    grants.push(RbacSpec::NamespacedRules {
                        namespace: role.metadata.namespace.clone(),
                        rules: role.rules.unwrap_or_default(),
                    });
                }
                _ => {}
            }
        }
        Ok(grants)
    }

    /// Deletes CertificateSigningRequest `name` on cleanup (CSRs are cluster-scoped).
    pub fn delete_csr_on_cleanup(&self, name: &str) {
        self.own(Owned::Csr(name.to_string()));
    }

    fn own(&self, o: Owned) {
        self.owned.lock().unwrap_or_else(|e| e.into_inner()).push(o);
    }

    /// Deletes the namespace and every object created through this handle.
    pub async fn cleanup(mut self) -> Result<()> {
        self.cleaned = true;
        let owned = std::mem::take(&mut *self.owned.lock().unwrap_or_else(|e| e.into_inner()));
        cleanup_objects(self.env.client(), &self.name, owned).await
    }
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let owned = std::mem::take(&mut *self.owned.lock().unwrap_or_else(|e| e.into_inner()));
        let name = self.name.clone();
        let kubeconfig = self.env.config.kubeconfig.clone();
        // The test's runtime may be shutting down (or be single-threaded and
        // blocked here): clean up on a thread with its own runtime and a fresh client.
        let handle = std::thread::spawn(move || -> Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let client = client_from_kubeconfig(&kubeconfig).await?;
                tokio::time::timeout(
                    Duration::from_secs(30),
                    cleanup_objects(client, &name, owned),
                )
                .await
                .map_err(|_| anyhow!("cleanup of namespace {name} timed out"))?
            })
        });
        match handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("meshca-testsupport: cleanup failed: {e:#}"),
            Err(_) => eprintln!("meshca-testsupport: cleanup thread panicked"),
        }
    }
}

async fn cleanup_objects(client: Client, ns: &str, owned: Vec<Owned>) -> Result<()> {
    let dp = DeleteParams::background();
    let mut errors = Vec::new();
    let mut note = |r: Result<(), kube::Error>, what: String| {
        if let Err(e) = r {
            if !is_not_found(&e) {
                errors.push(format!("{what}: {e}"));
            }
        }
    };
    for o in owned.into_iter().rev() {
        match o {
            Owned::ClusterRole(n) => note(
                Api::<ClusterRole>::all(client.clone())
                    .delete(&n, &dp)
                    .await
                    .map(drop),
                format!("ClusterRole {n}"),
            ),
            Owned::ClusterRoleBinding(n) => note(
                Api::<ClusterRoleBinding>::all(client.clone())
                    .delete(&n, &dp)
                    .await
                    .map(drop),
                format!("ClusterRoleBinding {n}"),
            ),
            Owned::Csr(n) => note(
                Api::<CertificateSigningRequest>::all(client.clone())
                    .delete(&n, &dp)
                    .await
                    .map(drop),
                format!("CertificateSigningRequest {n}"),
            ),
            Owned::Role(ns, n) => note(
                Api::<Role>::namespaced(client.clone(), &ns)
                    .delete(&n, &dp)
                    .await
                    .map(drop),
                format!("Role {ns}/{n}"),
            ),
            Owned::RoleBinding(ns, n) => note(
                Api::<RoleBinding>::namespaced(client.clone(), &ns)
                    .delete(&n, &dp)
                    .await
                    .map(drop),
                format!("RoleBinding {ns}/{n}"),
            ),
        }
    }
    // There is no namespace controller (no kube-controller-manager), so a deleted
    // namespace would stay Terminating: delete it, then clear its finalizers.
    let nss = Api::<Namespace>::all(client.clone());
    note(
        nss.delete(ns, &dp).await.map(drop),
        format!("Namespace {ns}"),
    );
    let finalize = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns},
        "spec": {"finalizers": []},
    });
    note(
        nss.replace_subresource::<serde_json::Value>(
            "finalize",
            ns,
            &PostParams::default(),
            &finalize,
        )
        .await
        .map(drop),
        format!("finalizing Namespace {ns}"),
    );
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("cleanup of {ns}: {}", errors.join("; "))
    }
}

/// A ServiceAccount identity with exactly the RBAC it was granted.
#[derive(Debug, Clone)]
pub struct Identity {
    /// Namespace of the ServiceAccount.
    pub namespace: String,
    /// Name of the ServiceAccount.
    pub service_account: String,
    token: String,
    kubeconfig_path: PathBuf,
}

impl Identity {
    /// `system:serviceaccount:<ns>:<sa>`.
    pub fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }

    /// Bearer token for the apiserver (its own audience, 1 h).
    pub fn token(&self) -> &str {
        &self.token
    }

    /// A kubeconfig file for this identity (lives as long as the namespace handle).
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig_path
    }

    /// A client acting as this identity.
    pub async fn client(&self) -> Result<Client> {
        client_from_kubeconfig(&self.kubeconfig_path).await
    }
}

/// Builds a client from a kubeconfig file (its current context).
pub async fn client_from_kubeconfig(path: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(path)
        .with_context(|| format!("reading kubeconfig {}", path.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("loading kubeconfig {}", path.display()))?;
    Client::try_from(config).context("building kube client")
}

/// True if the error is an apiserver 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    api_status_code(e) == Some(404)
}

/// The HTTP status code of an apiserver error response, if it is one.
pub fn api_status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Small helpers around the `openssl` CLI, for making test keys, CSRs and
/// certificates.
pub mod openssl {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use anyhow::{Context, Result, bail};

    /// Runs `openssl ARGS` in `dir` and returns its stdout.
    pub fn run(dir: &Path, args: &[&str]) -> Result<Vec<u8>> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .context("running the openssl CLI (is it installed?)")?;
        if !out.status.success() {
            bail!(
                "openssl {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(out.stdout)
    }

    /// A PKCS#10 CSR (PEM) for a fresh P-256 key with subject `subject`
    /// (e.g. `/CN=foo/O=bar`); the key goes to `dir/<name>.key`.
    pub fn csr_pem(dir: &Path, name: &str, subject: &str) -> Result<String> {
        let key = format!("{name}.key");
        let csr = format!("{name}.csr");
        run(
            dir,
            &[
                "req",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-subj",
                subject,
                "-out",
                &csr,
            ],
        )?;
        Ok(std::fs::read_to_string(dir.join(csr))?)
    }

    /// A self-signed P-256 certificate valid for `days`, with subject `subject`;
    /// returns the paths of `dir/<name>.crt` and `dir/<name>.key`.
    pub fn self_signed(
        dir: &Path,
        name: &str,
        subject: &str,
        days: u32,
    ) -> Result<(PathBuf, PathBuf)> {
        let key = format!("{name}.key");
        let crt = format!("{name}.crt");
        run(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                &key,
                "-subj",
                subject,
                "-days",
                &days.to_string(),
                "-out",
                &crt,
            ],
        )?;
        Ok((dir.join(crt), dir.join(key)))
    }
}

fn labels() -> BTreeMap<String, String> {
    BTreeMap::from([(TESTSUPPORT_LABEL.to_string(), "true".to_string())])
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: namespace.map(str::to_string),
        labels: Some(labels()),
        ..Default::default()
    }
}

fn b64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// `<prefix>-<suffix>`: a DNS-1123 label unique across processes and calls.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mix =
        (nanos ^ (u64::from(std::process::id()) << 32) ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            & 0xff_ffff_ffff;
    let suffix = format!("{mix:x}{n:x}");
    let mut p: String = prefix
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    p.truncate(62 - suffix.len());
    let p = p.trim_matches('-');
    if p.is_empty() {
        format!("t-{suffix}")
    } else {
        format!("{p}-{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_dns_labels() {
        let a = unique_name("Some_Prefix.x");
        let b = unique_name("Some_Prefix.x");
        assert_ne!(a, b);
        for n in [&a, &b, &unique_name(&"x".repeat(100))] {
            assert!(n.len() <= 63, "{n}");
            assert!(
                n.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
                "{n}"
            );
            assert!(!n.starts_with('-') && !n.ends_with('-'), "{n}");
        }
    }

    #[test]
    fn missing_env_says_how_to_start() {
        let e = TestEnvConfig::from_vars(|_| None).unwrap_err().to_string();
        assert!(e.contains("eval \"$(testenv/up)\""), "{e}");
        assert!(e.contains("./test"), "{e}");
    }
}
