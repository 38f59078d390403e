//! The server's own CA: where it comes from, and keeping it (with the RA
//! roots and the serving certificate) current.
//!
//! In order of preference: a plugged-in CA (Istio's `cacerts` layout,
//! polled), Secret `istio-ca-secret` with Istio's root rotation (with a
//! cluster), or a self-signed CA in the state directory (standalone).

pub mod istio_secret;
pub mod reload;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use meshca_ca_store::{CaSource, CurrentCa, dir};
use meshca_kube::CancellationToken;
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::ServerConfig;

/// Where the CA comes from, and so whether it is watched.
pub enum CaOrigin {
    Plugged(PathBuf),
    SelfSigned(PathBuf),
    /// Secret `istio-ca-secret`; the directory holds a copy of its public root.
    Secret(PathBuf),
}

impl CaOrigin {
    /// The directory holding (a copy of) `root-cert.pem`.
    pub fn dir(&self) -> &Path {
        match self {
            CaOrigin::Plugged(d) | CaOrigin::SelfSigned(d) | CaOrigin::Secret(d) => d,
        }
    }
}

/// The CA the server signs with, kept current.
pub struct OpenedCa {
    pub origin: CaOrigin,
    pub current: CurrentCa,
}

/// Loads the plugged-in CA, or the self-signed one (creating it on first
/// start): in Secret `istio-ca-secret` with Kubernetes, else in the state
/// directory. A plugged-in CA is then polled, and the Secret's root rotated.
/// Background work (polling, rotation) runs until `stop` is cancelled.
pub async fn open(config: &ServerConfig, stop: &CancellationToken) -> Result<OpenedCa> {
    if let Some(plugged) = &config.ca_dir
        && dir::has_ca(plugged)
    {
        let bundle = dir::load(plugged, OffsetDateTime::now_utc())?;
        let current = meshca_ca_store::watch(
            None,
            CaSource::Dir(plugged.clone()),
            config.reload_interval,
            Some(bundle),
            Box::new(|_| {}),
            stop.clone(),
        );
        return Ok(OpenedCa {
            origin: CaOrigin::Plugged(plugged.clone()),
            current,
        });
    }
    if let (Some(client), Some(secret)) = (&config.kube, &config.ca_secret) {
        let spec = istio_secret::RootSpec {
            key_type: config.self_signed_key_type,
            org: &config.trust_domain,
            ttl: config.self_signed_ttl,
        };
        let (bundle, _) = istio_secret::load_or_create(client.clone(), secret, &spec).await?;
        let copy = config.state_dir.join("ca-secret");
        let root_file = copy.join(dir::ROOT_CERT);
        dir::replace_public(&root_file, bundle.roots_pem().as_bytes())?;
        let served = bundle.signing_cert_der().to_vec();
        let (tx, current) = watch::channel(Some(Arc::new(bundle)));
        tokio::spawn(
            stop.clone()
                .run_until_cancelled_owned(istio_secret::rotation_loop(
                    client.clone(),
                    secret.clone(),
                    config.self_signed_ttl,
                    served,
                    Some(root_file),
                    move |rotated| {
                        tx.send_replace(Some(Arc::new(rotated)));
                    },
                )),
        );
        return Ok(OpenedCa {
            origin: CaOrigin::Secret(copy),
            current,
        });
    }
    let state = config.state_dir.join("ca");
    let bundle = if dir::has_ca(&state) {
        dir::load(&state, OffsetDateTime::now_utc())?
    } else {
        let spec = dir::NewCa {
            pkcs11: None,
            key_type: config.self_signed_key_type,
            org: &config.trust_domain,
            ttl: config.self_signed_ttl,
            issuer: None,
        };
        let (bundle, _) =
            dir::create(&state, &spec, false).context("creating the self-signed CA")?;
        tracing::info!(dir = %state.display(), "created a self-signed root CA");
        bundle
    };
    // Never changes: nothing watches the state directory.
    let (_, current) = watch::channel(Some(Arc::new(bundle)));
    Ok(OpenedCa {
        origin: CaOrigin::SelfSigned(state),
        current,
    })
}
