//! `POST /api/tenant/{tenantId}/tool`: the old service's one tenant endpoint. `listTools`
//! and `refreshTools` answer the tenant's tool list; any other `method` is a tool name,
//! called on the tenant's upstream with `params` as its arguments. The answer is the
//! upstream's `CallToolResult` as it was sent (a tool error is still 200, `isError: true`).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::audit;
use crate::audit::pending::PendingCall;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{MeasuredJson, Tenant};
use crate::http::middleware::RequestId;
use crate::http::AppState;
use crate::tenants::messages::{CallError, LONGEST_TOOL_NAME};

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
    MeasuredJson { body, bytes }: MeasuredJson<ToolRequest>,
) -> Result<Response, ApiError> {
    let tenant = &ctx.tenant;
    let (action, tool) = match body.method.as_str() {
        "" => {
            return Err(ApiError::invalid_request(
                "field `method`: must not be empty",
            ))
        }
        "listTools" | "refreshTools" => ("tools.list", None),
        name if name.len() > LONGEST_TOOL_NAME => {
            return Err(ApiError::invalid_request(format!(
                "field `method`: at most {LONGEST_TOOL_NAME} bytes"
            )))
        }
        name => ("tool.call", Some(name.to_owned())),
    };
    let mut pending = PendingCall::new(
        state.tenants.clone(),
        &tenant.id,
        action,
        Some(request_id.id),
        Some(request_id.started + state.config.request_timeout),
    );
    pending.tool = tool;
    // Arguments reach the audit trail only when the operator asked (AUDIT_ARGUMENTS).
    pending.arguments = state
        .config
        .audit_arguments
        .then(|| body.params.clone())
        .flatten();
    pending.request_bytes = i64::try_from(bytes).ok();
    let result = match pending.tool.as_deref() {
        None => state
            .tenants
            .list_tools(tenant, body.method == "refreshTools")
            .await
            .and_then(|list| to_json(&serde_json::json!({ "tools": list.tools }), false)),
        // A REST answer is one JSON body: no channel for the upstream's progress.
        Some(name) => state
            .tenants
            .call_tool(tenant, name, body.params, None)
            .await
            .and_then(|mut r| {
                let is_error = *r.is_error.get_or_insert(false);
                to_json(&r, is_error)
            }),
    };
    pending.write(
        audit::call_outcome(result.as_ref().map(|(_, is_error)| *is_error)),
        result.as_ref().ok().map(|(b, _)| b.len() as i64),
    );
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
            CallError::Failing {
                reason,
                retry_after,
            } => ApiError::UpstreamFailing {
                reason,
                retry_after,
            },
            CallError::Timeout => ApiError::UpstreamTimeout,
            CallError::Unavailable { retry_after, .. } => ApiError::Unavailable {
                reason: "the tenant is restarting",
                retry_after,
            },
            CallError::Busy { retry_after } => ApiError::TooManyInFlight { retry_after },
            CallError::RateLimited { retry_after } => ApiError::RateLimited { retry_after },
        }
    }
}
