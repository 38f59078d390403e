//! `/healthz`, `/readyz` and `/metrics`, the same for every command.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::http::{StatusCode, header};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Answers `/readyz`: `Ok(())` when ready, else why not.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// What `/metrics` serves, in the Prometheus text format 0.0.4 (what istiod
/// serves): families written exactly as named (istiod's counters carry no
/// `_total`; the OpenMetrics text encoder writes them, without its `# EOF`,
/// and for counters encoded as such and unitless gauges every line it writes
/// is also 0.0.4), then a registry by prometheus-client's 0.0.4 encoder.
#[derive(Clone)]
pub struct Registries {
    pub as_named: Option<Arc<Registry>>,
    pub registry: Arc<Registry>,
}

impl Registries {
    /// Just one registry.
    pub fn one(registry: Arc<Registry>) -> Self {
        Registries {
            as_named: None,
            registry,
        }
    }

    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        encode(self.as_named.as_deref(), &self.registry)
    }
}

/// See [`Registries`].
pub fn encode(as_named: Option<&Registry>, registry: &Registry) -> Result<String, std::fmt::Error> {
    let mut text = String::new();
    if let Some(as_named) = as_named {
        prometheus_client::encoding::text::encode_registry(&mut text, as_named)?;
    }
    prometheus_client::encoding::prometheus_text::encode(&mut text, registry)?;
    Ok(text)
}

/// The monitoring routes over the metrics and a readiness check.
pub fn router(registries: Registries, readiness: Readiness) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let answer = match readiness() {
                    Ok(()) => (StatusCode::OK, "ready".to_owned()),
                    Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}")),
                };
                async move { answer }
            }),
        )
        .route("/metrics", get(move || metrics(registries.clone())))
}

async fn metrics(
    registries: Registries,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    match registries.encode() {
        Ok(text) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            )],
            text,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            String::new(),
        ),
    }
}

/// Binds `addr` and serves `app` until `stop` is cancelled. Returns the
/// bound address (the real port when 0 was asked for).
pub async fn serve(
    addr: SocketAddr,
    app: axum::Router,
    stop: CancellationToken,
) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr} (monitoring)"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let serving = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = serving.await {
            tracing::error!(error = %e, "monitoring server stopped");
        }
    });
    Ok(bound)
}
