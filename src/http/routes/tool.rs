//! `POST /api/tenant/{tenantId}/tool`: the old service's one tenant endpoint. `listTools`
//! and `refreshTools` answer the tenant's tool list; any other `method` is a tool name,
//! called on the tenant's upstream with `params` as its arguments. The answer is the
//! upstream's `CallToolResult` as it was sent (a tool error is still 200, `isError: true`).

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::audit;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{ApiJson, Tenant};
use crate::http::middleware::RequestId;
use crate::http::AppState;
use crate::tenants::messages::CallError;

#[derive(Deserialize, utoipa::ToSchema)]
pub struct ToolRequest {
    /// `listTools`, `refreshTools`, or the name of a tool to call.
    method: String,
    /// The tool's arguments (an object), for tool calls.
    #[schema(value_type = Option<Object>)]
    params: Option<Map<String, Value>>,
}

/// Lists the tenant's tools or calls one of them on the tenant's upstream.
#[utoipa::path(post, path = "/api/tenant/{tenantId}/tool", tag = "tools", request_body = ToolRequest,
    params(("tenantId" = String, Path)), security(("bearer" = []), ("apiKey" = [])),
    responses(
        (status = 200, description = "`{\"tools\":[…]}` for listTools/refreshTools, else the upstream's CallToolResult", body = Object),
        (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
        (status = 404, body = ErrorBody), (status = 429, body = ErrorBody), (status = 502, body = ErrorBody),
        (status = 503, body = ErrorBody), (status = 504, body = ErrorBody)))]
pub async fn call(
    Tenant(ctx): Tenant,
    State(state): State<AppState>,
    Extension(request_id): Extension<RequestId>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<ToolRequest>,
) -> Result<Response, ApiError> {
    let started = Instant::now();
    let tenant = &ctx.tenant;
    // Arguments reach the audit trail only when the operator asked for it (AUDIT_ARGUMENTS).
    let arguments = state
        .config
        .audit_arguments
        .then(|| body.params.clone())
        .flatten();
    let (action, tool, result) = match body.method.as_str() {
        "" => {
            return Err(ApiError::invalid_request(
                "field `method`: must not be empty",
            ))
        }
        m @ ("listTools" | "refreshTools") => {
            let result = state
                .tenants
                .list_tools(tenant, m == "refreshTools")
                .await
                .and_then(|list| to_json(&serde_json::json!({ "tools": list.tools }), false));
            ("tools.list", None, result)
        }
        name => {
            // A REST answer is one JSON body: no channel for the upstream's progress.
            let result = state
                .tenants
                .call_tool(tenant, name, body.params, None)
                .await
                .and_then(|mut r| {
                    let is_error = *r.is_error.get_or_insert(false);
                    to_json(&r, is_error)
                });
            ("tool.call", Some(name.to_owned()), result)
        }
    };
    let event = audit::call_event(audit::CallFacts {
        tenant_id: &tenant.id,
        action,
        tool: tool.as_deref(),
        arguments,
        request_id: Some(&request_id.0),
        outcome: audit::call_outcome(result.as_ref().map(|(_, is_error)| *is_error)),
        started,
        request_bytes: headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok()),
        response_bytes: result.as_ref().ok().map(|(b, _)| b.len() as i64),
    });
    state.tenants.audit(&tenant.id, event);
    let (bytes, _) = result.map_err(ApiError::from)?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Bytes::from(bytes),
    )
        .into_response())
}

/// The answer's bytes, and whether it reports a tool error.
fn to_json(value: &impl serde::Serialize, is_error: bool) -> Result<(Vec<u8>, bool), CallError> {
    serde_json::to_vec(value)
        .map(|bytes| (bytes, is_error))
        .map_err(|e| CallError::Upstream(format!("unserialisable upstream answer: {e}")))
}

impl From<CallError> for ApiError {
    fn from(err: CallError) -> Self {
        match err {
            CallError::UnknownTool(name) => ApiError::UnknownTool(name),
            CallError::Upstream(reason) => ApiError::Upstream(reason),
            CallError::Timeout => ApiError::UpstreamTimeout,
            CallError::Unavailable { retry_after, .. } | CallError::Busy { retry_after } => {
                ApiError::Unavailable {
                    reason: "the tenant's upstream is failing or busy",
                    retry_after,
                }
            }
            CallError::RateLimited { retry_after } => ApiError::RateLimited { retry_after },
        }
    }
}
