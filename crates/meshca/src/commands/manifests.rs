//! `meshca manifests`: print deployment manifests (embedded from deploy/).

use std::process::ExitCode;

use anyhow::Result;
use meshca_signer::manifests;

#[derive(clap::Subcommand)]
pub enum ManifestsCommand {
    /// The signer controller (deploy/signer): namespace, RBAC, Deployment,
    /// metrics Service, and istiod's RA-mode RBAC (`approve` on the signer).
    Signer(SignerManifestArgs),
    /// The mesh CA (deploy/server): RBAC, Deployment, Service on 15012 and
    /// 15014, PodDisruptionBudget; `--istio-values` prints the Istio install
    /// settings that point the mesh at it.
    Server(ServerManifestArgs),
}

#[derive(clap::Args)]
pub struct ServerManifestArgs {
    /// meshca's namespace (its Service is meshca.<namespace>.svc:15012).
    #[arg(long, default_value = "istio-system")]
    pub namespace: String,
    #[arg(long, default_value = "meshca:latest")]
    pub image: String,
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,
    /// Replicas share the CA (Secret `cacerts` or `istio-ca-secret`).
    #[arg(long, default_value_t = 1)]
    pub replicas: u32,
    /// RA mode: forward every request to this Kubernetes CSR signer
    /// (EXTERNAL_CA=ISTIOD_RA_KUBERNETES_API, K8S_SIGNER) and verify its
    /// answers against Secret `external-ca-cert` (what `meshca signer`
    /// publishes); adds rbac-ra.yaml for it.
    #[arg(long)]
    pub k8s_signer: Option<String>,
    /// Also publish the roots as ClusterTrustBundle istio.io:istiod-ca:root-cert
    /// (ENABLE_CLUSTER_TRUST_BUNDLE_API); adds rbac-cluster-trust-bundle.yaml.
    #[arg(long)]
    pub cluster_trust_bundle: bool,
    /// The CA is plugged in: Secret `cacerts` (e.g. from `meshca ca init`
    /// and `kubectl create secret generic cacerts --from-file=...`) must
    /// exist before the pods start. Drops rbac-ca-secret.yaml (no access to
    /// any other Secret, no `create secrets`) and sets MESHCA_NO_CA_SECRET.
    #[arg(long, conflicts_with = "ca_secret_precreated")]
    pub plugged_ca: bool,
    /// The self-signed CA's Secret `istio-ca-secret` is created before the
    /// install: keeps `get`/`update` on that one name (root rotation) and
    /// drops the `create secrets` rule, which RBAC cannot limit to a name.
    #[arg(long)]
    pub ca_secret_precreated: bool,
    /// Print the Istio install values (IstioOperator with caAddress) instead.
    #[arg(long)]
    pub istio_values: bool,
}

