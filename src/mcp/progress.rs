//! Progress of a downstream `tools/call`: when the client's request carries
//! `_meta.progressToken`, every progress notification the upstream sends about the gateway's
//! own upstream request is passed to the client, re-addressed to the client's token, while the
//! call runs and before its result. rmcp routes each one into the stream of the request it
//! names (a session's request stream; a session-less request falls back from JSON to SSE).
//! The upstream side (subscribing to the gateway's token) is `upstream::UpstreamClient`'s.

use std::future::Future;

use rmcp::model::{
    ProgressNotification, ProgressNotificationParam, ProgressToken, ServerJsonRpcMessage,
    ServerNotification,
};
use rmcp::service::RequestContext;
use rmcp::{Peer, RoleServer};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::upstream::ProgressSink;

/// Upstream progress notifications one call may have queued for its client. Past this, the
/// upstream side holds them in the call's own bounded route (`upstream::progress`), which
/// drops and counts what does not fit rather than hold up the upstream connection.
pub const QUEUE: usize = 32;

/// How long relaying one notification may wait for room on the client's stream. The call
/// is not polled meanwhile (its progress is relayed in order, before its result); past it
/// the relay stops trying, so a client that stopped reading holds its call up once.
const SEND: std::time::Duration = std::time::Duration::from_secs(1);

/// Passes one call's upstream progress to the client that asked for it.
pub struct ProgressRelay {
    /// The client's token, which every relayed notification carries instead of the gateway's.
    token: ProgressToken,
    to: Destination,
    updates: mpsc::Receiver<ProgressNotificationParam>,
    /// A send timed out: the client is not reading, and the rest is dropped (and counted)
    /// without waiting, so that it cannot hold the call up any longer.
    stalled: bool,
}

/// Where relayed progress goes.
enum Destination {
    /// The session's (or session-less request's) rmcp peer, which routes it into the
    /// stream of the request it names.
    Peer(Peer<RoleServer>),
    /// The answer the gate's fast path writes itself (`super::fast_path`).
    Answer(mpsc::Sender<ServerJsonRpcMessage>),
}

impl ProgressRelay {
    /// A relay and the sink to hand to the upstream call, when the client's request asked for
    /// progress; `(None, None)` when it did not, so the upstream call subscribes to nothing.
    pub fn for_request(
        context: &RequestContext<RoleServer>,
    ) -> (Option<ProgressSink>, Option<ProgressRelay>) {
        match context.meta.get_progress_token() {
            Some(token) => Self::to(token, Destination::Peer(context.peer.clone())),
            None => (None, None),
        }
    }

    /// A relay into `answer` (the messages of a call's answer), with the sink to hand to
    /// the upstream call.
    pub fn into_answer(
        token: ProgressToken,
        answer: mpsc::Sender<ServerJsonRpcMessage>,
    ) -> (Option<ProgressSink>, Option<ProgressRelay>) {
        Self::to(token, Destination::Answer(answer))
    }

    fn to(token: ProgressToken, to: Destination) -> (Option<ProgressSink>, Option<ProgressRelay>) {
        let (sink, updates) = mpsc::channel(QUEUE);
        let relay = ProgressRelay {
            token,
            to,
            updates,
            stalled: false,
        };
        (Some(sink), Some(relay))
    }

    async fn relay(&mut self, update: ProgressNotificationParam) {
        if self.stalled {
            crate::metrics::progress_dropped(1);
            return;
        }
        // Advisory: a client gone away gets its result (or nothing) all the same, and one
        // that does not read its stream holds the call up once, for SEND at most.
        let relayed = readdressed(&self.token, update);
        let sent = match &self.to {
            Destination::Peer(peer) => tokio::time::timeout(SEND, peer.notify_progress(relayed))
                .await
                .map(|sent| sent.map_err(|error| error.to_string())),
            Destination::Answer(answer) => {
                let notification = ServerJsonRpcMessage::notification(
                    ServerNotification::ProgressNotification(ProgressNotification::new(relayed)),
                );
                tokio::time::timeout(SEND, answer.send(notification))
                    .await
                    .map(|sent| sent.map_err(|_| "the client went away".to_owned()))
            }
        };
        match sent {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::debug!(%error, "could not relay progress to the client"),
            Err(_) => {
                tracing::debug!(
                    "the client is not reading: its call's further progress is dropped"
                );
                crate::metrics::progress_dropped(1);
                self.stalled = true;
            }
        }
    }
}

