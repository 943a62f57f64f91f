//! Upstream failures, sorted into the few kinds the gateway answers differently (502 for an
//! unreachable or misbehaving upstream or a closed connection, 504 for a timeout). Nothing
//! is retried: a connection that failed or closed is dropped and the next call reconnects.
//!
//! Messages are built from rmcp and reqwest errors. The bearer token travels only in a
//! header, but rmcp quotes the body of an upstream's HTTP error answer, which could quote the
//! token back; so every message passes a [`Redaction`]: the token is cut out, and the query
//! (`integrationKey`) and user information of every URL, so a message can go to a log as it
//! is.

use std::time::Duration;

use rmcp::{
    service::ClientInitializeError, transport::streamable_http_client::StreamableHttpError,
    ServiceError,
};

use crate::config::Secret;

/// Why an upstream operation failed. A tool that fails inside the upstream is not an error: it
/// is an `Ok(CallToolResult)` with `is_error: Some(true)`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream could not be reached or refused the connection: refused, DNS, TLS, an HTTP
    /// error status, or a transport that broke while sending.
    #[error("upstream unreachable: {0}")]
    Connect(String),
    /// The upstream answered a request with a JSON-RPC error (unknown tool, invalid params, ...).
    #[error("upstream answered with JSON-RPC error {code}: {message}")]
    Rpc { code: i32, message: String },
    /// The upstream answered something that is not valid MCP for the request.
    #[error("upstream protocol error: {0}")]
    Protocol(String),
    /// No answer within the caller's deadline; the request was cancelled upstream.
    #[error("upstream did not answer in time")]
    Timeout,
    /// The connection is closed; a new [`super::UpstreamClient`] must be connected.
    #[error("upstream connection closed")]
    Closed,
    /// The upstream refused this request with a server error: an HTTP 5xx that is not a
    /// JSON-RPC answer (a proxy's 502, a crashed tool's HTML 500). The request failed; the
    /// session, and every other request on it, did not.
    #[error("upstream answered with an HTTP error: {0}")]
    Refused(String),
    /// The upstream answered HTTP 429: it limits this tenant's requests, for `retry_after`
    /// if it said how long (in seconds).
    #[error("upstream rate limited the request")]
    Throttled { retry_after: Option<Duration> },
}

/// What a failed request says of the upstream, for the tenant's count of failures in a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// The connection failed (unreachable, refused, broken, closed): it is dropped, and the
    /// next call connects again.
    Connection(String),
    /// The upstream refused this one request ([`UpstreamError::Refused`]): it counts, but
    /// the session goes on, and so do the other calls in flight on it.
    Request(String),
}

impl UpstreamError {
    /// Whether the connection itself failed (unreachable, refused, broken, closed), not the
    /// request on it (an error answer, or no answer in time): what counts towards marking a
    /// tenant failing, and makes the connection be dropped.
    pub fn is_transport(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::Closed)
    }

    /// What this error counts as towards marking the tenant failing: a failed connection, a
    /// refused request, or nothing (an answer, an error one too, says the upstream is there;
    /// a timeout is for a ping to decide).
    pub fn failure(&self) -> Option<UpstreamFailure> {
        match self {
            Self::Connect(_) | Self::Closed => Some(UpstreamFailure::Connection(self.to_string())),
            Self::Refused(_) => Some(UpstreamFailure::Request(self.to_string())),
            Self::Rpc { .. } | Self::Protocol(_) | Self::Timeout | Self::Throttled { .. } => None,
        }
    }

    /// Maps an error from an rmcp request (after a successful `initialize`).
    pub(super) fn from_service(error: ServiceError, redaction: &Redaction) -> Self {
        match error {
            ServiceError::McpError(data) => Self::Rpc {
                code: data.code.0,
                message: redaction.apply(&data.message),
            },
            // rmcp fails only this request for these and keeps the session: so does the
            // gateway. A 4xx other than 429 still drops the connection, as the session may be
            // what the upstream refuses (a 400 for a session it does not know).
            ServiceError::TransportSend(error) => {
                let said = redaction.apply(&described(&*error.error));
                match refusal(&*error.error) {
                    Some(Refusal::Throttled(retry_after)) => Self::Throttled { retry_after },
                    Some(Refusal::ServerError) => Self::Refused(said),
                    Some(Refusal::TooLarge) => Self::Protocol(said),
                    None => Self::Connect(said),
                }
            }
            ServiceError::TransportClosed | ServiceError::Cancelled { .. } => Self::Closed,
            ServiceError::Timeout { .. } => Self::Timeout,
            other => Self::Protocol(redaction.apply(&other.to_string())),
        }
    }

    /// Maps an error from the `initialize` handshake.
    pub(super) fn from_init(error: ClientInitializeError, redaction: &Redaction) -> Self {
        match error {
            ClientInitializeError::JsonRpcError(data) => Self::Rpc {
                code: data.code.0,
                message: redaction.apply(&data.message),
            },
            ClientInitializeError::TransportError { error, context } => {
                // The upstream's limit on the tenant's credential: an answer, not a failed
                // connection (as for a call).
                if let Some(throttled) = throttled(&*error.error) {
                    return throttled;
                }
                // The context is rmcp's own short text: the cut must not fall on it.
                let failed = redaction.apply(&described(&*error.error));
                Self::Connect(format!("{failed}, when {context}"))
            }
            ClientInitializeError::ConnectionClosed(_) => {
                Self::Connect(redaction.apply(&error.to_string()))
            }
            ClientInitializeError::Cancelled => Self::Closed,
            // rmcp's own text for these quotes what the upstream sent, as Rust debug output.
            ClientInitializeError::ExpectedInitResponse(_)
            | ClientInitializeError::ExpectedInitResult(_) => Self::Protocol(
                "the upstream did not answer initialize with an initialize result".into(),
            ),
            other => Self::Protocol(redaction.apply(&other.to_string())),
        }
    }
}

