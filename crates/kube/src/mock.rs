//! A scripted Kubernetes API for tier-2 tests: the code under test gets a
//! real `kube::Client` whose requests arrive here, one at a time, and the
//! test answers each (as kube-rs's controller-rs fixtures do). A request
//! other than the one expected fails the test with what was asked.

use http::{Request, Response};
use kube::client::Body;
use tower_test::mock::{Handle, pair};

/// The test's side of the mocked API.
pub struct MockApi {
    handle: Handle<Request<Body>, Response<Body>>,
}

/// A client for the code under test and the API it talks to.
pub fn client() -> (kube::Client, MockApi) {
    let (service, handle) = pair::<Request<Body>, Response<Body>>();
    (kube::Client::new(service, "default"), MockApi { handle })
}

/// A `metav1.Status` body, as the apiserver sends with an error code.
pub fn status(code: u16, reason: &str) -> serde_json::Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": format!("mock: {reason}"),
        "reason": reason, "code": code,
    })
}

impl MockApi {
    /// Waits for the next request, checks its method and path, answers
    /// `code` with `body`; returns the request's JSON body (Null if none).
    pub async fn expect(
        &mut self,
        method: &str,
        path: &str,
        code: u16,
        body: serde_json::Value,
    ) -> serde_json::Value {
        let (request, respond) = self
            .handle
            .next_request()
            .await
            .unwrap_or_else(|| panic!("no request came; expected {method} {path}"));
        assert_eq!(
            (request.method().as_str(), request.uri().path()),
            (method, path),
            "unexpected request"
        );
        let sent = request
            .into_body()
            .collect_bytes()
            .await
            .expect("request body");
        let sent = if sent.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&sent).expect("a JSON request body")
        };
        let response = Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&body).expect("JSON")))
            .expect("response");
        respond.send_response(response);
        sent
    }
}
