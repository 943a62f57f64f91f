//! The upstream MCP client against a real MCP server on loopback ([`TestUpstream`]): results
//! pass through unchanged, errors are sorted, timeouts and abandoned calls are cancelled
//! upstream, calls run concurrently, and both transports (and `auto`) work end to end.

mod common;

use std::time::{Duration, Instant};

use anyhow::Context as _;
use common::upstream::TestUpstream;
use rmcp::model::ProgressNotificationParam;
use serde_json::json;
use switchboard::{
    config::Secret,
    upstream::{TransportKind, UpstreamClient, UpstreamError, UpstreamEvent, UpstreamTarget},
};
use tokio::sync::mpsc;

const TOKEN: &str = "tenant-a-upstream-token";
const T: Duration = Duration::from_secs(10);

fn target(url: &str, transport: TransportKind) -> anyhow::Result<UpstreamTarget> {
    Ok(UpstreamTarget {
        url: url::Url::parse(url)?,
        token: Secret::new(TOKEN),
        transport,
        connect_timeout: Duration::from_secs(5),
        client_name: "switchboard-test".to_owned(),
        max_in_flight: 256,
        call_timeout: Duration::from_secs(2),
    })
}

type Connected = (UpstreamClient, mpsc::Receiver<UpstreamEvent>);

async fn connect(url: &str, transport: TransportKind) -> anyhow::Result<Connected> {
    Ok(try_connect(&target(url, transport)?).await?)
}

async fn try_connect(target: &UpstreamTarget) -> Result<Connected, UpstreamError> {
    let (tx, rx) = mpsc::channel(16);
    let client = UpstreamClient::connect(target, tx).await?;
    Ok((client, rx))
}

fn args(value: serde_json::Value) -> Option<serde_json::Map<String, serde_json::Value>> {
    value.as_object().cloned()
}

fn sse_url(upstream: &TestUpstream) -> anyhow::Result<&str> {
    upstream
        .sse_url
        .as_deref()
        .context("the test upstream serves SSE")
}

/// The test upstream's two ends: Streamable HTTP and legacy SSE.
fn both_transports(upstream: &TestUpstream) -> anyhow::Result<[(&str, TransportKind); 2]> {
    Ok([
        (upstream.url.as_str(), TransportKind::StreamableHttp),
        (sse_url(upstream)?, TransportKind::Sse),
    ])
}

#[tokio::test]
async fn lists_every_tool_across_pages() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (client, _events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    let tools = client.list_tools(T).await?;
    let names: Vec<&str> = tools.iter().map(|tool| tool.name.as_ref()).collect();
    assert_eq!(
        names,
        ["echo", "sleep", "fail", "whoami", "add", "progress"]
    );
    assert_eq!(upstream.initializes(), 1);
    assert_eq!(client.transport(), TransportKind::StreamableHttp);
    Ok(())
}