/// [`UpstreamError::Throttled`] when `error`, a transport's failure, is the upstream's 429.
pub(super) fn throttled(error: &(dyn std::error::Error + 'static)) -> Option<UpstreamError> {
    match refusal(error) {
        Some(Refusal::Throttled(retry_after)) => Some(UpstreamError::Throttled { retry_after }),
        _ => None,
    }
}

/// The HTTP status of a Streamable HTTP `initialize` that the server refused with a 4xx, if
/// that is why it failed: the MCP backwards-compatibility rule for falling back to legacy SSE.
/// A refused TCP connection, a 5xx or an auth challenge are not 4xx answers and give `None`.
pub(super) fn init_client_error_status(error: &ClientInitializeError) -> Option<u16> {
    // `TransportError` does not expose its transport error as `source()`, so start there.
    let ClientInitializeError::TransportError { error, .. } = error else {
        return None;
    };
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(StreamableHttpError::UnexpectedServerResponse(message)) =
            current.downcast_ref::<StreamableHttpError<reqwest::Error>>()
        {
            // rmcp's reqwest client formats these as "HTTP {status}: {body}".
            let status = message
                .strip_prefix("HTTP ")
                .and_then(|rest| rest.get(..3))
                .and_then(|code| code.parse::<u16>().ok());
            return status.filter(|status| (400..500).contains(status));
        }
        source = current.source();
    }
    None
}

/// An HTTP answer that fails one request and says nothing against its session.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    /// 429, with the `Retry-After` it gave in seconds.
    Throttled(Option<Duration>),
    /// A 5xx that is not a JSON-RPC error.
    ServerError,
    /// An answer larger than the gateway reads (rmcp's limit per message).
    TooLarge,
}

/// The longest `Retry-After` of an upstream's 429 passed on to callers.
const LONGEST_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// Whether `error`, a request's transport failure, is an HTTP answer that fails only that
/// request ([`Refusal`]), from either transport.
fn refusal(error: &(dyn std::error::Error + 'static)) -> Option<Refusal> {
    let of_status = |status: u16, retry_after: Option<&str>| match status {
        429 => Some(Refusal::Throttled(retry_after.and_then(|after| {
            let seconds = after.trim().parse::<u64>().ok()?;
            Some(Duration::from_secs(seconds).min(LONGEST_RETRY_AFTER))
        }))),
        500..=599 => Some(Refusal::ServerError),
        _ => None,
    };
    let mut source = Some(error);
    while let Some(current) = source {
        match current.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
            Some(StreamableHttpError::HttpStatus(answer)) => {
                return of_status(answer.status, answer.retry_after.as_deref());
            }
            Some(StreamableHttpError::ResponseBodyTooLarge { .. }) => {
                return Some(Refusal::TooLarge);
            }
            Some(StreamableHttpError::UnexpectedServerResponse(said))
                if said.starts_with(super::renewal::UNMATCHED_ERROR) =>
            {
                return Some(Refusal::ServerError);
            }
            Some(StreamableHttpError::UnexpectedServerResponse(said)) => {
                // rmcp's reqwest client formats these as "HTTP {status}: {body}".
                let status = said
                    .strip_prefix("HTTP ")
                    .and_then(|rest| rest.get(..3))
                    .and_then(|code| code.parse::<u16>().ok());
                return status.and_then(|status| of_status(status, None));
            }
            Some(_) => return None,
            None => {}
        }
        if let Some(super::sse::SseError::Status {
            status,
            retry_after,
        }) = current.downcast_ref()
        {
            return of_status(*status, retry_after.as_deref());
        }
        source = current.source();
    }
    None
}

