//! No secret in the audit trail or in any log line of a full run. This test binary owns
//! the global tracing subscriber (JSON, debug level, into a buffer), runs the whole flow
//! (tokens, tenant creation, tool calls, refusals, rotation, metrics, shutdown) and then
//! searches every log line and every audit row for each secret it saw.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::gateway::{CreatedTenant, TestGateway, TestStore};
use common::upstream::TestUpstream;
use reqwest::Method;
use serde_json::json;
use switchboard::config::{Config, LogFormat};
use tracing_subscriber::EnvFilter;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut inner) = self.0.lock() {
            inner.extend_from_slice(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffer {
    type Writer = Buffer;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn audit_rows(store: &TestStore) -> anyhow::Result<Vec<String>> {
    let TestStore::Sqlite(dir) = store else {
        anyhow::bail!("sqlite expected");
    };
    let conn = rusqlite::Connection::open(dir.path().join("sb.db"))?;
    // Every nullable column coalesced: one NULL would make the whole row NULL, and unread.
    let mut stmt = conn.prepare(
        "SELECT id || coalesce(tenant_id,'') || action || actor || outcome \
         || coalesce(request_id,'') || coalesce(tool,'') || coalesce(detail,'') \
         FROM audit_events",
    )?;
    let rows = stmt
        .query_map([], |row| row.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// A REST `echo` call of `tenant`'s, with its tenant JWT: the status and the body.
async fn echo_with_jwt(
    gw: &TestGateway,
    tenant: &CreatedTenant,
) -> anyhow::Result<(reqwest::StatusCode, serde_json::Value)> {
    let (status, _, body) = gw
        .send(
            Method::POST,
            &format!("/api/tenant/{}/tool", tenant.id),
            &[("authorization", &format!("Bearer {}", tenant.token))],
            Some(json!({"method": "echo"})),
        )
        .await?;
    Ok((status, body))
}

/// rmcp quotes this much of an HTTP error body (`max_error_response_size`'s default).
const RMCP_QUOTES: usize = 64 * 1024;

/// A loopback HTTP server that answers every request 403, its body quoting the request's
/// `Authorization` header; its address. With `split_at`, that quote comes after padding
/// that puts the end of what rmcp quotes `split_at` bytes into the token.
async fn quoting_upstream(split_at: Option<usize>) -> anyhow::Result<std::net::SocketAddr> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match socket.read(&mut byte).await {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let head = String::from_utf8_lossy(&head);
                let authorization = head
                    .lines()
                    .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
                    .unwrap_or("no authorization");
                // The request's body is read before the answer: closing a socket with unread
                // bytes resets it, and could lose the end of a long answer.
                let length = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, value)| value.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; length.min(1 << 20)];
                if socket.read_exact(&mut body).await.is_err() {
                    return;
                }
                let quote = format!("bad request; you sent {authorization}");
                let body = match split_at {
                    None => quote,
                    Some(split_at) => {
                        let token_at = quote.find("Bearer ").map_or(0, |at| at + 7);
                        let pad = RMCP_QUOTES - token_at - split_at;
                        format!("{}{quote}{}", "x".repeat(pad), "y".repeat(1024))
                    }
                };
                let answer = format!(
                    "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(answer.as_bytes()).await;
            });
        }
    });
    Ok(address)
}

