//! Forwards a tenant's notices downstream: when the tenant's upstream says
//! `notifications/tools/list_changed`, the client hears it too, whether this replica's tenant
//! actor heard it or another replica did (PostgreSQL fleets, through
//! [`crate::store::change_feed`]). Two kinds of listener share one loop
//! (`relay_tool_changes`): a session (protocol up to 2025-11-25; one task per session,
//! started at `initialize` and again by a later request if the subscription was lost, ended
//! by the session's end, shutdown or a closed peer), and a session-less client's
//! `subscriptions/listen` stream (2026-07-28; [`listen`]).

use std::future::Future;
use std::sync::Arc;

use rmcp::service::SubscriptionContext;
use rmcp::{Peer, RoleServer};
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::shutdown::Lifecycle;
use crate::store::TenantRecord;
use crate::tenants::messages::TenantNotice;
use crate::tenants::runtime::TenantRuntime;

/// The forwarder of one session; dropping it stops the task.
pub struct Forwarder {
    _stop: DropGuard,
    /// Cancelled by the task when it ends (subscription lost, peer gone).
    done: CancellationToken,
}

impl Forwarder {
    pub fn finished(&self) -> bool {
        self.done.is_cancelled()
    }
}

/// Starts forwarding `tenant`'s notices to `peer` until the returned [`Forwarder`] drops,
/// `parent` is cancelled, the peer goes away or the tenant actor stops. A lost
/// subscription is not taken up here with this (possibly stale) record: the session's next
/// request, which carries a freshly authenticated record, starts a new forwarder.
pub fn spawn_forwarder(
    lifecycle: &Arc<Lifecycle>,
    runtime: TenantRuntime,
    tenant: TenantRecord,
    peer: Peer<RoleServer>,
    parent: &CancellationToken,
) -> Forwarder {
    let stop = parent.child_token();
    let done = CancellationToken::new();
    let finished = done.clone();
    let token = stop.clone();
    lifecycle.tasks.spawn(async move {
        let _done = finished.drop_guard();
        let peer = &peer;
        tokio::select! {
            _ = relay_tool_changes(&runtime, &tenant, || peer.notify_tool_list_changed()) => {}
            _ = token.cancelled() => {}
        }
    });
    Forwarder {
        _stop: stop.drop_guard(),
        done,
    }
}

/// Runs one `subscriptions/listen` stream of a session-less client: `tenant`'s tool-list
/// changes go to it (when it asked for them) until the client cancels it, the gateway drains
/// (`sessions`), or the tenant actor stops; then the stream ends with its final result and the
/// client listens again, authenticated afresh, as a session's next request would renew its
/// forwarder. It counts as no request in flight, so an open stream never holds the drain.
pub async fn listen(
    runtime: &TenantRuntime,
    tenant: &TenantRecord,
    subscription: &SubscriptionContext,
    sessions: &CancellationToken,
) {
    let sink = subscription.sink();
    let relay = async {
        if subscription.accepted().tools_list_changed == Some(true) {
            relay_tool_changes(runtime, tenant, || sink.notify_tool_list_changed()).await;
        } else {
            // Nothing accepted that this gateway sends: an idle stream until it ends.
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        _ = relay => {}
        _ = subscription.cancelled() => {}
        _ = sessions.cancelled() => {}
    }
}

/// Calls `announce` once per change of `tenant`'s tool list, until the tenant actor stops or
/// `announce` fails (the listener is gone).
async fn relay_tool_changes<F, E>(
    runtime: &TenantRuntime,
    tenant: &TenantRecord,
    mut announce: impl FnMut() -> F,
) where
    F: Future<Output = Result<(), E>>,
{
    // Subscribed first, so a change heard elsewhere while we subscribe locally is not lost.
    let mut remote = runtime.remote_tool_changes();
    let Ok(mut notices) = runtime.subscribe(tenant).await else {
        return;
    };
    loop {
        let changed = tokio::select! {
            notice = notices.recv() => match notice {
                // A lagged receiver missed some changes: the list changed all the same.
                Ok(TenantNotice::ToolListChanged) | Err(RecvError::Lagged(_)) => true,
                // The tenant actor stopped (idle, changed, deleted, restarted).
                Err(RecvError::Closed) => return,
            },
            heard = remote.recv() => match heard {
                Ok(tenant_id) => tenant_id == tenant.id,
                // Missed some: one of them may have been ours.
                Err(RecvError::Lagged(_)) => true,
                Err(RecvError::Closed) => return,
            },
        };
        if changed && announce().await.is_err() {
            return;
        }
    }
}