/// A transport's failure as a person reads it: the error and each of its causes (a refused
/// connection, a TLS or DNS failure), which reqwest keeps out of its own message, and not
/// rmcp's wrappers around them (one names the transport's Rust type, another says "Client
/// error" of what is no HTTP 4xx).
pub(super) fn described(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    let mut cause = Some(error);
    while let Some(current) = cause {
        let said = match current.downcast_ref::<StreamableHttpError<reqwest::Error>>() {
            // rmcp does not give its HTTP client's error as the source: follow it anyway.
            Some(StreamableHttpError::Client(client)) => {
                cause = Some(client);
                continue;
            }
            // rmcp's text names its Rust type for the message it expected.
            Some(StreamableHttpError::UnexpectedServerResponse(said)) => {
                match said.strip_prefix(RMCP_UNPARSED_ANSWER) {
                    Some(rest) => {
                        format!("the upstream's JSON answer is no JSON-RPC message{rest}")
                    }
                    None => said.to_string(),
                }
            }
            // rmcp's text is Rust debug output (`Some("text/html")`).
            Some(StreamableHttpError::UnexpectedContentType(got)) => format!(
                "the upstream answered with content type {}, not JSON or an event stream",
                got.as_deref().unwrap_or("(none)")
            ),
            _ => current.to_string(),
        };
        if !text.contains(&said) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&said);
        }
        cause = current.source();
    }
    text
}

/// How rmcp's text for an answer that is JSON but no JSON-RPC message begins (see
/// [`described`]).
const RMCP_UNPARSED_ANSWER: &str = "could not parse JSON response as ServerJsonRpcMessage";

/// See [`Redaction::apply`].
const SHORTEST_TOKEN_CUT: usize = 8;

/// The longest message about an upstream that the gateway passes on, in bytes (see
/// [`Redaction::apply`]).
const LONGEST_MESSAGE: usize = 1024;

/// What a message about one upstream must not show: the query and user information of its
/// URL (or of any URL), and the bearer token the gateway sends it, should the upstream quote
/// it back (rmcp puts the body of an upstream's HTTP error answer in its error).
pub(super) struct Redaction {
    url: url::Url,
    token: Secret,
}

impl Redaction {
    pub(super) fn new(url: &url::Url, token: &Secret) -> Self {
        Self {
            url: url.clone(),
            token: token.clone(),
        }
    }

    /// The URL as a message may show it.
    pub(super) fn shown_url(&self) -> String {
        self.apply(self.url.as_str())
    }

    /// The token is cut first (the URL cuts could split it), and only when it has at least
    /// [`SHORTEST_TOKEN_CUT`] bytes: a shorter one would be found inside ordinary words,
    /// and where those were cut would spell it out. So is a part of it that someone's cut
    /// left ([`cut_token`]).
    ///
    /// Then the message is cut to [`LONGEST_MESSAGE`] bytes: it goes into a 502's body or an
    /// MCP error, a log line and the tenant's status, and an upstream decides its length
    /// (rmcp quotes up to 64 KiB of an HTTP error body, a JSON-RPC error's message whole).
    /// That cut comes last, when no token is left to split.
    pub(super) fn apply(&self, message: &str) -> String {
        let token = self.token.expose();
        let mut said = if token.len() >= SHORTEST_TOKEN_CUT {
            redact(&cut_token(message, token), &self.url)
        } else {
            redact(message, &self.url)
        };
        shorten(&mut said, LONGEST_MESSAGE);
        said
    }
}

