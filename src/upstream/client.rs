//! [`UpstreamClient`]: a cheap, cloneable handle on one tenant's upstream session, used
//! concurrently by many tasks of the tenant actor.
//!
//! Calls are independent rmcp requests on one session, so a slow call never holds up another.
//! A call that times out, or whose future is dropped because its caller went away, is cancelled
//! upstream with `notifications/cancelled` by a drop guard, so the upstream stops the work too.
//! A call given a [`ProgressSink`] passes on the upstream's progress for its own request
//! while it waits (rmcp puts a progress token on every request it sends).

use std::{collections::HashSet, sync::Arc, time::Duration};

use rmcp::{
    model::{
        CallToolRequest, CallToolRequestParams, CallToolResult, CancelledNotificationParam,
        ClientRequest, PaginatedRequestParams, PingRequest, ProgressNotificationParam, RequestId,
        ServerResult, Tool,
    },
    service::{ClientCacheConfig, PeerRequestOptions, RequestHandle, RoleClient, ServiceError},
    Peer,
};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    connect,
    error::Redaction,
    events::EventForwarder,
    progress::{ProgressRoute, ProgressRoutes},
    ProgressSink, TransportKind, UpstreamError, UpstreamEvent, UpstreamTarget,
};

/// How long one upstream's tool list may be: tools, pages and bytes (as JSON) at most. The
/// upstream decides, and a list that never ends (a cursor handed out for ever) would
/// otherwise grow for as long as the listing's timeout lets it, in every tenant on it.
const MOST_TOOLS: usize = 10_000;
const MOST_PAGES: usize = 1_000;
const MOST_LIST_BYTES: usize = 32 * 1024 * 1024;

/// A connected upstream MCP session. Clones share the session; it closes on [`Self::close`],
/// when the upstream goes away, or when the last clone is dropped.
#[derive(Clone)]
pub struct UpstreamClient {
    inner: Arc<Inner>,
}

struct Inner {
    peer: Peer<RoleClient>,
    /// Shared with the session's transport, which routes every progress notification here.
    progress: ProgressRoutes,
    /// What error messages about this upstream must not show (its URL's query, its token).
    redaction: Arc<Redaction>,
    transport: TransportKind,
    /// Ends the rmcp session; cancelled by [`UpstreamClient::close`] or by `_cancel_on_drop`.
    shutdown: CancellationToken,
    /// Turns true once the session's service loop has ended.
    ended: watch::Receiver<bool>,
    close_timeout: Duration,
    _cancel_on_drop: DropGuard,
}

impl UpstreamClient {
    /// Connects to `target` and runs MCP `initialize`. Tool-list changes and the end of the
    /// session are sent to `events`; progress goes to the call it is about.
    pub async fn connect(
        target: &UpstreamTarget,
        events: mpsc::Sender<UpstreamEvent>,
    ) -> Result<Self, UpstreamError> {
        let shutdown = CancellationToken::new();
        let progress = ProgressRoutes::default();
        let handler = EventForwarder::new(events.clone(), &target.client_name);
        let (session, transport) =
            connect::open(target, handler, &progress, shutdown.child_token()).await?;
        let peer = session.peer().clone();
        // The tenant actor owns the tool-list cache; rmcp's own cache could serve a stale list
        // after an upstream error, so it is off.
        peer.set_response_cache_config(ClientCacheConfig::disabled())
            .await;
        let (ended_tx, ended) = watch::channel(false);
        // Watches the session until it ends (upstream gone, or `shutdown`), then reports once.
        // Bounded by `shutdown`, which the last clone's drop cancels.
        tokio::spawn(async move {
            let reason = session.waiting().await;
            tracing::debug!(?reason, "upstream session ended");
            let _ = ended_tx.send(true);
            let _ = events.send(UpstreamEvent::Closed).await;
        });
        Ok(Self {
            inner: Arc::new(Inner {
                peer,
                progress,
                redaction: Arc::new(Redaction::new(&target.url, &target.token)),
                transport,
                _cancel_on_drop: shutdown.clone().drop_guard(),
                shutdown,
                ended,
                close_timeout: target.connect_timeout,
            }),
        })
    }

