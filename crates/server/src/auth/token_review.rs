//! Kubernetes TokenReview: the apiserver vouches for a token.

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::PostParams;
use meshca_kube::status::ApiUnavailable;
use meshca_kube::{ApiBusy, ApiLimit};

use super::{KubeAccount, NoIdentity, jwt};

const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Kubernetes TokenReview with the configured audiences.
pub struct TokenReviewer {
    api: kube::Api<TokenReview>,
    audiences: Vec<String>,
    limit: ApiLimit,
    /// TokenReviews in flight (a share of `limit`).
    reviews: ApiLimit,
}

impl TokenReviewer {
    pub fn new(
        client: kube::Client,
        audiences: Vec<String>,
        limit: ApiLimit,
        reviews: ApiLimit,
    ) -> Self {
        TokenReviewer {
            api: kube::Api::all(client),
            audiences,
            limit,
            reviews,
        }
    }

    /// The account (and, for a bound token, its pod) a token proves. No
    /// call slot in time: an [`ApiBusy`] error; no answer from the API: an
    /// [`ApiUnavailable`] error (either way the token is unjudged).
    pub async fn review(&self, token: &str) -> Result<KubeAccount> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(self.audiences.clone()),
            },
            ..Default::default()
        };
        let answer = self
            .reviews
            .call(
                self.limit
                    .call(self.api.create(&PostParams::default(), &review)),
            )
            .await
            .map_err(|e| match e {
                kube::Error::Service(e) if e.is::<ApiBusy>() => match e.downcast::<ApiBusy>() {
                    Ok(busy) => anyhow::Error::from(*busy),
                    Err(e) => anyhow::Error::new(kube::Error::Service(e)),
                },
                // No TokenReview answer: the token is unjudged, not
                // refused. The apiserver is down, restarting, without its
                // storage, or (just restarted, its RBAC caches still
                // empty) forbids meshca's own call for a moment.
                e => anyhow::Error::new(ApiUnavailable(format!("TokenReview request: {e}"))),
            })?;
        let status = answer.status.context("TokenReview without status")?;
        if status.authenticated != Some(true) {
            bail!("not authenticated: {}", status.error.unwrap_or_default());
        }
        check_audiences(&status, &self.audiences)?;
        // Authenticated: from here on, a failure is a missing identity.
        let user = status
            .user
            .ok_or_else(|| NoIdentity("TokenReview without user".into()))?;
        let groups = user.groups.unwrap_or_default();
        if !groups.iter().any(|g| g == "system:serviceaccounts") {
            return Err(NoIdentity(format!("not a service account (groups {groups:?})")).into());
        }
        let username = user.username.unwrap_or_default();
        let (namespace, service_account) = jwt::parse_service_account(&username)
            .map_err(|e| NoIdentity(format!("username {e}")))?;
        let mut extra = user.extra.unwrap_or_default();
        let mut one = |key: &str| {
            extra
                .remove(key)
                .and_then(|v| v.into_iter().next())
                .filter(|v| !v.is_empty())
        };
        Ok(KubeAccount {
            namespace,
            service_account,
            pod_name: one(EXTRA_POD_NAME),
            pod_uid: one(EXTRA_POD_UID),
        })
    }
}

/// An authenticated TokenReview answer must name one of the audiences asked
/// for: an audience-unaware authenticator (a webhook behind the apiserver)
/// answers without `status.audiences`, and an empty list means "valid for
/// the apiserver's own audience", not for this CA. With no audience asked
/// for, the apiserver's own audience is what was asked.
pub fn check_audiences(status: &TokenReviewStatus, requested: &[String]) -> Result<()> {
    if requested.is_empty() {
        return Ok(());
    }
    let answered = status.audiences.as_deref().unwrap_or_default();
    if answered.iter().any(|a| requested.contains(a)) {
        return Ok(());
    }
    bail!(
        "TokenReview answer names audiences {answered:?}, none of the requested {requested:?} \
         (an audience-unaware authenticator?)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_review_must_name_a_requested_audience() {
        let requested = vec!["istio-ca".to_string(), "other".to_string()];
        let status = |audiences: Option<&[&str]>| TokenReviewStatus {
            authenticated: Some(true),
            audiences: audiences.map(|a| a.iter().map(|s| s.to_string()).collect()),
            ..Default::default()
        };
        assert!(check_audiences(&status(Some(&["istio-ca"])), &requested).is_ok());
        assert!(check_audiences(&status(Some(&["x", "other"])), &requested).is_ok());
        // An audience-unaware authenticator: no audiences, or the apiserver's.
        for answer in [
            None,
            Some(&[][..]),
            Some(&["https://kubernetes.default.svc"][..]),
        ] {
            let e = check_audiences(&status(answer), &requested).unwrap_err();
            assert!(
                !e.is::<NoIdentity>(),
                "not proven for this CA: unauthenticated"
            );
            assert!(e.to_string().contains("none of the requested"), "{e:#}");
        }
        // No audience asked for: the apiserver's own was.
        assert!(check_audiences(&status(None), &[]).is_ok());
    }
}