/// Lists the tools of an upstream that `endless` has set to page for ever, and returns
/// what the refusal said, having checked it came after at most `most_pages` pages.
async fn refused_endless_list(
    endless: impl FnOnce(&TestUpstream),
    most_pages: usize,
    within: Duration,
) -> anyhow::Result<String> {
    let upstream = TestUpstream::start().await?;
    let (client, _events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    endless(&upstream);
    let refused = client.list_tools(within).await;
    let Err(UpstreamError::Protocol(said)) = refused else {
        anyhow::bail!("not refused as too long: {refused:?}");
    };
    assert!(
        upstream.lists() <= most_pages,
        "{} pages asked for",
        upstream.lists()
    );
    Ok(said)
}

#[tokio::test]
async fn a_tool_list_that_never_ends_is_refused_not_collected() -> anyhow::Result<()> {
    let started = Instant::now();
    let said =
        refused_endless_list(TestUpstream::list_endlessly, 1_000, Duration::from_secs(60)).await?;
    assert!(said.contains("too long"), "{said}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refused only after {:?}",
        started.elapsed()
    );
    Ok(())
}

#[tokio::test]
async fn a_tool_list_of_long_cursors_counts_them_towards_its_bytes() -> anyhow::Result<()> {
    // Pages of no tools, each naming a next page by a cursor of 1 MiB: the cursors are
    // kept and sent back, so they count towards the list's 32 MiB as its tools do.
    let said = refused_endless_list(
        |upstream| upstream.list_endlessly_with_cursors_of(1 << 20),
        40,
        Duration::from_secs(30),
    )
    .await?;
    assert!(said.contains("MiB"), "{said}");
    Ok(())
}

#[tokio::test]
async fn echo_result_passes_through_unchanged() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (client, _events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    let result = client
        .call_tool("echo", args(json!({"text": "hello"})), T, None)
        .await?;
    assert_eq!(
        serde_json::to_value(&result)?,
        json!({
            "content": [{"type": "text", "text": "hello"}],
            "structuredContent": {"echo": "hello"},
            "isError": false
        })
    );
    let sum = client
        .call_tool("add", args(json!({"a": 2, "b": 3})), T, None)
        .await?;
    assert_eq!(
        serde_json::to_value(&sum.content)?,
        json!([{"type": "text", "text": "5"}])
    );
    Ok(())
}

#[tokio::test]
async fn tool_failure_is_ok_with_is_error() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (client, _events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    let result = client.call_tool("fail", None, T, None).await?;
    assert_eq!(result.is_error, Some(true));
    assert_eq!(
        serde_json::to_value(&result.content)?,
        json!([{"type": "text", "text": "the tool failed"}])
    );
    Ok(())
}

#[tokio::test]
async fn unknown_tool_is_a_json_rpc_error() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (client, _events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    let error = client
        .call_tool("nope", None, T, None)
        .await
        .expect_err("unknown tool");
    assert!(
        matches!(&error, UpstreamError::Rpc { code: -32602, message } if message.contains("nope")),
        "{error:?}"
    );
    // The session survives a refused call.
    client
        .call_tool("echo", args(json!({"text": "still here"})), T, None)
        .await?;
    Ok(())
}

#[tokio::test]
async fn timeout_cancels_the_call_upstream() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (client, _events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    upstream.set_hang(true);
    let started = Instant::now();
    let error = client
        .call_tool(
            "echo",
            args(json!({"text": "x"})),
            Duration::from_millis(300),
            None,
        )
        .await
        .expect_err("a hanging tool times out");
    assert_eq!(error, UpstreamError::Timeout);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    upstream.wait_for_cancellations(1).await?;
    upstream.set_hang(false);
    client
        .call_tool("echo", args(json!({"text": "after"})), T, None)
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_tool_list_that_times_out_is_cancelled_upstream() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (client, _events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    upstream.hold_next_list();
    let error = client
        .list_tools(Duration::from_millis(300))
        .await
        .expect_err("a held list times out");
    assert_eq!(error, UpstreamError::Timeout);
    upstream.wait_for_cancellations(1).await?;
    upstream.release_list();
    Ok(())
}

#[tokio::test]
async fn calls_an_upstream_never_answers_do_not_use_up_the_session() -> anyhow::Result<()> {
    // An upstream that never sends even the headers of its answer, and ignores
    // `notifications/cancelled`: each call the gateway gave up on must let go of its POST,
    // or after one session's worth of POSTs (256) the tenant could send nothing at all.
    let upstream = TestUpstream::start().await?;
    for (url, transport) in both_transports(&upstream)? {
        abandon_calls_to_a_stalling_upstream(&upstream, url, transport)
            .await
            .with_context(|| format!("{transport:?}"))?;
    }
    Ok(())
}

#[tokio::test]
async fn a_handshake_given_up_lets_go_of_its_connection() -> anyhow::Result<()> {
    // rmcp's transport worker waits for the initialize POST without watching its own
    // cancellation: a handshake timed out used to keep its POST, its HTTP client and its
    // worker open for as long as the upstream held the socket.
    let upstream = TestUpstream::start().await?;
    upstream.set_stalling(&["initialize"]);
    let mut stalled = target(&upstream.url, TransportKind::StreamableHttp)?;
    stalled.connect_timeout = Duration::from_millis(300);
    let refused = try_connect(&stalled).await;
    assert!(
        matches!(&refused, Err(UpstreamError::Connect(said)) if said.contains("handshake")),
        "{:?}",
        refused.err()
    );
    upstream
        .wait_for_no_stalled_posts()
        .await
        .with_context(|| format!("{} stalled POSTs still open", upstream.stalled_open()))?;
    upstream.set_stalling(&[]);
    let (client, _events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    assert!(!client.list_tools(T).await?.is_empty());
    Ok(())
}

/// 300 calls the upstream never answers, each given up on after 500 ms; then the session
/// must have let go of every POST, and still serve a call.
async fn abandon_calls_to_a_stalling_upstream(
    upstream: &TestUpstream,
    url: &str,
    transport: TransportKind,
) -> anyhow::Result<()> {
    let (client, _events) = connect(url, transport).await?;
    upstream.set_stalling(&["tools/call"]);
    let abandoned = (0..300).map(|_| {
        client.call_tool(
            "echo",
            args(json!({"text": "x"})),
            Duration::from_millis(500),
            None,
        )
    });
    for answer in futures::future::join_all(abandoned).await {
        assert!(matches!(answer, Err(UpstreamError::Timeout)), "{answer:?}");
    }
    upstream
        .wait_for_no_stalled_posts()
        .await
        .with_context(|| format!("{} stalled POSTs still open", upstream.stalled_open()))?;
    upstream.set_stalling(&[]);
    let answer = client
        .call_tool("echo", args(json!({"text": "after"})), T, None)
        .await?;
    assert_ne!(answer.is_error, Some(true), "{answer:?}");
    Ok(())
}

#[tokio::test]
async fn dropped_call_is_cancelled_upstream() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (client, _events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    upstream.set_hang(true);
    let call = tokio::spawn({
        let client = client.clone();
        async move {
            client
                .call_tool("echo", args(json!({"text": "x"})), T, None)
                .await
        }
    });
    upstream.wait_for_calls(1).await?;
    call.abort();
    upstream.wait_for_cancellations(1).await?;
    Ok(())
}

#[tokio::test]
async fn bearer_token_arrives_as_sent() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (client, _events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    let result = client.call_tool("whoami", None, T, None).await?;
    assert_eq!(
        serde_json::to_value(&result.content)?,
        json!([{"type": "text", "text": TOKEN}])
    );
    let seen = upstream.seen_tokens();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|token| token == TOKEN), "{seen:?}");
    Ok(())
}

#[tokio::test]
async fn concurrent_calls_do_not_queue_behind_each_other() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (client, _events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    let started = Instant::now();
    let calls = (0..50).map(|_| client.call_tool("sleep", args(json!({"ms": 100})), T, None));
    for result in futures::future::join_all(calls).await {
        assert_eq!(result?.is_error, Some(false));
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed < Duration::from_millis(1000),
        "50 calls took {elapsed:?}"
    );
    assert_eq!(upstream.calls(), 50);
    Ok(())
}

/// The progress the upstream reported to one call, as its sink received it.
fn drained(
    updates: &mut mpsc::Receiver<ProgressNotificationParam>,
) -> Vec<ProgressNotificationParam> {
    let mut got = Vec::new();
    while let Ok(update) = updates.try_recv() {
        got.push(update);
    }
    got
}

#[tokio::test]
async fn progress_reaches_the_call_that_asked_for_it() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    for (url, transport) in both_transports(&upstream)? {
        let (client, _events) = connect(url, transport).await?;
        // Two calls at once: each hears its own request's progress and nothing else.
        let (three_tx, mut three) = mpsc::channel(16);
        let (four_tx, mut four) = mpsc::channel(16);
        let (a, b) = tokio::join!(
            client.call_tool("progress", args(json!({"steps": 3})), T, Some(three_tx)),
            client.call_tool("progress", args(json!({"steps": 4})), T, Some(four_tx)),
        );
        assert_eq!(a?.is_error, Some(false), "{transport:?}");
        assert_eq!(b?.is_error, Some(false), "{transport:?}");
        // All of it arrived before the answer, and the call let go of its sink.
        for (updates, steps) in [(&mut three, 3), (&mut four, 4)] {
            let got = drained(updates);
            let values: Vec<f64> = got.iter().map(|u| u.progress).collect();
            let expected: Vec<f64> = (1..=steps).map(f64::from).collect();
            assert_eq!(values, expected, "{transport:?}: {got:?}");
            assert!(got.iter().all(|u| u.total == Some(f64::from(steps))));
            assert_eq!(
                got.last().and_then(|u| u.message.as_deref()),
                Some(format!("step {steps} of {steps}").as_str())
            );
            assert!(got
                .iter()
                .all(|u| u.progress_token == got[0].progress_token));
            assert!(updates.recv().await.is_none(), "the sink is dropped");
        }
        // Without a sink the call is answered the same; its progress has nowhere to go.
        let quiet = client
            .call_tool("progress", args(json!({"steps": 2})), T, None)
            .await?;
        assert_eq!(quiet.is_error, Some(false));
    }
    Ok(())
}

