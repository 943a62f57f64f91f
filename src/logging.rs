//! The log pipeline: one line per event, JSON or pretty, on stdout, with no URL's query
//! string or user information (a password in a `postgres://` URL) in it.
//!
//! Our own errors shorten upstream URLs before they are logged (`upstream::error`), but
//! libraries log too: rmcp logs its transport's failures itself, with reqwest's error and
//! the full URL in it, and a tenant's upstream URL may carry a key in its query
//! (`integrationKey`, or whatever a custom `upstreamUrl` holds). So every formatted line
//! passes through [`redact_urls`] on its way out, whoever wrote the event.

use std::borrow::Cow;
use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

use crate::config::{ConfigError, LogFormat};

/// Library targets that log what a peer sent, as Rust debug output, whatever `RUST_LOG`
/// says; the gateway logs what it needs of the same events itself, redacted.
/// - rmcp's transport worker logs why it quit, quoting the body of an upstream's HTTP error
///   answer as sent: an upstream that echoes the request's `Authorization` header would
///   put the tenant's token in the log (the gateway logs `upstream connect failed`).
/// - rmcp's service loop logs every notification a peer sends (info), an upstream's whole
///   `initialize` result (info), every request and answer (debug) and unexpected messages
///   (warn), in either direction: a tenant's upstream quoting its token in a notification,
///   or any client's 16 MiB notification, would be written as sent. Only its errors, which
///   quote nothing, are kept.
/// - rmcp's Streamable HTTP client logs a message an upstream sends before its `initialize`
///   result whole (debug), and its errors quote what the upstream answered (an HTTP error
///   body may echo the request's `Authorization` header).
const QUIET: &[&str] = &[
    "rmcp::transport::worker=off",
    "rmcp::service=error",
    "rmcp::transport::streamable_http_client=off",
];

/// Installs the process's subscriber: `RUST_LOG`, or `info` when it is unset, to stdout. A
/// `RUST_LOG` that does not parse is refused, as any other setting is, rather than taken
/// as `info` (a filter meant to keep the access log out would be lost without a word).
pub fn init(format: LogFormat) -> Result<(), ConfigError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) => filter_of(&directives)?,
        Err(_) => EnvFilter::new("info"),
    };
    install(format, filter, io::stdout);
    Ok(())
}

fn filter_of(directives: &str) -> Result<EnvFilter, ConfigError> {
    EnvFilter::try_new(directives).map_err(|err| ConfigError::Invalid {
        key: "RUST_LOG",
        reason: err.to_string(),
    })
}

/// `filter` with [`QUIET`] added, whatever `RUST_LOG` said about those targets.
fn quieted(filter: EnvFilter) -> EnvFilter {
    QUIET
        .iter()
        .filter_map(|quiet| quiet.parse().ok())
        .fold(filter, EnvFilter::add_directive)
}

/// Installs the process's subscriber, writing to `writer` (tests read their logs back), with
/// `filter` and [`QUIET`].
pub fn install<W>(format: LogFormat, filter: EnvFilter, writer: W)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(quieted(filter))
        .with_writer(Redacting(writer));
    match format {
        // Each line carries its spans once, outermost first (`spans`: the request's id,
        // method, path and tenant, then any span inside it). The current span on its own
        // (`span`) would repeat the last of them: about a third of an access line.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .init(),
        LogFormat::Pretty => builder.init(),
    }
}

/// A [`MakeWriter`] whose writers pass [`redact_urls`] over what they are given. The
/// formatter hands each event over whole, in one write, so a URL is never split.
struct Redacting<W>(W);

impl<'w, W: MakeWriter<'w>> MakeWriter<'w> for Redacting<W> {
    type Writer = RedactingWriter<W::Writer>;

    fn make_writer(&'w self) -> Self::Writer {
        RedactingWriter(self.0.make_writer())
    }

    fn make_writer_for(&'w self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        RedactingWriter(self.0.make_writer_for(meta))
    }
}