    /// The transport in use: with [`TransportKind::Auto`], the one the upstream accepted.
    pub fn transport(&self) -> TransportKind {
        self.inner.transport
    }

    /// Lists every tool of the upstream, following pagination, within `timeout` in total.
    pub async fn list_tools(&self, timeout: Duration) -> Result<Vec<Tool>, UpstreamError> {
        self.ensure_open()?;
        // rmcp cancels the page in flight upstream when this future is dropped on timeout.
        match tokio::time::timeout(timeout, self.all_tools()).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout),
        }
    }

    /// Every page of the tool list, within [`MOST_TOOLS`], [`MOST_PAGES`] and
    /// [`MOST_LIST_BYTES`], refusing a cursor the upstream handed out before.
    async fn all_tools(&self) -> Result<Vec<Tool>, UpstreamError> {
        let too_long = |what: String| {
            UpstreamError::Protocol(format!("the upstream's tool list is too long: {what}"))
        };
        let (mut tools, mut bytes, mut cursors) = (Vec::new(), 0, HashSet::new());
        let mut cursor = None;
        for _ in 0..MOST_PAGES {
            let params = PaginatedRequestParams::default().with_cursor(cursor);
            let page = self
                .inner
                .peer
                .list_tools(Some(params))
                .await
                .map_err(|error| UpstreamError::from_service(error, &self.inner.redaction))?;
            // The cursors count too: each is kept (to refuse it handed out again) and sent
            // back, and an upstream decides their length as it does the tools'.
            let cursor_bytes = page.next_cursor.as_ref().map_or(0, String::len);
            bytes += crate::audit::json_len(&page.tools).map_or(0, |n| n as usize) + cursor_bytes;
            tools.extend(page.tools);
            if tools.len() > MOST_TOOLS {
                return Err(too_long(format!("more than {MOST_TOOLS} tools")));
            }
            if bytes > MOST_LIST_BYTES {
                return Err(too_long(format!("more than {} MiB", MOST_LIST_BYTES >> 20)));
            }
            match page.next_cursor {
                None => return Ok(tools),
                Some(next) if !cursors.insert(next.clone()) => {
                    return Err(too_long("a cursor handed out twice".into()));
                }
                next => cursor = next,
            }
        }
        Err(too_long(format!("more than {MOST_PAGES} pages")))
    }

    /// Forwards one `tools/call` and returns the upstream's `CallToolResult` unchanged. A tool
    /// that fails is `Ok` with `is_error: Some(true)`. On timeout, or when this future is
    /// dropped before the answer, the upstream gets `notifications/cancelled` for the request.
    /// With `progress`, the upstream's progress notifications for this call go there, as the
    /// upstream sent them (with the gateway's progress token), before this returns.
    pub async fn call_tool(
        &self,
        name: &str,
        arguments: Option<serde_json::Map<String, serde_json::Value>>,
        timeout: Duration,
        progress: Option<ProgressSink>,
    ) -> Result<CallToolResult, UpstreamError> {
        self.ensure_open()?;
        let mut params = CallToolRequestParams::new(name.to_owned());
        if let Some(arguments) = arguments {
            params = params.with_arguments(arguments);
        }
        let request = ClientRequest::CallToolRequest(CallToolRequest::new(params));
        // The deadline covers sending too (a session with every POST slot taken queues it),
        // and ends with the answer: passing on the progress that came before it is bounded
        // on its own, so that a caller slow to take its progress cannot turn an answer
        // that came in time into a timeout.
        let answer = tokio::time::timeout(timeout, self.request(request, progress)).await;
        // A timed-out request's drop guard has cancelled it upstream.
        let Ok((result, unrelayed)) = answer else {
            return Err(UpstreamError::Timeout);
        };
        if let Some(unrelayed) = unrelayed {
            unrelayed.pass_on().await;
        }
        match result {
            Ok(ServerResult::CallToolResult(result)) => Ok(result),
            // Some servers answer a tool without output with a bare `{}`.
            Ok(ServerResult::EmptyResult(_)) => Ok(CallToolResult::success(Vec::new())),
            Ok(_) => Err(UpstreamError::Protocol(
                "tools/call was answered with another kind of result".to_owned(),
            )),
            Err(error) => Err(error),
        }
    }

    /// Sends `request` and waits for its answer, relaying the upstream's progress on it to
    /// `progress` meanwhile; the progress not passed on by the answer comes with it, to be
    /// passed on before the answer is. When this future is dropped before the answer (a
    /// timeout, a caller gone), the upstream gets `notifications/cancelled`, and rmcp lets
    /// go of the request's POST.
    async fn request(
        &self,
        request: ClientRequest,
        progress: Option<ProgressSink>,
    ) -> (Result<ServerResult, UpstreamError>, Option<Unrelayed>) {
        let peer = &self.inner.peer;
        let sent = peer
            .send_cancellable_request(request, PeerRequestOptions::no_options())
            .await;
        let handle = match sent {
            Ok(handle) => handle,
            Err(error) => {
                let error = UpstreamError::from_service(error, &self.inner.redaction);
                return (Err(error), None);
            }
        };
        let mut guard = CancelOnDrop::new(peer.clone(), handle.id.clone(), &self.inner.redaction);
        // Subscribed at once: the request has only been queued, so its first progress is
        // still a network round trip away.
        let progress = progress.map(|sink| {
            let route = self.inner.progress.subscribe(handle.progress_token.clone());
            (route, sink)
        });
        let (result, unrelayed) = answer_relaying(handle, progress).await;
        guard.disarm();
        let result = result.map_err(|error| match error {
            // rmcp's own answer for one request whose answer stream broke off before its
            // result, with no event id to resume from (a socket reset, a proxy's idle
            // timeout on a slow tool): that request failed, not the session, which goes on
            // serving the others.
            ServiceError::TransportClosed if !self.is_closed() => UpstreamError::Refused(
                "the upstream's answer stream ended before its answer".into(),
            ),
            error => UpstreamError::from_service(error, &self.inner.redaction),
        });
        (result, unrelayed)
    }

    /// Sends MCP `ping` and waits for its answer, within `window`: whether the upstream
    /// still says anything at all on this session. A call that timed out may be a slow
    /// tool or an upstream gone silent on an open connection; the ping tells them apart.
    /// A ping that gets no answer in time still passes when other answers or progress
    /// came from the upstream meanwhile: a busy upstream, or one whose POST slots are all
    /// taken, is there. One that fails at once (an HTTP error, the connection gone) fails.
    pub async fn ping(&self, window: Duration) -> Result<(), UpstreamError> {
        self.ensure_open()?;
        let heard = self.inner.progress.heard();
        let request = ClientRequest::PingRequest(PingRequest::default());
        let answered = match tokio::time::timeout(window, self.request(request, None)).await {
            Err(_) => Err(UpstreamError::Timeout),
            Ok((result, _)) => result.map(drop),
        };
        match answered {
            Err(error @ UpstreamError::Timeout) if self.inner.progress.heard() != heard => {
                tracing::debug!(%error, "no answer to a ping, but the upstream said something else");
                Ok(())
            }
            answered => answered,
        }
    }

    /// True once the session has ended; every call then fails with [`UpstreamError::Closed`].
    pub fn is_closed(&self) -> bool {
        *self.inner.ended.borrow() || self.inner.peer.is_transport_closed()
    }

    /// Ends the session (Streamable HTTP also deletes it upstream) and waits, up to the connect
    /// timeout, until it has ended. Every clone sees the session closed afterwards.
    pub async fn close(&self) {
        self.inner.shutdown.cancel();
        let mut ended = self.inner.ended.clone();
        let wait = ended.wait_for(|ended| *ended);
        if tokio::time::timeout(self.inner.close_timeout, wait)
            .await
            .is_err()
        {
            tracing::warn!("upstream session did not end within the close timeout");
        }
    }

    fn ensure_open(&self) -> Result<(), UpstreamError> {
        if self.is_closed() || self.inner.shutdown.is_cancelled() {
            return Err(UpstreamError::Closed);
        }
        Ok(())
    }
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("url", &self.inner.redaction.shown_url())
            .field("transport", &self.inner.transport)
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// How long the progress that came before an answer may take to be passed on, after the
/// answer: what a caller has not taken by then is dropped (and counted).
const PASS_ON_AFTER_ANSWER: Duration = Duration::from_secs(1);

