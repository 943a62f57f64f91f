//! The audit trail: typed events and how they reach the store. Rare events (admin actions,
//! tokens issued, refused credentials) are written at once; tool-call events go through a
//! bounded buffer owned by the tenant actor and are written in batches.

use chrono::{SubsecRound, Utc};

use crate::store::{AuditRecord, SharedStore};
use crate::tenants::messages::CallError;

/// A new event with a time-ordered id (UUIDv7), so ids sort by time across replicas.
pub fn event(
    tenant_id: Option<&str>,
    action: &str,
    actor: &str,
    outcome: &str,
    request_id: Option<&str>,
) -> AuditRecord {
    AuditRecord {
        id: uuid::Uuid::now_v7().to_string(),
        at: Utc::now().trunc_subsecs(6),
        tenant_id: tenant_id.map(str::to_owned),
        action: action.to_owned(),
        actor: actor.to_owned(),
        outcome: outcome.to_owned(),
        request_id: request_id.map(str::to_owned),
        tool: None,
        latency_ms: None,
        request_bytes: None,
        response_bytes: None,
        detail: None,
    }
}

/// Writes one event now; a failure is logged (without the event's content) and counted.
pub async fn write_now(store: &SharedStore, event: AuditRecord) {
    if let Err(err) = store.append_audit(std::slice::from_ref(&event)).await {
        tracing::warn!(error = %err, action = %event.action, "audit event not written");
    }
}

/// What the audit trail records about one tenant call, from the REST route or the MCP
/// endpoint alike, so both write the same event for the same call.
pub struct CallFacts<'a> {
    pub tenant_id: &'a str,
    /// `tool.call` or `tools.list`.
    pub action: &'a str,
    pub tool: Option<&'a str>,
    pub request_id: Option<&'a str>,
    pub outcome: &'static str,
    pub started: std::time::Instant,
    pub request_bytes: Option<i64>,
    pub response_bytes: Option<i64>,
}

/// The event of one tenant call (actor `tenant`).
pub fn call_event(facts: CallFacts<'_>) -> AuditRecord {
    let mut record = event(
        Some(facts.tenant_id),
        facts.action,
        "tenant",
        facts.outcome,
        facts.request_id,
    );
    record.tool = facts.tool.map(str::to_owned);
    record.latency_ms = Some(facts.started.elapsed().as_millis() as i64);
    record.request_bytes = facts.request_bytes;
    record.response_bytes = facts.response_bytes;
    record
}

/// The audit outcome of a call: `Ok(is_error)` for an answer from the upstream.
pub fn call_outcome(result: Result<bool, &CallError>) -> &'static str {
    match result {
        Ok(true) => "tool_error",
        Ok(false) => "ok",
        Err(CallError::Timeout) => "timeout",
        Err(CallError::RateLimited { .. }) => "rate_limited",
        Err(CallError::UnknownTool(_)) => "refused",
        Err(CallError::Upstream(_) | CallError::Unavailable { .. } | CallError::Busy { .. }) => {
            "upstream_error"
        }
    }
}
