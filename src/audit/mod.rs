//! The audit trail: typed events and how they reach the store. Rare events (admin actions,
//! tokens issued) are written at once by the [`AuditWriter`], which retries what the store
//! refused; refused credentials, which anyone can cause, go on its queue, written in
//! batches ([`refusal`]); tool-call events go through a bounded buffer per tenant
//! (`tenants::audit_buffer`), which the tenant's actor writes in batches.

pub mod budget;
pub mod pending;
mod writer;

pub use writer::AuditWriter;
pub(crate) use writer::{append_within, ATTEMPT};

use std::time::Duration;

use chrono::{SubsecRound, Utc};

use crate::shutdown::Lifecycle;
use crate::store::{AuditRecord, SharedStore};
use crate::tenants::messages::CallError;

/// How often events past `AUDIT_RETENTION_DAYS` are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);
/// Audit events one prune statement deletes at most.
const PRUNE_BATCH: u32 = 5_000;
/// The pause between two prune statements of one round.
const PRUNE_PAUSE: Duration = Duration::from_millis(50);

/// The action of a refused credential, on a tenant route, `/mcp/{id}` or a token request.
pub const REFUSED: &str = "auth.refused";
/// The actions of a tenant's tool calls and tool lists (REST and MCP).
pub const TOOL_CALL: &str = "tool.call";
pub const TOOLS_LIST: &str = "tools.list";

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

/// Records a refused credential (`auth.refused`), under `tenant` when the refusal names one.
/// Queued for the writer's batches, neither written at once nor waited for: anyone can cause
/// refusals, at the auth limit from every address they have, and a write of its own for
/// each would hold a pooled connection (SQLite's one connection) per refusal, and the
/// refused request with it, starving key lookups and admin changes. On the queue they take
/// one write for many, and at most their share of it; past that they are dropped, counted
/// in `switchboard_audit_dropped_total`.
pub fn refusal(audit: &AuditWriter, tenant: Option<&str>, request_id: Option<&str>) {
    audit.queue(event(tenant, REFUSED, "anonymous", "refused", request_id));
}

/// Records a refused tenant credential (`auth.refused`) under the path's tenant, so the
/// tenant sees attempts on it. Only 401/403 refusals count; a store outage is not a refusal.
pub fn credential_refused(
    audit: &AuditWriter,
    path_tenant: &str,
    err: &crate::auth::AuthError,
    request_id: Option<&str>,
) {
    use crate::auth::AuthError;
    if !matches!(err, AuthError::Unauthorized | AuthError::Forbidden) {
        return;
    }
    // The id is the caller's text: keep it only when it is tenant-id sized.
    let tenant = Some(path_tenant).filter(|id| id.len() <= 64);
    refusal(audit, tenant, request_id);
}

/// Deletes events older than `days` now and then every hour, until shutdown; `0` keeps
/// everything. A failed prune (database down) is logged and tried at the next round. A
/// backlog goes in batches of [`PRUNE_BATCH`] with a pause between them, so the store
/// serves everything else meanwhile, and shutdown never waits for more than one batch.
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
            // A count of days older than the calendar (to mean "for ever") prunes nothing.
            let Some(before) =
                Utc::now().checked_sub_signed(chrono::Duration::days(i64::from(days)))
            else {
                continue;
            };
            let mut deleted = 0;
            let outcome = loop {
                match store.prune_audit(before, PRUNE_BATCH).await {
                    // A short batch was the last one.
                    Ok(n) if n < u64::from(PRUNE_BATCH) => {
                        deleted += n;
                        break Ok(());
                    }
                    Ok(n) => deleted += n,
                    Err(err) => break Err(err),
                }
                tokio::select! {
                    _ = token.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(PRUNE_PAUSE) => {}
                }
            };
            if deleted > 0 {
                tracing::info!(deleted, days, "old audit events deleted");
            }
            if let Err(err) = outcome {
                tracing::warn!(error = %err, "audit retention prune failed");
            }
        }
    });
}

/// What the audit trail records about one tenant call, from the REST route or the MCP
/// endpoint alike, so both write the same event for the same call.
pub struct CallFacts<'a> {
    pub tenant_id: &'a str,
    /// `tool.call` or `tools.list`.
    pub action: &'a str,
    pub tool: Option<&'a str>,
    /// The tool's arguments, only when `AUDIT_ARGUMENTS=true`.
    pub arguments: Option<serde_json::Map<String, serde_json::Value>>,
    pub request_id: Option<&'a str>,
    pub outcome: &'static str,
    pub started: std::time::Instant,
    pub request_bytes: Option<i64>,
    pub response_bytes: Option<i64>,
}

/// A call's arguments an audit event keeps at most, as JSON; larger ones are recorded by
/// their size alone (`{"argumentsOmitted":{"bytes":…}}`): the trail is no place for a
/// call's payload, and every event waits in memory while the database is down.
pub const LONGEST_ARGUMENTS: usize = 16 * 1024;

