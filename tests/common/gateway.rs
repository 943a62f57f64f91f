//! `TestGateway`: the real service on a loopback port 0, on a fresh store, with a reqwest
//! client and helpers for the admin and tenant flows. Stops (and drains) on `stop()`.

use std::net::SocketAddr;

use anyhow::Context;
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};
use switchboard::config::Config;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::database::FreshDatabase;

/// Where a test gateway keeps its data.
pub enum TestStore {
    /// An embedded SQLite file in a temporary folder.
    Sqlite(tempfile::TempDir),
    /// A fresh PostgreSQL database, dropped with the gateway's owner.
    Postgres(std::sync::Arc<FreshDatabase>),
    /// A database URL the test manages itself (a private cluster it stops and starts).
    External(String),
}

pub struct TestGateway {
    pub base: String,
    pub addr: SocketAddr,
    pub config: Config,
    pub http: reqwest::Client,
    shutdown: CancellationToken,
    server: Option<JoinHandle<anyhow::Result<()>>>,
    pub store: std::sync::Arc<TestStore>,
    /// The gateway's tenant runtime, for assertions on actors and for fault injection.
    pub tenants: switchboard::tenants::runtime::TenantRuntime,
}

/// A tenant created through the admin API, with its secrets as the test knows them.
#[derive(Debug, Clone)]
pub struct CreatedTenant {
    pub id: String,
    pub api_key: String,
    pub token: String,
}

