//! Read a request's whole body before routing it. A stream that opens and
//! never completes its body then holds only this small future: the router,
//! tonic's codec and the handler (several KiB of boxed futures and buffers
//! per stream) come into play only once the body is in. A flood of stalled
//! streams (BENCHMARKS.md, "Stream flood") costs about half as much memory.
//! The request timeout (`--request-timeout`, outside this layer) still ends
//! a stalled stream.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http_body_util::{BodyExt, Full, Limited};
use tonic::body::Body;

/// Wraps the gRPC routes: see the module.
#[derive(Debug, Clone)]
pub struct BodyFirstLayer {
    /// The largest body read (a gRPC message plus its 5-byte frame header).
    pub limit: usize,
}

impl<S> tower::Layer<S> for BodyFirstLayer {
    type Service = BodyFirst<S>;
    fn layer(&self, inner: S) -> BodyFirst<S> {
        BodyFirst {
            inner,
            limit: self.limit,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BodyFirst<S> {
    inner: S,
    limit: usize,
}

type Answer<E> = Result<http::Response<Body>, E>;

impl<S> tower::Service<http::Request<Body>> for BodyFirst<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Answer<S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        // The service polled ready goes with this request; a clone stays.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let limit = self.limit;
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let bytes = match Limited::new(body, limit).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(e) => {
                    let status = if e.is::<http_body_util::LengthLimitError>() {
                        // What tonic answers a message over its decoding limit.
                        tonic::Status::out_of_range(format!("request larger than {limit} bytes"))
                    } else {
                        tonic::Status::cancelled("request body not received")
                    };
                    return Ok(status.into_http());
                }
            };
            inner
                .call(http::Request::from_parts(
                    parts,
                    Body::new(Full::new(bytes)),
                ))
                .await
        })
    }
}