#[tokio::test]
async fn a_caller_slow_to_take_its_progress_still_gets_the_answer_that_came_in_time(
) -> anyhow::Result<()> {
    // The answer comes at about 80 ms, well within the call's 2 s; the caller takes none
    // of its progress (its sink holds one update). Progress waiting for room used to hold
    // up the answer until the deadline, which then gave a timeout for an answered call.
    let upstream = TestUpstream::start().await?;
    let (client, _events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    let (tx, mut rx) = mpsc::channel(1);
    let started = Instant::now();
    let answer = client
        .call_tool(
            "progress",
            args(json!({"steps": 6, "ms": 10})),
            Duration::from_secs(2),
            Some(tx),
        )
        .await?;
    assert_eq!(answer.is_error, Some(false), "{answer:?}");
    // The answer, then at most a second for its progress to be taken.
    assert!(
        started.elapsed() < Duration::from_millis(1_800),
        "answered after {:?}",
        started.elapsed()
    );
    // What the sink took is the first of it, in order.
    let heard: Vec<f64> = drained(&mut rx).iter().map(|u| u.progress).collect();
    assert_eq!(heard, [1.0], "{heard:?}");
    Ok(())
}

/// Progress sent just before the answer is the racy case: with no pause between steps, each
/// call's progress and answer follow each other on the wire. Every call, on both transports,
/// must hear all of its progress, in order, before its answer, with the calls spread over
/// worker threads as in the gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_arrives_in_order_before_the_answer_every_time() -> anyhow::Result<()> {
    use futures::StreamExt as _;
    let upstream = TestUpstream::start().await?;
    for (url, transport) in both_transports(&upstream)? {
        let (client, _events) = connect(url, transport).await?;
        let calls = (0..200).map(|_| {
            let client = client.clone();
            async move {
                let (tx, mut rx) = mpsc::channel(16);
                let answer = client
                    .call_tool("progress", args(json!({"steps": 5})), T, Some(tx))
                    .await?;
                anyhow::ensure!(answer.is_error == Some(false), "{answer:?}");
                let heard: Vec<f64> = drained(&mut rx).iter().map(|u| u.progress).collect();
                Ok(heard)
            }
        });
        let results: Vec<anyhow::Result<Vec<f64>>> = futures::stream::iter(calls)
            .buffer_unordered(8)
            .collect()
            .await;
        for heard in results {
            assert_eq!(heard?, [1.0, 2.0, 3.0, 4.0, 5.0], "{transport:?}");
        }
    }
    Ok(())
}

