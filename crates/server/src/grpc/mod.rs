//! The wire: Istio's `IstioCertificateService` over TLS on :15012.

pub mod service;
pub mod tls;
