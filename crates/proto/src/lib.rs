//! Istio's CA API: `istio.v1.auth.IstioCertificateService/CreateCertificate`.
#![forbid(unsafe_code)]
#![allow(clippy::all)]

pub mod istio {
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

pub use istio::v1::auth::*;
