//! `/healthz`, `/readyz` and `/metrics`, the same for every command.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::http::{StatusCode, header};
use axum::routing::get;
use prometheus_client::metrics::gauge::Gauge;
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

    /// The registries, then this process's own gauges ([`process_registry`]).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = encode(self.as_named.as_deref(), &self.registry)?;
        prometheus_client::encoding::prometheus_text::encode(&mut text, &process_registry())?;
        Ok(text)
    }
}

/// Gauges of this process, read when scraped, so that a fault test (and an
/// operator) sees leaks without a profiler: `process_resident_memory_bytes`
/// and `process_open_fds` (Prometheus' standard names; sockets are fds, so
/// leaked connections show there) and `meshca_runtime_alive_tasks` (tokio
/// tasks alive: in-flight requests, watches, background loops). Each is
/// left out where it cannot be read (not Linux, no runtime).
pub fn process_registry() -> Registry {
    let mut registry = Registry::default();
    let mut gauge = |name: &str, help: &str, value: Option<i64>| {
        if let Some(value) = value {
            let g = Gauge::<i64>::default();
            g.set(value);
            registry.register(name, help, g);
        }
    };
    gauge(
        "process_resident_memory_bytes",
        "Resident memory size in bytes",
        resident_memory_bytes(),
    );
    gauge(
        "process_open_fds",
        "Number of open file descriptors (sockets included)",
        std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as i64),
    );
    gauge(
        "meshca_runtime_alive_tasks",
        "Tokio tasks alive in this process",
        tokio::runtime::Handle::try_current()
            .ok()
            .map(|h| h.metrics().num_alive_tasks() as i64),
    );
    registry
}

/// `VmRSS` of /proc/self/status, in bytes.
fn resident_memory_bytes() -> Option<i64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: i64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, name: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    #[tokio::test]
    async fn process_gauges_are_read_when_scraped() {
        let registries = Registries::one(Arc::new(Registry::default()));
        let before = registries.encode().unwrap();
        let rss = value(&before, "process_resident_memory_bytes").expect(&before);
        assert!(rss > 1e6, "{before}");
        // Other tests of this binary open and close fds at the same time:
        // only that there are some is certain.
        let fds = value(&before, "process_open_fds").expect(&before);
        assert!(fds >= 3.0, "{before}");
        // Tasks are counted per runtime, and this test's is its own.
        let tasks = value(&before, "meshca_runtime_alive_tasks").expect(&before);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(stopped);
        let after = registries.encode().unwrap();
        assert_eq!(
            value(&after, "meshca_runtime_alive_tasks"),
            Some(tasks + 1.0),
            "{after}"
        );
        drop(stop);
        task.await.unwrap().unwrap_err();
    }
}