#[tokio::test]
async fn tool_list_change_reaches_the_events_channel() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (client, mut events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    assert_eq!(client.list_tools(T).await?.len(), 6);
    upstream.set_tools_changed().await;
    let event = tokio::time::timeout(T, events.recv()).await?;
    assert_eq!(event, Some(UpstreamEvent::ToolListChanged));
    // No stale list: the client keeps no cache of its own.
    let names: Vec<String> = client
        .list_tools(T)
        .await?
        .into_iter()
        .map(|t| t.name.into())
        .collect();
    assert!(names.iter().any(|name| name == "extra"), "{names:?}");
    Ok(())
}

#[tokio::test]
async fn stopped_upstream_fails_fast_and_a_new_connect_works_after_restart() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (client, _events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    upstream.stop().await;
    let started = Instant::now();
    let error = client
        .call_tool("echo", args(json!({"text": "x"})), T, None)
        .await
        .expect_err("the upstream is down");
    assert!(
        matches!(error, UpstreamError::Connect(_) | UpstreamError::Closed),
        "{error:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "{:?}",
        started.elapsed()
    );
    assert!(!format!("{error}").contains(TOKEN));
    let refused = try_connect(&target(&upstream.url, TransportKind::StreamableHttp)?).await;
    assert!(
        matches!(refused, Err(UpstreamError::Connect(_))),
        "{:?}",
        refused.err()
    );
    // The message says why (reqwest keeps the cause out of its own), and does not name the
    // transport's Rust type (rmcp's wrapper does).
    let said = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(said.to_lowercase().contains("refused"), "{said}");
    assert!(!said.contains("Transport ["), "{said}");
    // The same on the legacy SSE transport.
    let refused = try_connect(&target(sse_url(&upstream)?, TransportKind::Sse)?).await;
    let said = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(said.to_lowercase().contains("refused"), "{said}");

    upstream.restart().await?;
    let (fresh, _events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    let result = fresh
        .call_tool("echo", args(json!({"text": "back"})), T, None)
        .await?;
    assert_eq!(result.structured_content, Some(json!({"echo": "back"})));
    client.close().await;
    assert!(client.is_closed());
    Ok(())
}

#[tokio::test]
async fn an_upstream_that_never_answers_the_handshake_could_not_be_reached() -> anyhow::Result<()> {
    // It takes the connection and says nothing: past the connect timeout that is an
    // upstream that could not be reached (502, and a failure towards failing), on either
    // transport, not a call that ran out of its time (504).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/mcp", silent.local_addr()?);
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            open.push(socket);
        }
    });
    for transport in [TransportKind::StreamableHttp, TransportKind::Sse] {
        let mut silent_target = target(&url, transport)?;
        silent_target.connect_timeout = Duration::from_millis(300);
        let started = Instant::now();
        let error = try_connect(&silent_target)
            .await
            .err()
            .context("nothing answered, yet it connected")?;
        assert!(
            matches!(error, UpstreamError::Connect(_)) && error.is_transport(),
            "{transport:?}: {error:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
    }
    held.abort();
    Ok(())
}

