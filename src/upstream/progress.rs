//! The upstream's progress notifications, delivered to the call they are about in the order
//! they were read off the connection.
//!
//! rmcp hands every notification to its handler in a task of its own, so two progress
//! notifications could reach a call out of order, and the last ones could reach it after
//! the answer that followed them on the wire. [`Ordered`] wraps the connection's transport
//! instead: a progress notification is routed to its call's channel as it is read, before
//! the next message is read and long before rmcp sees the answer. So when a call has its
//! answer, every progress the upstream sent before it is already in the call's channel.
//!
//! Reading the connection never waits on a call, so each call's channel is bounded
//! ([`ROUTE_CAPACITY`]) and progress past it is dropped and counted: an upstream that floods
//! progress faster than the caller reads it costs the gateway a bounded amount of memory.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rmcp::model::{
    JsonRpcNotification, ProgressNotificationParam, ProgressToken, ServerJsonRpcMessage,
    ServerNotification,
};
use rmcp::service::{RoleClient, TxJsonRpcMessage};
use rmcp::transport::Transport;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

/// Progress notifications one call may have waiting, read off the connection but not yet
/// taken by the call. A caller that keeps up never comes near it.
const ROUTE_CAPACITY: usize = 256;

/// Each waiting call's channel, by the progress token rmcp put on its request.
type Routes = HashMap<ProgressToken, Inbox>;

/// The sending side of one call's route, and how much was dropped because it was full.
struct Inbox {
    updates: mpsc::Sender<ProgressNotificationParam>,
    dropped: Arc<AtomicU64>,
}

/// Where each waiting call wants its progress: one channel per progress token. Shared by a
/// connection's [`Ordered`] transport and its [`super::UpstreamClient`].
#[derive(Clone, Default)]
pub(super) struct ProgressRoutes {
    routes: Arc<Mutex<Routes>>,
    /// The answers and progress the transport has read ([`is_work`]): whether the upstream
    /// got on with its work over a while (see [`super::UpstreamClient::ping`]).
    heard: Arc<AtomicU64>,
}

impl ProgressRoutes {
    /// Answers and progress read off the connection so far.
    pub(super) fn heard(&self) -> u64 {
        self.heard.load(Ordering::Relaxed)
    }

