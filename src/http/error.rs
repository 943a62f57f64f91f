//! Every failure becomes a response here, and only here: [`ApiError`] maps to the status and
//! code of API.md's table. The conversion is pure: it puts an [`ErrorReport`] in the
//! response's extensions, and `middleware::request_context` writes the JSON body with the
//! request id (and logs the cause of a 500, which never reaches the client).

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::auth::AuthError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("unauthorized")]
    Unauthorized,
    #[error("forbidden")]
    Forbidden,
    #[error("tenant disabled")]
    TenantDisabled,
    #[error("{0}")]
    NotFound(String),
    #[error("unknown tool {0}")]
    UnknownTool(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("conflict")]
    Conflict,
    #[error("payload too large")]
    PayloadTooLarge,
    #[error("unsupported media type")]
    UnsupportedMediaType,
    /// The request's `Accept` leaves out what the answer must be (the MCP endpoint's).
    #[error("not acceptable: {0}")]
    NotAcceptable(String),
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
    /// The tenant's `TENANT_MAX_IN_FLIGHT` is reached: its limit too (429), said as such.
    #[error("too many calls in flight")]
    TooManyInFlight { retry_after: Duration },
    /// The tenant's `MCP_MAX_SESSIONS_PER_TENANT` is reached (its sessions and listen
    /// streams): its limit too (429), said as such.
    #[error("too many open MCP sessions")]
    TooManySessions { retry_after: Duration },
    #[error("upstream error: {0}")]
    Upstream(String),
    /// The tenant's upstream failed too many times in a row: 502 as [`Self::Upstream`], with
    /// `Retry-After` saying when it is tried again.
    #[error("upstream failing: {reason}")]
    UpstreamFailing {
        reason: String,
        retry_after: Duration,
    },
    #[error("unavailable: {reason}")]
    Unavailable {
        reason: &'static str,
        retry_after: Duration,
    },
    #[error("draining")]
    Draining,
    #[error("upstream timeout")]
    UpstreamTimeout,
    #[error("request timeout")]
    RequestTimeout,
    #[error("internal error: {0}")]
    Internal(String),
}

/// What the error middleware needs to finish an error response.
#[derive(Debug, Clone)]
pub struct ErrorReport {
    pub code: &'static str,
    pub message: String,
    /// Logged by the middleware, never sent (500s).
    pub internal: Option<String>,
}

/// The error body of API.md.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    pub request_id: String,
}

impl ApiError {
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::InvalidRequest(message.into())
    }

    pub fn unavailable(reason: &'static str) -> Self {
        Self::Unavailable {
            reason,
            retry_after: Duration::from_secs(5),
        }
    }

    /// Status, code and the message a person reads.
    pub fn parts(&self) -> (StatusCode, &'static str, String) {
        use ApiError::*;
        match self {
            InvalidJson(m) => (StatusCode::BAD_REQUEST, "invalid_json", m.clone()),
            InvalidRequest(m) => (StatusCode::BAD_REQUEST, "invalid_request", m.clone()),
            Unauthorized => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing or invalid credentials".into(),
            ),
            Forbidden => (
                StatusCode::FORBIDDEN,
                "forbidden",
                "this credential is not valid for this tenant".into(),
            ),
            TenantDisabled => (
                StatusCode::FORBIDDEN,
                "tenant_disabled",
                "this tenant is disabled".into(),
            ),
            NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m.clone()),
            UnknownTool(name) => (
                StatusCode::NOT_FOUND,
                "unknown_tool",
                format!("unknown tool: {name}"),
            ),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not accept that method".into(),
            ),
            Conflict => (
                StatusCode::CONFLICT,
                "conflict",
                "the tenant changed while this update was made; read it again and retry".into(),
            ),
            PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the request body is larger than MAX_BODY_BYTES".into(),
            ),
            UnsupportedMediaType => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "the request body must be application/json".into(),
            ),
            NotAcceptable(m) => (StatusCode::NOT_ACCEPTABLE, "not_acceptable", m.clone()),
            RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "rate limit exceeded; retry after the time in Retry-After".into(),
            ),
            TooManyInFlight { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "too many calls of this tenant in flight; retry after the time in Retry-After"
                    .into(),
            ),
            TooManySessions { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "this tenant has too many open MCP sessions and listen streams; close some, or \
                 retry after the time in Retry-After"
                    .into(),
            ),
            Upstream(m) => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!("upstream MCP server error: {m}"),
            ),
            UpstreamFailing { reason, .. } => (
                StatusCode::BAD_GATEWAY,
                "upstream_error",
                format!(
                    "the upstream MCP server failed repeatedly and is not tried again before \
                     Retry-After: {reason}"
                ),
            ),
            Unavailable { reason, .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("temporarily unavailable: {reason}"),
            ),
            Draining => (
                StatusCode::SERVICE_UNAVAILABLE,
                "draining",
                "the service is shutting down; retry on another instance".into(),
            ),
            UpstreamTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the upstream MCP server did not answer in time".into(),
            ),
            // API.md's one 504: in practice only a chain of upstream steps (connect, list,
            // call, each within its own bound) outlasts the whole request.
            RequestTimeout => (
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the request took longer than REQUEST_TIMEOUT_MS".into(),
            ),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "internal error".into(),
            ),
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after }
            | Self::TooManyInFlight { retry_after }
            | Self::TooManySessions { retry_after }
            | Self::UpstreamFailing { retry_after, .. }
            | Self::Unavailable { retry_after, .. } => Some(*retry_after),
            Self::Draining => Some(Duration::from_secs(5)),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message) = self.parts();
        let internal = match &self {
            ApiError::Internal(cause) => Some(cause.clone()),
            _ => None,
        };
        let mut response = status.into_response();
        if let Some(wait) = self.retry_after() {
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
                response.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        if status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response.extensions_mut().insert(ErrorReport {
            code,
            message,
            internal,
        });
        response
    }
}

impl From<AuthError> for ApiError {
    fn from(err: AuthError) -> Self {
        match err {
            AuthError::Unauthorized => Self::Unauthorized,
            AuthError::Forbidden => Self::Forbidden,
            AuthError::TenantDisabled => Self::TenantDisabled,
            AuthError::Unavailable => Self::unavailable("database"),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound => Self::NotFound("no such tenant".into()),
            StoreError::Conflict | StoreError::Duplicate => Self::Conflict,
            StoreError::Unavailable(_) => Self::unavailable("database"),
            StoreError::Backend(cause) => Self::Internal(format!("store: {cause}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every 504 carries API.md's one 504 code, the whole-request timeout's too.
    #[test]
    fn every_gateway_timeout_is_upstream_timeout() {
        for err in [ApiError::UpstreamTimeout, ApiError::RequestTimeout] {
            let (status, code, _) = err.parts();
            assert_eq!(status, StatusCode::GATEWAY_TIMEOUT);
            assert_eq!(code, "upstream_timeout");
        }
    }

    /// A tenant whose upstream keeps failing answers as API.md says an unreachable upstream
    /// does (502 `upstream_error`), with `Retry-After` for when it is tried again.
    #[test]
    fn a_failing_upstream_is_a_bad_gateway_with_retry_after() {
        let err = ApiError::UpstreamFailing {
            reason: "connection refused".into(),
            retry_after: Duration::from_millis(2_500),
        };
        let (status, code, _) = err.parts();
        assert_eq!((status, code), (StatusCode::BAD_GATEWAY, "upstream_error"));
        let response = err.into_response();
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(response.headers()[header::RETRY_AFTER], "3");
    }
}