/// An upstream URL whose server redirects every request with `status` to `location`; the
/// server stops when the handle is dropped.
async fn redirecting(
    status: u16,
    location: String,
) -> anyhow::Result<(String, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!(
        "http://{}/mcp?apiKey=key-in-the-query",
        listener.local_addr()?
    );
    let status = axum::http::StatusCode::from_u16(status)?;
    let app = axum::Router::new().fallback(move || {
        let location = location.clone();
        async move { (status, [(axum::http::header::LOCATION, location)]) }
    });
    Ok((
        url,
        tokio::spawn(async move { axum::serve(listener, app).await }),
    ))
}

#[tokio::test]
async fn a_redirect_to_another_origin_or_one_that_drops_the_body_is_not_followed(
) -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let port = url::Url::parse(&upstream.url)?.port().context("port")?;
    // Another origin (the same server, by another host name): it would get the call's
    // body, and the URL's query in a Referer. A 303 would make the POST a GET.
    for (status, location) in [
        (307, format!("http://localhost:{port}/mcp")),
        (308, format!("http://localhost:{port}/mcp")),
        (303, upstream.url.clone()),
    ] {
        let (url, server) = redirecting(status, location).await?;
        let refused = try_connect(&target(&url, TransportKind::StreamableHttp)?).await;
        server.abort();
        assert!(refused.is_err(), "{status} followed");
        // Counted whatever it asks (a 303's GET would fail there too, and without the
        // bearer, which another origin does not get).
        assert_eq!(upstream.requests(), 0, "{status} reached the upstream");
    }
    Ok(())
}

