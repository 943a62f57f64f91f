//! A client for the legacy MCP HTTP+SSE transport (protocol 2024-11-05), which rmcp 3 no longer
//! ships: GET the SSE URL, wait for the `endpoint` event naming the POST URL, then POST each
//! JSON-RPC message there while answers arrive as `message` events on the stream.
//!
//! It implements rmcp's [`Transport`] so the rest of the client is the same for both transports.
//! The bearer token goes on the GET and on every POST; the POST URL must have the SSE URL's
//! origin, so a server cannot redirect the token elsewhere.

use std::{future::Future, sync::Arc, time::Duration};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use rmcp::{
    model::{ClientJsonRpcMessage, ServerJsonRpcMessage},
    service::RoleClient,
    transport::Transport,
};
use sse_stream::SseStream;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use crate::config::Secret;

/// The largest SSE event accepted, like rmcp's default for Streamable HTTP.
const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;
/// Messages read from the stream and not yet taken by the rmcp service loop.
const INBOUND_BUFFER: usize = 64;

/// Why the SSE transport failed. Messages carry no URL and no token.
#[derive(Debug, thiserror::Error)]
pub(super) enum SseError {
    #[error("HTTP request failed: {0}")]
    Http(#[source] reqwest::Error),
    /// An answer that is not a success, with its `Retry-After` (as sent, when short).
    #[error("HTTP {status}")]
    Status {
        status: u16,
        retry_after: Option<String>,
    },
    #[error("the SSE stream is not text/event-stream")]
    NotEventStream,
    #[error("the SSE stream ended before its endpoint event")]
    NoEndpoint,
    #[error("no endpoint event within {0:?}")]
    EndpointTimeout(Duration),
    #[error("the endpoint event names an invalid or foreign URL")]
    BadEndpoint,
    #[error("could not encode a message: {0}")]
    Encode(#[from] serde_json::Error),
}

impl SseError {
    /// The failure of an answer that is not a success.
    fn refused(response: &reqwest::Response) -> Self {
        // A number of seconds or a date: anything longer is not worth keeping.
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|value| value.to_str().ok())
            .filter(|value| value.len() <= 64)
            .map(str::to_owned);
        Self::Status {
            status: response.status().as_u16(),
            retry_after,
        }
    }
}

impl From<reqwest::Error> for SseError {
    fn from(error: reqwest::Error) -> Self {
        Self::Http(error.without_url())
    }
}

/// One open legacy SSE session. Dropping it stops the stream reader.
pub(super) struct SseTransport {
    http: reqwest::Client,
    post_url: Arc<url::Url>,
    token: Arc<Secret>,
    inbound: mpsc::Receiver<ServerJsonRpcMessage>,
    reader: Option<AbortOnDropHandle<()>>,
    /// How long a POST may take to be accepted: rmcp never cancels a transport's send, so
    /// without it a server that never accepts one would keep its connection open until the
    /// session ends, one per call given up on. Longer than the call may take: a POST that
    /// fails this way would fail its call as a broken transport, not as a timeout.
    post_timeout: Duration,
}

impl SseTransport {
    /// Opens the event stream and waits (up to `timeout`) for the endpoint to POST to; each
    /// POST must then be accepted within `post_timeout`.
    pub(super) async fn connect(
        http: reqwest::Client,
        sse_url: &url::Url,
        token: Secret,
        timeout: Duration,
        post_timeout: Duration,
    ) -> Result<Self, SseError> {
        let open = async {
            let response = http
                .get(sse_url.clone())
                .header(reqwest::header::ACCEPT, "text/event-stream")
                .bearer_auth(token.expose())
                .send()
                .await?;
            if !response.status().is_success() {
                return Err(SseError::refused(&response));
            }
            let is_event_stream = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .and_then(|value| value.to_str().ok())
                .is_some_and(|value| value.starts_with("text/event-stream"));
            if !is_event_stream {
                return Err(SseError::NotEventStream);
            }
            let mut events = SseStream::from_bytes_stream(bounded(response.bytes_stream()));
            while let Some(event) = events.next().await {
                let Ok(event) = event else { break };
                if event.event.as_deref() == Some("endpoint") {
                    let post_url = endpoint_url(sse_url, event.data.as_deref().unwrap_or(""))?;
                    return Ok((post_url, events));
                }
            }
            Err(SseError::NoEndpoint)
        };
        let (post_url, events) = tokio::time::timeout(timeout, open)
            .await
            .map_err(|_| SseError::EndpointTimeout(timeout))??;
        let (tx, inbound) = mpsc::channel(INBOUND_BUFFER);
        let reader = AbortOnDropHandle::new(tokio::spawn(read_messages(events, tx)));
        Ok(Self {
            http,
            post_url: Arc::new(post_url),
            token: Arc::new(token),
            inbound,
            reader: Some(reader),
            post_timeout,
        })
    }
}

impl Transport<RoleClient> for SseTransport {
    type Error = SseError;

