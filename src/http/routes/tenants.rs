//! The operator's tenant API: create, list, read, change, rotate the key, delete.
//! Request bodies are validated here into `tenants::admin` types; no response ever carries
//! the upstream token or the key hash, and the API key only in the create/rotate answer.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::{Extension, Json};
use base64::Engine;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};

use crate::config::Secret;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{Admin, ApiJson, ApiPath, ApiQuery};
use crate::http::middleware::RequestId;
use crate::http::no_store::NoStore;
use crate::http::AppState;
use crate::store::{
    answered_within, PageCursor, RateLimit, TenantRecord, UpstreamTransport, STORE_WAIT,
};
use crate::tenants::admin::{Actor, NewTenant, TenantUpdate};
use crate::tenants::status::UpstreamStatus;

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateTenantRequest {
    name: Option<String>,
    integration_key: String,
    integration_app_token: String,
    upstream_url: Option<String>,
    upstream_transport: Option<UpstreamTransport>,
    rate_limit: Option<RateLimit>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedTenant {
    tenant_id: String,
    /// Shown only here (and on rotation): store it now.
    api_key: String,
    name: Option<String>,
    integration_key: String,
    upstream_url: Option<String>,
    upstream_transport: UpstreamTransport,
    rate_limit: Option<RateLimit>,
    enabled: bool,
    created_at: DateTime<Utc>,
}

/// A tenant as the operator sees it: never a secret.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantView {
    tenant_id: String,
    name: Option<String>,
    integration_key: String,
    upstream_url: Option<String>,
    upstream_transport: UpstreamTransport,
    enabled: bool,
    rate_limit: Option<RateLimit>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    /// Bumped by every change; send it back as `If-Match` to update only that version.
    version: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<UpstreamStatus>,
}

impl TenantView {
    fn new(t: TenantRecord, status: Option<UpstreamStatus>) -> Self {
        Self {
            tenant_id: t.id,
            name: t.name,
            integration_key: t.integration_key,
            upstream_url: t.upstream_url,
            upstream_transport: t.upstream_transport,
            enabled: t.enabled,
            rate_limit: t.rate_limit,
            created_at: t.created_at,
            updated_at: t.updated_at,
            version: t.version,
            status,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantPage {
    items: Vec<TenantView>,
    next_cursor: Option<String>,
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct PageParams {
    /// Items per page, 1 to 500 (default 50).
    limit: Option<u32>,
    /// `nextCursor` of the page before.
    cursor: Option<String>,
}

fn actor(request_id: &RequestId) -> Actor {
    Actor {
        name: "admin",
        request_id: Some(request_id.id.clone()),
    }
}

/// Creates a tenant and returns its API key, once.
#[utoipa::path(post, path = "/api/tenants", tag = "tenants", request_body = CreateTenantRequest,
    security(("bearer" = [])),
    responses((status = 201, body = CreatedTenant), (status = 400, body = ErrorBody),
        (status = 401, body = ErrorBody), (status = 415, body = ErrorBody)))]
pub async fn create(
    _: Admin,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    ApiJson(body): ApiJson<CreateTenantRequest>,
) -> Result<NoStore<(StatusCode, Json<CreatedTenant>)>, ApiError> {
    let new = NewTenant {
        name: validate_name(body.name)?,
        integration_key: validate_integration_key(body.integration_key)?,
        integration_app_token: validate_token(body.integration_app_token)?,
        upstream_url: body.upstream_url.map(validate_upstream_url).transpose()?,
        upstream_transport: body.upstream_transport.unwrap_or_default(),
        rate_limit: body.rate_limit.map(validate_rate_limit).transpose()?,
    };
    let (t, api_key) = state.admin.create(new, &actor(&request_id)).await?;
    tracing::info!(tenant_id = %t.id, "tenant created");
    Ok(NoStore((
        StatusCode::CREATED,
        Json(CreatedTenant {
            tenant_id: t.id,
            api_key: api_key.expose().to_owned(),
            name: t.name,
            integration_key: t.integration_key,
            upstream_url: t.upstream_url,
            upstream_transport: t.upstream_transport,
            rate_limit: t.rate_limit,
            enabled: t.enabled,
            created_at: t.created_at,
        }),
    )))
}

/// Lists tenants, newest first.
#[utoipa::path(get, path = "/api/tenants", tag = "tenants", params(PageParams),
    security(("bearer" = [])),
    responses((status = 200, body = TenantPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)))]