    /// Progress for `token` from now on, until the returned route is dropped.
    pub(super) fn subscribe(&self, token: ProgressToken) -> ProgressRoute {
        let (tx, rx) = mpsc::channel(ROUTE_CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        let inbox = Inbox {
            updates: tx,
            dropped: dropped.clone(),
        };
        self.lock().insert(token.clone(), inbox);
        ProgressRoute {
            routes: self.clone(),
            token,
            updates: rx,
            dropped,
        }
    }

    /// Hands `update` to the call waiting for its token without waiting: progress nobody
    /// waits for is dropped, and so is progress for a call whose channel is full (counted).
    fn route(&self, update: ProgressNotificationParam) {
        let routes = self.lock();
        let Some(inbox) = routes.get(&update.progress_token) else {
            return;
        };
        if let Err(TrySendError::Full(_)) = inbox.updates.try_send(update) {
            inbox.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One call's progress, in the order the upstream sent it. Unsubscribes when dropped, and
/// then reports (log and metric) any progress dropped because the call fell behind.
pub(super) struct ProgressRoute {
    routes: ProgressRoutes,
    token: ProgressToken,
    pub(super) updates: mpsc::Receiver<ProgressNotificationParam>,
    dropped: Arc<AtomicU64>,
}

impl ProgressRoute {
    /// Counts `n` updates of this call as dropped (reported with the others on drop).
    pub(super) fn dropped(&self, n: u64) {
        self.dropped.fetch_add(n, Ordering::Relaxed);
    }
}

impl Drop for ProgressRoute {
    fn drop(&mut self) {
        self.routes.lock().remove(&self.token);
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                capacity = ROUTE_CAPACITY,
                "upstream progress dropped: the upstream sent it faster than the caller took it"
            );
            crate::metrics::progress_dropped(dropped);
        }
    }
}

/// A client transport that takes progress notifications out of the message stream as it
/// reads them and routes them to their calls ([`ProgressRoutes`]); every other message
/// goes on to rmcp unchanged.
pub(super) struct Ordered<T> {
    inner: T,
    routes: ProgressRoutes,
}

impl<T> Ordered<T> {
    pub(super) fn new(inner: T, routes: ProgressRoutes) -> Self {
        Self { inner, routes }
    }
}

impl<T: Transport<RoleClient>> Transport<RoleClient> for Ordered<T> {
    type Error = T::Error;

    fn send(
        &mut self,
        item: TxJsonRpcMessage<RoleClient>,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        self.inner.send(item)
    }

    async fn receive(&mut self) -> Option<ServerJsonRpcMessage> {
        loop {
            let message = self.inner.receive().await?;
            if is_work(&message) {
                self.routes.heard.fetch_add(1, Ordering::Relaxed);
            }
            match message {
                ServerJsonRpcMessage::Notification(JsonRpcNotification {
                    notification: ServerNotification::ProgressNotification(progress),
                    ..
                }) => self.routes.route(progress.params),
                message => return Some(message),
            }
        }
    }

    fn close(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send {
        self.inner.close()
    }
}

/// Whether `message` shows the upstream at work: an answer or progress. Not its own
/// requests or other notices (an upstream that pings its client while no call gets an
/// answer is not serving), nor the error rmcp makes up for a request whose stream closed
/// before its answer.
fn is_work(message: &ServerJsonRpcMessage) -> bool {
    const MADE_UP_BY_RMCP: &str = "io.modelcontextprotocol/transportClosed";
    match message {
        ServerJsonRpcMessage::Response(_) => true,
        ServerJsonRpcMessage::Error(error) => error
            .error
            .data
            .as_ref()
            .is_none_or(|data| data.get(MADE_UP_BY_RMCP).is_none()),
        ServerJsonRpcMessage::Notification(JsonRpcNotification {
            notification: ServerNotification::ProgressNotification(_),
            ..
        }) => true,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(token: &ProgressToken, step: usize) -> ProgressNotificationParam {
        ProgressNotificationParam::new(token.clone(), step as f64)
    }

    #[test]
    fn a_call_that_falls_behind_keeps_the_first_updates_in_order_and_the_rest_are_counted() {
        let routes = ProgressRoutes::default();
        let token = ProgressToken(rmcp::model::NumberOrString::Number(7));
        let mut route = routes.subscribe(token.clone());
        let sent = ROUTE_CAPACITY + 10;
        for step in 0..sent {
            routes.route(update(&token, step));
        }
        let mut kept = Vec::new();
        while let Ok(update) = route.updates.try_recv() {
            kept.push(update.progress as usize);
        }
        assert_eq!(kept, (0..ROUTE_CAPACITY).collect::<Vec<_>>());
        assert_eq!(route.dropped.load(Ordering::Relaxed), 10);

        // Room again once the call has read: nothing that fits is dropped.
        routes.route(update(&token, sent));
        assert_eq!(
            route.updates.try_recv().map(|u| u.progress as usize),
            Ok(sent)
        );
        assert_eq!(route.dropped.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn progress_for_no_waiting_call_is_dropped_and_a_dropped_route_unsubscribes() {
        let routes = ProgressRoutes::default();
        let token = ProgressToken(rmcp::model::NumberOrString::Number(1));
        let other = ProgressToken(rmcp::model::NumberOrString::Number(2));
        let mut route = routes.subscribe(token.clone());
        routes.route(update(&other, 1));
        assert!(route.updates.try_recv().is_err());
        assert_eq!(route.dropped.load(Ordering::Relaxed), 0);
        drop(route);
        assert!(routes.lock().is_empty());
        routes.route(update(&token, 1));
    }

    #[test]
    fn only_answers_and_progress_show_the_upstream_at_work() {
        let message = |value: serde_json::Value| -> ServerJsonRpcMessage {
            serde_json::from_value(value).expect("a server message")
        };
        let id = 1;
        assert!(is_work(&message(
            serde_json::json!({"jsonrpc": "2.0", "id": id, "result": {}})
        )));
        assert!(is_work(&message(serde_json::json!({
            "jsonrpc": "2.0", "id": id, "error": {"code": -32602, "message": "bad"}
        }))));
        assert!(is_work(&message(serde_json::json!({
            "jsonrpc": "2.0", "method": "notifications/progress",
            "params": {"progressToken": 7, "progress": 1}
        }))));
        // What rmcp makes up for a stream closed before its answer.
        assert!(!is_work(&message(serde_json::json!({
            "jsonrpc": "2.0", "id": id, "error": {"code": -32603, "message": "closed",
                "data": {"io.modelcontextprotocol/transportClosed": 1}}
        }))));
        assert!(!is_work(&message(serde_json::json!({
            "jsonrpc": "2.0", "method": "notifications/tools/list_changed"
        }))));
        assert!(!is_work(&message(
            serde_json::json!({"jsonrpc": "2.0", "id": id, "method": "ping"})
        )));
    }
}
