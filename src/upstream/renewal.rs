//! Noticing that an upstream renewed a Streamable HTTP session by itself. When the upstream
//! forgets a session (it restarted, or expired it) and answers 404, rmcp runs the
//! `initialize` handshake again inside the same connection and retries the request: the
//! call succeeds, and nothing above the transport hears of it. But the new session may
//! serve another tool list (an upstream redeployed), which nobody announces. So the
//! session's HTTP client is [`RenewalWatch`]: reqwest's, unchanged, except that every
//! `notifications/initialized` after the connection's first that the upstream accepts is
//! told to the tenant ([`UpstreamEvent::SessionRenewed`]), which checks its tool list
//! again. rmcp sends that notification only once an `initialize` succeeded, so a renewal
//! that failed is not told.
//!
//! It also ends every POST, and the event stream a POST is answered with, when its
//! session's attempt is given up ([`RenewalWatch::new`]'s `stop`): rmcp's transport worker
//! waits for the `initialize` POST and its answer without watching its own cancellation,
//! so a handshake the gateway timed out would otherwise keep its connection, its HTTP
//! client and its worker for as long as the upstream keeps the socket open.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::stream::{BoxStream, StreamExt};
use http::{HeaderName, HeaderValue};
use rmcp::model::{ClientJsonRpcMessage, ClientNotification, JsonRpcMessage};
use rmcp::transport::streamable_http_client::{
    SseError, StreamableHttpClient, StreamableHttpError, StreamableHttpPostResponse,
    StreamableHttpResponseLimits,
};
use sse_stream::Sse;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::UpstreamEvent;

type PostResult = Result<StreamableHttpPostResponse, StreamableHttpError<reqwest::Error>>;

/// The JSON-RPC code the TypeScript SDK's server answers what it refuses of a session with.
const SESSION_REFUSED: i32 = -32000;

/// How an error answer to no request other than a session's refusal begins: it fails that
/// request alone (`upstream::error`'s refusals read it so).
pub(super) const UNMATCHED_ERROR: &str = "an error answer to no request";

/// What a POST carries, as [`RenewalWatch::watched`] needs it.
#[derive(Clone, Copy)]
struct Posting {
    renews: bool,
    request: bool,
}

/// reqwest's Streamable HTTP client, telling the tenant of each renewed session.
#[derive(Clone)]
pub(super) struct RenewalWatch {
    http: reqwest::Client,
    /// Whether the connection's own `notifications/initialized` has gone out: any later one
    /// ends a renewal.
    initialized: Arc<AtomicBool>,
    events: mpsc::Sender<UpstreamEvent>,
    /// Cancelled when the session's attempt is given up or the session closes: POSTs and
    /// their answer streams end then.
    stop: CancellationToken,
}

impl RenewalWatch {
    pub(super) fn new(
        http: reqwest::Client,
        events: mpsc::Sender<UpstreamEvent>,
        stop: CancellationToken,
    ) -> Self {
        Self {
            http,
            initialized: Arc::default(),
            events,
            stop,
        }
    }

    /// What `message` is to this watch: whether it ends a renewal of the session
    /// (`notifications/initialized` after the first), and whether it is a request.
    fn posting(&self, message: &ClientJsonRpcMessage) -> Posting {
        let initialized = matches!(
            message,
            JsonRpcMessage::Notification(notification)
                if matches!(notification.notification, ClientNotification::InitializedNotification(_))
        );
        Posting {
            renews: initialized && self.initialized.swap(true, Ordering::AcqRel),
            request: matches!(message, JsonRpcMessage::Request(_)),
        }
    }

