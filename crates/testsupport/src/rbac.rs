//! RBAC for test identities: [`RbacSpec`] says what a ServiceAccount may do,
//! [`rule`] writes a [`PolicyRule`], and [`TestNamespace::grant`] creates the
//! (Cluster)Roles and bindings, including those of a component's YAML manifest.

use anyhow::{Context, Result};
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use kube::api::{Api, Patch, PatchParams, PostParams};

use crate::TestNamespace;
use crate::names::meta;
use crate::namespace::Owned;

/// Which permissions an [`Identity`](crate::Identity) gets.
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

impl TestNamespace {
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
        Api::<ClusterRole>::all(self.env().client())
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
            namespace: Some(self.name().to_string()),
            api_group: None,
        };
        let client = self.env().client();
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
                let ns = namespace.clone().unwrap_or_else(|| self.name().to_string());
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

    /// The grants of a component's manifest; see
    /// [`TestNamespace::identity_from_manifest`].
    pub(crate) async fn grants_from_manifest(&self, manifest_yaml: &str) -> Result<Vec<RbacSpec>> {
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
}