/// deploy/server, in apply order (the optional RBAC files come first).
const RA_RBAC: (&str, &str) = (
    "rbac-ra.yaml",
    include_str!("../../../../deploy/server/rbac-ra.yaml"),
);
const CLUSTER_TRUST_BUNDLE_RBAC: (&str, &str) = (
    "rbac-cluster-trust-bundle.yaml",
    include_str!("../../../../deploy/server/rbac-cluster-trust-bundle.yaml"),
);
/// The rule of rbac-ca-secret.yaml that `--ca-secret-precreated` drops.
const CA_SECRET_CREATE_RULE: &str =
    "  # create cannot be limited to a name; meshca creates only istio-ca-secret.
  - apiGroups: [\"\"]
    resources: [\"secrets\"]
    verbs: [\"create\"]
";
const CA_SECRET_RBAC: &str = "rbac-ca-secret.yaml";
const SERVER_FILES: [(&str, &str); 7] = [
    (
        "rbac.yaml",
        include_str!("../../../../deploy/server/rbac.yaml"),
    ),
    (
        "rbac-root-configmap.yaml",
        include_str!("../../../../deploy/server/rbac-root-configmap.yaml"),
    ),
    (
        "rbac-impersonation.yaml",
        include_str!("../../../../deploy/server/rbac-impersonation.yaml"),
    ),
    (
        CA_SECRET_RBAC,
        include_str!("../../../../deploy/server/rbac-ca-secret.yaml"),
    ),
    (
        "deployment.yaml",
        include_str!("../../../../deploy/server/deployment.yaml"),
    ),
    (
        "service.yaml",
        include_str!("../../../../deploy/server/service.yaml"),
    ),
    (
        "pdb.yaml",
        include_str!("../../../../deploy/server/pdb.yaml"),
    ),
];
const SERVER_ISTIO_VALUES: &str = include_str!("../../../../deploy/server/istio-values.yaml");

/// The Deployment's optional parts: (env, volume mounts, volumes), each as
/// YAML lines at the template's indentation.
fn server_extras(a: &ServerManifestArgs) -> (String, String, String) {
    let (mut env, mut mounts, mut volumes) = (String::new(), String::new(), String::new());
    let mut var = |name: &str, value: &str| {
        env.push_str(&format!(
            "            - name: {name}\n              value: {value:?}\n"
        ))
    };
    if let Some(signer) = &a.k8s_signer {
        var(
            "EXTERNAL_CA",
            meshca_server::backend::ra::EXTERNAL_CA_KUBERNETES,
        );
        var("K8S_SIGNER", signer);
        var(
            "MESHCA_EXTERNAL_CA_ROOT",
            "/etc/external-ca-cert/root-cert.pem",
        );
        mounts.push_str(
            "            - name: external-ca-cert\n              mountPath: /etc/external-ca-cert\n              readOnly: true\n",
        );
        volumes.push_str(
            "        - name: external-ca-cert\n          secret:\n            secretName: external-ca-cert\n",
        );
    }
    if a.cluster_trust_bundle {
        var("ENABLE_CLUSTER_TRUST_BUNDLE_API", "true");
    }
    if a.plugged_ca {
        var("MESHCA_NO_CA_SECRET", "true");
    }
    (env, mounts, volumes)
}

fn render_server(template: &str, a: &ServerManifestArgs) -> String {
    let (env, mounts, volumes) = server_extras(a);
    let signer = a.k8s_signer.as_deref().unwrap_or("example.com/foo");
    template
        // The RBAC files name the default namespace and signer literally.
        .replace("namespace: istio-system", "namespace: {{NAMESPACE}}")
        .replace(
            "resourceNames: [\"example.com/foo\"]",
            &format!("resourceNames: [{signer:?}]"),
        )
        .replace("{{NAMESPACE}}", &a.namespace)
        .replace("{{IMAGE}}", &a.image)
        .replace("{{TRUST_DOMAIN}}", &a.trust_domain)
        .replace("{{REPLICAS}}", &a.replicas.to_string())
        .replace("{{EXTRA_ENV}}\n", &env)
        .replace("{{EXTRA_MOUNTS}}\n", &mounts)
        .replace("{{EXTRA_VOLUMES}}\n", &volumes)
        // With a plugged-in CA, a missing `cacerts` keeps the pods from
        // starting instead of leaving each replica its own emptyDir CA.
        .replace(
            "secretName: cacerts\n            optional: true",
            &format!(
                "secretName: cacerts\n            optional: {}",
                !a.plugged_ca
            ),
        )
}

/// All of deploy/server that the options call for, as one multi-document
/// YAML stream.
pub fn render_server_manifests(a: &ServerManifestArgs) -> String {
    let optional = [
        a.k8s_signer.is_some().then_some(RA_RBAC),
        a.cluster_trust_bundle.then_some(CLUSTER_TRUST_BUNDLE_RBAC),
    ];
    optional
        .into_iter()
        .flatten()
        .chain(SERVER_FILES)
        .filter(|(file, _)| !(a.plugged_ca && *file == CA_SECRET_RBAC))
        .map(|(file, text)| {
            let text = if a.ca_secret_precreated && file == CA_SECRET_RBAC {
                text.replace(CA_SECRET_CREATE_RULE, "")
            } else {
                text.to_owned()
            };
            format!("# deploy/server/{file}\n{}", render_server(&text, a))
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

#[derive(clap::Args)]
pub struct SignerManifestArgs {
    /// Signer names (repeatable).
    #[arg(
        long = "signer-name",
        value_delimiter = ',',
        default_value = "example.com/foo"
    )]
    pub signer_names: Vec<String>,
    #[arg(long, default_value = "signer-ca-system")]
    pub namespace: String,
    /// istiod's namespace (trust bundle Secret, istiod's ServiceAccount).
    #[arg(long, default_value = "istio-system")]
    pub istio_namespace: String,
    #[arg(long, default_value = "meshca:latest")]
    pub image: String,
    /// Prefix of cluster-scoped object names.
    #[arg(long, default_value = "signer-ca")]
    pub name: String,
    /// Print istiod's install values (IstioOperator: EXTERNAL_CA, K8S_SIGNER,
    /// the external-ca-cert mount) instead.
    #[arg(long, conflicts_with = "ca_secret_template")]
    pub istiod_values: bool,
    /// Print the CA Secret template (signer-ca-keypair) instead; kept out of
    /// the default output so re-applying it never wipes a filled Secret.
    #[arg(long)]
    pub ca_secret_template: bool,
}

pub fn run(cmd: ManifestsCommand) -> Result<ExitCode> {
    match cmd {
        ManifestsCommand::Signer(a) => {
            for name in &a.signer_names {
                meshca_signer::config::validate_signer_name(name)?;
            }
            let o = manifests::Options {
                name: a.name,
                namespace: a.namespace,
                istio_namespace: a.istio_namespace,
                signer_names: a.signer_names,
                image: a.image,
            };
            if a.istiod_values {
                print!("{}", manifests::render_text(manifests::ISTIOD_VALUES, &o));
            } else if a.ca_secret_template {
                print!("{}", manifests::render_ca_secret_template(&o));
            } else {
                print!("{}", manifests::render(&o));
            }
        }
        ManifestsCommand::Server(a) => {
            if let Some(name) = &a.k8s_signer {
                meshca_signer::config::validate_signer_name(name)?;
            }
            if a.istio_values {
                print!("{}", render_server(SERVER_ISTIO_VALUES, &a));
            } else {
                print!("{}", render_server_manifests(&a));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_create_rule_that_ca_secret_precreated_drops_is_in_the_file() {
        let (_, text) = SERVER_FILES
            .iter()
            .find(|(f, _)| *f == CA_SECRET_RBAC)
            .unwrap();
        assert!(text.contains(CA_SECRET_CREATE_RULE), "{text}");
    }
}
