//! How a failed tenant call reads to an MCP client: a JSON-RPC error with a message a person
//! can act on. A tool error inside the upstream is not here: it stays an `isError: true`
//! result. An unknown tool (also another tenant's tool: the tenant has no such tool) is
//! `-32602 Unknown tool`, as the MCP specification shows.

use rmcp::model::ErrorCode;
use rmcp::ErrorData;
use serde_json::json;

use crate::tenants::messages::CallError;

/// Server-defined JSON-RPC codes (the -32000..-32099 range).
pub const UPSTREAM_ERROR: ErrorCode = ErrorCode(-32000);
pub const UPSTREAM_TIMEOUT: ErrorCode = ErrorCode(-32001);
pub const UNAVAILABLE: ErrorCode = ErrorCode(-32003);
pub const RATE_LIMITED: ErrorCode = ErrorCode(-32029);

pub fn call_error(err: CallError) -> ErrorData {
    match err {
        CallError::UnknownTool(name) => ErrorData::invalid_params(
            format!("Unknown tool: {name}"),
            Some(json!({ "code": "unknown_tool" })),
        ),
        CallError::Upstream(reason) => ErrorData::new(
            UPSTREAM_ERROR,
            format!("upstream MCP server error: {reason}"),
            Some(json!({ "code": "upstream_error" })),
        ),
        CallError::Failing {
            reason,
            retry_after,
        } => ErrorData::new(
            UPSTREAM_ERROR,
            format!("upstream MCP server failing, not tried again for a while: {reason}"),
            Some(json!({ "code": "upstream_error", "retryAfterSeconds": secs(retry_after) })),
        ),
        CallError::Timeout => ErrorData::new(
            UPSTREAM_TIMEOUT,
            "the upstream MCP server did not answer in time",
            Some(json!({ "code": "upstream_timeout" })),
        ),
        CallError::Unavailable { retry_after, .. } => ErrorData::new(
            UNAVAILABLE,
            "the tenant is restarting; retry later",
            Some(json!({ "code": "unavailable", "retryAfterSeconds": secs(retry_after) })),
        ),
        CallError::Busy { retry_after } => ErrorData::new(
            RATE_LIMITED,
            "too many calls of this tenant in flight; retry later",
            Some(json!({ "code": "rate_limited", "retryAfterSeconds": secs(retry_after) })),
        ),
        CallError::RateLimited { retry_after } => ErrorData::new(
            RATE_LIMITED,
            "rate limit exceeded; retry later",
            Some(json!({ "code": "rate_limited", "retryAfterSeconds": secs(retry_after) })),
        ),
    }
}

fn secs(wait: std::time::Duration) -> u64 {
    wait.as_secs_f64().ceil().max(1.0) as u64
}

/// A call ended by the drain's end (the process is stopping): the client retries, on
/// another replica or this one once it is back, as API.md's 503 `draining` says.
pub fn draining() -> ErrorData {
    ErrorData::new(
        UNAVAILABLE,
        "the gateway is shutting down; retry",
        Some(json!({ "code": "draining", "retryAfterSeconds": 5 })),
    )
}

/// The request reached the handler without the gate's tenant: a wiring bug, never a
/// client's fault, and never a reason to touch any tenant.
pub fn no_tenant() -> ErrorData {
    ErrorData::internal_error("no authenticated tenant for this request", None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failing upstream reads to an MCP client as an upstream error, not as the gateway
    /// being unavailable, and says when to retry.
    #[test]
    fn a_failing_upstream_is_an_upstream_error_with_a_retry_time() {
        let error = call_error(CallError::Failing {
            reason: "connection refused".into(),
            retry_after: std::time::Duration::from_millis(2_500),
        });
        assert_eq!(error.code, UPSTREAM_ERROR);
        let data = error.data.expect("data");
        assert_eq!(data["code"], "upstream_error");
        assert_eq!(data["retryAfterSeconds"], 3);
    }
}
