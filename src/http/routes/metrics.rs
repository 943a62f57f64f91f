//! `GET /metrics`: the Prometheus text exposition of [`crate::metrics`]. With
//! `METRICS_TOKEN` set it needs that bearer token (compared in constant time); it answers
//! during a drain, like the probes.

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};

use crate::auth::keys::secrets_equal;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::bearer;
use crate::http::AppState;

/// Prometheus text format (version 0.0.4).
#[utoipa::path(get, path = "/metrics", tag = "operations",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String),
        (status = 401, description = "METRICS_TOKEN is set and the bearer token is missing or wrong", body = ErrorBody)))]
pub async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if let Some(token) = &state.config.metrics_token {
        let given = bearer(&headers).unwrap_or("");
        if !secrets_equal(given, token.expose()) {
            return Err(ApiError::Unauthorized);
        }
    }
    crate::metrics::sample(state.tenants.active_count(), state.store.pool_status());
    let body = crate::metrics::install().render();
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response())
}