impl TestGateway {
    /// On a fresh embedded store with the test configuration.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(Config::for_tests()).await
    }

    pub async fn start_with(config: Config) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        Self::start_on(config, std::sync::Arc::new(TestStore::Sqlite(dir))).await
    }

    /// On a fresh PostgreSQL database.
    pub async fn start_postgres(config: Config) -> anyhow::Result<Self> {
        let db = std::sync::Arc::new(FreshDatabase::create().await?);
        Self::start_on(config, std::sync::Arc::new(TestStore::Postgres(db))).await
    }

    /// On `store` (shared with an earlier gateway to test restarts).
    pub async fn start_on(
        mut config: Config,
        store: std::sync::Arc<TestStore>,
    ) -> anyhow::Result<Self> {
        config.database_url = Some(match store.as_ref() {
            TestStore::Sqlite(dir) => format!("sqlite://{}", dir.path().join("sb.db").display()),
            TestStore::Postgres(db) => db.url.clone(),
            TestStore::External(url) => url.clone(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let app = switchboard::app::App::build(config.clone(), shutdown.clone()).await?;
        let tenants = app.state.tenants.clone();
        let server = tokio::spawn(app.serve(listener));
        Ok(Self {
            base: format!("http://{addr}"),
            addr,
            config,
            http: reqwest::Client::new(),
            shutdown,
            server: Some(server),
            store,
            tenants,
        })
    }

    /// Drains and waits for the service to stop.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server.await??;
        }
        Ok(())
    }

    /// Stops this gateway (its actors flush their audit buffers) and starts another on the
    /// same store and configuration.
    pub async fn restart(self) -> anyhow::Result<Self> {
        let (store, config) = (self.store.clone(), self.config.clone());
        self.stop().await?;
        Self::start_on(config, store).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// [`Self::send`] with the operator's key as the bearer, and no other header.
    pub async fn send_as_admin(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, reqwest::header::HeaderMap, Value)> {
        let admin = format!("Bearer {}", self.config.admin_api_key.expose());
        self.send(method, path, &[("authorization", &admin)], body)
            .await
    }

    /// Sends a request; returns status, headers and the JSON body (Null when empty).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> anyhow::Result<(StatusCode, reqwest::header::HeaderMap, Value)> {
        let mut req = self.http.request(method, self.url(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.json(&body);
        }
        Self::answer(req).await
    }

    /// [`Self::send`] with `body` sent as written, as `application/json`: for bodies that a
    /// `Value` cannot hold (a key twice) or that are not JSON at all.
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> anyhow::Result<(StatusCode, reqwest::header::HeaderMap, Value)> {
        let mut req = self
            .http
            .request(method, self.url(path))
            .header("content-type", "application/json")
            .body(body.to_owned());
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        Self::answer(req).await
    }

    /// Sends `req`; returns status, headers and the JSON body (Null when empty).
    async fn answer(
        req: reqwest::RequestBuilder,
    ) -> anyhow::Result<(StatusCode, reqwest::header::HeaderMap, Value)> {
        let resp = req.send().await?;
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await?;
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .with_context(|| format!("non-JSON body: {}", String::from_utf8_lossy(&bytes)))?
        };
        Ok((status, headers, json))
    }

    /// The tenant's audit trail (its newest page), of `action` only if given, as an admin
    /// reads it.
    pub async fn audit_items(
        &self,
        tenant_id: &str,
        action: Option<&str>,
    ) -> anyhow::Result<Vec<Value>> {
        let mut path = format!("/api/tenants/{tenant_id}/audit");
        if let Some(action) = action {
            path.push_str(&format!("?action={action}"));
        }
        let (status, _, body) = self.send_as_admin(Method::GET, &path, None).await?;
        anyhow::ensure!(status == StatusCode::OK, "audit: {status} {body}");
        Ok(body["items"].as_array().cloned().unwrap_or_default())
    }

    /// The tenant's audit items of `action` (its newest page) once there are at least `n`
    /// (waiting up to 10 s): refused credentials are queued for the audit writer's batches,
    /// so theirs are written shortly after their answer, not before it.
    pub async fn wait_for_audit(
        &self,
        tenant_id: &str,
        action: &str,
        n: usize,
    ) -> anyhow::Result<Vec<Value>> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let items = self.audit_items(tenant_id, Some(action)).await?;
            if items.len() >= n {
                return Ok(items);
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "{} of {n} {action} events in {tenant_id}'s audit trail",
                items.len()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// `POST /api/auth/token` with the admin key: the whole answer.
    pub async fn admin_token_answer(
        &self,
    ) -> anyhow::Result<(StatusCode, reqwest::header::HeaderMap, Value)> {
        let key = self.config.admin_api_key.expose().to_owned();
        self.send(
            Method::POST,
            "/api/auth/token",
            &[],
            Some(json!({ "key": key })),
        )
        .await
    }

    pub async fn admin_token(&self) -> anyhow::Result<String> {
        let (status, _, body) = self.admin_token_answer().await?;
        anyhow::ensure!(status == StatusCode::OK, "admin token: {status} {body}");
        Ok(body["token"].as_str().context("token")?.to_owned())
    }

    /// Creates a tenant with `body` (as an admin) and fetches its tenant JWT.
    pub async fn create_tenant(&self, body: Value) -> anyhow::Result<CreatedTenant> {
        let (id, api_key) = self.register_tenant(body).await?;
        let token = self.tenant_token(&api_key).await?;
        Ok(CreatedTenant { id, api_key, token })
    }

    /// Creates a tenant with `body` (as an admin), and nothing more: its id and API key,
    /// which nothing has used yet (no token fetched, so no credential cached).
    pub async fn register_tenant(&self, body: Value) -> anyhow::Result<(String, String)> {
        let (status, _, created) = self
            .send_as_admin(Method::POST, "/api/tenants", Some(body))
            .await?;
        anyhow::ensure!(status == StatusCode::CREATED, "create: {status} {created}");
        let id = created["tenantId"].as_str().context("tenantId")?.to_owned();
        let api_key = created["apiKey"].as_str().context("apiKey")?.to_owned();
        Ok((id, api_key))
    }

    /// `POST /api/tenant/{id}/tool` with the tenant's API key.
    pub async fn tool(
        &self,
        tenant: &CreatedTenant,
        body: Value,
    ) -> anyhow::Result<(StatusCode, reqwest::header::HeaderMap, Value)> {
        let path = format!("/api/tenant/{}/tool", tenant.id);
        self.send(
            Method::POST,
            &path,
            &[("x-api-key", &tenant.api_key)],
            Some(body),
        )
        .await
    }

    pub async fn tenant_token(&self, api_key: &str) -> anyhow::Result<String> {
        let (status, _, body) = self
            .send(
                Method::POST,
                "/api/auth/tenant-token",
                &[("x-api-key", api_key)],
                None,
            )
            .await?;
        anyhow::ensure!(status == StatusCode::OK, "tenant token: {status} {body}");
        Ok(body["token"].as_str().context("token")?.to_owned())
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}