/// `message` with `token` cut out, and every part of it that someone else's cut left:
/// rmcp quotes a 64 KiB prefix of an HTTP error body and 256 bytes of a body it could not
/// parse, and either end can fall inside a token the upstream quoted back. A part is its
/// first or its last [`SHORTEST_TOKEN_CUT`] bytes and as much of the rest as goes on from
/// there. Parts are cut only of an ASCII token (as a header value is), so that every cut
/// falls between characters.
fn cut_token(message: &str, token: &str) -> String {
    let whole = message.replace(token, "…");
    if !token.is_ascii() {
        return whole;
    }
    let head = &token[..SHORTEST_TOKEN_CUT];
    let mut cut = String::with_capacity(whole.len());
    let mut rest = whole.as_str();
    while let Some(at) = rest.find(head) {
        let matched = common_len(rest[at..].bytes(), token.bytes());
        cut.push_str(&rest[..at]);
        cut.push('…');
        rest = &rest[at + matched..];
    }
    cut.push_str(rest);
    let foot = &token[token.len() - SHORTEST_TOKEN_CUT..];
    let mut tail_cut = String::with_capacity(cut.len());
    let mut rest = cut.as_str();
    while let Some(at) = rest.find(foot) {
        let end = at + foot.len();
        let matched = common_len(rest[..end].bytes().rev(), token.bytes().rev());
        tail_cut.push_str(&rest[..end - matched]);
        tail_cut.push('…');
        rest = &rest[end..];
    }
    tail_cut.push_str(rest);
    tail_cut
}

/// How many bytes two sequences share from their start.
fn common_len(a: impl Iterator<Item = u8>, b: impl Iterator<Item = u8>) -> usize {
    a.zip(b).take_while(|(a, b)| a == b).count()
}

/// Cuts `message` to at most `longest` bytes (on a character boundary), saying so at its end.
fn shorten(message: &mut String, longest: usize) {
    const CUT: &str = " … (cut)";
    if message.len() <= longest {
        return;
    }
    let mut end = longest.saturating_sub(CUT.len());
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message.truncate(end);
    message.push_str(CUT);
}

