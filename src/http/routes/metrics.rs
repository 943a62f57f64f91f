//! `GET /metrics`: the Prometheus text exposition of [`crate::metrics`]. With
//! `METRICS_TOKEN` set it needs that bearer token (compared in constant time, and guessed
//! at no faster than the admin key: see [`metrics`]); it answers during a drain, like the
//! probes.

use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use crate::auth::keys::secrets_equal;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::bearer;
use crate::http::ratelimit::peer_of;
use crate::http::AppState;

/// Prometheus text format (version 0.0.4).
///
/// A refused token spends from the caller's address budget on the auth limiter, as a
/// refused admin credential does; past it the address gets 429 without its token being
/// checked (a right guess included, which would tell the guesser it was right) until it
/// refills. Right tokens spend nothing, so a scraper is never limited by its own scrapes.
#[utoipa::path(get, path = "/metrics", tag = "operations",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "Prometheus text exposition format", content_type = "text/plain", body = String),
        (status = 401, description = "METRICS_TOKEN is set and the bearer token is missing or wrong", body = ErrorBody),
        (status = 429, description = "too many wrong tokens from this address; see Retry-After", body = ErrorBody)))]
pub async fn metrics(
    State(state): State<AppState>,
    request: Request,
) -> Result<Response, ApiError> {
    if let Some(token) = &state.config.metrics_token {
        let (headers, peer) = (request.headers(), peer_of(request.extensions()));
        let limiter = &state.auth_limiter;
        limiter.blocked(headers, peer)?;
        let given = bearer(headers).unwrap_or("");
        if !secrets_equal(given, token.expose()) {
            return Err(limiter
                .refused(headers, peer)
                .unwrap_or(ApiError::Unauthorized));
        }
    }
    crate::metrics::sample(
        state.tenants.active_count(),
        &state.tenants.count_by_state(),
        state.store.pool_status(),
    );
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
