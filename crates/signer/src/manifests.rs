//! `meshca manifests signer`: the files in `deploy/signer/`, embedded and
//! rendered with the signer names, namespaces and image.

/// The Kubernetes objects, in apply order.
pub const FILES: [(&str, &str); 5] = [
    (
        "namespace.yaml",
        include_str!("../../../deploy/signer/namespace.yaml"),
    ),
    (
        "rbac.yaml",
        include_str!("../../../deploy/signer/rbac.yaml"),
    ),
    (
        "ca-secret.yaml",
        include_str!("../../../deploy/signer/ca-secret.yaml"),
    ),
    (
        "deployment.yaml",
        include_str!("../../../deploy/signer/deployment.yaml"),
    ),
    (
        "istiod.yaml",
        include_str!("../../../deploy/signer/istiod.yaml"),
    ),
];

/// istiod's install values (an IstioOperator, not applied to the cluster).
pub const ISTIOD_VALUES: &str = include_str!("../../../deploy/signer/istiod-values.yaml");

#[derive(Debug, Clone)]
pub struct Options {
    /// Prefix of the cluster-scoped objects' names.
    pub name: String,
    pub namespace: String,
    pub istio_namespace: String,
    pub signer_names: Vec<String>,
    pub image: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            name: "signer-ca".into(),
            namespace: "signer-ca-system".into(),
            istio_namespace: "istio-system".into(),
            signer_names: vec!["example.com/foo".into()],
            image: "meshca:latest".into(),
        }
    }
}

fn quote(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}

/// Substitutes the placeholders in one template.
pub fn render_text(template: &str, o: &Options) -> String {
    let names = format!(
        "[{}]",
        o.signer_names
            .iter()
            .map(|n| quote(n))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let args = o
        .signer_names
        .iter()
        .map(|n| format!("            - --signer-name={n}"))
        .collect::<Vec<_>>()
        .join("\n");
    let first = o.signer_names.first().cloned().unwrap_or_default();
    template
        .replace("{{SIGNER_NAMES}}", &names)
        .replace("{{SIGNER_ARGS}}", &args)
        .replace("{{FIRST_SIGNER}}", &first)
        .replace("{{NAMESPACE}}", &o.namespace)
        .replace("{{ISTIO_NAMESPACE}}", &o.istio_namespace)
        .replace("{{IMAGE}}", &o.image)
        .replace("{{NAME}}", &o.name)
}

/// The CA Secret template is kept out of [`render`]: applying an empty
/// template over a filled Secret would wipe the CA.
pub const CA_SECRET_TEMPLATE: &str = "ca-secret.yaml";

/// All Kubernetes objects but the CA Secret template, as one multi-document
/// YAML stream (safe to apply again over a running installation).
pub fn render(o: &Options) -> String {
    FILES
        .iter()
        .filter(|(file, _)| *file != CA_SECRET_TEMPLATE)
        .map(|(file, text)| format!("# deploy/signer/{file}\n{}", render_text(text, o)))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The CA Secret template (`signer-ca-keypair`, to fill with the CA).
pub fn render_ca_secret_template(o: &Options) -> String {
    FILES
        .iter()
        .find(|(file, _)| *file == CA_SECRET_TEMPLATE)
        .map(|(_, text)| render_text(text, o))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_is_substituted() {
        let o = Options {
            signer_names: vec!["example.com/foo".into(), "example.com/bar".into()],
            ..Default::default()
        };
        let out = render(&o) + &render_text(ISTIOD_VALUES, &o) + &render_ca_secret_template(&o);
        assert!(!out.contains("{{"), "{out}");
        assert!(out.contains(r#"resourceNames: ["example.com/foo", "example.com/bar"]"#));
        assert!(out.contains("- --signer-name=example.com/bar"));
        assert!(out.contains("signer-ca-controller-manager-metrics-service"));
        assert!(out.contains("namespace: signer-ca-system"));
        assert!(out.contains("value: ISTIOD_RA_KUBERNETES_API"));
        assert!(
            !render(&o).contains("kind: Secret"),
            "no CA template in render()"
        );
        assert!(render_ca_secret_template(&o).contains("name: signer-ca-keypair"));
    }
}