/// Waits for the answer to `handle`, passing the upstream's progress on that request to the
/// sink meanwhile, in the order the upstream sent it. A sink that is full holds up only this
/// forwarding, never the answer; one whose receiver is gone just gets nothing. What is not
/// passed on by the answer comes back with it ([`Unrelayed`]).
async fn answer_relaying(
    handle: RequestHandle<RoleClient>,
    progress: Option<(ProgressRoute, ProgressSink)>,
) -> (Result<ServerResult, ServiceError>, Option<Unrelayed>) {
    let Some((mut route, sink)) = progress else {
        return (handle.await_response().await, None);
    };
    let answer = handle.await_response();
    tokio::pin!(answer);
    loop {
        tokio::select! {
            biased;
            Some(update) = route.updates.recv() => {
                // Room in the sink, or the answer, whichever comes first.
                let answered = tokio::select! {
                    biased;
                    room = sink.reserve() => {
                        if let Ok(room) = room {
                            room.send(update);
                        }
                        continue;
                    }
                    result = &mut answer => result,
                };
                let unrelayed = Unrelayed { first: Some(update), route, sink };
                return (answered, Some(unrelayed));
            }
            result = &mut answer => {
                return (result, Some(Unrelayed { first: None, route, sink }));
            }
        }
    }
}