/// The upstream's notification with the client's `token`; progress, total and message as
/// the upstream sent them, its `_meta` (about the gateway's request) left out.
fn readdressed(
    token: &ProgressToken,
    update: ProgressNotificationParam,
) -> ProgressNotificationParam {
    let mut relayed = ProgressNotificationParam::new(token.clone(), update.progress);
    relayed.total = update.total;
    relayed.message = update.message;
    relayed
}

/// Awaits `call` while relaying its progress (with a relay), or until `cancelled` (the
/// client's `notifications/cancelled`, its session's end, the drain's end, or whatever rmcp
/// cancels its own requests for); `None` when cancelled first.
/// `call` must own the relay's sink, so that when it ends everything it passed on is queued:
/// that rest is relayed before this returns, so the client hears all progress before the result.
pub async fn run_relaying<T>(
    call: impl Future<Output = T>,
    relay: Option<ProgressRelay>,
    cancelled: &CancellationToken,
) -> Option<T> {
    let Some(mut relay) = relay else {
        return tokio::select! {
            result = call => Some(result),
            _ = cancelled.cancelled() => None,
        };
    };
    tokio::pin!(call);
    let result = loop {
        tokio::select! {
            biased;
            Some(update) = relay.updates.recv() => relay.relay(update).await,
            result = &mut call => break result,
            _ = cancelled.cancelled() => return None,
        }
    };
    while let Ok(update) = relay.updates.try_recv() {
        relay.relay(update).await;
    }
    Some(result)
}

#[cfg(test)]
mod tests {
    use rmcp::model::NumberOrString;
    use std::time::Instant;

    use super::*;

    fn token(name: &str) -> ProgressToken {
        ProgressToken(NumberOrString::String(name.into()))
    }

    /// The answer's notification as the progress it carries.
    fn progress_in(message: ServerJsonRpcMessage) -> ProgressNotificationParam {
        match message {
            ServerJsonRpcMessage::Notification(notification) => match notification.notification {
                ServerNotification::ProgressNotification(progress) => progress.params,
                other => panic!("not progress: {other:?}"),
            },
            other => panic!("not a notification: {other:?}"),
        }
    }

    /// A relay into an answer with room for `room` messages, and a call that passes on
    /// `updates` progress notifications and ends with `result`.
    fn relayed_call<T>(
        room: usize,
        updates: u32,
        result: T,
    ) -> (
        impl Future<Output = T>,
        Option<ProgressRelay>,
        mpsc::Receiver<ServerJsonRpcMessage>,
    ) {
        let (answer, read) = mpsc::channel(room);
        let (sink, relay) = ProgressRelay::into_answer(token("client's"), answer);
        let sink = sink.expect("a sink");
        let call = async move {
            for n in 0..updates {
                let update = ProgressNotificationParam::new(token("gateway's"), f64::from(n));
                sink.send(update).await.expect("the relay reads");
            }
            result
        };
        (call, relay, read)
    }

    #[tokio::test]
    async fn a_client_that_stops_reading_holds_its_call_up_once() {
        // Room for one message, and nobody reading: the second waits, then gives up.
        let (call, relay, mut read) = relayed_call(1, 5, "result");
        let started = Instant::now();
        let result = run_relaying(call, relay, &CancellationToken::new()).await;
        assert_eq!(result, Some("result"));
        let took = started.elapsed();
        assert!(took >= SEND && took < 2 * SEND, "waited {took:?}, not once");
        let first = progress_in(read.try_recv().expect("the first was relayed"));
        assert_eq!(first.progress_token, token("client's"), "readdressed");
        assert_eq!(first.progress, 0.0);
        assert!(read.try_recv().is_err(), "the rest was dropped");
    }

    #[tokio::test]
    async fn progress_passed_on_before_the_call_ends_is_relayed_before_its_result() {
        let (call, relay, mut read) = relayed_call(8, 3, ());
        assert_eq!(
            run_relaying(call, relay, &CancellationToken::new()).await,
            Some(())
        );
        for n in 0..3 {
            let relayed = progress_in(read.try_recv().expect("relayed before the return"));
            assert_eq!(relayed.progress, f64::from(n), "in order");
        }
    }
}
