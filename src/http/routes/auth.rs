//! Token issuance: the admin JWT for the admin key, the tenant JWT for a tenant API key.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

use crate::audit;
use crate::auth::keys::key_generation;
use crate::auth::AuthError;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{api_key_header, ApiJson};
use crate::http::middleware::RequestId;
use crate::http::no_store::NoStore;
use crate::http::ratelimit::WithinAuthLimit;
use crate::http::AppState;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminTokenRequest {
    /// The `ADMIN_API_KEY`.
    key: String,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AdminToken {
    token: String,
    expires_in: u64,
}

/// Exchanges the admin key for an admin JWT.
#[utoipa::path(post, path = "/api/auth/token", tag = "auth", request_body = AdminTokenRequest,
    responses((status = 200, body = AdminToken), (status = 401, body = ErrorBody), (status = 400, body = ErrorBody)))]
pub async fn admin_token(
    _: WithinAuthLimit,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    ApiJson(body): ApiJson<AdminTokenRequest>,
) -> Result<NoStore<Json<AdminToken>>, ApiError> {
    if !state.auth.is_admin_key(&body.key) {
        refused(&state, None, &request_id);
        return Err(ApiError::Unauthorized);
    }
    let issued = state
        .auth
        .jwt()
        .issue_admin()
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let event = audit::event(None, "token.issue", "admin", "ok", Some(&request_id.id));
    state.audit.write(event).await;
    Ok(NoStore(Json(AdminToken {
        token: issued.token,
        expires_in: issued.expires_in,
    })))
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantToken {
    token: String,
    expires_in: u64,
    tenant_id: String,
}

/// Exchanges a tenant API key (`x-api-key`) for a tenant JWT.
#[utoipa::path(post, path = "/api/auth/tenant-token", tag = "auth",
    params(("x-api-key" = String, Header, description = "the tenant API key")),
    responses((status = 200, body = TenantToken), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn tenant_token(
    _: WithinAuthLimit,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
) -> Result<NoStore<Json<TenantToken>>, ApiError> {
    let key = api_key_header(&headers).ok_or(ApiError::Unauthorized)?;
    let tenant = match state.auth.tenant_for_key(key).await {
        Ok(tenant) => tenant,
        Err(err) => {
            if err == AuthError::Unauthorized {
                refused(&state, None, &request_id);
            }
            return Err(err.into());
        }
    };
    let issued = state
        .auth
        .jwt()
        .issue_tenant(&tenant.id, key_generation(&tenant.api_key_hash))
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let event = audit::event(
        Some(&tenant.id),
        "token.issue",
        "tenant",
        "ok",
        Some(&request_id.id),
    );
    state.audit.write(event).await;
    Ok(NoStore(Json(TenantToken {
        token: issued.token,
        expires_in: issued.expires_in,
        tenant_id: tenant.id,
    })))
}

fn refused(state: &AppState, tenant_id: Option<&str>, request_id: &RequestId) {
    audit::refusal(&state.audit, tenant_id, Some(&request_id.id));
}
