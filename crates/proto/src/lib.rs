//! Istio's CA API: `istio.v1.auth.IstioCertificateService/CreateCertificate`.
#![forbid(unsafe_code)]
#![allow(clippy::all)]

pub mod codec;

pub mod istio {
    pub mod v1 {
        pub mod auth {
            tonic::include_proto!("istio.v1.auth");
        }
    }
}

pub use istio::v1::auth::*;
pub use prost_types;

impl IstioCertificateRequest {
    /// A request as istio-agent sends it: the CSR, the wanted lifetime in
    /// seconds, and the `CertSigner` metadata key (usually empty).
    pub fn from_agent(csr: String, validity_seconds: i64, cert_signer: &str) -> Self {
        let value = prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(
                cert_signer.to_owned(),
            )),
        };
        IstioCertificateRequest {
            csr,
            validity_duration: validity_seconds,
            metadata: Some(prost_types::Struct {
                fields: std::collections::BTreeMap::from([("CertSigner".to_owned(), value)]),
            }),
        }
    }

    /// The same request made on behalf of `identity`, as ztunnel asks for
    /// a workload on its node (metadata `ImpersonatedIdentity`).
    pub fn impersonating(mut self, identity: &str) -> Self {
        let value = prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(identity.to_owned())),
        };
        self.metadata
            .get_or_insert_with(Default::default)
            .fields
            .insert("ImpersonatedIdentity".to_owned(), value);
        self
    }
}
