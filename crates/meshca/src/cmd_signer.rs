//! `meshca signer`: the Kubernetes CSR signer controller.

use std::process::ExitCode;

use anyhow::Result;

#[derive(clap::Args)]
pub struct SignerArgs {}

pub fn signer(_args: SignerArgs) -> Result<ExitCode> {
    anyhow::bail!("meshca signer is not built yet")
}
