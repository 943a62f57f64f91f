//! The audit event of one tenant call (a tool call or a tool list, REST or MCP), written
//! exactly once: with its outcome when the call is answered, or, if the request is dropped
//! first, as a `timeout` when `REQUEST_TIMEOUT_MS` cut it off (the client was answered
//! 504), else as an `upstream_error` that was cancelled (the client went away). Either way
//! the call may have reached the upstream (which is told it was cancelled), so it is on
//! record.

use std::time::Instant;

use serde_json::{Map, Value};

use crate::tenants::runtime::TenantRuntime;

pub struct PendingCall {
    runtime: TenantRuntime,
    tenant_id: String,
    action: &'static str,
    /// The tool called; `None` for a tool list.
    pub tool: Option<String>,
    /// The tool's arguments, only when `AUDIT_ARGUMENTS=true`.
    pub arguments: Option<Map<String, Value>>,
    request_id: Option<String>,
    started: Instant,
    pub request_bytes: Option<i64>,
    /// When `REQUEST_TIMEOUT_MS` cuts the request off; `None` for one it never cuts (an MCP
    /// request in a session, answered by an event stream whose headers go out at once).
    cut_off_at: Option<Instant>,
    written: bool,
}

impl PendingCall {
    /// A call of `action` (`tool.call` or `tools.list`) starting now, for the request with
    /// id `request_id` that the timeout layer cuts off at `cut_off_at`, if it does.
    pub fn new(
        runtime: TenantRuntime,
        tenant_id: &str,
        action: &'static str,
        request_id: Option<String>,
        cut_off_at: Option<Instant>,
    ) -> Self {
        Self {
            runtime,
            tenant_id: tenant_id.to_owned(),
            action,
            tool: None,
            arguments: None,
            request_id,
            started: Instant::now(),
            request_bytes: None,
            cut_off_at,
            written: false,
        }
    }

    pub fn write(mut self, outcome: &'static str, response_bytes: Option<i64>) {
        self.record(outcome, response_bytes);
    }

    fn record(&mut self, outcome: &'static str, response_bytes: Option<i64>) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        let event = super::call_event(super::CallFacts {
            tenant_id: &self.tenant_id,
            action: self.action,
            tool: self.tool.as_deref(),
            arguments: self.arguments.take(),
            request_id: self.request_id.as_deref(),
            outcome,
            started: self.started,
            request_bytes: self.request_bytes,
            response_bytes,
        });
        self.runtime.audit(&self.tenant_id, event);
    }
}

impl Drop for PendingCall {
    fn drop(&mut self) {
        // The timeout layer starts its timer after `RequestId::started` and fires no earlier
        // than its deadline: a request it cut off is past `cut_off_at` here.
        let timed_out = self.cut_off_at.is_some_and(|at| Instant::now() >= at);
        let outcome = if timed_out {
            "timeout"
        } else {
            "upstream_error"
        };
        if !self.written {
            abandoned_call_counted(self.action, &self.tenant_id, outcome);
        }
        self.record(outcome, None);
    }
}

/// A tool call whose caller dropped it never returns to the tenant runtime, which counts
/// each call it returns in the tool-call metrics: it is counted here, with the outcome
/// its audit event has, under the tool label `other` (its name may be one the tenant's
/// list never confirmed, and a caller's names must not use up the tool labels).
pub fn abandoned_call_counted(action: &str, tenant_id: &str, outcome: &'static str) {
    if action == "tool.call" {
        crate::metrics::tool_call(tenant_id, crate::metrics::OTHER, outcome);
    }
}
