//! Who the code under test runs as: an [`Identity`] is a ServiceAccount with
//! exactly the RBAC it was granted, a token and a kubeconfig file for it;
//! [`client_from_kubeconfig`] turns such a file into a client.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::{RbacSpec, TestNamespace, TokenOptions};

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

impl TestNamespace {
    /// An identity for ServiceAccount `sa` (created if it does not exist) with
    /// exactly the given permissions: a token for the apiserver's own audience
    /// (1 h) and a kubeconfig using it.
    pub async fn identity(&self, sa: &str, grants: &[RbacSpec]) -> Result<Identity> {
        let sas = Api::<ServiceAccount>::namespaced(self.env().client(), self.name());
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
        let kubeconfig_path = self.temp_dir().join(format!("{sa}.kubeconfig"));
        let ca_pem = self.env().ca_pem()?;
        let kc = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "testenv", "cluster": {
                "server": self.env().apiserver_url(),
                "certificate-authority-data": b64(ca_pem.as_bytes()),
            }}],
            "users": [{"name": sa, "user": {"token": token}}],
            "contexts": [{"name": "testenv", "context": {
                "cluster": "testenv", "user": sa, "namespace": self.name(),
            }}],
            "current-context": "testenv",
        });
        std::fs::write(&kubeconfig_path, serde_json::to_vec_pretty(&kc)?)
            .with_context(|| format!("writing {}", kubeconfig_path.display()))?;
        Ok(Identity {
            namespace: self.name().to_string(),
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
}

fn b64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}