/// The event of one tenant call (actor `tenant`).
pub fn call_event(facts: CallFacts<'_>) -> AuditRecord {
    let mut record = event(
        Some(facts.tenant_id),
        facts.action,
        "tenant",
        facts.outcome,
        facts.request_id,
    );
    if let (Some(arguments), Some(_)) = (facts.arguments, facts.tool) {
        let bytes = json_len(&arguments).unwrap_or(i64::MAX);
        record.detail = Some(
            if usize::try_from(bytes).is_ok_and(|b| b <= LONGEST_ARGUMENTS) {
                serde_json::json!({ "arguments": arguments })
            } else {
                serde_json::json!({ "argumentsOmitted": { "bytes": bytes } })
            },
        );
    }
    record.tool = facts.tool.map(str::to_owned);
    record.latency_ms = Some(facts.started.elapsed().as_millis() as i64);
    record.request_bytes = facts.request_bytes;
    record.response_bytes = facts.response_bytes;
    record
}

/// The size in bytes of `value` as JSON, counted as it is written, without building the
/// text: an MCP call's audit event records its sizes, which rmcp serialises elsewhere.
pub fn json_len(value: &impl serde::Serialize) -> Option<i64> {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    serde_json::to_writer(&mut count, value).ok()?;
    i64::try_from(count.0).ok()
}

/// The audit outcome of a call: `Ok(is_error)` for an answer from the upstream.
pub fn call_outcome(result: Result<bool, &CallError>) -> &'static str {
    match result {
        Ok(true) => "tool_error",
        Ok(false) => "ok",
        Err(CallError::Timeout) => "timeout",
        // The tenant's rate limit, or its in-flight limit (both answered 429).
        Err(CallError::RateLimited { .. } | CallError::Busy { .. }) => "rate_limited",
        // Refused by the gateway itself (an unknown tool, a tenant restarting): the upstream
        // never saw the call.
        Err(CallError::UnknownTool(_) | CallError::Unavailable { .. }) => "refused",
        Err(CallError::Upstream(_) | CallError::Failing { .. }) => "upstream_error",
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{call_event, call_outcome, json_len, CallFacts, LONGEST_ARGUMENTS};
    use crate::tenants::messages::CallError;

    #[test]
    fn arguments_past_their_bound_are_recorded_by_their_size() {
        let facts = |text: String| CallFacts {
            tenant_id: "t",
            action: "tool.call",
            tool: Some("echo"),
            arguments: serde_json::json!({ "text": text }).as_object().cloned(),
            request_id: None,
            outcome: "ok",
            started: std::time::Instant::now(),
            request_bytes: None,
            response_bytes: None,
        };
        // `{"text":"…"}` is 11 bytes around the text.
        let kept = call_event(facts("a".repeat(LONGEST_ARGUMENTS - 11)));
        assert_eq!(
            kept.detail.as_ref().and_then(|d| json_len(&d["arguments"])),
            Some(LONGEST_ARGUMENTS as i64)
        );
        let omitted = call_event(facts("a".repeat(LONGEST_ARGUMENTS - 10)));
        assert_eq!(
            omitted.detail,
            Some(serde_json::json!({"argumentsOmitted": {"bytes": LONGEST_ARGUMENTS + 1}}))
        );
    }

    #[test]
    fn a_call_the_gateway_refused_itself_is_refused_and_one_the_upstream_failed_is_not() {
        let wait = Duration::from_secs(1);
        let refused = [
            CallError::UnknownTool("nope".into()),
            CallError::Unavailable {
                reason: "restarting".into(),
                retry_after: wait,
            },
        ];
        for error in &refused {
            assert_eq!(call_outcome(Err(error)), "refused", "{error}");
        }
        let upstream = [
            CallError::Upstream("reset".into()),
            CallError::Failing {
                reason: "reset".into(),
                retry_after: wait,
            },
        ];
        for error in &upstream {
            assert_eq!(call_outcome(Err(error)), "upstream_error", "{error}");
        }
        assert_eq!(call_outcome(Err(&CallError::Timeout)), "timeout");
        for limited in [
            CallError::RateLimited { retry_after: wait },
            CallError::Busy { retry_after: wait },
        ] {
            assert_eq!(call_outcome(Err(&limited)), "rate_limited", "{limited}");
        }
        assert_eq!(call_outcome(Ok(true)), "tool_error");
        assert_eq!(call_outcome(Ok(false)), "ok");
    }

    #[test]
    fn json_len_counts_what_serde_json_writes() {
        let value =
            serde_json::json!({"text": "héllo", "n": [1, 2.5, null], "nested": {"a": true}});
        let text = serde_json::to_vec(&value).expect("serialisable");
        assert_eq!(json_len(&value), Some(text.len() as i64));
        assert_eq!(json_len(&serde_json::Map::new()), Some(2));
    }
}