pub async fn list(
    _: Admin,
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<PageParams>,
) -> Result<Json<TenantPage>, ApiError> {
    let limit = page_limit(params.limit)?;
    let after = params.cursor.as_deref().map(decode_cursor).transpose()?;
    let listed = state.store.list_tenants(limit + 1, after.as_ref());
    let mut rows = answered_within(STORE_WAIT, listed).await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(encode_cursor)
    } else {
        None
    };
    Ok(Json(TenantPage {
        items: rows.into_iter().map(|t| TenantView::new(t, None)).collect(),
        next_cursor,
    }))
}

/// One tenant with the state of its upstream connection.
#[utoipa::path(get, path = "/api/tenants/{tenantId}", tag = "tenants",
    params(("tenantId" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = TenantView), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get(
    _: Admin,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<TenantView>, ApiError> {
    let tenant = answered_within(STORE_WAIT, state.store.get_tenant(&id))
        .await?
        .ok_or_else(no_tenant)?;
    let status = state.tenants.status(&id).await;
    Ok(Json(TenantView::new(tenant, Some(status))))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpdateTenantRequest {
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    name: Option<Option<String>>,
    #[serde(default, deserialize_with = "not_null")]
    integration_key: Option<String>,
    #[serde(default, deserialize_with = "not_null")]
    integration_app_token: Option<String>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    upstream_url: Option<Option<String>>,
    #[serde(default, deserialize_with = "not_null")]
    upstream_transport: Option<UpstreamTransport>,
    #[serde(default, deserialize_with = "not_null")]
    enabled: Option<bool>,
    /// `null` returns the tenant to the default limit.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<RateLimit>)]
    rate_limit: Option<Option<RateLimit>>,
}

/// Tells a field sent as `null` (`Some(None)`) from one not sent (`None`).
fn present<'de, D, T>(de: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(de).map(Some)
}

/// A field that may be left out but has no `null`: sent as `null`, it is a wrong-typed
/// field (400), not a change that silently does nothing.
fn not_null<'de, D, T>(de: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    // Through `Option`: serde_json reads `null` where an enum belongs as a syntax error.
    match Option::<T>::deserialize(de)? {
        Some(value) => Ok(Some(value)),
        None => Err(serde::de::Error::invalid_type(
            serde::de::Unexpected::Unit,
            &"a value (this field has no null)",
        )),
    }
}

/// Changes a tenant; its upstream connection is rebuilt with the new values.
#[utoipa::path(patch, path = "/api/tenants/{tenantId}", tag = "tenants", request_body = UpdateTenantRequest,
    params(("tenantId" = String, Path), ("If-Match" = Option<String>, Header, description = "only update this version")),
    security(("bearer" = [])),
    responses((status = 200, body = TenantView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
pub async fn update(
    _: Admin,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<UpdateTenantRequest>,
) -> Result<Json<TenantView>, ApiError> {
    let if_match = match headers.get("if-match") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .map(|s| s.trim().trim_matches('"'))
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| ApiError::invalid_request("If-Match must be a tenant version"))?,
        ),
        None => None,
    };
    let update = TenantUpdate {
        name: body.name.map(validate_name).transpose()?,
        integration_key: body
            .integration_key
            .map(validate_integration_key)
            .transpose()?,
        integration_app_token: body.integration_app_token.map(validate_token).transpose()?,
        upstream_url: body
            .upstream_url
            .map(|u| u.map(validate_upstream_url).transpose())
            .transpose()?,
        upstream_transport: body.upstream_transport,
        enabled: body.enabled,
        rate_limit: body
            .rate_limit
            .map(|r| r.map(validate_rate_limit).transpose())
            .transpose()?,
    };
    let tenant = state
        .admin
        .update(&id, update, if_match, &actor(&request_id))
        .await
        .map_err(not_found_is_tenant)?;
    let status = state.tenants.status(&id).await;
    Ok(Json(TenantView::new(tenant, Some(status))))
}

