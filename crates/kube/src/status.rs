//! What a failed API call means, in one place: callers branch on these
//! instead of matching `kube::Error::Api` codes inline.

/// The HTTP status of an API error; `None` for transport failures.
pub fn code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// 409: someone else wrote first (or the object already exists).
pub fn is_conflict(e: &kube::Error) -> bool {
    code(e) == Some(409)
}

/// 404: the object (or its namespace) does not exist.
pub fn is_not_found(e: &kube::Error) -> bool {
    code(e) == Some(404)
}

/// 403: RBAC refused the call.
pub fn is_forbidden(e: &kube::Error) -> bool {
    code(e) == Some(403)
}

/// A write that lost a race on a precondition: 409, or 422 where the
/// apiserver validates an update against the object it raced with.
pub fn is_lost_race(e: &kube::Error) -> bool {
    matches!(code(e), Some(409 | 422))
}

/// An API call that failed, so that nothing was judged (e.g. a
/// TokenReview that got no answer), carried as an error so that callers
/// can answer "retry" rather than "refused".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiUnavailable(pub String);

impl std::fmt::Display for ApiUnavailable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kubernetes API unavailable: {}", self.0)
    }
}

impl std::error::Error for ApiUnavailable {}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> kube::Error {
        kube::Error::Api(
            kube::core::Status::failure("test", "Test")
                .with_code(code)
                .boxed(),
        )
    }

    #[test]
    fn codes_are_read_from_api_errors_only() {
        assert!(is_conflict(&api(409)));
        assert!(is_not_found(&api(404)));
        assert!(is_forbidden(&api(403)));
        assert!(is_lost_race(&api(422)) && is_lost_race(&api(409)));
        assert!(!is_conflict(&api(404)));
        let transport = kube::Error::Service("reset".into());
        assert_eq!(code(&transport), None);
        assert!(!is_lost_race(&transport));
    }
}