    /// Passes `posted` on; a renewal the upstream accepted is told to the tenant first.
    ///
    /// An error answer to a request that names no request (`"id": null`) would reach no
    /// caller: rmcp passes it to its service, which cannot match it and drops it, and the
    /// call waits for its timeout. It fails the request instead. The TypeScript SDK answers
    /// so, with -32000, what it refuses of the session (one it does not know, after a
    /// restart; every later call would fail the same way): the connection goes, and the
    /// next call connects again, as for a 4xx. Any other code (a tool's crash answered 500
    /// with -32603, a body too large) fails only that request, as a 5xx does
    /// ([`UNMATCHED_ERROR`]).
    async fn watched(
        &self,
        posting: Posting,
        posted: impl Future<Output = PostResult>,
    ) -> PostResult {
        let answer = tokio::select! {
            answer = posted => answer,
            () = self.stop.cancelled() => Err(StreamableHttpError::TransportChannelClosed),
        };
        if let Ok(StreamableHttpPostResponse::Json(JsonRpcMessage::Error(error), _)) = &answer {
            if posting.request && error.id.is_none() {
                let (code, message) = (error.error.code.0, &error.error.message);
                let said = if code == SESSION_REFUSED {
                    format!("the upstream refused the session: {message} ({code})")
                } else {
                    format!("{UNMATCHED_ERROR}: {message} ({code})")
                };
                return Err(StreamableHttpError::UnexpectedServerResponse(said.into()));
            }
        }
        let answer = answer.map(|posted| match posted {
            StreamableHttpPostResponse::Sse(stream, session_id) => {
                let stop = self.stop.clone().cancelled_owned();
                StreamableHttpPostResponse::Sse(stream.take_until(stop).boxed(), session_id)
            }
            other => other,
        });
        if posting.renews && answer.is_ok() {
            // Waits for room, as a list change does: a renewal must not be lost. The send
            // only queues; the tenant actor loads the list on its own task.
            let _ = self.events.send(UpstreamEvent::SessionRenewed).await;
        }
        answer
    }
}

impl StreamableHttpClient for RenewalWatch {
    type Error = reqwest::Error;

    async fn post_message(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> PostResult {
        let posting = self.posting(&message);
        let posted = self
            .http
            .post_message(uri, message, session_id, auth_header, custom_headers);
        self.watched(posting, posted).await
    }

    async fn post_message_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> PostResult {
        let posting = self.posting(&message);
        let posted = self.http.post_message_with_max_sse_event_size(
            uri,
            message,
            session_id,
            auth_header,
            custom_headers,
            max_sse_event_size,
        );
        self.watched(posting, posted).await
    }

    async fn post_message_with_response_limits(
        &self,
        uri: Arc<str>,
        message: ClientJsonRpcMessage,
        session_id: Option<Arc<str>>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        limits: StreamableHttpResponseLimits,
    ) -> PostResult {
        let posting = self.posting(&message);
        let posted = self.http.post_message_with_response_limits(
            uri,
            message,
            session_id,
            auth_header,
            custom_headers,
            limits,
        );
        self.watched(posting, posted).await
    }

    async fn delete_session(
        &self,
        uri: Arc<str>,
        session_id: Arc<str>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<(), StreamableHttpError<Self::Error>> {
        self.http
            .delete_session(uri, session_id, auth_header, custom_headers)
            .await
    }

    async fn get_stream(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
    ) -> Result<BoxStream<'static, Result<Sse, SseError>>, StreamableHttpError<Self::Error>> {
        self.http
            .get_stream(uri, session_id, last_event_id, auth_header, custom_headers)
            .await
    }

    async fn get_stream_with_max_sse_event_size(
        &self,
        uri: Arc<str>,
        session_id: Option<Arc<str>>,
        last_event_id: Option<String>,
        auth_header: Option<String>,
        custom_headers: HashMap<HeaderName, HeaderValue>,
        max_sse_event_size: usize,
    ) -> Result<BoxStream<'static, Result<Sse, SseError>>, StreamableHttpError<Self::Error>> {
        self.http
            .get_stream_with_max_sse_event_size(
                uri,
                session_id,
                last_event_id,
                auth_header,
                custom_headers,
                max_sse_event_size,
            )
            .await
    }
}
