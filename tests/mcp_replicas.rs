//! MCP sessions across replicas: two gateways on one fresh PostgreSQL database and no
//! sticky load balancing. A raw 2025-11-25 client sends each request to the next replica
//! (round robin) and its session works everywhere, because the session's state is sealed in
//! its `Mcp-Session-Id`; a forged id, or one used by another tenant, is never served. An
//! upstream's `tools/list_changed` heard by one replica reaches sessions on the other, and
//! a session its client ended through one replica ends on the other too.

mod common;

use std::sync::Arc;

use common::database::{drop_listeners, FreshDatabase};
use common::gateway::{CreatedTenant, TestGateway, TestStore};
use common::mcp_client::{connect, initialize_request, raw};
use common::upstream::TestUpstream;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use switchboard::config::Config;

/// Two replicas sharing one fresh PostgreSQL database (and so one ENCRYPTION_KEY, which
/// `Config::for_tests` fixes).
async fn two_replicas() -> anyhow::Result<(TestGateway, TestGateway)> {
    let db = Arc::new(FreshDatabase::create().await?);
    let store = Arc::new(TestStore::Postgres(db));
    let a = TestGateway::start_on(Config::for_tests(), store.clone()).await?;
    let b = TestGateway::start_on(Config::for_tests(), store).await?;
    Ok((a, b))
}

async fn tenant_on(gw: &TestGateway, upstream: &TestUpstream) -> anyhow::Result<CreatedTenant> {
    gw.create_tenant(
        json!({"integrationKey": "k", "integrationAppToken": "upstream-secret",
                            "upstreamUrl": upstream.url}),
    )
    .await
}

/// A raw JSON-RPC client whose every request goes to the next replica in turn.
struct RoundRobin<'a> {
    replicas: [&'a TestGateway; 2],
    next: usize,
    tenant: &'a CreatedTenant,
    session: Option<String>,
}

struct Answer {
    status: StatusCode,
    session: Option<String>,
    body: Value,
    text: String,
}

impl<'a> RoundRobin<'a> {
    fn new(replicas: [&'a TestGateway; 2], tenant: &'a CreatedTenant) -> Self {
        Self {
            replicas,
            next: 0,
            tenant,
            session: None,
        }
    }

    /// POSTs `message` to the next replica, in the session if there is one.
    async fn post(&mut self, message: &Value) -> anyhow::Result<Answer> {
        let gw = self.replicas[self.next % 2];
        self.next += 1;
        let auth = format!("Bearer {}", self.tenant.api_key);
        let mut headers = vec![
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
            ("mcp-protocol-version", "2025-11-25"),
        ];
        if let Some(id) = &self.session {
            headers.push(("mcp-session-id", id.as_str()));
        }
        let url = gw.url(&format!("/mcp/{}", self.tenant.id));
        let got = raw(&gw.http, Method::POST, &url, &headers, Some(message)).await?;
        let session = got
            .headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        // As a client does: a session id the server answers with is the one it uses next.
        if let Some(id) = &session {
            self.session = Some(id.clone());
        }
        let body = if got.text.is_empty() {
            Value::Null
        } else {
            got.answer()
        };
        Ok(Answer {
            status: got.status,
            session,
            body,
            text: got.text,
        })
    }
}

fn init_body() -> Value {
    initialize_request("round-robin")
}

fn call(id: u64, text: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "tools/call",
           "params": {"name": "echo", "arguments": {"text": text}}})
}

/// Opens a session through `client` (initialize on one replica, initialized on the other).
async fn initialise(client: &mut RoundRobin<'_>) -> anyhow::Result<String> {
    let got = client.post(&init_body()).await?;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    assert_eq!(got.body["result"]["protocolVersion"], "2025-11-25");
    let id = got.session.expect("initialize answers with a session id");
    let initialized = json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
    let got = client.post(&initialized).await?;
    assert_eq!(got.status, StatusCode::ACCEPTED, "{}", got.text);
    Ok(id)
}

