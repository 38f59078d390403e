//! What a failed apiserver call means: its HTTP status code, 404 or not.

/// True if the error is an apiserver 404.
pub fn is_not_found(e: &kube::Error) -> bool {
    api_status_code(e) == Some(404)
}

/// The HTTP status code of an apiserver error response, if it is one.
pub fn api_status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}