/// The first part of `secret` (16 characters, or the whole of a shorter one) that `text`
/// holds: a secret must not show up even in part.
fn part_of<'s>(secret: &'s str, text: &str) -> Option<&'s str> {
    const PART: usize = 16;
    if secret.len() <= PART {
        return text.contains(secret).then_some(secret);
    }
    (0..=secret.len() - PART)
        .filter_map(|start| secret.get(start..start + PART))
        .find(|part| text.contains(part))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_logs_and_audits_no_secret() -> anyhow::Result<()> {
    let logs = Buffer::default();
    // The gateway's own log pipeline, at debug level, into the buffer.
    switchboard::logging::install(LogFormat::Json, EnvFilter::new("debug"), logs.clone());
    let upstream = TestUpstream::start().await?;
    let mut config = Config::for_tests();
    config.audit_arguments = true;
    let gw = TestGateway::start_with(config).await?;
    let app_token = "integration-app-token-SECRET-42";
    let admin_jwt = gw.admin_token().await?;
    let tenant = gw
        .create_tenant(json!({"integrationKey": "k", "integrationAppToken": app_token, "upstreamUrl": upstream.url}))
        .await?;
    let tool = format!("/api/tenant/{}/tool", tenant.id);
    let auth = format!("Bearer {}", tenant.token);
    // `whoami` answers with the upstream token, and says it in a log notification first.
    for method in ["listTools", "echo", "whoami"] {
        let body = json!({"method": method, "params": {"text": "hello"}});
        let (status, _, _) = gw
            .send(Method::POST, &tool, &[("authorization", &auth)], Some(body))
            .await?;
        assert!(status.is_success(), "{method}: {status}");
    }
    let (status, _, _) = gw
        .send(
            Method::POST,
            &tool,
            &[("x-api-key", &tenant.api_key)],
            Some(json!({"method": "echo", "params": {"text": "again"}})),
        )
        .await?;
    assert!(status.is_success());
    // Refusals: a wrong admin key, a wrong tenant key, a tampered JWT.
    let wrong_admin = format!("{}x", gw.config.admin_api_key.expose());
    gw.send(
        Method::POST,
        "/api/auth/token",
        &[],
        Some(json!({"key": wrong_admin})),
    )
    .await?;
    gw.send(
        Method::POST,
        "/api/auth/tenant-token",
        &[("x-api-key", &format!("{}x", tenant.api_key))],
        None,
    )
    .await?;
    let tampered = format!("Bearer {}x", tenant.token);
    gw.send(
        Method::POST,
        &tool,
        &[("authorization", &tampered)],
        Some(json!({"method": "echo"})),
    )
    .await?;
    // A tenant whose upstream refuses connections, with a key in its URL's query: rmcp
    // logs its transport's failure itself, with the whole URL in it.
    let query_key = "upstream-query-key-SECRET-77";
    let unreachable = format!(
        "http://{}/mcp?apiKey={query_key}",
        switchboard::config::refusing_loopback()
    );
    let down = gw
        .create_tenant(
            json!({"integrationKey": "k", "integrationAppToken": "t", "upstreamUrl": unreachable}),
        )
        .await?;
    let (status, _) = echo_with_jwt(&gw, &down).await?;
    assert!(status.is_server_error(), "unreachable upstream: {status}");
    // An upstream that answers every request 403 (about the token, so not a cue to try
    // legacy SSE), quoting the request's Authorization header: the tenant's token must not
    // come back in the 502 or reach a log line.
    let echo_token = "echoed-upstream-token-SECRET-99";
    let echoing = quoting_upstream(None).await?;
    let echoed = gw
        .create_tenant(
            json!({"integrationKey": "k", "integrationAppToken": echo_token,
            "upstreamUrl": format!("http://{echoing}/mcp")}),
        )
        .await?;
    let (status, echoed_answer) = echo_with_jwt(&gw, &echoed).await?;
    assert!(status.is_server_error(), "quoting upstream: {status}");
    let echoed_answer = echoed_answer.to_string();
    // One that quotes it where rmcp's quote of the body ends, splitting it: the part before
    // the split is no exact match of the token, yet it must not be shown either.
    let split_token = "split-upstream-token-SECRET-0123456789";
    let splitting = quoting_upstream(Some(20)).await?;
    let split = gw
        .create_tenant(
            json!({"integrationKey": "k", "integrationAppToken": split_token,
            "upstreamUrl": format!("http://{splitting}/mcp")}),
        )
        .await?;
    let (status, split_answer) = echo_with_jwt(&gw, &split).await?;
    assert!(status.is_server_error(), "splitting upstream: {status}");
    let split_answer = split_answer.to_string();
    assert!(split_answer.contains("(cut)"), "{split_answer}");
    let admin = format!("Bearer {admin_jwt}");
    let (_, _, rotated) = gw
        .send(
            Method::POST,
            &format!("/api/tenants/{}/api-key", tenant.id),
            &[("authorization", &admin)],
            None,
        )
        .await?;
    let new_key = rotated["apiKey"].as_str().unwrap_or_default().to_owned();
    assert!(!new_key.is_empty(), "{rotated}");
    let metrics = gw.http.get(gw.url("/metrics")).send().await?.text().await?;

    let secrets = [
        ("admin key", gw.config.admin_api_key.expose().to_owned()),
        ("JWT secret", gw.config.jwt_secret.expose().to_owned()),
        ("encryption key", hex::encode(gw.config.encryption_key)),
        ("admin JWT", admin_jwt.clone()),
        ("tenant key", tenant.api_key.clone()),
        ("rotated tenant key", new_key),
        ("tenant JWT", tenant.token.clone()),
        ("integrationAppToken", app_token.to_owned()),
        ("key in an upstream URL's query", query_key.to_owned()),
        ("token an upstream quoted back", echo_token.to_owned()),
        ("token an upstream's quote split", split_token.to_owned()),
    ];
    let store = gw.store.clone();
    gw.stop().await?;
    // After the stop: the tenant actors flushed their audit buffers.
    let rows = audit_rows(&store)?;
    let text = String::from_utf8(logs.0.lock().map(|b| b.clone()).unwrap_or_default())?;
    assert!(text.lines().count() > 20, "the run logged");
    // JSON lines carry the request span with its request id and tenant id.
    assert!(text
        .lines()
        .any(|l| l.contains("\"request_id\"") && l.contains(&tenant.id)));
    assert!(rows.iter().any(|r| r.contains("auth.refused")));
    // The refusal at the tenant-token endpoint names no tenant: its row is read too.
    assert!(
        rows.iter()
            .any(|r| r.contains("auth.refused") && !r.contains(&tenant.id)),
        "every audit row is searched"
    );
    // The failing upstream's connect was logged in the gateway's words, with its URL cut
    // at its query (rmcp's own line of it is off: it quotes error bodies as sent).
    let failed = text
        .lines()
        .find(|l| l.contains("upstream connect failed") && l.contains(&down.id))
        .unwrap_or_default();
    assert!(
        failed.contains("/mcp"),
        "the connect failure is logged: {failed}"
    );
    assert!(!text.contains("worker quit"), "rmcp's worker lines are off");
    // The upstream that quoted the token back was answered 502, without the token.
    assert!(echoed_answer.contains("upstream_error"), "{echoed_answer}");
    let audit = rows.join("\n");
    for (what, secret) in &secrets {
        for (place, haystack) in [
            ("/metrics", &metrics),
            ("the logs", &text),
            ("the audit trail", &audit),
            ("the quoting upstream's 502", &echoed_answer),
            ("the splitting upstream's 502", &split_answer),
        ] {
            if let Some(part) = part_of(secret, haystack) {
                panic!("a part of the {what} is in {place}: {part}");
            }
        }
    }
    Ok(())
}