#[tokio::test]
async fn a_round_robin_client_initialises_once_and_is_served_by_both_replicas() -> anyhow::Result<()>
{
    let upstream = TestUpstream::with_tools(&["extra"]).await?;
    let (a, b) = two_replicas().await?;
    let tenant = tenant_on(&a, &upstream).await?;
    let mut client = RoundRobin::new([&a, &b], &tenant);
    let id = initialise(&mut client).await?;
    for round in 0..3u64 {
        let list = json!({"jsonrpc": "2.0", "id": 10 + round, "method": "tools/list"});
        let got = client.post(&list).await?;
        assert_eq!(got.status, StatusCode::OK, "round {round}: {}", got.text);
        let tools = got.body["result"]["tools"].as_array().map(Vec::len);
        assert_eq!(tools, Some(7), "round {round}: {}", got.text);
        let text = format!("hello {round}");
        let got = client.post(&call(20 + round, &text)).await?;
        assert_eq!(got.status, StatusCode::OK, "round {round}: {}", got.text);
        let result = &got.body["result"];
        assert_eq!(result["isError"], json!(false), "{}", got.text);
        assert!(got.text.contains(&text), "{}", got.text);
    }
    // The session id never changed (`post` takes up any id an answer names): no replica
    // made the client start over.
    assert_eq!(client.session.as_deref(), Some(id.as_str()));
    a.stop().await?;
    b.stop().await
}

#[tokio::test]
async fn forged_and_foreign_session_ids_are_never_served() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (a, b) = two_replicas().await?;
    let first = tenant_on(&a, &upstream).await?;
    let second = tenant_on(&a, &upstream).await?;
    let mut client = RoundRobin::new([&a, &b], &first);
    let id = initialise(&mut client).await?;
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});

    // Garbled and forged ids: "session not found", on the replica that opened the session
    // and on the one that never saw it.
    let mut garbled = id.clone().into_bytes();
    let last = garbled.len() / 2;
    garbled[last] = if garbled[last] == b'A' { b'B' } else { b'A' };
    let garbled = String::from_utf8(garbled)?;
    for forged in [garbled.as_str(), "forged-session", "AAAA"] {
        for _ in 0..2 {
            client.session = Some(forged.to_owned());
            let got = client.post(&list).await?;
            assert_eq!(got.status, StatusCode::NOT_FOUND, "{forged}: {}", got.text);
        }
    }

    // The first tenant's session with the second tenant's credentials, on both replicas:
    // on the second tenant's endpoint it does not exist; on the first tenant's endpoint
    // the credentials are refused.
    let mut foreign = RoundRobin::new([&a, &b], &second);
    foreign.session = Some(id.clone());
    for _ in 0..2 {
        let got = foreign.post(&list).await?;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{}", got.text);
    }
    for gw in [&a, &b] {
        let auth = format!("Bearer {}", second.api_key);
        let headers = [
            ("authorization", auth.as_str()),
            ("content-type", "application/json"),
            ("mcp-protocol-version", "2025-11-25"),
            ("mcp-session-id", id.as_str()),
        ];
        let url = gw.url(&format!("/mcp/{}", first.id));
        let got = raw(&gw.http, Method::POST, &url, &headers, Some(&list)).await?;
        assert_eq!(got.status, StatusCode::FORBIDDEN, "{}", got.text);
    }

    // The genuine id still works on both replicas.
    client.session = Some(id);
    for _ in 0..2 {
        let got = client.post(&list).await?;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    }
    a.stop().await?;
    b.stop().await
}

#[tokio::test]
async fn list_changed_heard_by_one_replica_reaches_sessions_on_the_other() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let (a, b) = two_replicas().await?;
    let tenant = tenant_on(&a, &upstream).await?;
    // A session on B. B's tenant actor never connects upstream (nothing is listed or
    // called through B), so B can only hear of a change from A.
    let url = b.url(&format!("/mcp/{}", tenant.id));
    let (client, changed) = connect(&url, &tenant.api_key).await?;
    // A's tenant actor connects upstream by serving a call.
    let body = json!({"method": "echo", "params": {"text": "warm"}});
    let (status, _, answer) = a.tool(&tenant, body).await?;
    assert_eq!(status, StatusCode::OK, "{answer}");
    assert!(
        upstream.change_tools_until_heard(&changed).await,
        "the change heard by replica A never reached B's session"
    );
    // Only A ever had an upstream session: B's session heard the change through A.
    assert_eq!(upstream.initializes(), 1, "B connected upstream itself");
    client.cancel().await?;
    a.stop().await?;
    b.stop().await
}

