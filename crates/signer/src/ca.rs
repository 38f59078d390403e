//! Each signer's CA, from the shared CA store: loaded at start (a CA that
//! does not load is retried, and its signer signs nothing meanwhile), kept
//! current, and recorded in the signer's metrics.

use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use meshca_ca_store::{CaSource, CurrentCa};
use meshca_kube::CancellationToken;
use meshca_pki::CaBundle;
use time::OffsetDateTime;

use crate::metrics::Metrics;

fn observe(metrics: &Metrics, signer: &str, bundle: &CaBundle) {
    let label = Metrics::label(signer);
    metrics
        .ca_expiry_timestamp
        .get_or_create(&label)
        .set(bundle.not_after().unix_timestamp());
    if let Some(t) = bundle.roots_not_after() {
        metrics
            .root_expiry_timestamp
            .get_or_create(&label)
            .set(t.unix_timestamp());
    }
}

/// Loads `source` and keeps it current for `signer`; every change updates
/// the expiry gauges, every failed load counts in `ca_load_errors`.
pub async fn start(
    client: &Client,
    signer: &str,
    source: &CaSource,
    poll: Duration,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> CurrentCa {
    let count_error = {
        let (metrics, signer) = (metrics.clone(), signer.to_owned());
        move || {
            metrics
                .ca_load_errors
                .get_or_create(&Metrics::label(&signer))
                .inc();
        }
    };
    let initial = match source.load(Some(client), OffsetDateTime::now_utc()).await {
        Ok(bundle) => {
            tracing::info!(signer, source = %source, not_after = %bundle.not_after(), "CA loaded");
            // Recorded before start returns: a started signer's metrics show its CA.
            observe(&metrics, signer, &bundle);
            Some(bundle)
        }
        Err(e) => {
            count_error();
            tracing::error!(signer, error = %format!("{e:#}"), "CA does not load; this signer signs nothing until it does");
            None
        }
    };
    let current = meshca_ca_store::watch(
        Some(client.clone()),
        source.clone(),
        poll,
        initial,
        Box::new(move |_| count_error()),
        stop.clone(),
    );
    let mut observed = current.clone();
    let signer = signer.to_owned();
    tokio::spawn(stop.run_until_cancelled_owned(async move {
        loop {
            if let Some(bundle) = observed.borrow_and_update().clone() {
                observe(&metrics, &signer, &bundle);
            }
            if observed.changed().await.is_err() {
                return;
            }
        }
    }));
    current
}