/// `message` with every occurrence of `url` shortened to its origin and path (and user
/// information, if any, to `…@`), so that a query string never reaches a log or an API
/// response. Any other URL in it (the same one as an HTTP client printed it without its
/// user information, a redirect's) loses its query and user information too.
fn redact(message: &str, url: &url::Url) -> String {
    let shortened = if url.query().is_none() {
        std::borrow::Cow::Borrowed(message)
    } else {
        let mut bare = url.clone();
        bare.set_query(None);
        std::borrow::Cow::Owned(message.replace(url.as_str(), bare.as_str()))
    };
    crate::logging::redact_urls(&shortened).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_in_another_form_loses_its_query_and_user_information_too() {
        let url = url::Url::parse("http://user:pw@127.0.0.1:1/mcp?integrationKey=k").expect("url");
        // As reqwest prints it: no user information, so not `url` itself.
        let message = "error sending request for url (http://127.0.0.1:1/mcp?integrationKey=k)";
        let redacted = redact(message, &url);
        assert!(!redacted.contains("integrationKey"), "{redacted}");
        let message = format!("redirected from {url}");
        let redacted = redact(&message, &url);
        assert!(
            !redacted.contains("pw") && !redacted.contains("integrationKey"),
            "{redacted}"
        );
    }

    #[test]
    fn a_failure_says_its_causes_once_and_none_of_rmcps_wrappers() {
        // A reqwest error made without a network: its cause is kept out of its own text.
        let client_error = reqwest::Client::new()
            .get("not a url")
            .build()
            .expect_err("no base URL");
        let wrapped = StreamableHttpError::<reqwest::Error>::Client(client_error);
        let said = described(&wrapped);
        assert!(!said.contains("Client error"), "{said}");
        assert!(said.starts_with("builder error: "), "{said}");
        assert!(said.contains("relative URL without a base"), "{said}");
        // A cause the error already quotes is not said twice.
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Outer(#[source] std::io::Error);
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(described(&Outer(io)), "outer: refused");
    }

    #[test]
    fn a_token_the_upstream_quotes_back_is_cut_out() {
        let url = url::Url::parse("http://127.0.0.1:1/mcp?integrationKey=k").expect("url");
        let redaction = Redaction::new(&url, &Secret::new("ia-token-31337"));
        let said = redaction.apply("HTTP 400: bad header Authorization: Bearer ia-token-31337");
        assert_eq!(said, "HTTP 400: bad header Authorization: Bearer …");
        // One too short to be told from ordinary text is left alone.
        let redaction = Redaction::new(&url, &Secret::new("t"));
        let said = redaction.apply("tcp connect error");
        assert_eq!(said, "tcp connect error");
    }

    #[test]
    fn a_long_message_is_cut_and_a_token_split_past_the_cut_is_not_shown() {
        let url = url::Url::parse("http://127.0.0.1:1/mcp").expect("url");
        let token = "ia-token-0123456789abcdef";
        let redaction = Redaction::new(&url, &Secret::new(token));
        // As rmcp quotes a 64 KiB prefix of an error body: the token split at its end. The
        // odd-length start puts the cut inside a two-byte character.
        let body = format!("{}{}", "é".repeat(32 * 1024 - 5), &token[..10]);
        let said = redaction.apply(&format!("HTTP 403:{body}"));
        assert!(said.len() <= LONGEST_MESSAGE, "{}", said.len());
        assert!(said.starts_with("HTTP 403:éé") && said.ends_with("é … (cut)"));
        assert!(!said.contains(&token[..4]), "part of the token shown");
        // A short one is left whole.
        assert_eq!(redaction.apply("HTTP 403: no"), "HTTP 403: no");
    }

    #[test]
    fn a_part_of_the_token_that_a_cut_left_is_cut_out_too() {
        let url = url::Url::parse("http://127.0.0.1:1/mcp").expect("url");
        let token = "ia-token-0123456789abcdef";
        let redaction = Redaction::new(&url, &Secret::new(token));
        // Its start, as a 256-byte preview cut it, with more text after it.
        let said = redaction.apply(&format!(
            "preview: {{\"t\":\"{}: when sending",
            &token[..12]
        ));
        assert_eq!(said, "preview: {\"t\":\"…: when sending");
        // Its end, as a cut from the front would leave it; and the whole token twice.
        let said = redaction.apply(&format!("{}\" and {token}, {token}", &token[15..]));
        assert_eq!(said, "…\" and …, …");
        // Fewer than 8 of its bytes are left alone: ordinary text shares as many.
        let said = redaction.apply("ia-toke, 9abcdef");
        assert_eq!(said, "ia-toke, 9abcdef");
    }

    #[test]
    fn an_http_answer_that_fails_one_request_is_told_from_a_failed_connection() {
        use rmcp::transport::streamable_http_client::HttpStatusError;
        type Error = StreamableHttpError<reqwest::Error>;
        let of = |error: Error| refusal(&error);
        let status = |code: u16, after: Option<&str>| {
            Error::HttpStatus(HttpStatusError::new(code, after.map(str::to_owned)))
        };
        assert_eq!(
            of(status(429, Some("12"))),
            Some(Refusal::Throttled(Some(Duration::from_secs(12))))
        );
        // A date, or no wait at all, is no number of seconds; a day is cut to the longest.
        let dated = status(429, Some("Wed, 21 Oct 2026 07:28:00 GMT"));
        assert_eq!(of(dated), Some(Refusal::Throttled(None)));
        assert_eq!(
            of(status(429, Some("86400"))),
            Some(Refusal::Throttled(Some(LONGEST_RETRY_AFTER)))
        );
        assert_eq!(of(status(503, None)), Some(Refusal::ServerError));
        let html_500 = Error::UnexpectedServerResponse("HTTP 500: <html>".into());
        assert_eq!(of(html_500), Some(Refusal::ServerError));
        // A 4xx may be the session refused (a 400 for one the upstream does not know).
        let bad_request = Error::UnexpectedServerResponse("HTTP 400: no session".into());
        assert_eq!(of(bad_request), None);
        let too_large = Error::ResponseBodyTooLarge { max_size: 1 };
        assert_eq!(of(too_large), Some(Refusal::TooLarge));
        assert_eq!(of(Error::TransportChannelClosed), None);
        // The legacy SSE transport's POST refused.
        assert_eq!(
            refusal(&super::super::sse::SseError::Status {
                status: 502,
                retry_after: None
            }),
            Some(Refusal::ServerError)
        );
        let not_found = super::super::sse::SseError::Status {
            status: 404,
            retry_after: None,
        };
        assert_eq!(refusal(&not_found), None);
        let throttled = super::super::sse::SseError::Status {
            status: 429,
            retry_after: Some("7".into()),
        };
        assert_eq!(
            refusal(&throttled),
            Some(Refusal::Throttled(Some(Duration::from_secs(7))))
        );
    }

    #[test]
    fn an_unexpected_content_type_is_said_without_debug_output() {
        let got = StreamableHttpError::<reqwest::Error>::UnexpectedContentType(Some(
            "text/html; charset=utf-8".into(),
        ));
        let said = described(&got);
        assert_eq!(
            said,
            "the upstream answered with content type text/html; charset=utf-8, not JSON or an event stream"
        );
    }

    #[test]
    fn redact_drops_the_query() {
        let url = url::Url::parse("http://127.0.0.1:1/mcp?integrationKey=hubspot").expect("url");
        let message = format!("error sending request for url ({url})");
        assert_eq!(
            redact(&message, &url),
            "error sending request for url (http://127.0.0.1:1/mcp)"
        );
    }
}