/// `DELETE` of the client's session on `gw`; the status.
async fn end_session(gw: &TestGateway, tenant: &CreatedTenant, id: &str) -> anyhow::Result<u16> {
    let auth = format!("Bearer {}", tenant.api_key);
    let headers = [
        ("authorization", auth.as_str()),
        ("mcp-protocol-version", "2025-11-25"),
        ("mcp-session-id", id),
    ];
    let url = gw.url(&format!("/mcp/{}", tenant.id));
    Ok(raw(&gw.http, Method::DELETE, &url, &headers, None)
        .await?
        .status
        .as_u16())
}

#[tokio::test]
async fn a_session_ended_through_one_replica_ends_on_every_replica() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let db = Arc::new(FreshDatabase::create().await?);
    let store = Arc::new(TestStore::Postgres(db));
    // One session per tenant on each replica: B can open another for the tenant only once
    // its copy of the ended session is gone.
    let mut config = Config::for_tests();
    config.mcp_max_sessions_per_tenant = 1;
    let a = TestGateway::start_on(config.clone(), store.clone()).await?;
    let b = TestGateway::start_on(config, store).await?;
    let tenant = tenant_on(&a, &upstream).await?;
    // Opened on A, then served (so copied) by B as well.
    let mut client = RoundRobin::new([&a, &b], &tenant);
    let id = initialise(&mut client).await?;
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    for _ in 0..2 {
        let got = client.post(&list).await?;
        assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    }
    // B is at its cap for the tenant while it holds its copy.
    let mut fresh = RoundRobin::new([&b, &a], &tenant);
    let got = fresh.post(&init_body()).await?;
    assert_eq!(got.status, StatusCode::TOO_MANY_REQUESTS, "{}", got.text);

    let status = end_session(&a, &tenant, &id).await?;
    assert!((200..300).contains(&status), "DELETE answered {status}");

    // B hears of it (NOTIFY) and ends its copy: its slot comes back.
    wait_for_slot(
        &b,
        &tenant,
        "replica B still holds a session its client ended through A",
    )
    .await?;
    // And the ended id is never rebuilt: not on B, not on A.
    for gw in [&b, &a] {
        assert_not_served(gw, &tenant, &id).await?;
    }
    a.stop().await?;
    b.stop().await
}