/// Removes a tenant: its credentials stop working at once; its audit trail stays.
#[utoipa::path(delete, path = "/api/tenants/{tenantId}", tag = "tenants",
    params(("tenantId" = String, Path)), security(("bearer" = [])),
    responses((status = 204), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn delete(
    _: Admin,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    Extension(request_id): Extension<RequestId>,
) -> Result<StatusCode, ApiError> {
    state
        .admin
        .delete(&id, &actor(&request_id))
        .await
        .map_err(not_found_is_tenant)?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RotatedKey {
    tenant_id: String,
    /// The new key, shown only here. The old one no longer works.
    api_key: String,
}

/// Rotates the tenant API key.
#[utoipa::path(post, path = "/api/tenants/{tenantId}/api-key", tag = "tenants",
    params(("tenantId" = String, Path)), security(("bearer" = [])),
    responses((status = 200, body = RotatedKey), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn rotate_key(
    _: Admin,
    State(state): State<AppState>,
    ApiPath(id): ApiPath<String>,
    Extension(request_id): Extension<RequestId>,
) -> Result<NoStore<Json<RotatedKey>>, ApiError> {
    let (tenant, api_key) = state
        .admin
        .rotate_key(&id, &actor(&request_id))
        .await
        .map_err(not_found_is_tenant)?;
    Ok(NoStore(Json(RotatedKey {
        tenant_id: tenant.id,
        api_key: api_key.expose().to_owned(),
    })))
}

fn no_tenant() -> ApiError {
    ApiError::NotFound("no such tenant".into())
}

fn not_found_is_tenant(err: crate::store::StoreError) -> ApiError {
    match err {
        crate::store::StoreError::NotFound => no_tenant(),
        other => other.into(),
    }
}

pub(crate) fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    match limit.unwrap_or(50) {
        n @ 1..=500 => Ok(n),
        _ => Err(ApiError::invalid_request("limit must be between 1 and 500")),
    }
}

fn encode_cursor(t: &TenantRecord) -> String {
    let raw = format!("{}:{}", t.created_at.timestamp_micros(), t.id);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn decode_cursor(cursor: &str) -> Result<PageCursor, ApiError> {
    let bad = || ApiError::invalid_request("cursor is not one this service issued");
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let (micros, id) = raw.split_once(':').ok_or_else(bad)?;
    // No id this service makes has control characters (PostgreSQL cannot even take a NUL).
    if id.chars().any(char::is_control) {
        return Err(bad());
    }
    let created_at = micros
        .parse::<i64>()
        .ok()
        .and_then(DateTime::from_timestamp_micros)
        .ok_or_else(bad)?;
    Ok(PageCursor {
        created_at,
        id: id.to_owned(),
    })
}

/// A name is text for people: at most 200 characters, none of them a control character
/// (a NUL, which PostgreSQL cannot store, or a line break that would forge log lines).
fn validate_name(name: Option<String>) -> Result<Option<String>, ApiError> {
    match name {
        Some(n) if n.chars().count() > 200 || n.chars().any(char::is_control) => {
            Err(ApiError::invalid_request(
                "field `name`: at most 200 characters, no control characters",
            ))
        }
        other => Ok(other),
    }
}

fn validate_integration_key(key: String) -> Result<String, ApiError> {
    let ok = !key.is_empty()
        && key.len() <= 200
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(key)
    } else {
        Err(ApiError::invalid_request(
            "field `integrationKey`: 1 to 200 characters of letters, digits, '-', '_' or '.'",
        ))
    }
}

fn validate_token(token: String) -> Result<Secret, ApiError> {
    if token.is_empty() || token.len() > 16 * 1024 || token.chars().any(char::is_control) {
        return Err(ApiError::invalid_request(
            "field `integrationAppToken`: must be a non-empty string of at most 16 KiB",
        ));
    }
    Ok(Secret::new(token))
}

/// The longest `upstreamUrl`, in bytes: what browsers and most servers take, far beyond
/// any MCP endpoint's, and a bound on what every connect, log line and status carries.
const LONGEST_UPSTREAM_URL: usize = 2048;

fn validate_upstream_url(url: String) -> Result<String, ApiError> {
    if url.len() > LONGEST_UPSTREAM_URL {
        return Err(ApiError::invalid_request(format!(
            "field `upstreamUrl`: at most {LONGEST_UPSTREAM_URL} bytes"
        )));
    }
    let bad = || ApiError::invalid_request("field `upstreamUrl`: must be an http or https URL");
    // The URL parser would quietly encode or drop these; the text stored is the one sent.
    if url.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad());
    }
    let parsed = url::Url::parse(&url).map_err(|_| bad())?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host().is_none() {
        return Err(bad());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(ApiError::invalid_request(
            "field `upstreamUrl`: must not carry credentials; use integrationAppToken",
        ));
    }
    Ok(url)
}

/// The largest `requestsPerSecond` or `burst` the store keeps (a 32-bit signed column).
const MAX_RATE: u32 = i32::MAX as u32;

fn validate_rate_limit(limit: RateLimit) -> Result<RateLimit, ApiError> {
    let within = |v: u32| (1..=MAX_RATE).contains(&v);
    if !within(limit.requests_per_second) || !within(limit.burst) {
        return Err(ApiError::invalid_request(format!(
            "field `rateLimit`: requestsPerSecond and burst must be from 1 to {MAX_RATE}"
        )));
    }
    Ok(limit)
}
