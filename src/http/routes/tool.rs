//! `POST /api/tenant/{tenantId}/tool`: the old service's one tenant endpoint. `listTools`
//! and `refreshTools` answer the tenant's tool list; any other `method` is a tool name,
//! called on the tenant's upstream with `params` as its arguments. The answer is the
//! upstream's `CallToolResult` as it was sent (a tool error is still 200, `isError: true`).

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::audit;
use crate::http::error::{ApiError, ErrorBody};
use crate::http::extract::{MeasuredJson, Tenant};
use crate::http::middleware::RequestId;
use crate::http::AppState;
use crate::tenants::messages::{CallError, LONGEST_TOOL_NAME};
use crate::tenants::runtime::TenantRuntime;

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
    let pending = PendingAudit {
        runtime: state.tenants.clone(),
        tenant_id: tenant.id.clone(),
        action,
        tool,
        // Arguments reach the audit trail only when the operator asked (AUDIT_ARGUMENTS).
        arguments: state
            .config
            .audit_arguments
            .then(|| body.params.clone())
            .flatten(),
        request_id: request_id.id,
        started: Instant::now(),
        request_bytes: i64::try_from(bytes).ok(),
        cut_off_at: request_id.started + state.config.request_timeout,
        written: false,
    };
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

/// The audit event of one REST tool request, written once: with its outcome when the
/// handler answers, or, if the handler is dropped first, as a `timeout` when
/// `REQUEST_TIMEOUT_MS` cut the request (the client was answered 504), else as an
/// `upstream_error` that was cancelled (the client went away). Either way the call may have
/// reached the upstream (which is told it was cancelled), so it is on record.
struct PendingAudit {
    runtime: TenantRuntime,
    tenant_id: String,
    action: &'static str,
    tool: Option<String>,
    arguments: Option<Map<String, Value>>,
    request_id: String,
    started: Instant,
    request_bytes: Option<i64>,
    /// When `REQUEST_TIMEOUT_MS` cuts the request off.
    cut_off_at: Instant,
    written: bool,
}

impl PendingAudit {
    fn write(mut self, outcome: &'static str, response_bytes: Option<i64>) {
        self.record(outcome, response_bytes);
    }

    fn record(&mut self, outcome: &'static str, response_bytes: Option<i64>) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        let event = audit::call_event(audit::CallFacts {
            tenant_id: &self.tenant_id,
            action: self.action,
            tool: self.tool.as_deref(),
            arguments: self.arguments.take(),
            request_id: Some(&self.request_id),
            outcome,
            started: self.started,
            request_bytes: self.request_bytes,
            response_bytes,
        });
        self.runtime.audit(&self.tenant_id, event);
    }
}

impl Drop for PendingAudit {
    fn drop(&mut self) {
        // The timeout layer starts its timer after `RequestId::started` and fires no earlier
        // than its deadline: a request it cut off is past `cut_off_at` here.
        let timed_out = Instant::now() >= self.cut_off_at;
        self.record(
            if timed_out {
                "timeout"
            } else {
                "upstream_error"
            },
            None,
        );
    }
}