/// Waits (bounded) until `gw` has a session slot for `tenant` again, which it lacks while
/// it holds its copy of an ended session (at one session per tenant). Asked with new
/// sessions, not the ended one, so that no request of that session is in flight while the
/// copy closes.
async fn wait_for_slot(gw: &TestGateway, tenant: &CreatedTenant, why: &str) -> anyhow::Result<()> {
    let mut fresh = RoundRobin::new([gw, gw], tenant);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let got = fresh.post(&init_body()).await?;
        if got.status == StatusCode::OK {
            return Ok(());
        }
        assert_eq!(got.status, StatusCode::TOO_MANY_REQUESTS, "{}", got.text);
        assert!(tokio::time::Instant::now() < deadline, "{why}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Asserts that `gw` answers 404 for session `id`, twice (the second time from what the
/// first taught it).
async fn assert_not_served(
    gw: &TestGateway,
    tenant: &CreatedTenant,
    id: &str,
) -> anyhow::Result<()> {
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let mut ended = RoundRobin::new([gw, gw], tenant);
    ended.session = Some(id.to_owned());
    for _ in 0..2 {
        let got = ended.post(&list).await?;
        assert_eq!(got.status, StatusCode::NOT_FOUND, "{}", got.text);
    }
    Ok(())
}

#[tokio::test]
async fn a_session_end_missed_by_a_replica_is_caught_up_and_never_rebuilt() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let db = Arc::new(FreshDatabase::create().await?);
    let url = db.url.clone();
    let store = Arc::new(TestStore::Postgres(db));
    let mut config = Config::for_tests();
    config.mcp_max_sessions_per_tenant = 1;
    let a = TestGateway::start_on(config.clone(), store.clone()).await?;
    let b = TestGateway::start_on(config.clone(), store.clone()).await?;
    let tenant = tenant_on(&a, &upstream).await?;
    // A session opened on A and copied to B, as in the test above.
    let mut client = RoundRobin::new([&a, &b], &tenant);
    let id = initialise(&mut client).await?;
    let list = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"});
    let got = client.post(&list).await?;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);

    // The session ends while no replica listens: B never hears the announcement.
    drop_listeners(&url, 2).await?;
    let status = end_session(&a, &tenant, &id).await?;
    assert!((200..300).contains(&status), "DELETE answered {status}");
    // B's listener reconnects, checks its open copies against the record, ends this one.
    wait_for_slot(&b, &tenant, "replica B kept a session whose end it missed").await?;
    assert_not_served(&b, &tenant, &id).await?;

    // A replica started after the end heard nothing of it; the record is enough. A session
    // still open is rebuilt there as usual.
    let mut live = RoundRobin::new([&a, &a], &tenant);
    let live_id = initialise(&mut live).await?;
    let c = TestGateway::start_on(config, store).await?;
    assert_not_served(&c, &tenant, &id).await?;
    let mut on_c = RoundRobin::new([&c, &c], &tenant);
    on_c.session = Some(live_id);
    let got = on_c.post(&list).await?;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    for gw in [a, b, c] {
        gw.stop().await?;
    }
    Ok(())
}

#[tokio::test]
async fn a_session_its_client_ended_stays_ended_after_a_restart() -> anyhow::Result<()> {
    let upstream = TestUpstream::start().await?;
    let store = Arc::new(TestStore::Sqlite(tempfile::tempdir()?));
    let first = TestGateway::start_on(Config::for_tests(), store.clone()).await?;
    let tenant = tenant_on(&first, &upstream).await?;
    let ended = initialise(&mut RoundRobin::new([&first, &first], &tenant)).await?;
    let kept = initialise(&mut RoundRobin::new([&first, &first], &tenant)).await?;
    let status = end_session(&first, &tenant, &ended).await?;
    assert!((200..300).contains(&status), "DELETE answered {status}");
    first.stop().await?;

    let second = TestGateway::start_on(Config::for_tests(), store).await?;
    // An `initialize` in the ended session that names a session-less version in its
    // header: rmcp takes any `initialize` into the session it names, whatever the header
    // says, so the store's record of the end must be asked for it too. First thing after
    // the restart, while only the store knows of the end.
    let mut initialize = init_body();
    initialize["params"]["protocolVersion"] = json!("2026-07-28");
    let auth = format!("Bearer {}", tenant.api_key);
    let headers = [
        ("authorization", auth.as_str()),
        ("content-type", "application/json"),
        ("accept", "application/json, text/event-stream"),
        ("mcp-protocol-version", "2026-07-28"),
        ("mcp-session-id", ended.as_str()),
    ];
    let url = second.url(&format!("/mcp/{}", tenant.id));
    let got = raw(
        &second.http,
        Method::POST,
        &url,
        &headers,
        Some(&initialize),
    )
    .await?;
    assert_eq!(got.status, StatusCode::NOT_FOUND, "{}", got.text);
    assert_not_served(&second, &tenant, &ended).await?;
    let mut client = RoundRobin::new([&second, &second], &tenant);
    client.session = Some(kept);
    let got = client.post(&call(3, "still here")).await?;
    assert_eq!(got.status, StatusCode::OK, "{}", got.text);
    assert!(got.text.contains("still here"), "{}", got.text);
    second.stop().await
}
