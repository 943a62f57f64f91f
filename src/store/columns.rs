//! The column values both backends store, and their conversion to and from the trait's
//! types. Keeping the mapping here (timestamps as unix microseconds, the transport as
//! text, the rate limit as two nullable integers, `detail` as JSON text) makes the two
//! backends agree by construction; each backend only moves these plain values in and out.

use chrono::{DateTime, Utc};

use super::{
    AuditRecord, RateLimit, StoreError, StoreResult, TenantChanges, TenantRecord, UpstreamTransport,
};

/// The tenant columns in the order every `SELECT` and `RETURNING` lists them.
pub(super) const TENANT_COLUMNS: &str = "id, name, integration_key, sealed_token, api_key_hash, \
    upstream_url, upstream_transport, enabled, rate_rps, rate_burst, created_at, updated_at, version";

/// The audit columns in the order every `SELECT` lists them and every `INSERT` binds them.
pub(super) const AUDIT_COLUMNS: &str = "id, at, tenant_id, action, actor, outcome, request_id, \
    tool, latency_ms, request_bytes, response_bytes, detail";

/// A `tenants` row as plain column values.
#[derive(Debug, Clone)]
pub(super) struct TenantRow {
    pub id: String,
    pub name: Option<String>,
    pub integration_key: String,
    pub sealed_token: Vec<u8>,
    pub api_key_hash: Vec<u8>,
    pub upstream_url: Option<String>,
    pub upstream_transport: String,
    pub enabled: bool,
    pub rate_rps: Option<i32>,
    pub rate_burst: Option<i32>,
    pub created_at: i64,
    pub updated_at: i64,
    pub version: i64,
}

impl TenantRow {
    pub fn from_record(t: &TenantRecord) -> StoreResult<Self> {
        let (rate_rps, rate_burst) = rate_columns(t.rate_limit)?;
        Ok(Self {
            id: t.id.clone(),
            name: t.name.clone(),
            integration_key: t.integration_key.clone(),
            sealed_token: t.sealed_token.clone(),
            api_key_hash: t.api_key_hash.clone(),
            upstream_url: t.upstream_url.clone(),
            upstream_transport: t.upstream_transport.as_str().to_owned(),
            enabled: t.enabled,
            rate_rps,
            rate_burst,
            created_at: micros(t.created_at),
            updated_at: micros(t.updated_at),
            version: t.version,
        })
    }

    pub fn into_record(self) -> StoreResult<TenantRecord> {
        let upstream_transport =
            UpstreamTransport::parse(&self.upstream_transport).ok_or_else(|| {
                StoreError::Backend("unknown upstream_transport in a tenant row".into())
            })?;
        Ok(TenantRecord {
            id: self.id,
            name: self.name,
            integration_key: self.integration_key,
            sealed_token: self.sealed_token,
            api_key_hash: self.api_key_hash,
            upstream_url: self.upstream_url,
            upstream_transport,
            enabled: self.enabled,
            rate_limit: rate_limit(self.rate_rps, self.rate_burst)?,
            created_at: from_micros(self.created_at)?,
            updated_at: from_micros(self.updated_at)?,
            version: self.version,
        })
    }
}

/// Text from a client (a tool name, a path's tenant id) as a column value. PostgreSQL's `TEXT`
/// refuses the NUL character, and one refused row fails its whole audit batch, which would be
/// retried for ever: NUL is stored as U+FFFD, in both backends alike.
fn storable_text(text: &str) -> String {
    text.replace('\0', "\u{FFFD}")
}

/// An `audit_events` row as plain column values.
#[derive(Debug, Clone)]
pub(super) struct AuditRow {
    pub id: String,
    pub at: i64,
    pub tenant_id: Option<String>,
    pub action: String,
    pub actor: String,
    pub outcome: String,
    pub request_id: Option<String>,
    pub tool: Option<String>,
    pub latency_ms: Option<i64>,
    pub request_bytes: Option<i64>,
    pub response_bytes: Option<i64>,
    pub detail: Option<String>,
}

