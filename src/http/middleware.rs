//! The layer every request passes first: request id in and out, the tracing span with
//! request and tenant id, the drain gate, security headers (and `Cache-Control: no-store`
//! on every `/api/*` answer), and the JSON error body of API.md for every error response
//! (from our handlers or from a layer such as the body limit or the timeout), and the HTTP
//! request metrics (by route template, never the raw path, so the series stay bounded).

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderName, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::error::{ApiError, ErrorBody, ErrorDetail, ErrorReport};
use crate::shutdown::Lifecycle;

pub static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The request id, and when the request reached the gateway, as one request extension
/// for handlers that record them (audit).
#[derive(Debug, Clone)]
pub struct RequestId {
    pub id: String,
    /// `REQUEST_TIMEOUT_MS` counts from about here.
    pub started: Instant,
}

/// Routes that answer during a drain: probes must see the drain, not be refused by it.
fn serves_while_draining(path: &str) -> bool {
    matches!(path, "/live" | "/health" | "/ready" | "/metrics")
}

/// What the edge layer needs: the drain gate, and whether to believe a proxy's
/// `X-Forwarded-Proto` (`TRUST_PROXY`).
pub struct Edge {
    pub lifecycle: Arc<Lifecycle>,
    pub trust_proxy: bool,
}

/// The one layer of per-request context (one layer, not one per concern: every layer is
/// cloned and boxed again for each request).
pub async fn request_context(
    State(edge): State<Arc<Edge>>,
    mut req: Request,
    next: Next,
) -> Response {
    let lifecycle = &edge.lifecycle;
    let started = Instant::now();
    let request_id = req
        .headers()
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_sane_request_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    req.extensions_mut().insert(RequestId {
        id: request_id.clone(),
        started,
    });
    let span = tracing::info_span!(
        "request",
        request_id = %request_id,
        method = %req.method(),
        path = %req.uri().path(),
        tenant_id = tracing::field::Empty,
    );
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let method = req.method().clone();
    let probe = serves_while_draining(req.uri().path());
    let api = req.uri().path().starts_with("/api/");
    let over_tls = edge.trust_proxy && forwarded_over_tls(req.headers());
    let mut response = if lifecycle.is_draining() && !probe {
        ApiError::Draining.into_response()
    } else {
        // Probes do not hold the drain open; everything else does until it answers.
        let _in_flight = (!probe).then(|| lifecycle.begin_request());
        next.run(req).instrument(span.clone()).await
    };
    finish_error(&mut response, &request_id, &span);
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert(REQUEST_ID.clone(), v);
    }
    add_security_headers(headers);
    if api {
        // Every `/api/*` answer is a tenant's or the operator's data, or an error about a
        // credential: a shared cache must keep none of them, also when `x-api-key` alone
        // authenticated it (RFC 9111 lets a cache store answers to requests without
        // `Authorization`). Answers that carry a secret add `Pragma` (`NoStore`).
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if over_tls {
        headers.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000; includeSubDomains"),
        );
    }
    let status = response.status().as_u16();
    let elapsed = started.elapsed();
    crate::metrics::http_request(&route, method.as_str(), status, elapsed);
    let latency_ms = elapsed.as_secs_f64() * 1000.0;
    // A target of its own, so that an operator can drop the access line alone
    // (`RUST_LOG=info,switchboard::access=off`) and keep the request span on other lines.
    span.in_scope(
        || tracing::info!(target: "switchboard::access", status, latency_ms, "request finished"),
    );
    response
}

/// Longest request id taken from a client: a trace header of a load balancer or a
/// tracing system fits (`Root=1-...;Parent=...;Sampled=1`, a base64 id).
const REQUEST_ID_MOST: usize = 200;

/// Ids taken from a client are echoed into logs, headers and audit rows: any id of visible
/// ASCII is kept as it came (API.md: taken from the request), one with a space or control
/// character (a forged log line), or longer than [`REQUEST_ID_MOST`], is replaced.
fn is_sane_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= REQUEST_ID_MOST && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Writes the JSON error body for an error response that carries an [`ErrorReport`], and
/// gives one to the bare error statuses of layers that do not know our format.
fn finish_error(response: &mut Response, request_id: &str, span: &tracing::Span) {
    let report = match response.extensions_mut().remove::<ErrorReport>() {
        Some(report) => report,
        None => {
            let replacement = match response.status() {
                StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed,
                StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
                StatusCode::REQUEST_TIMEOUT => ApiError::RequestTimeout,
                _ => return,
            };
            let headers = std::mem::take(response.headers_mut());
            *response = replacement.into_response();
            for (name, value) in headers.iter() {
                if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
                    response.headers_mut().insert(name.clone(), value.clone());
                }
            }
            match response.extensions_mut().remove::<ErrorReport>() {
                Some(report) => report,
                None => return,
            }
        }
    };
    if let Some(cause) = &report.internal {
        span.in_scope(|| tracing::error!(code = report.code, cause = %cause, "request failed"));
    }
    let body = ErrorBody {
        error: ErrorDetail {
            code: report.code.to_owned(),
            message: report.message,
            request_id: request_id.to_owned(),
        },
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response.headers_mut().remove(header::CONTENT_LENGTH);
    *response.body_mut() = Body::from(bytes);
}

/// The headers a helmet-protected service sends. JSON answers get a CSP that forbids
/// everything, since nothing here is meant to be rendered.
///
/// Header names as constants: a name given as `&str` is parsed again on every insert.
fn add_security_headers(headers: &mut axum::http::HeaderMap) {
    static CROSS_ORIGIN_RESOURCE_POLICY: HeaderName =
        HeaderName::from_static("cross-origin-resource-policy");
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        CROSS_ORIGIN_RESOURCE_POLICY.clone(),
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
    );
}

/// Whether a proxy says the request came over TLS (`X-Forwarded-Proto: https`), for
/// `Strict-Transport-Security`. The gateway speaks plain HTTP itself; the caller believes
/// this only when `TRUST_PROXY` is set, and only the last entry of the last line (the
/// proxy's, as for `X-Forwarded-For`).
fn forwarded_over_tls(headers: &axum::http::HeaderMap) -> bool {
    headers
        .get_all("x-forwarded-proto")
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_proxys_own_forwarded_proto_counts() {
        let over_tls = |lines: &[&str]| {
            let mut headers = axum::http::HeaderMap::new();
            for line in lines {
                headers.append("x-forwarded-proto", line.parse().unwrap());
            }
            forwarded_over_tls(&headers)
        };
        assert!(over_tls(&["https"]));
        assert!(over_tls(&["http, https"]), "the proxy appended to the line");
        assert!(over_tls(&["http", "https"]), "the proxy added a line");
        assert!(!over_tls(&["https", "http"]), "the client's own line");
        assert!(!over_tls(&["https, http"]));
        assert!(!over_tls(&[]));
    }
}