    fn send(
        &mut self,
        item: ClientJsonRpcMessage,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send + 'static {
        let http = self.http.clone();
        let url = self.post_url.clone();
        let token = self.token.clone();
        let timeout = self.post_timeout;
        async move {
            let body = serde_json::to_vec(&item)?;
            let response = http
                .post(url.as_str())
                .timeout(timeout)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .bearer_auth(token.expose())
                .body(body)
                .send()
                .await?;
            // Answers arrive on the event stream; the POST says only whether it was accepted.
            if response.status().is_success() {
                Ok(())
            } else {
                Err(SseError::refused(&response))
            }
        }
    }

    async fn receive(&mut self) -> Option<ServerJsonRpcMessage> {
        self.inbound.recv().await
    }

    async fn close(&mut self) -> Result<(), Self::Error> {
        self.reader.take();
        self.inbound.close();
        Ok(())
    }
}

/// Resolves the endpoint event's (usually relative) URL and keeps it on the SSE URL's origin.
fn endpoint_url(sse_url: &url::Url, data: &str) -> Result<url::Url, SseError> {
    let url = sse_url
        .join(data.trim())
        .map_err(|_| SseError::BadEndpoint)?;
    if url.origin() != sse_url.origin() {
        return Err(SseError::BadEndpoint);
    }
    Ok(url)
}

/// Forwards `message` events (and unnamed ones, which SSE calls messages) until the stream
/// ends or the transport is dropped; the end of the stream ends the rmcp session.
async fn read_messages<S>(mut events: S, tx: mpsc::Sender<ServerJsonRpcMessage>)
where
    S: Stream<Item = Result<sse_stream::Sse, sse_stream::Error>> + Unpin,
{
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::debug!(%error, "upstream SSE stream failed");
                break;
            }
        };
        if !matches!(event.event.as_deref(), None | Some("message")) {
            continue;
        }
        let Some(data) = event.data else { continue };
        match serde_json::from_str::<ServerJsonRpcMessage>(&data) {
            Ok(message) => {
                if tx.send(message).await.is_err() {
                    break;
                }
            }
            // Where it failed, not serde's text: that quotes what the upstream sent.
            Err(error) => tracing::warn!(
                line = error.line(),
                column = error.column(),
                "upstream sent an SSE message that is not JSON-RPC"
            ),
        }
    }
}

/// Fails the byte stream when one SSE event grows past [`MAX_EVENT_BYTES`], so a server cannot
/// make us buffer without bound. An event ends at a blank line: two line ends in a row, each
/// `\r\n`, `\n` or `\r` (as the SSE standard has them, and as the parser reads them).
fn bounded<S>(stream: S) -> impl Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin
where
    S: Stream<Item = Result<Bytes, reqwest::Error>> + Send + Unpin,
{
    let mut event_bytes = 0usize;
    // Line ends in a row so far, and whether the last byte was a `\r` (whose `\n` would
    // end the same line).
    let (mut line_ends, mut after_cr) = (0u8, false);
    stream.map(move |chunk| {
        let chunk = chunk.map_err(|error| std::io::Error::other(error.without_url()))?;
        for &byte in chunk.iter() {
            match byte {
                b'\n' if after_cr => after_cr = false,
                b'\n' | b'\r' => {
                    line_ends = line_ends.saturating_add(1);
                    after_cr = byte == b'\r';
                }
                _ => (line_ends, after_cr) = (0, false),
            }
            event_bytes += 1;
            if line_ends >= 2 {
                event_bytes = 0;
            }
        }
        if event_bytes > MAX_EVENT_BYTES {
            return Err(std::io::Error::other("SSE event too large"));
        }
        Ok(chunk)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_must_stay_on_the_same_origin() {
        let sse = url::Url::parse("http://127.0.0.1:8080/sse?integrationKey=x").expect("url");
        let post = endpoint_url(&sse, "/message?sessionId=abc").expect("relative endpoint");
        assert_eq!(post.as_str(), "http://127.0.0.1:8080/message?sessionId=abc");
        assert!(endpoint_url(&sse, "http://evil.example/message").is_err());
    }

    #[tokio::test]
    async fn events_end_at_a_blank_line_whatever_the_line_ends() {
        for event in [
            "event: message\ndata: {}\n\n",
            "event: message\r\ndata: {}\r\n\r\n",
            "event: message\rdata: {}\r\r",
        ] {
            // Many small events, more than one event's bound in all.
            let chunk = Bytes::from(event.repeat(MAX_EVENT_BYTES / event.len() + 100));
            let mut stream = bounded(futures::stream::iter(vec![Ok::<_, reqwest::Error>(chunk)]));
            assert!(
                matches!(stream.next().await, Some(Ok(_))),
                "{event:?} counted as one event"
            );
        }
        // A line end that is no blank line does not end the event.
        let chunk = Bytes::from("data: x\r\n".repeat(MAX_EVENT_BYTES / 9 + 1));
        let mut stream = bounded(futures::stream::iter(vec![Ok::<_, reqwest::Error>(chunk)]));
        assert!(matches!(stream.next().await, Some(Err(_))));
    }

    #[tokio::test]
    async fn oversized_event_fails_the_stream() {
        let big = Bytes::from(vec![b'a'; MAX_EVENT_BYTES + 1]);
        let mut stream = bounded(futures::stream::iter(vec![Ok::<_, reqwest::Error>(big)]));
        assert!(matches!(stream.next().await, Some(Err(_))));
    }
}
