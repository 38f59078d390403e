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

/// The monitoring routes over a metrics registry and a readiness check.
pub fn router(registry: Arc<Registry>, readiness: Readiness) -> axum::Router {
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
        .route("/metrics", get(move || metrics(registry.clone())))
}

async fn metrics(
    registry: Arc<Registry>,
) -> (StatusCode, [(header::HeaderName, &'static str); 1], String) {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
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
