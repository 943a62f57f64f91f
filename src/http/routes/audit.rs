//! The audit trail of one tenant, for its operator and for the tenant itself: newest
//! first, cursor pagination, `?action=` filter.

use axum::extract::State;
use axum::Json;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::tenants::page_limit;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{Admin, ApiPath, ApiQuery, Tenant};
use crate::http::AppState;
use crate::store::{answered_within, AuditQuery, AuditRecord, STORE_WAIT};

const ACTIONS: &[&str] = &[
    "tool.call",
    "tools.list",
    "tenant.create",
    "tenant.update",
    "tenant.delete",
    "tenant.key_rotate",
    "token.issue",
    "auth.refused",
];

#[derive(Deserialize, utoipa::IntoParams)]
pub struct AuditParams {
    /// Items per page, 1 to 500 (default 50).
    limit: Option<u32>,
    /// `nextCursor` of the page before.
    cursor: Option<String>,
    /// Only events of this action, e.g. `tool.call`.
    action: Option<String>,
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditItem {
    id: String,
    at: DateTime<Utc>,
    tenant_id: Option<String>,
    action: String,
    actor: String,
    outcome: String,
    request_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_bytes: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_bytes: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    detail: Option<serde_json::Value>,
}

impl From<AuditRecord> for AuditItem {
    fn from(r: AuditRecord) -> Self {
        Self {
            id: r.id,
            at: r.at,
            tenant_id: r.tenant_id,
            action: r.action,
            actor: r.actor,
            outcome: r.outcome,
            request_id: r.request_id,
            tool: r.tool,
            latency_ms: r.latency_ms,
            request_bytes: r.request_bytes,
            response_bytes: r.response_bytes,
            detail: r.detail,
        }
    }
}

#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    items: Vec<AuditItem>,
    next_cursor: Option<String>,
}

/// A tenant's audit trail, for the operator: also a deleted tenant's (its trail outlives
/// it); 404 for an id that names no tenant and has no trail.
#[utoipa::path(get, path = "/api/tenants/{tenantId}/audit", tag = "audit",
    params(("tenantId" = String, Path), AuditParams), security(("bearer" = [])),
    responses((status = 200, body = AuditPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 404, body = ErrorBody)))]
pub async fn for_admin(
    _: Admin,
    State(state): State<AppState>,
    ApiPath(tenant_id): ApiPath<String>,
    ApiQuery(params): ApiQuery<AuditParams>,
) -> Result<Json<AuditPage>, ApiError> {
    let page = page(&state, tenant_id.clone(), params).await?;
    // A refusal is written under whatever id the refused request's path named, so
    // refusals alone do not show that a tenant of this id ever was.
    let proven = page.items.iter().any(|item| item.action != "auth.refused");
    if !proven && !has_tenant_or_trail(&state, tenant_id).await? {
        return Err(ApiError::NotFound("no such tenant".into()));
    }
    Ok(page)
}

/// Whether `tenant_id` is a tenant now, or was one whose trail is still kept: every
/// tenant's trail starts with its `tenant.create` and a deleted one's ends with its
/// `tenant.delete` (the newest of its events that retention keeps longest).
async fn has_tenant_or_trail(state: &AppState, tenant_id: String) -> Result<bool, ApiError> {
    if answered_within(STORE_WAIT, state.store.get_tenant(&tenant_id))
        .await?
        .is_some()
    {
        return Ok(true);
    }
    for action in ["tenant.delete", "tenant.create"] {
        let query = AuditQuery {
            tenant_id: tenant_id.clone(),
            action: Some(action.to_owned()),
            before_id: None,
            limit: 1,
        };
        if !answered_within(STORE_WAIT, state.store.list_audit(&query))
            .await?
            .is_empty()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The calling tenant's own audit trail.
#[utoipa::path(get, path = "/api/tenant/{tenantId}/audit", tag = "audit",
    params(("tenantId" = String, Path), AuditParams), security(("bearer" = []), ("apiKey" = [])),
    responses((status = 200, body = AuditPage), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)))]
pub async fn for_tenant(
    Tenant(ctx): Tenant,
    State(state): State<AppState>,
    ApiQuery(params): ApiQuery<AuditParams>,
) -> Result<Json<AuditPage>, ApiError> {
    page(&state, ctx.tenant_id, params).await
}

async fn page(
    state: &AppState,
    tenant_id: String,
    params: AuditParams,
) -> Result<Json<AuditPage>, ApiError> {
    let limit = page_limit(params.limit)?;
    if let Some(action) = params.action.as_deref() {
        if !ACTIONS.contains(&action) {
            return Err(ApiError::invalid_request(format!(
                "action must be one of {}",
                ACTIONS.join(", ")
            )));
        }
    }
    if let Some(cursor) = params.cursor.as_deref() {
        if !is_issued_form(cursor) {
            return Err(ApiError::invalid_request(
                "cursor is not one this service issued",
            ));
        }
    }
    let query = AuditQuery {
        tenant_id,
        action: params.action,
        before_id: params.cursor,
        limit: limit + 1,
    };
    let mut rows = answered_within(STORE_WAIT, state.store.list_audit(&query)).await?;
    let next_cursor = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|r| r.id.clone())
    } else {
        None
    };
    Ok(Json(AuditPage {
        items: rows.into_iter().map(AuditItem::from).collect(),
        next_cursor,
    }))
}

/// Whether `cursor` is an audit event id as this service writes it: a UUID in its
/// lower-case hyphenated form. Other spellings of a UUID parse too, but pages are cut by
/// comparing the text with the stored ids, so they would skip or repeat events.
fn is_issued_form(cursor: &str) -> bool {
    uuid::Uuid::try_parse(cursor).is_ok_and(|id| id.hyphenated().to_string() == cursor)
}

#[cfg(test)]
mod tests {
    use super::is_issued_form;

    #[test]
    fn only_the_issued_spelling_of_an_event_id_is_a_cursor() {
        let issued = "0190a5d2-7c1e-7a3b-8f00-1234567890ab";
        assert!(is_issued_form(issued));
        for other in [
            "0190A5D2-7C1E-7A3B-8F00-1234567890AB",
            "0190a5d27c1e7a3b8f001234567890ab",
            "{0190a5d2-7c1e-7a3b-8f00-1234567890ab}",
            "urn:uuid:0190a5d2-7c1e-7a3b-8f00-1234567890ab",
            "not-a-uuid",
        ] {
            assert!(!is_issued_form(other), "{other}");
        }
    }
}
