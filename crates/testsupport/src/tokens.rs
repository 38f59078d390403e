//! ServiceAccount tokens: minting them (TokenRequest, by default for Istio's CA
//! audience) and checking them (TokenReview).

use std::path::PathBuf;

use anyhow::{Context, Result};
use k8s_openapi::api::authentication::v1::{
    TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec, TokenReviewStatus,
};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Client;
use kube::api::{Api, PostParams};

use crate::{TestEnv, TestNamespace, unique_name};

/// The audience Istio's CA expects in workload tokens.
pub const ISTIO_CA_AUDIENCE: &str = "istio-ca";

/// Options of a TokenRequest.
#[derive(Debug, Clone)]
pub struct TokenOptions {
    /// Audiences; empty means the apiserver's own audience (its issuer).
    pub audiences: Vec<String>,
    /// Lifetime in seconds; the apiserver requires at least 600.
    pub expiration_seconds: i64,
}

impl Default for TokenOptions {
    fn default() -> Self {
        TokenOptions {
            audiences: vec![ISTIO_CA_AUDIENCE.to_string()],
            expiration_seconds: 600,
        }
    }
}

/// Runs a TokenReview for `token` with the given audiences, as `client`'s identity
/// (it needs `create` on `tokenreviews.authentication.k8s.io`).
pub async fn token_review(
    client: &Client,
    token: &str,
    audiences: &[&str],
) -> Result<TokenReviewStatus> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(audiences.iter().map(|a| a.to_string()).collect()),
        },
        ..Default::default()
    };
    let out = Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .context("TokenReview")?;
    out.status.context("TokenReview returned no status")
}

impl TestEnv {
    /// Runs a TokenReview (as admin) for `token` with the given audiences.
    pub async fn token_review(&self, token: &str, audiences: &[&str]) -> Result<TokenReviewStatus> {
        token_review(&self.client(), token, audiences).await
    }
}

impl TestNamespace {
    /// Mints a token for ServiceAccount `sa` with audience `istio-ca`, 600 s.
    pub async fn token(&self, sa: &str) -> Result<String> {
        self.token_with(sa, &TokenOptions::default()).await
    }

    /// Mints a token for ServiceAccount `sa` (TokenRequest) with the given options.
    pub async fn token_with(&self, sa: &str, opts: &TokenOptions) -> Result<String> {
        let tr = TokenRequest {
            spec: TokenRequestSpec {
                audiences: opts.audiences.clone(),
                expiration_seconds: Some(opts.expiration_seconds),
                bound_object_ref: None,
            },
            ..Default::default()
        };
        let out = Api::<ServiceAccount>::namespaced(self.env().client(), self.name())
            .create_token_request(sa, &PostParams::default(), &tr)
            .await
            .with_context(|| format!("TokenRequest for {}/{sa}", self.name()))?;
        Ok(out.status.context("TokenRequest returned no status")?.token)
    }

    /// Mints a token (see [`TestNamespace::token_with`]) and writes it to a file in
    /// [`TestNamespace::temp_dir`], e.g. for `istio-client -token` or pilot-agent.
    pub async fn token_file(&self, sa: &str, opts: &TokenOptions) -> Result<PathBuf> {
        let token = self.token_with(sa, opts).await?;
        let path = self.temp_dir().join(format!("{}.token", unique_name(sa)));
        std::fs::write(&path, token).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    }
}