impl AuditRow {
    pub fn from_record(e: &AuditRecord) -> StoreResult<Self> {
        let detail = e
            .detail
            .as_ref()
            .map(serde_json::to_string)
            .transpose()
            .map_err(|_| StoreError::Backend("audit detail is not serialisable".into()))?;
        Ok(Self {
            id: e.id.clone(),
            at: micros(e.at),
            tenant_id: e.tenant_id.as_deref().map(storable_text),
            action: storable_text(&e.action),
            actor: storable_text(&e.actor),
            outcome: storable_text(&e.outcome),
            request_id: e.request_id.as_deref().map(storable_text),
            tool: e.tool.as_deref().map(storable_text),
            latency_ms: e.latency_ms,
            request_bytes: e.request_bytes,
            response_bytes: e.response_bytes,
            detail,
        })
    }

    pub fn into_record(self) -> StoreResult<AuditRecord> {
        let detail = self
            .detail
            .as_deref()
            .map(serde_json::from_str)
            .transpose()
            .map_err(|_| StoreError::Backend("audit detail in the database is not JSON".into()))?;
        Ok(AuditRecord {
            id: self.id,
            at: from_micros(self.at)?,
            tenant_id: self.tenant_id,
            action: self.action,
            actor: self.actor,
            outcome: self.outcome,
            request_id: self.request_id,
            tool: self.tool,
            latency_ms: self.latency_ms,
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
            detail,
        })
    }
}

/// The stored form of a timestamp: unix microseconds (sub-microsecond digits are dropped).
pub(super) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(super) fn from_micros(us: i64) -> StoreResult<DateTime<Utc>> {
    DateTime::from_timestamp_micros(us)
        .ok_or_else(|| StoreError::Backend("timestamp out of range in the database".into()))
}

/// The current time as the database stores it.
pub(super) fn now_micros() -> i64 {
    micros(Utc::now())
}

fn rate_columns(limit: Option<RateLimit>) -> StoreResult<(Option<i32>, Option<i32>)> {
    let Some(limit) = limit else {
        return Ok((None, None));
    };
    let to_i32 = |v: u32| {
        i32::try_from(v).map_err(|_| StoreError::Backend("rate limit out of range".into()))
    };
    Ok((
        Some(to_i32(limit.requests_per_second)?),
        Some(to_i32(limit.burst)?),
    ))
}

fn rate_limit(rps: Option<i32>, burst: Option<i32>) -> StoreResult<Option<RateLimit>> {
    let to_u32 = |v: i32| {
        u32::try_from(v)
            .map_err(|_| StoreError::Backend("negative rate limit in the database".into()))
    };
    match (rps, burst) {
        (Some(rps), Some(burst)) => Ok(Some(RateLimit {
            requests_per_second: to_u32(rps)?,
            burst: to_u32(burst)?,
        })),
        _ => Ok(None),
    }
}

/// `current` with `changes` applied, its version bumped and `updated_at` set to `now`: the
/// row an optimistic `update_tenant` writes (guarded by the old version).
pub(super) fn apply_changes(
    current: TenantRow,
    changes: &TenantChanges,
    now: i64,
) -> StoreResult<TenantRow> {
    let mut row = current;
    if let Some(name) = &changes.name {
        row.name = name.clone();
    }
    if let Some(key) = &changes.integration_key {
        row.integration_key = key.clone();
    }
    if let Some(token) = &changes.sealed_token {
        row.sealed_token = token.clone();
    }
    if let Some(url) = &changes.upstream_url {
        row.upstream_url = url.clone();
    }
    if let Some(transport) = changes.upstream_transport {
        row.upstream_transport = transport.as_str().to_owned();
    }
    if let Some(enabled) = changes.enabled {
        row.enabled = enabled;
    }
    if let Some(limit) = changes.rate_limit {
        (row.rate_rps, row.rate_burst) = rate_columns(limit)?;
    }
    row.version += 1;
    row.updated_at = now;
    Ok(row)
}
