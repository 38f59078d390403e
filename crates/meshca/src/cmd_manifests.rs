//! `meshca manifests`: print deployment manifests (embedded from deploy/).

use std::process::ExitCode;

use anyhow::Result;
use meshca_signer::manifests;

#[derive(clap::Subcommand)]
pub enum ManifestsCommand {
    /// The signer controller (deploy/signer): namespace, RBAC, Deployment,
    /// metrics Service, and istiod's RA-mode RBAC (`approve` on the signer).
    Signer(SignerManifestArgs),
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
    }
    Ok(ExitCode::SUCCESS)
}
