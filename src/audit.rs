//! The audit trail: typed events and how they reach the store. Rare events (admin actions,
//! tokens issued, refused credentials) are written at once; tool-call events go through a
//! bounded buffer owned by the tenant actor and are written in batches.

use chrono::{SubsecRound, Utc};

use crate::store::{AuditRecord, SharedStore};

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
