//! [`TestNamespace`]: a unique namespace per test, its ServiceAccounts and
//! temp dir, and the cleanup (on drop too) of it and of every cluster object
//! made through it.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use meshca_kube::status;

use crate::TestEnv;
use crate::identity::client_from_kubeconfig;
use crate::names::{labels, unique_name};

/// A unique namespace for one test. Deleted (with the cluster-scoped objects
/// created through it) by [`TestNamespace::cleanup`] or on drop.
pub struct TestNamespace {
    env: TestEnv,
    name: String,
    tmp: tempfile::TempDir,
    owned: Mutex<Vec<Owned>>,
    cleaned: bool,
}

impl TestEnv {
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
        Api::<Namespace>::all(self.client())
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

    /// Deletes CertificateSigningRequest `name` on cleanup (CSRs are cluster-scoped).
    pub fn delete_csr_on_cleanup(&self, name: &str) {
        self.own(Owned::Csr(name.to_string()));
    }

    /// Records an object to delete on cleanup.
    pub(crate) fn own(&self, o: Owned) {
        self.owned.lock().unwrap_or_else(|e| e.into_inner()).push(o);
    }

    /// Deletes the namespace and every object created through this handle.
    pub async fn cleanup(mut self) -> Result<()> {
        self.cleaned = true;
        let owned = std::mem::take(&mut *self.owned.lock().unwrap_or_else(|e| e.into_inner()));
        cleanup_objects(self.env.client(), &self.name, owned).await
    }
}

/// A cluster object made through a [`TestNamespace`], deleted on cleanup.
#[derive(Debug, Clone)]
pub(crate) enum Owned {
    ClusterRole(String),
    ClusterRoleBinding(String),
    Csr(String),
    Role(String, String),
    RoleBinding(String, String),
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        if self.cleaned {
            return;
        }
        let owned = std::mem::take(&mut *self.owned.lock().unwrap_or_else(|e| e.into_inner()));
        let name = self.name.clone();
        let kubeconfig = self.env.config().kubeconfig.clone();
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
            if !status::is_not_found(&e) {
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
