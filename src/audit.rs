//! The audit trail: typed events and how they reach the store. Rare events (admin actions,
//! tokens issued, refused credentials) are written at once; tool-call events go through a
//! bounded buffer owned by the tenant actor and are written in batches.

use std::time::Duration;

use chrono::{SubsecRound, Utc};

use crate::shutdown::Lifecycle;
use crate::store::{AuditRecord, SharedStore};

/// How often events past `AUDIT_RETENTION_DAYS` are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

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

/// Deletes events older than `days` now and then every hour, until shutdown; `0` keeps
/// everything. A failed prune (database down) is logged and tried at the next round.
pub fn spawn_retention(store: SharedStore, days: u32, lifecycle: &Lifecycle) {
    if days == 0 {
        return;
    }
    let token = lifecycle.token.clone();
    lifecycle.tasks.spawn(async move {
        let mut tick = tokio::time::interval(PRUNE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = token.cancelled() => break,
                _ = tick.tick() => {}
            }
            let before = Utc::now() - chrono::Duration::days(i64::from(days));
            match store.prune_audit(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(deleted = n, days, "old audit events deleted"),
                Err(err) => tracing::warn!(error = %err, "audit retention prune failed"),
            }
        }
    });
}
