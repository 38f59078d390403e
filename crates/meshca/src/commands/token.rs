//! `meshca token`: mint a token with the standalone server's local key.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use meshca_server::auth::local_issuer::local_issuer;

use crate::duration::parse_duration;

#[derive(clap::Args)]
pub struct TokenArgs {
    #[arg(long, default_value = "default")]
    pub namespace: String,
    #[arg(long, default_value = "default")]
    pub service_account: String,
    #[arg(long, default_value = "istio-ca")]
    pub audience: String,
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    pub ttl: Duration,
    /// The server's state directory (holds jwt/jwt-signing-key.pem).
    #[arg(long, env = "MESHCA_STATE_DIR", default_value = "./meshca-data")]
    pub state_dir: PathBuf,
}

pub fn token(args: &TokenArgs) -> Result<ExitCode> {
    let issuer = local_issuer(&args.state_dir, false)?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let ttl = i64::try_from(args.ttl.as_secs()).unwrap_or(i64::MAX);
    println!(
        "{}",
        issuer.mint(
            &args.namespace,
            &args.service_account,
            &args.audience,
            ttl,
            now
        )?
    );
    Ok(ExitCode::SUCCESS)
}