#[tokio::test]
async fn a_307_within_the_origin_is_followed_and_a_302_is_not() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    // The test upstream answers `/moved/mcp` with a 307 to its `/mcp`, `/found/mcp` with a
    // 302 (which would turn the POST into a body-less GET).
    let found = upstream.url.replace("/mcp", "/found/mcp");
    let refused = try_connect(&target(&found, TransportKind::StreamableHttp)?).await;
    assert!(refused.is_err(), "a 302 was followed");
    // The redirecting POST alone: a followed 302 would be a GET of `/mcp` (which fails
    // too, but is one request more).
    assert_eq!(upstream.requests(), 1, "a 302 was followed");
    assert_eq!(upstream.initializes(), 0);
    let moved = upstream.url.replace("/mcp", "/moved/mcp");
    let (client, _events) = try_connect(&target(&moved, TransportKind::StreamableHttp)?).await?;
    assert_eq!(
        upstream.initializes(),
        1,
        "the 307 was followed to the upstream"
    );
    let tools = client.list_tools(T).await?;
    assert!(tools.iter().any(|t| t.name == "echo"), "{tools:?}");
    Ok(())
}

#[tokio::test]
async fn an_answer_that_is_json_but_no_json_rpc_message_is_said_in_our_words() -> anyhow::Result<()>
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}/mcp", listener.local_addr()?);
    // It quotes the token back where rmcp's 256-byte preview of the answer ends, 12 bytes
    // into it: what is left of the token must not be shown either.
    let app = axum::Router::new().route(
        "/mcp",
        axum::routing::post(|headers: axum::http::HeaderMap| async move {
            let sent = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default()
                .to_owned();
            let start = r#"{"hello":""#;
            let pad = "x".repeat(256 - start.len() - 12);
            (
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                format!(r#"{start}{pad}{sent}"}}"#),
            )
        }),
    );
    let served = tokio::spawn(async move { axum::serve(listener, app).await });
    let error = try_connect(&target(&url, TransportKind::StreamableHttp)?)
        .await
        .err()
        .context("connected to an upstream that answers no JSON-RPC")?;
    served.abort();
    let said = error.to_string();
    assert!(
        said.contains("JSON answer is no JSON-RPC message"),
        "{said}"
    );
    assert!(!said.contains("ServerJsonRpcMessage"), "{said}");
    assert!(
        said.contains("xxx…"),
        "the preview is shown, cut at the token: {said}"
    );
    assert!(!said.contains(&TOKEN[..8]), "a part of the token: {said}");
    Ok(())
}

#[tokio::test]
async fn close_ends_the_session_and_reports_it() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (client, mut events) = connect(&upstream.url, TransportKind::StreamableHttp).await?;
    let other = client.clone();
    client.close().await;
    assert!(other.is_closed());
    assert_eq!(
        tokio::time::timeout(T, events.recv()).await?,
        Some(UpstreamEvent::Closed)
    );
    let error = other
        .call_tool("echo", args(json!({"text": "x"})), T, None)
        .await;
    assert_eq!(error.err(), Some(UpstreamError::Closed));
    Ok(())
}

