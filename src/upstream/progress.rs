//! The upstream's progress notifications, delivered to the call they are about in the order
//! they were read off the connection.
//!
//! rmcp hands every notification to its handler in a task of its own, so two progress
//! notifications could reach a call out of order, and the last ones could reach it after
//! the answer that followed them on the wire. [`Ordered`] wraps the connection's transport
//! instead: a progress notification is routed to its call's channel as it is read, before
//! the next message is read and long before rmcp sees the answer. So when a call has its
//! answer, every progress the upstream sent before it is already in the call's channel.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use rmcp::model::{
    JsonRpcNotification, ProgressNotificationParam, ProgressToken, ServerJsonRpcMessage,
    ServerNotification,
};
use rmcp::service::{RoleClient, TxJsonRpcMessage};
use rmcp::transport::Transport;
use tokio::sync::mpsc;

/// Each waiting call's channel, by the progress token rmcp put on its request.
type Routes = HashMap<ProgressToken, mpsc::UnboundedSender<ProgressNotificationParam>>;

/// Where each waiting call wants its progress: one channel per progress token. Shared by a
/// connection's [`Ordered`] transport and its [`super::UpstreamClient`].
#[derive(Clone, Default)]
pub(super) struct ProgressRoutes {
    routes: Arc<Mutex<Routes>>,
}

impl ProgressRoutes {
    /// Progress for `token` from now on, until the returned route is dropped.
    ///
    /// Unbounded, as rmcp's own per-notification tasks were: the call drains it while it
    /// waits, and reading the connection must never wait on one slow call.
    pub(super) fn subscribe(&self, token: ProgressToken) -> ProgressRoute {
        let (tx, rx) = mpsc::unbounded_channel();
        self.lock().insert(token.clone(), tx);
        ProgressRoute {
            routes: self.clone(),
            token,
            updates: rx,
        }
    }

    /// Hands `update` to the call waiting for its token; progress nobody waits for is dropped.
    fn route(&self, update: ProgressNotificationParam) {
        let routes = self.lock();
        if let Some(tx) = routes.get(&update.progress_token) {
            let _ = tx.send(update);
        }
    }

    fn lock(&self) -> MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One call's progress, in the order the upstream sent it. Unsubscribes when dropped.
pub(super) struct ProgressRoute {
    routes: ProgressRoutes,
    token: ProgressToken,
    pub(super) updates: mpsc::UnboundedReceiver<ProgressNotificationParam>,
}

impl Drop for ProgressRoute {
    fn drop(&mut self) {
        self.routes.lock().remove(&self.token);
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
            match self.inner.receive().await? {
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
