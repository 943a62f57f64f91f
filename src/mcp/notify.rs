//! Forwards a tenant's notices downstream: when the tenant's tool list changes (its
//! upstream says `notifications/tools/list_changed`, or the gateway loads a list that
//! differs from the one before), the client hears it too, whether this replica's tenant
//! actor found it or another replica did (PostgreSQL fleets, through
//! [`crate::store::change_feed`]). Both reach the process's tool-change feed, which
//! outlives any one tenant actor. Two kinds of listener share one loop
//! (`relay_tool_changes`): a session (protocol up to 2025-11-25; one task per session,
//! started at `initialize`, ended by the session's end, shutdown or a closed peer), and a
//! session-less client's `subscriptions/listen` stream (2026-07-28; [`listen`]).

use std::future::Future;
use std::sync::Arc;

use rmcp::service::SubscriptionContext;
use rmcp::{Peer, RoleServer};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::shutdown::Lifecycle;
use crate::store::TenantRecord;
use crate::tenants::runtime::TenantRuntime;

/// The forwarder of one session; dropping it stops the task.
pub struct Forwarder {
    _stop: DropGuard,
}

/// Starts forwarding `tenant_id`'s tool-list changes to `peer` until the returned
/// [`Forwarder`] drops, `parent` is cancelled or the peer goes away. The tenant's actor
/// stopping (idle, changed, restarted) does not end it: the next actor's changes reach the
/// same feed.
pub fn spawn_forwarder(
    lifecycle: &Arc<Lifecycle>,
    runtime: &TenantRuntime,
    tenant_id: String,
    peer: Peer<RoleServer>,
    parent: &CancellationToken,
) -> Forwarder {
    // Subscribed now, so a change right after `initialize` is not missed.
    let changes = runtime.tool_changes();
    let stop = parent.child_token();
    let token = stop.clone();
    lifecycle.tasks.spawn(async move {
        let peer = &peer;
        tokio::select! {
            _ = relay_tool_changes(changes, &tenant_id, || peer.notify_tool_list_changed()) => {}
            _ = token.cancelled() => {}
        }
    });
    Forwarder {
        _stop: stop.drop_guard(),
    }
}

/// Runs one `subscriptions/listen` stream of a session-less client: `tenant`'s tool-list
/// changes go to it (when it asked for them) until the client cancels it, the gateway drains
/// (`sessions`), or the tenant actor stops; then the stream ends with its final result and the
/// client listens again, authenticated afresh. It counts as no request in flight, so an open
/// stream never holds the drain.
pub async fn listen(
    runtime: &TenantRuntime,
    tenant: &TenantRecord,
    subscription: &SubscriptionContext,
    sessions: &CancellationToken,
) {
    let changes = runtime.tool_changes();
    // A stream ends when the tenant actor stops, even when it
    // accepted nothing this gateway sends: it holds a session slot, and what
    // authenticated it (a key since rotated, a tenant since disabled) is checked again
    // only when it listens again.
    let Ok(actor_stop) = runtime.actor_stop(tenant).await else {
        return;
    };
    let sink = subscription.sink();
    let tell = subscription.accepted().tools_list_changed == Some(true);
    let relay = relay_tool_changes(changes, &tenant.id, || async {
        if tell {
            sink.notify_tool_list_changed().await
        } else {
            Ok(())
        }
    });
    tokio::select! {
        _ = relay => {}
        _ = actor_stop.cancelled() => {}
        _ = subscription.cancelled() => {}
        _ = sessions.cancelled() => {}
    }
}

/// Calls `announce` once per change of `tenant_id`'s tool list heard on `changes`, until
/// `announce` fails (the listener is gone).
async fn relay_tool_changes<F, E>(
    mut changes: broadcast::Receiver<String>,
    tenant_id: &str,
    mut announce: impl FnMut() -> F,
) where
    F: Future<Output = Result<(), E>>,
{
    loop {
        let changed = match changes.recv().await {
            Ok(changed) => changed == tenant_id,
            // Missed some: one of them may have been this tenant's.
            Err(RecvError::Lagged(_)) => true,
            Err(RecvError::Closed) => return,
        };
        if changed && announce().await.is_err() {
            return;
        }
    }
}