/// A call's progress that came before its answer and is not passed on yet.
struct Unrelayed {
    /// Taken from the route, waiting for room in the sink.
    first: Option<ProgressNotificationParam>,
    route: ProgressRoute,
    sink: ProgressSink,
}

impl Unrelayed {
    /// Passes the rest on, in order, within [`PASS_ON_AFTER_ANSWER`]. The transport routed
    /// each progress notification as it read it, before it read the answer: all that the
    /// upstream sent before its answer is here.
    async fn pass_on(mut self) {
        let until = tokio::time::Instant::now() + PASS_ON_AFTER_ANSWER;
        let mut next = self.first.take();
        loop {
            let Some(update) = next.take().or_else(|| self.route.updates.try_recv().ok()) else {
                return;
            };
            match tokio::time::timeout_at(until, self.sink.send(update)).await {
                Ok(Ok(())) => {}
                // The caller is gone: nothing more to pass on.
                Ok(Err(_)) => return,
                Err(_) => {
                    let left = 1 + self.route.updates.len() as u64;
                    self.route.dropped(left);
                    return;
                }
            }
        }
    }
}

/// Sends `notifications/cancelled` for a request unless disarmed, i.e. when the caller stops
/// waiting (timeout or a dropped future) before the answer came.
struct CancelOnDrop {
    peer: Peer<RoleClient>,
    id: Option<RequestId>,
    redaction: Arc<Redaction>,
}

impl CancelOnDrop {
    const REASON: &'static str = "the gateway's caller stopped waiting";

    fn new(peer: Peer<RoleClient>, id: RequestId, redaction: &Arc<Redaction>) -> Self {
        Self {
            peer,
            id: Some(id),
            redaction: redaction.clone(),
        }
    }

    fn disarm(&mut self) {
        self.id = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        // Drop cannot await; the notification is handed to a short task that ends as soon as
        // rmcp has sent it (or the session is gone). rmcp also forgets the pending request then.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (peer, redaction) = (self.peer.clone(), self.redaction.clone());
        runtime.spawn(async move {
            let params = CancelledNotificationParam::new(Some(id), Some(Self::REASON.to_owned()));
            if let Err(error) = peer.notify_cancelled(params).await {
                let error = UpstreamError::from_service(error, &redaction);
                tracing::debug!(%error, "could not cancel an abandoned upstream request");
            }
        });
    }
}