struct RedactingWriter<W>(W);

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match std::str::from_utf8(buf) {
            Ok(text) => self.0.write_all(redact_urls(text).as_bytes())?,
            Err(_) => self.0.write_all(buf)?,
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// `text` with every URL (`http://`, `postgres://`, any `scheme://`) cut to its scheme,
/// host, port and path:
/// the query and fragment become `?…`, user information `…@`. A URL ends at white space,
/// a quote (a single one only when no `@` follows it before the next end), a backslash
/// (an escaped quote in a JSON line) or an angle bracket.
pub fn redact_urls(text: &str) -> Cow<'_, str> {
    let mut out = String::new();
    let mut copied = 0;
    let mut from = 0;
    while let Some(found) = find_scheme(&text[from..]) {
        let start = from + found;
        let rest = &text[start..];
        let mut len = rest.find(ends_url).unwrap_or(rest.len());
        // A quote is a legal character of a password: followed by an `@` before the next
        // end, it is inside the URL's user information.
        while rest[len..].starts_with('\'') {
            let after = len + 1;
            let next = rest[after..]
                .find(ends_url)
                .map_or(rest.len(), |i| after + i);
            if !rest[after..next].contains('@') {
                break;
            }
            len = next;
        }
        let url = &rest[..len];
        let redacted = redact_one(url);
        if let Cow::Owned(redacted) = redacted {
            out.push_str(&text[copied..start]);
            out.push_str(&redacted);
            copied = start + len;
        }
        from = start + len;
    }
    if copied == 0 {
        return Cow::Borrowed(text);
    }
    out.push_str(&text[copied..]);
    Cow::Owned(out)
}

