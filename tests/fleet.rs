//! Several replicas on one fresh PostgreSQL database, all in this process on loopback
//! port 0: changes made through one replica reach the others (LISTEN/NOTIFY), replicas
//! starting together migrate once, rate limits are shared by the fleet, and a replica
//! drained under load keeps every audit event it acknowledged.
//!
//! Waiting: "within one second" is asserted by polling with a 1 s deadline and a 20 ms
//! interval ([`eventually`]). The change arrives by a notification the test cannot hook,
//! so polling against a deadline is the honest form of the requirement.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use common::database::{drop_listeners, FreshDatabase};
use common::gateway::{CreatedTenant, TestGateway, TestStore};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use switchboard::config::Config;

const ONE_SECOND: Duration = Duration::from_secs(1);

/// `n` replicas on one fresh database, started one after the other.
async fn fleet(n: usize) -> anyhow::Result<Vec<TestGateway>> {
    let db = Arc::new(FreshDatabase::create().await?);
    let store = Arc::new(TestStore::Postgres(db));
    let mut replicas = Vec::new();
    for _ in 0..n {
        replicas.push(TestGateway::start_on(Config::for_tests(), store.clone()).await?);
    }
    Ok(replicas)
}

/// Polls `check` every 20 ms until it holds or `limit` passes.
async fn eventually<F, Fut>(limit: Duration, mut check: F) -> anyhow::Result<bool>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await? {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn admin(gw: &TestGateway) -> String {
    format!("Bearer {}", gw.config.admin_api_key.expose())
}

fn tenant_body() -> Value {
    json!({"name": "Fleet", "integrationKey": "hubspot", "integrationAppToken": "ia-token"})
}

/// A tool call with the tenant's API key; the test upstream is unreachable, so an
/// accepted call answers 502/503 (and starts the tenant's actor on that replica).
async fn call_tool(gw: &TestGateway, tenant_id: &str, api_key: &str) -> anyhow::Result<StatusCode> {
    let path = format!("/api/tenant/{tenant_id}/tool");
    let body = json!({"method": "echo", "params": {}});
    let (status, _, _) = gw
        .send(Method::POST, &path, &[("x-api-key", api_key)], Some(body))
        .await?;
    Ok(status)
}

async fn active_tenants(gw: &TestGateway) -> anyhow::Result<u64> {
    let (_, _, body) = gw.send(Method::GET, "/health", &[], None).await?;
    Ok(body["activeTenants"].as_u64().unwrap_or(u64::MAX))
}

/// Starts the tenant's actor on every replica and checks it runs there.
async fn warm(replicas: &[TestGateway], tenant: &CreatedTenant) -> anyhow::Result<()> {
    for gw in replicas {
        let status = call_tool(gw, &tenant.id, &tenant.api_key).await?;
        anyhow::ensure!(status != StatusCode::UNAUTHORIZED, "warm-up refused");
        anyhow::ensure!(active_tenants(gw).await? == 1, "no actor on {}", gw.base);
    }
    Ok(())
}

/// Asserts that within one second every replica in `others` has stopped the tenant's
/// actor. Only the NOTIFY listener stops an actor on a replica that did not make the
/// change, so this fails without it.
async fn actors_stop(others: &[&TestGateway], what: &str) -> anyhow::Result<()> {
    for gw in others {
        let stopped = eventually(ONE_SECOND, || async { Ok(active_tenants(gw).await? == 0) });
        anyhow::ensure!(stopped.await?, "{what}: actor still running on {}", gw.base);
    }
    Ok(())
}

/// Asserts that within one second `api_key` is refused by every replica in `others`.
async fn key_refused(others: &[&TestGateway], api_key: &str, what: &str) -> anyhow::Result<()> {
    for gw in others {
        let refused = eventually(ONE_SECOND, || async {
            let (status, _, _) = gw
                .send(
                    Method::POST,
                    "/api/auth/tenant-token",
                    &[("x-api-key", api_key)],
                    None,
                )
                .await?;
            Ok(status == StatusCode::UNAUTHORIZED)
        });
        anyhow::ensure!(refused.await?, "{what}: key still accepted by {}", gw.base);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_through_one_replica_reach_every_replica() -> anyhow::Result<()> {
    let replicas = fleet(3).await?;
    let [a, b, c] = [&replicas[0], &replicas[1], &replicas[2]];
    let tenant = a.create_tenant(tenant_body()).await?;

    // A key rotated through A is refused by B and C, whose actors are rebuilt.
    warm(&replicas, &tenant).await?;
    let path = format!("/api/tenants/{}/api-key", tenant.id);
    let (status, _, rotated) = a
        .send(Method::POST, &path, &[("authorization", &admin(a))], None)
        .await?;
    anyhow::ensure!(status == StatusCode::OK, "rotate: {status} {rotated}");
    key_refused(&[b, c], &tenant.api_key, "rotate").await?;
    actors_stop(&[b, c], "rotate").await?;
    let new_key = rotated["apiKey"].as_str().unwrap_or_default().to_owned();
    b.tenant_token(&new_key).await?;
    c.tenant_token(&new_key).await?;
    let tenant = CreatedTenant {
        api_key: new_key,
        ..tenant
    };

    // A changed upstream URL (through A) stops the running actor on B and C, so their
    // next call builds one on the new URL: a real upstream this time, which every replica
    // then reaches.
    warm(&replicas, &tenant).await?;
    let upstream = common::upstream::TestUpstream::start().await?;
    let path = format!("/api/tenants/{}", tenant.id);
    let patch = json!({"upstreamUrl": upstream.url});
    let (status, _, body) = a
        .send(
            Method::PATCH,
            &path,
            &[("authorization", &admin(a))],
            Some(patch),
        )
        .await?;
    anyhow::ensure!(status == StatusCode::OK, "patch: {status} {body}");
    actors_stop(&[b, c], "upstreamUrl change").await?;
    for gw in [b, c] {
        let (_, _, view) = gw
            .send(Method::GET, &path, &[("authorization", &admin(gw))], None)
            .await?;
        anyhow::ensure!(view["upstreamUrl"] == upstream.url.as_str(), "{view}");
    }
    let echo = json!({"method": "echo", "params": {"text": "hi"}});
    let tool_path = format!("/api/tenant/{}/tool", tenant.id);
    for gw in [a, b, c] {
        let (status, _, body) = gw
            .send(
                Method::POST,
                &tool_path,
                &[("x-api-key", &tenant.api_key)],
                Some(echo.clone()),
            )
            .await?;
        anyhow::ensure!(status == StatusCode::OK, "{}: {status} {body}", gw.base);
    }
    anyhow::ensure!(
        upstream.initializes() == 3,
        "each replica connected to the new upstream: {}",
        upstream.initializes()
    );

    // A tenant deleted through B stops working on A and C.
    warm(&replicas, &tenant).await?;
    let (status, _, _) = b
        .send(Method::DELETE, &path, &[("authorization", &admin(b))], None)
        .await?;
    anyhow::ensure!(status.is_success(), "delete: {status}");
    key_refused(&[a, c], &tenant.api_key, "delete").await?;
    actors_stop(&[a, c], "delete").await?;
    for gw in replicas {
        gw.stop().await?;
    }
    Ok(())
}

/// With its fleet listener cut off (the database restarted, the listener in its back-off),
/// a replica hears no change another one makes: what it cached of a credential must not
/// stand for that while, or a key rotated elsewhere would go on working here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_not_listening_takes_no_cached_credential_as_current() -> anyhow::Result<()> {
    let db = Arc::new(FreshDatabase::create().await?);
    let url = db.url.clone();
    let store = Arc::new(TestStore::Postgres(db));
    let a = TestGateway::start_on(Config::for_tests(), store.clone()).await?;
    let b = TestGateway::start_on(Config::for_tests(), store).await?;
    let mut tenant = a.create_tenant(tenant_body()).await?;
    // B's listener reconnects 125-250 ms after it is cut off, and a reconnect drops B's
    // cache whether or not it trusts it: a round proves something only if the call on B
    // came before any listener was back, and is made again if not.
    for _ in 0..5 {
        // B reads the key, and caches it.
        let status = call_tool(&b, &tenant.id, &tenant.api_key).await?;
        assert_ne!(status, StatusCode::UNAUTHORIZED);
        drop_listeners(&url, 2).await?;
        // The listeners' clients see their connections end (the server says so as it
        // ends them).
        tokio::time::sleep(Duration::from_millis(20)).await;
        let rotate = format!("/api/tenants/{}/api-key", tenant.id);
        let (status, _, body) = a
            .send(
                Method::POST,
                &rotate,
                &[("authorization", &admin(&a))],
                None,
            )
            .await?;
        assert_eq!(status, StatusCode::OK, "{body}");
        let status = call_tool(&b, &tenant.id, &tenant.api_key).await?;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "the old key worked on B");
        let back = listening(&url).await?;
        tenant.api_key = body["apiKey"].as_str().context("a new key")?.to_owned();
        if back == 0 {
            a.stop().await?;
            return b.stop().await;
        }
    }
    anyhow::bail!("in five rounds a listener was back before the call on B")
}

/// The fleet listeners holding their LISTEN session on the database at `url` now.
async fn listening(url: &str) -> anyhow::Result<i64> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let conn = tokio::spawn(conn);
    let count: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() \
             AND datname = current_database() AND query LIKE 'LISTEN %'",
            &[],
        )
        .await?
        .get(0);
    drop(client);
    let _ = conn.await;
    Ok(count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_together_migrate_once() -> anyhow::Result<()> {
    let db = Arc::new(FreshDatabase::create().await?);
    let store = Arc::new(TestStore::Postgres(db.clone()));
    let start = || TestGateway::start_on(Config::for_tests(), store.clone());
    // Every migration creates tables without IF NOT EXISTS: applied twice, the second
    // replica would fail to start. All three coming up is the "exactly once" evidence;
    // the bookkeeping table holds every migration (its version is its key, so it cannot
    // say how many times one ran).
    let (a, b, c) = tokio::join!(start(), start(), start());
    let replicas = [a?, b?, c?];
    for gw in &replicas {
        let (status, _, _) = gw.send(Method::GET, "/ready", &[], None).await?;
        anyhow::ensure!(status == StatusCode::OK, "{} not ready", gw.base);
    }
    let (client, conn) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await?;
    let driver = tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await?;
    let got: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let want: Vec<i64> = switchboard::store::POSTGRES_MIGRATIONS
        .iter()
        .map(|m| m.version)
        .collect();
    anyhow::ensure!(got == want, "schema_migrations: {got:?}");
    drop(client);
    driver.abort();
    for gw in replicas {
        gw.stop().await?;
    }
    Ok(())
}

/// Fires `n` tool calls at once at `gw`; returns how many the rate limit let through.
async fn burst_through(
    gw: &TestGateway,
    tenant: &CreatedTenant,
    n: usize,
) -> anyhow::Result<usize> {
    let calls = (0..n).map(|_| call_tool(gw, &tenant.id, &tenant.api_key));
    let statuses = futures::future::try_join_all(calls).await?;
    Ok(statuses
        .iter()
        .filter(|s| **s != StatusCode::TOO_MANY_REQUESTS)
        .count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_replica_takes_its_share_of_a_rate_limit() -> anyhow::Result<()> {
    let mut replicas = fleet(2).await?;
    let counted = eventually(Duration::from_secs(5), || async {
        Ok(replicas.iter().all(|gw| gw.tenants.replica_count() == 2))
    });
    anyhow::ensure!(counted.await?, "replicas did not count each other");
    let mut body = tenant_body();
    body["rateLimit"] = json!({"requestsPerSecond": 10, "burst": 10});
    let tenant = replicas[0].create_tenant(body).await?;
    // Alone, each replica would let 10 of 20 through; with two, each takes 5 (plus what
    // refills while the burst is in flight).
    let (first, second) = tokio::join!(
        burst_through(&replicas[0], &tenant, 20),
        burst_through(&replicas[1], &tenant, 20)
    );
    let (first, second) = (first?, second?);
    anyhow::ensure!((4..=7).contains(&first), "replica 1 let {first} through");
    anyhow::ensure!((4..=7).contains(&second), "replica 2 let {second} through");
    // A replica that leaves says so: the other goes back to the whole limit.
    let leaving = replicas.remove(1);
    leaving.stop().await?;
    let alone = eventually(Duration::from_secs(2), || async {
        Ok(replicas[0].tenants.replica_count() == 1)
    });
    anyhow::ensure!(alone.await?, "the remaining replica still counts two");
    replicas.remove(0).stop().await?;
    Ok(())
}

/// Sends tool calls to `base` until it stops answering; returns the request ids of the
/// calls it acknowledged (any answer from the tool handler, which audits every call;
/// not the `draining` refusals, which never reach it).
async fn load(
    base: String,
    tenant: CreatedTenant,
    worker: usize,
    counter: Arc<AtomicUsize>,
) -> Vec<String> {
    let (api_key, tenant_id) = (tenant.api_key, tenant.id);
    let http = reqwest::Client::new();
    let mut acked = Vec::new();
    for i in 0..400 {
        let request_id = format!("load-{worker}-{i}");
        let sent = http
            .post(format!("{base}/api/tenant/{tenant_id}/tool"))
            .header("x-api-key", &api_key)
            .header("x-request-id", &request_id)
            .json(&json!({"method": "echo", "params": {}}))
            .send()
            .await;
        let Ok(resp) = sent else { break };
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        if body["error"]["code"] == "draining" {
            break;
        }
        acked.push(request_id);
        counter.fetch_add(1, Ordering::Relaxed);
    }
    acked
}

/// Every tool-call request id in the tenant's audit trail, read through `gw`.
async fn audited_ids(gw: &TestGateway, tenant_id: &str) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut cursor = String::new();
    loop {
        let path = format!("/api/tenants/{tenant_id}/audit?action=tool.call&limit=500{cursor}");
        let (status, _, page) = gw
            .send(Method::GET, &path, &[("authorization", &admin(gw))], None)
            .await?;
        anyhow::ensure!(status == StatusCode::OK, "audit: {status} {page}");
        for item in page["items"].as_array().into_iter().flatten() {
            ids.extend(item["requestId"].as_str().map(str::to_owned));
        }
        match page["nextCursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return Ok(ids),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_drained_under_load_keeps_its_audit_and_the_rest_serve() -> anyhow::Result<()> {
    let mut replicas = fleet(2).await?;
    let tenant = replicas[1].create_tenant(tenant_body()).await?;
    let a = replicas.remove(0);
    let counter = Arc::new(AtomicUsize::new(0));
    let workers: Vec<_> = (0..4)
        .map(|w| tokio::spawn(load(a.base.clone(), tenant.clone(), w, counter.clone())))
        .collect();
    // Once the load is well under way, drain A as SIGTERM would, with calls in flight.
    let busy = eventually(Duration::from_secs(10), || async {
        Ok(counter.load(Ordering::Relaxed) >= 40)
    });
    anyhow::ensure!(busy.await?, "the load never got going");
    a.stop().await?;
    let mut acked = Vec::new();
    for worker in workers {
        acked.extend(worker.await?);
    }
    anyhow::ensure!(acked.len() >= 10, "only {} calls acknowledged", acked.len());
    let b = &replicas[0];
    // B keeps serving: the tenant's credentials and its admin view still work there.
    b.tenant_token(&tenant.api_key).await?;
    let status = call_tool(b, &tenant.id, &tenant.api_key).await?;
    anyhow::ensure!(status != StatusCode::UNAUTHORIZED, "B refused the tenant");
    let audited = audited_ids(b, &tenant.id).await?;
    let lost: Vec<_> = acked.iter().filter(|id| !audited.contains(id)).collect();
    anyhow::ensure!(
        lost.is_empty(),
        "{} acknowledged calls not audited: {lost:?}",
        lost.len()
    );
    replicas.remove(0).stop().await?;
    Ok(())
}
