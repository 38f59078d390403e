//! The wire: Istio's `IstioCertificateService` over TLS on :15012.

pub mod body_first;
pub mod service;
pub mod tls;