#[tokio::test]
async fn legacy_sse_end_to_end() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (client, mut events) = connect(sse_url(&upstream)?, TransportKind::Sse).await?;
    assert_eq!(client.transport(), TransportKind::Sse);
    assert_eq!(client.list_tools(T).await?.len(), 6);
    let result = client
        .call_tool("echo", args(json!({"text": "over sse"})), T, None)
        .await?;
    assert_eq!(result.structured_content, Some(json!({"echo": "over sse"})));
    let whoami = client.call_tool("whoami", None, T, None).await?;
    assert_eq!(
        serde_json::to_value(&whoami.content)?,
        json!([{"type": "text", "text": TOKEN}])
    );
    assert!(upstream.seen_tokens().iter().all(|token| token == TOKEN));

    let calls = (0..20).map(|_| client.call_tool("sleep", args(json!({"ms": 100})), T, None));
    let started = Instant::now();
    for result in futures::future::join_all(calls).await {
        result?;
    }
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );

    upstream.set_hang(true);
    let error = client
        .call_tool(
            "echo",
            args(json!({"text": "x"})),
            Duration::from_millis(200),
            None,
        )
        .await;
    assert_eq!(error.err(), Some(UpstreamError::Timeout));
    upstream.wait_for_cancellations(1).await?;

    upstream.set_tools_changed().await;
    assert_eq!(
        tokio::time::timeout(T, events.recv()).await?,
        Some(UpstreamEvent::ToolListChanged)
    );

    // The end of the event stream ends the session.
    upstream.stop().await;
    assert_eq!(
        tokio::time::timeout(T, events.recv()).await?,
        Some(UpstreamEvent::Closed)
    );
    assert!(client.is_closed());
    Ok(())
}

#[tokio::test]
async fn auto_uses_streamable_http_when_offered() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (client, _events) = connect(&upstream.url, TransportKind::Auto).await?;
    assert_eq!(client.transport(), TransportKind::StreamableHttp);
    client
        .call_tool("echo", args(json!({"text": "auto"})), T, None)
        .await?;
    Ok(())
}

#[tokio::test]
async fn auto_falls_back_to_sse_when_the_url_only_speaks_sse() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (client, _events) = connect(sse_url(&upstream)?, TransportKind::Auto).await?;
    assert_eq!(client.transport(), TransportKind::Sse);
    let result = client
        .call_tool("echo", args(json!({"text": "fallback"})), T, None)
        .await?;
    assert_eq!(result.structured_content, Some(json!({"echo": "fallback"})));
    Ok(())
}

#[tokio::test]
async fn streamable_http_only_does_not_fall_back() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let result = try_connect(&target(sse_url(&upstream)?, TransportKind::StreamableHttp)?).await;
    assert!(
        matches!(result, Err(UpstreamError::Connect(_))),
        "{:?}",
        result.err()
    );
    Ok(())
}

#[tokio::test]
async fn auto_does_not_fall_back_when_the_upstream_fails_with_a_server_error() -> anyhow::Result<()>
{
    // A 5xx to `initialize` says the server is in trouble, not that it lacks Streamable
    // HTTP: trying legacy SSE would only add a second request (and token) upstream.
    let upstream = TestUpstream::start().await?;
    upstream.set_failing(Some("initialize"));
    let result = try_connect(&target(&upstream.url, TransportKind::Auto)?).await;
    assert!(result.is_err(), "connected through a failing initialize");
    assert_eq!(
        upstream.seen_tokens().len(),
        1,
        "only the Streamable HTTP attempt reaches the upstream"
    );
    Ok(())
}

/// Our client against the reference TypeScript server (`@modelcontextprotocol/server-everything`),
/// over both transports. Needs `npm ci --prefix tests/peers`; fails with that hint otherwise.
#[tokio::test]
async fn reference_server_everything_over_both_transports() -> anyhow::Result<()> {
    use common::peers::{EverythingMode, EverythingServer};

    for (mode, path, transport) in [
        (
            EverythingMode::StreamableHttp,
            "/mcp",
            TransportKind::StreamableHttp,
        ),
        (EverythingMode::Sse, "/sse", TransportKind::Sse),
        (EverythingMode::Sse, "/sse", TransportKind::Auto),
    ] {
        let server = EverythingServer::start(mode).await?;
        let (client, _events) = connect(&server.url(path), transport).await?;
        let tools = client.list_tools(T).await?;
        assert!(
            tools.iter().any(|tool| tool.name == "echo"),
            "{path}: {tools:?}"
        );
        let result = client
            .call_tool("echo", args(json!({"message": "hi"})), T, None)
            .await?;
        assert_eq!(
            serde_json::to_value(&result.content)?,
            json!([{"type": "text", "text": "Echo: hi"}]),
            "{path} over {transport:?}"
        );
        client.close().await;
    }
    Ok(())
}