/// Where the first URL in `text` starts: a scheme (letters, digits, `+`, `-`, `.`) and
/// `://`.
fn find_scheme(text: &str) -> Option<usize> {
    let mut from = 0;
    while let Some(found) = text[from..].find("://") {
        let colon = from + found;
        // By bytes: a scheme is ASCII, so the byte after any other one (the last byte of
        // a multi-byte character included) starts a character.
        let start = text.as_bytes()[..colon]
            .iter()
            .rposition(|&b| !(b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.')))
            .map_or(0, |i| i + 1);
        if start < colon {
            return Some(start);
        }
        from = colon + 3;
    }
    None
}

fn ends_url(c: char) -> bool {
    c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\' | '<' | '>' | '`')
}

/// One URL (`scheme://rest`), without its user information and query. User information
/// runs to the last `@` of the URL: a password may hold a raw `/`, `?` or `#`, and cutting
/// there would leave part of it. But an `@` may as well be in the query
/// (`?email=a@b.example&key=…`), and which of the two it is cannot be told: when a `?` or
/// `#` comes before the last `@`, or what would be the host is no host name, everything
/// after the scheme goes.
fn redact_one(url: &str) -> Cow<'_, str> {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let everything = || Cow::Owned(format!("{}…", &url[..after_scheme]));
    let rest = &url[after_scheme..];
    let (user, rest) = match rest.rfind('@') {
        Some(at) if rest[..at].contains(['?', '#']) => return everything(),
        Some(at) => (true, &rest[at + 1..]),
        None => (false, rest),
    };
    let host_len = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (host, tail) = rest.split_at(host_len);
    let host_name = |c: char| c.is_alphanumeric() || matches!(c, '-' | '.' | ':' | '[' | ']' | '_');
    if user && !host.chars().all(host_name) {
        return everything();
    }
    let query = tail.find(['?', '#']);
    if !user && query.is_none() {
        return Cow::Borrowed(url);
    }
    let mut out = String::with_capacity(url.len());
    out.push_str(&url[..after_scheme]);
    if user {
        out.push_str("…@");
    }
    out.push_str(host);
    match query {
        Some(q) => {
            out.push_str(&tail[..q]);
            out.push_str("?…");
        }
        None => out.push_str(tail),
    }
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_user_information_are_cut_from_every_url() {
        let cases = [
            (
                r#"worker quit: reqwest::Error { url: "https://mcp.example/mcp?integrationKey=hubspot&x=1" }"#,
                r#"worker quit: reqwest::Error { url: "https://mcp.example/mcp?…" }"#,
            ),
            (
                r#"{"error":"url: \"http://127.0.0.1:9/mcp?api_key=s3cret\", source"}"#,
                r#"{"error":"url: \"http://127.0.0.1:9/mcp?…\", source"}"#,
            ),
            (
                "db postgres://user:pw@db:5432/x#frag and https://a.b?k=v end",
                "db postgres://…@db:5432/x?… and https://a.b?… end",
            ),
            // Not even part of a password with a raw `/`, `?` or `#` in it.
            ("postgres://u:pa/ss#w?rd@db/x done", "postgres://… done"),
            ("postgres://u:pa/ss@db/x done", "postgres://…@db/x done"),
            // An `@` in the query, followed by what looks like a host and a path.
            (
                "GET https://up/mcp?user=bob@corp.com/x&token=S3cret done",
                "GET https://… done",
            ),
            // A quote in a password ends the URL in the line before its `@`.
            (
                "connect postgres://sb:pa'ss@db/sb failed",
                "connect postgres://…@db/sb failed",
            ),
            (
                "url='https://a/p?k=v' user='u@x'",
                "url='https://a/p?…' user='u@x'",
            ),
            // An `@` in the query: no part of the query is left.
            (
                "GET https://a/p?email=u@x.example&key=S3cret done",
                "GET https://… done",
            ),
            // A multi-byte character right before the scheme or the `://`.
            ("éhttp://x?k=v", "éhttp://x?…"),
            (
                "链接：https://a.example/p?k=v",
                "链接：https://a.example/p?…",
            ),
            ("«https://a?k=v»", "«https://a?…"),
            // A control character (an ANSI colour code) ends a URL.
            (
                "{url=https://a/p?k=v\u{1b}[0m}",
                "{url=https://a/p?…\u{1b}[0m}",
            ),
        ];
        for (line, want) in cases {
            assert_eq!(redact_urls(line), want, "{line}");
        }
    }

    #[test]
    fn a_line_without_a_secret_in_a_url_is_not_copied() {
        for line in [
            "no url here",
            "http://127.0.0.1:3000/mcp/t1 answered",
            "https://example.com/",
            "http://",
            "a :// b",
            "é://x?k=v",
        ] {
            assert!(matches!(redact_urls(line), Cow::Borrowed(_)), "{line}");
        }
    }

    #[test]
    fn what_rmcp_logs_of_an_upstreams_messages_stays_out_whatever_rust_log_says() {
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let sink = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(quieted(EnvFilter::new("trace")))
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!(target: "rmcp::transport::streamable_http_client", "message: token-1");
            tracing::error!(target: "rmcp::transport::streamable_http_client", "error: token-2");
            tracing::info!(target: "rmcp::service", "notification: token-3");
            tracing::debug!(target: "rmcp::transport::worker", "quit: token-4");
            tracing::debug!(target: "switchboard::upstream", "kept");
        });
        let written = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert!(!written.contains("token-"), "{written}");
        assert!(written.contains("kept"), "{written}");
    }

    #[test]
    fn a_rust_log_that_does_not_parse_is_refused() {
        assert!(filter_of("warn,switchboard::access=off").is_ok());
        for bad in ["warn,switchboard::access=none", "error,rmcp=warning"] {
            match filter_of(bad) {
                Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "RUST_LOG"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_writer_redacts_each_event_it_is_given() {
        let mut out = Vec::new();
        RedactingWriter(&mut out)
            .write_all(b"GET https://up/mcp?integrationKey=k failed\n")
            .unwrap();
        assert_eq!(out, b"GET https://up/mcp?\xE2\x80\xA6 failed\n");
    }
}
