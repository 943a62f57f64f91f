//! Configuration: environment variables (and `.env`), with the same names as command-line
//! flags (`PORT` is also `--port`). [`RawConfig`] is what clap parses; [`Config`] is the
//! validated form the rest of the service reads. Secrets live in [`Secret`] so that no
//! `Debug` or log line can print them.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use clap::{Args, ValueEnum};

/// A secret string: `Debug` prints a placeholder, never the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AppEnv {
    Development,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

/// `TENANT_AUTH`: whether a tenant call needs one credential or both (API.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TenantAuthMode {
    Either,
    Both,
}

/// The settings as given. Every field is also an environment variable of the same name.
/// No `Debug`: several fields are secrets as given.
#[derive(Clone, Args)]
pub struct RawConfig {
    /// `development` generates missing secrets; `production` requires them.
    #[arg(
        long,
        global = true,
        env = "APP_ENV",
        value_enum,
        default_value = "development"
    )]
    pub app_env: AppEnv,
    /// Address to listen on.
    #[arg(long, global = true, env = "HOST", default_value = "0.0.0.0")]
    pub host: IpAddr,
    /// Port to listen on (0 picks a free one).
    #[arg(long, global = true, env = "PORT", default_value_t = 3000)]
    pub port: u16,
    /// Threads running requests and tenant actors; unset: one per CPU the process may use.
    /// Lower it when the gateway shares its machine (README, Performance).
    #[arg(long, global = true, env = "WORKER_THREADS")]
    pub worker_threads: Option<std::num::NonZeroUsize>,
    /// `postgres://…` for PostgreSQL, `sqlite://PATH` for the embedded store; unset: `sqlite://switchboard.db`.
    #[arg(long, global = true, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Connections in the PostgreSQL pool.
    #[arg(long, global = true, env = "DATABASE_POOL_SIZE", default_value_t = 16)]
    pub database_pool_size: usize,
    #[arg(long, global = true, env = "ADMIN_API_KEY", hide_env_values = true)]
    pub admin_api_key: Option<String>,
    /// HS256 secret for admin and tenant JWTs, at least 32 bytes.
    #[arg(long, global = true, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// 32 bytes as 64 hex digits or base64: seals upstream tokens at rest.
    #[arg(long, global = true, env = "ENCRYPTION_KEY", hide_env_values = true)]
    pub encryption_key: Option<String>,
    #[arg(long, global = true, env = "JWT_TTL_SECS", default_value_t = 3600)]
    pub jwt_ttl_secs: u64,
    #[arg(long, global = true, env = "JWT_ISSUER", default_value = "switchboard")]
    pub jwt_issuer: String,
    #[arg(
        long,
        global = true,
        env = "JWT_AUDIENCE",
        default_value = "switchboard"
    )]
    pub jwt_audience: String,
    /// Default upstream MCP endpoint; `integrationKey` is added to its query per tenant.
    #[arg(
        long,
        global = true,
        env = "UPSTREAM_MCP_URL",
        default_value = "https://api.integration.app/mcp"
    )]
    pub upstream_mcp_url: String,
    #[arg(
        long,
        global = true,
        env = "UPSTREAM_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub upstream_timeout_ms: u64,
    #[arg(
        long,
        global = true,
        env = "UPSTREAM_CONNECT_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub upstream_connect_timeout_ms: u64,
    /// Default tenant rate limit, requests per second.
    #[arg(long, global = true, env = "TENANT_RATE_LIMIT", default_value_t = 50)]
    pub tenant_rate_limit: u32,
    #[arg(long, global = true, env = "TENANT_RATE_BURST", default_value_t = 100)]
    pub tenant_rate_burst: u32,
    /// A tenant actor with no call for this long stops and closes its upstream connection.
    #[arg(long, global = true, env = "TENANT_IDLE_SECS", default_value_t = 300)]
    pub tenant_idle_secs: u64,
    /// Upstream calls one tenant may have in flight; past it, 429 `rate_limited` with `Retry-After`.
    #[arg(
        long,
        global = true,
        env = "TENANT_MAX_IN_FLIGHT",
        default_value_t = 256
    )]
    pub tenant_max_in_flight: usize,
    /// A tenant's cached tool list is discovered again after this long.
    #[arg(
        long,
        global = true,
        env = "TOOL_CACHE_TTL_SECS",
        default_value_t = 300
    )]
    pub tool_cache_ttl_secs: u64,
    /// Restarts of one tenant actor allowed within `TENANT_RESTART_WINDOW_SECS` before the
    /// tenant is marked failing.
    #[arg(long, global = true, env = "TENANT_MAX_RESTARTS", default_value_t = 10)]
    pub tenant_max_restarts: u32,
    #[arg(
        long,
        global = true,
        env = "TENANT_RESTART_WINDOW_SECS",
        default_value_t = 60
    )]
    pub tenant_restart_window_secs: u64,
    #[arg(long, global = true, env = "DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,
    #[arg(long, global = true, env = "MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Whole-request timeout; must be above `UPSTREAM_TIMEOUT_MS`.
    #[arg(
        long,
        global = true,
        env = "REQUEST_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub request_timeout_ms: u64,
    /// Comma-separated origins allowed by CORS; none by default.
    #[arg(long, global = true, env = "CORS_ORIGINS", default_value = "")]
    pub cors_origins: String,
    /// `pretty` or `json`; unset: pretty in development, json in production.
    #[arg(long, global = true, env = "LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    #[arg(
        long,
        global = true,
        env = "TENANT_AUTH",
        value_enum,
        default_value = "either"
    )]
    pub tenant_auth: TenantAuthMode,
    /// Take the client address from `X-Forwarded-For` (only behind a proxy you run).
    #[arg(long, global = true, env = "TRUST_PROXY", default_value_t = false, action = clap::ArgAction::Set)]
    pub trust_proxy: bool,
    /// Per client address, against key guessing: token requests and refused tenant
    /// credentials (REST and MCP) and refused admin credentials per second.
    #[arg(long, global = true, env = "AUTH_RATE_LIMIT", default_value_t = 10)]
    pub auth_rate_limit: u32,
    #[arg(long, global = true, env = "AUTH_RATE_BURST", default_value_t = 20)]
    pub auth_rate_burst: u32,
    /// Put tool arguments into the tool-call audit event (off: they may hold personal data).
    #[arg(long, global = true, env = "AUDIT_ARGUMENTS", default_value_t = false, action = clap::ArgAction::Set)]
    pub audit_arguments: bool,
    /// Audit events older than this many days are deleted (0 keeps them forever).
    #[arg(
        long,
        global = true,
        env = "AUDIT_RETENTION_DAYS",
        default_value_t = 90
    )]
    pub audit_retention_days: u32,
    /// Tool-call audit events one tenant actor may hold while the database is slow or down.
    #[arg(
        long,
        global = true,
        env = "AUDIT_BUFFER_SIZE",
        default_value_t = 10_000
    )]
    pub audit_buffer_size: usize,
    #[arg(long, global = true, env = "AUDIT_BATCH_SIZE", default_value_t = 200)]
    pub audit_batch_size: usize,
    /// Bytes all tenants' audit buffers may hold together (while the database is down
    /// every tenant's buffer fills); past it a tenant's oldest events are dropped first.
    #[arg(
        long,
        global = true,
        env = "AUDIT_BUFFER_BYTES",
        default_value_t = 256 * 1024 * 1024
    )]
    pub audit_buffer_bytes: usize,
    /// Tenant credentials (API key hashes and tenant ids) remembered after a lookup.
    #[arg(
        long,
        global = true,
        env = "CREDENTIAL_CACHE_SIZE",
        default_value_t = 10_000
    )]
    pub credential_cache_size: usize,
    /// A remembered credential is trusted without asking the database for this long.
    #[arg(
        long,
        global = true,
        env = "CREDENTIAL_CACHE_TTL_SECS",
        default_value_t = 30
    )]
    pub credential_cache_ttl_secs: u64,
    /// When set, `GET /metrics` needs `Authorization: Bearer <METRICS_TOKEN>`.
    #[arg(long, global = true, env = "METRICS_TOKEN", hide_env_values = true)]
    pub metrics_token: Option<String>,
    /// Distinct tenants, and (tenant, tool) pairs, given their own metric series; the rest
    /// count as "other".
    #[arg(
        long,
        global = true,
        env = "METRICS_MAX_TENANT_SERIES",
        default_value_t = 1000
    )]
    pub metrics_max_tenant_series: usize,
    /// Open MCP sessions (`/mcp/{tenantId}`) allowed in this process, over all tenants.
    #[arg(
        long,
        global = true,
        env = "MCP_MAX_SESSIONS",
        default_value_t = 10_000
    )]
    pub mcp_max_sessions: usize,
    /// Open MCP sessions allowed per tenant in this process.
    #[arg(
        long,
        global = true,
        env = "MCP_MAX_SESSIONS_PER_TENANT",
        default_value_t = 100
    )]
    pub mcp_max_sessions_per_tenant: usize,
    /// An MCP session with no message for this long is closed (within a tenth and
    /// REQUEST_TIMEOUT_MS more).
    #[arg(
        long,
        global = true,
        env = "MCP_SESSION_IDLE_SECS",
        default_value_t = 600
    )]
    pub mcp_session_idle_secs: u64,
    /// Where development mode keeps the secrets it generated, so restarts reuse them.
    #[arg(
        long,
        global = true,
        env = "DEV_SECRETS_FILE",
        default_value = ".switchboard-dev-secrets"
    )]
    pub dev_secrets_file: PathBuf,
}

/// The validated configuration.
#[derive(Clone)]
pub struct Config {
    pub app_env: AppEnv,
    pub listen: SocketAddr,
    /// `None`: tokio's default, one per CPU.
    pub worker_threads: Option<std::num::NonZeroUsize>,
    pub database_url: Option<String>,
    pub database_pool_size: usize,
    pub admin_api_key: Secret,
    pub jwt_secret: Secret,
    /// The 32 raw bytes of `ENCRYPTION_KEY`.
    pub encryption_key: [u8; 32],
    pub jwt_ttl: Duration,
    pub jwt_issuer: String,
    pub jwt_audience: String,
    pub upstream_mcp_url: url::Url,
    pub upstream_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub tenant_rate_limit: u32,
    pub tenant_rate_burst: u32,
    pub tenant_idle: Duration,
    pub tenant_max_in_flight: usize,
    pub tool_cache_ttl: Duration,
    pub tenant_max_restarts: u32,
    pub tenant_restart_window: Duration,
    pub drain_timeout: Duration,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub cors_origins: Vec<String>,
    pub log_format: LogFormat,
    pub tenant_auth: TenantAuthMode,
    pub trust_proxy: bool,
    pub auth_rate_limit: u32,
    pub auth_rate_burst: u32,
    pub audit_arguments: bool,
    pub audit_retention_days: u32,
    pub audit_buffer_size: usize,
    pub audit_batch_size: usize,
    pub audit_buffer_bytes: usize,
    pub credential_cache_size: usize,
    pub credential_cache_ttl: Duration,
    pub metrics_token: Option<Secret>,
    pub metrics_max_tenant_series: usize,
    pub mcp_max_sessions: usize,
    pub mcp_max_sessions_per_tenant: usize,
    pub mcp_session_idle: Duration,
}

/// `TENANT_MAX_IN_FLIGHT` at most: each call in flight holds an upstream request (and, on
/// an upstream that answers with JSON, a connection) open.
pub const MOST_IN_FLIGHT: usize = 10_000;
/// The longest any duration setting may be.
const LONGEST_SETTING_SECS: u64 = 365 * 24 * 3600;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{0} is required when APP_ENV=production")]
    Missing(&'static str),
    #[error("{key} is invalid: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error("could not keep the generated development secrets in {path}: {reason}")]
    DevSecrets { path: String, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// What `switchboard migrate` runs with ([`RawConfig::for_migrate`]). `Debug` shows no
/// database URL (it may hold a password).
pub struct MigrateConfig {
    /// As [`Config::database_url`]: unset means the embedded store's default file.
    pub database_url: Option<String>,
    pub database_pool_size: usize,
    pub log_format: LogFormat,
}

impl fmt::Debug for MigrateConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MigrateConfig")
            .field("database", &self.database_url.as_ref().map(|_| "(set)"))
            .field("database_pool_size", &self.database_pool_size)
            .field("log_format", &self.log_format)
            .finish()
    }
}

/// The secrets that development mode made up because they were missing.
#[derive(Debug, Default)]
pub struct GeneratedSecrets {
    pub names: Vec<&'static str>,
}

impl RawConfig {
    /// The settings `switchboard migrate` needs: the store and the log format, and no
    /// secret, so a pipeline step or init container can run it with only `DATABASE_URL`.
    /// Unlike [`Self::validate`] it never creates the dev secrets file.
    pub fn for_migrate(self) -> Result<MigrateConfig, ConfigError> {
        if self.database_pool_size == 0 {
            return Err(invalid("DATABASE_POOL_SIZE", "must be above 0"));
        }
        Ok(MigrateConfig {
            log_format: self.chosen_log_format(),
            database_url: self.database_url.filter(|u| !u.is_empty()),
            database_pool_size: self.database_pool_size,
        })
    }

    /// `LOG_FORMAT`, or the default of `APP_ENV`: pretty in development, json in production.
    fn chosen_log_format(&self) -> LogFormat {
        self.log_format.unwrap_or(match self.app_env {
            AppEnv::Development => LogFormat::Pretty,
            AppEnv::Production => LogFormat::Json,
        })
    }

    /// Validates; in development fills missing secrets from (or into) the dev secrets file.
    pub fn validate(mut self) -> Result<(Config, GeneratedSecrets), ConfigError> {
        let generated = match self.app_env {
            AppEnv::Development => self.fill_dev_secrets()?,
            AppEnv::Production => GeneratedSecrets::default(),
        };
        let admin_api_key = self
            .admin_api_key
            .clone()
            .filter(|k| !k.is_empty())
            .ok_or(ConfigError::Missing("ADMIN_API_KEY"))?;
        if admin_api_key.len() < 16 {
            return Err(invalid("ADMIN_API_KEY", "must be at least 16 characters"));
        }
        let jwt_secret = self
            .jwt_secret
            .clone()
            .filter(|k| !k.is_empty())
            .ok_or(ConfigError::Missing("JWT_SECRET"))?;
        if jwt_secret.len() < 32 {
            return Err(invalid("JWT_SECRET", "must be at least 32 bytes"));
        }
        let encryption_key = parse_encryption_key(
            self.encryption_key
                .as_deref()
                .filter(|k| !k.is_empty())
                .ok_or(ConfigError::Missing("ENCRYPTION_KEY"))?,
        )?;
        let upstream_mcp_url = url::Url::parse(&self.upstream_mcp_url)
            .map_err(|e| invalid("UPSTREAM_MCP_URL", e.to_string()))?;
        if !matches!(upstream_mcp_url.scheme(), "http" | "https") {
            return Err(invalid("UPSTREAM_MCP_URL", "must be an http or https URL"));
        }
        // Durations are added to instants (a tool list's expiry, a stop's deadline), which
        // panics past what the clock can hold: no setting may exceed a year.
        let ms = |v: u64| v / 1000;
        for (key, secs) in [
            ("JWT_TTL_SECS", self.jwt_ttl_secs),
            ("UPSTREAM_TIMEOUT_MS", ms(self.upstream_timeout_ms)),
            (
                "UPSTREAM_CONNECT_TIMEOUT_MS",
                ms(self.upstream_connect_timeout_ms),
            ),
            ("TENANT_IDLE_SECS", self.tenant_idle_secs),
            ("TOOL_CACHE_TTL_SECS", self.tool_cache_ttl_secs),
            (
                "TENANT_RESTART_WINDOW_SECS",
                self.tenant_restart_window_secs,
            ),
            ("DRAIN_TIMEOUT_SECS", self.drain_timeout_secs),
            ("REQUEST_TIMEOUT_MS", ms(self.request_timeout_ms)),
            ("CREDENTIAL_CACHE_TTL_SECS", self.credential_cache_ttl_secs),
            ("MCP_SESSION_IDLE_SECS", self.mcp_session_idle_secs),
        ] {
            if secs > LONGEST_SETTING_SECS {
                return Err(invalid(key, "must be at most a year"));
            }
        }
        if self.upstream_timeout_ms == 0 {
            return Err(invalid("UPSTREAM_TIMEOUT_MS", "must be above 0"));
        }
        // 0 reads as "never" to some (as `AUDIT_RETENTION_DAYS=0` does), but would stop an
        // actor a moment after each call, or issue tokens that expire at once: refused
        // rather than taken as some other value.
        for (key, secs) in [
            ("JWT_TTL_SECS", self.jwt_ttl_secs),
            ("TENANT_IDLE_SECS", self.tenant_idle_secs),
            (
                "TENANT_RESTART_WINDOW_SECS",
                self.tenant_restart_window_secs,
            ),
            ("MCP_SESSION_IDLE_SECS", self.mcp_session_idle_secs),
        ] {
            if secs == 0 {
                return Err(invalid(key, "must be above 0"));
            }
        }
        if self.drain_timeout_secs == 0 {
            // Every shutdown and every tenant change would cut the calls in flight, and
            // drop the audit events not yet written.
            return Err(invalid("DRAIN_TIMEOUT_SECS", "must be above 0"));
        }
        if self
            .metrics_token
            .as_deref()
            .is_some_and(|token| !token.is_empty() && token.len() < 16)
        {
            // As the admin key: guessing it is bounded only by the per-address limiter.
            return Err(invalid("METRICS_TOKEN", "must be at least 16 characters"));
        }
        if self.upstream_connect_timeout_ms == 0 {
            // Every connect would fail at once.
            return Err(invalid("UPSTREAM_CONNECT_TIMEOUT_MS", "must be above 0"));
        }
        if self.request_timeout_ms <= self.upstream_timeout_ms {
            // Otherwise a slow upstream would cut the whole request first: a 504 the contract
            // does not name, and a call left out of the audit trail.
            return Err(invalid(
                "REQUEST_TIMEOUT_MS",
                "must be above UPSTREAM_TIMEOUT_MS",
            ));
        }
        if self.tenant_rate_limit == 0 || self.tenant_rate_burst == 0 {
            return Err(invalid(
                "TENANT_RATE_LIMIT",
                "TENANT_RATE_LIMIT and TENANT_RATE_BURST must be above 0",
            ));
        }
        if self.auth_rate_limit == 0 || self.auth_rate_burst == 0 {
            return Err(invalid(
                "AUTH_RATE_LIMIT",
                "AUTH_RATE_LIMIT and AUTH_RATE_BURST must be above 0",
            ));
        }
        if self.audit_buffer_bytes < 1024 * 1024 {
            // Smaller, an event with its arguments (up to 16 KiB) could find no room even
            // with every buffer empty.
            return Err(invalid(
                "AUDIT_BUFFER_BYTES",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        if self.audit_buffer_size == 0 || self.audit_batch_size == 0 {
            return Err(invalid(
                "AUDIT_BUFFER_SIZE",
                "AUDIT_BUFFER_SIZE and AUDIT_BATCH_SIZE must be above 0",
            ));
        }
        if self.tenant_max_in_flight == 0 || self.tenant_max_in_flight > MOST_IN_FLIGHT {
            return Err(invalid(
                "TENANT_MAX_IN_FLIGHT",
                format!("must be between 1 and {MOST_IN_FLIGHT}"),
            ));
        }
        if self.max_body_bytes == 0 {
            return Err(invalid("MAX_BODY_BYTES", "must be above 0"));
        }
        if self.mcp_max_sessions == 0 || self.mcp_max_sessions_per_tenant == 0 {
            return Err(invalid(
                "MCP_MAX_SESSIONS",
                "MCP_MAX_SESSIONS and MCP_MAX_SESSIONS_PER_TENANT must be above 0",
            ));
        }
        if self.database_pool_size == 0 {
            return Err(invalid("DATABASE_POOL_SIZE", "must be above 0"));
        }
        let on_postgres = self
            .database_url
            .as_deref()
            .is_some_and(|url| url.starts_with("postgres://") || url.starts_with("postgresql://"));
        if on_postgres && self.database_pool_size < 2 {
            // Audit writes hold at most half the pool, so that a lock that holds them up
            // leaves the rest to credential lookups, `/ready` and admin requests: with one
            // connection there is no rest.
            return Err(invalid(
                "DATABASE_POOL_SIZE",
                "must be at least 2 on PostgreSQL (audit writes hold at most half of it)",
            ));
        }
        let log_format = self.chosen_log_format();
        let config = Config {
            app_env: self.app_env,
            listen: SocketAddr::new(self.host, self.port),
            worker_threads: self.worker_threads,
            database_url: self.database_url.filter(|u| !u.is_empty()),
            database_pool_size: self.database_pool_size,
            admin_api_key: Secret::new(admin_api_key),
            jwt_secret: Secret::new(jwt_secret),
            encryption_key,
            jwt_ttl: Duration::from_secs(self.jwt_ttl_secs),
            jwt_issuer: self.jwt_issuer,
            jwt_audience: self.jwt_audience,
            upstream_mcp_url,
            upstream_timeout: Duration::from_millis(self.upstream_timeout_ms),
            upstream_connect_timeout: Duration::from_millis(self.upstream_connect_timeout_ms),
            tenant_rate_limit: self.tenant_rate_limit,
            tenant_rate_burst: self.tenant_rate_burst,
            tenant_idle: Duration::from_secs(self.tenant_idle_secs),
            tenant_max_in_flight: self.tenant_max_in_flight,
            tool_cache_ttl: Duration::from_secs(self.tool_cache_ttl_secs),
            tenant_max_restarts: self.tenant_max_restarts,
            tenant_restart_window: Duration::from_secs(self.tenant_restart_window_secs),
            drain_timeout: Duration::from_secs(self.drain_timeout_secs),
            max_body_bytes: self.max_body_bytes,
            request_timeout: Duration::from_millis(self.request_timeout_ms.max(1)),
            cors_origins: cors_origins(&self.cors_origins)?,
            log_format,
            tenant_auth: self.tenant_auth,
            trust_proxy: self.trust_proxy,
            auth_rate_limit: self.auth_rate_limit,
            auth_rate_burst: self.auth_rate_burst,
            audit_arguments: self.audit_arguments,
            audit_retention_days: self.audit_retention_days,
            audit_buffer_size: self.audit_buffer_size,
            audit_batch_size: self.audit_batch_size,
            audit_buffer_bytes: self.audit_buffer_bytes,
            credential_cache_size: self.credential_cache_size,
            credential_cache_ttl: Duration::from_secs(self.credential_cache_ttl_secs),
            metrics_token: self
                .metrics_token
                .filter(|t| !t.is_empty())
                .map(Secret::new),
            metrics_max_tenant_series: self.metrics_max_tenant_series,
            mcp_max_sessions: self.mcp_max_sessions,
            mcp_max_sessions_per_tenant: self.mcp_max_sessions_per_tenant,
            mcp_session_idle: Duration::from_secs(self.mcp_session_idle_secs),
        };
        Ok((config, generated))
    }

    /// Reads the dev secrets file, generates what is still missing and writes it back
    /// (mode 0600), so that a restart can still open tokens sealed before it.
    fn fill_dev_secrets(&mut self) -> Result<GeneratedSecrets, ConfigError> {
        let path = self.dev_secrets_file.clone();
        let kept = read_dev_secrets(&path);
        let mut generated = GeneratedSecrets::default();
        let mut changed = false;
        for (name, slot, make) in [
            (
                "ADMIN_API_KEY",
                &mut self.admin_api_key,
                random_token as fn() -> String,
            ),
            ("JWT_SECRET", &mut self.jwt_secret, random_token),
            ("ENCRYPTION_KEY", &mut self.encryption_key, random_key_hex),
        ] {
            if slot.as_deref().is_some_and(|v| !v.is_empty()) {
                continue;
            }
            match kept.iter().find(|(k, _)| k == name) {
                Some((_, v)) => *slot = Some(v.clone()),
                None => {
                    *slot = Some(make());
                    generated.names.push(name);
                    changed = true;
                }
            }
        }
        if changed {
            let mut lines: Vec<(String, String)> = kept;
            for name in &generated.names {
                let value = match *name {
                    "ADMIN_API_KEY" => self.admin_api_key.clone(),
                    "JWT_SECRET" => self.jwt_secret.clone(),
                    _ => self.encryption_key.clone(),
                };
                lines.push((name.to_string(), value.unwrap_or_default()));
            }
            write_dev_secrets(&path, &lines).map_err(|e| ConfigError::DevSecrets {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        Ok(generated)
    }
}

fn read_dev_secrets(path: &Path) -> Vec<(String, String)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn write_dev_secrets(path: &Path, lines: &[(String, String)]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    writeln!(
        file,
        "# generated by switchboard in development mode; do not use in production"
    )?;
    for (k, v) in lines {
        writeln!(file, "{k}={v}")?;
    }
    Ok(())
}

fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn random_key_hex() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// `ENCRYPTION_KEY` is 32 bytes, written as 64 hex digits or as base64: standard or
/// URL-safe, padded or not (as `openssl rand -base64 32 | tr -d =` or Python's
/// `urlsafe_b64encode` write it).
pub fn parse_encryption_key(text: &str) -> Result<[u8; 32], ConfigError> {
    use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
    use base64::engine::DecodePaddingMode;
    const PADDED_OR_NOT: GeneralPurposeConfig =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    const STANDARD: GeneralPurpose =
        GeneralPurpose::new(&base64::alphabet::STANDARD, PADDED_OR_NOT);
    const URL_SAFE: GeneralPurpose =
        GeneralPurpose::new(&base64::alphabet::URL_SAFE, PADDED_OR_NOT);
    let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex::decode(text).map_err(|_| invalid("ENCRYPTION_KEY", "bad hex"))?
    } else {
        STANDARD
            .decode(text)
            .or_else(|_| URL_SAFE.decode(text))
            .map_err(|_| invalid("ENCRYPTION_KEY", "must be 64 hex digits or base64"))?
    };
    bytes
        .try_into()
        .map_err(|_| invalid("ENCRYPTION_KEY", "must decode to exactly 32 bytes"))
}

/// A loopback address that refuses every connection at once, for tests and benches: a
/// socket bound for the life of the process but never listening, so that no other test is
/// given its port (as a port bound and released could be) and nothing else answers on it.
pub fn refusing_loopback() -> SocketAddr {
    static REFUSING: std::sync::OnceLock<(tokio::net::TcpSocket, SocketAddr)> =
        std::sync::OnceLock::new();
    REFUSING
        .get_or_init(|| {
            tokio::net::TcpSocket::new_v4()
                .and_then(|socket| {
                    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
                    let addr = socket.local_addr()?;
                    Ok((socket, addr))
                })
                .expect("a loopback socket for tests")
        })
        .1
}

impl Config {
    /// A configuration for tests and benches: loopback, port 0, fixed secrets, embedded store;
    /// the default upstream refuses connections ([`refusing_loopback`]).
    pub fn for_tests() -> Self {
        Config {
            app_env: AppEnv::Development,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            worker_threads: None,
            database_url: None,
            database_pool_size: 4,
            admin_api_key: Secret::new("test-admin-key-0123456789abcdef"),
            jwt_secret: Secret::new("test-jwt-secret-0123456789abcdef0123456789"),
            encryption_key: [7u8; 32],
            jwt_ttl: Duration::from_secs(3600),
            jwt_issuer: "switchboard".into(),
            jwt_audience: "switchboard".into(),
            upstream_mcp_url: url::Url::parse(&format!("http://{}/mcp", refusing_loopback()))
                .expect("a loopback url"),
            upstream_timeout: Duration::from_secs(5),
            upstream_connect_timeout: Duration::from_secs(2),
            tenant_rate_limit: 1000,
            tenant_rate_burst: 1000,
            tenant_idle: Duration::from_secs(300),
            tenant_max_in_flight: 256,
            tool_cache_ttl: Duration::from_secs(300),
            tenant_max_restarts: 10,
            tenant_restart_window: Duration::from_secs(60),
            drain_timeout: Duration::from_secs(5),
            max_body_bytes: 1024 * 1024,
            request_timeout: Duration::from_secs(30),
            cors_origins: Vec::new(),
            log_format: LogFormat::Pretty,
            tenant_auth: TenantAuthMode::Either,
            trust_proxy: false,
            auth_rate_limit: 1000,
            auth_rate_burst: 1000,
            audit_arguments: false,
            audit_retention_days: 90,
            audit_buffer_size: 10_000,
            audit_batch_size: 200,
            audit_buffer_bytes: 256 * 1024 * 1024,
            credential_cache_size: 10_000,
            credential_cache_ttl: Duration::from_secs(30),
            metrics_token: None,
            metrics_max_tenant_series: 1000,
            mcp_max_sessions: 10_000,
            mcp_max_sessions_per_tenant: 100,
            mcp_session_idle: Duration::from_secs(600),
        }
    }
}

/// `CORS_ORIGINS`: comma-separated origins as a browser sends them (`https://app.example.com`,
/// with a port when not the scheme's own): no `*` (the API takes credentials), no path, no
/// trailing slash (neither would ever match a browser's `Origin`).
fn cors_origins(raw: &str) -> Result<Vec<String>, ConfigError> {
    let bad = |origin: &str, why: &str| invalid("CORS_ORIGINS", format!("`{origin}`: {why}"));
    let mut origins = Vec::new();
    for origin in raw.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        if origin == "*" {
            return Err(bad(origin, "list the allowed origins; `*` is not accepted"));
        }
        let url = url::Url::parse(origin).map_err(|_| bad(origin, "not an origin"))?;
        let is_origin = matches!(url.scheme(), "http" | "https")
            && url.host().is_some()
            && url.path() == "/"
            && url.query().is_none()
            && url.fragment().is_none()
            && url.username().is_empty()
            && url.origin().ascii_serialization() == origin;
        if !is_origin {
            return Err(bad(
                origin,
                "must be scheme://host[:port], with no path or trailing slash",
            ));
        }
        origins.push(origin.to_owned());
    }
    Ok(origins)
}

/// What a log line or a panic message may show of the configuration: no secret, no
/// database URL (it may hold a password).
/// `url` without what may be a credential: its user information and query.
fn shown_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.into()
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("app_env", &self.app_env)
            .field("listen", &self.listen)
            .field("database", &self.database_url.as_ref().map(|_| "(set)"))
            .field("upstream_mcp_url", &shown_url(&self.upstream_mcp_url))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        raw: RawConfig,
    }

    fn raw(args: &[&str]) -> RawConfig {
        let mut all = vec!["switchboard"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).expect("flags parse").raw
    }

    /// A development secrets file in a fresh temporary folder (kept while the guard lives).
    fn dev_secrets_file() -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secrets").to_str().unwrap().to_owned();
        (dir, file)
    }

    /// A complete production configuration: each secret after the one before.
    const PRODUCTION: [&str; 8] = [
        "--app-env",
        "production",
        "--admin-api-key",
        "an-admin-key-long-enough",
        "--jwt-secret",
        "0123456789abcdef0123456789abcdef",
        "--encryption-key",
        "abababababababababababababababababababababababababababababababab",
    ];

    #[test]
    fn production_names_the_missing_secret() {
        let err = raw(&PRODUCTION[..2]).validate().unwrap_err();
        assert_eq!(err, ConfigError::Missing("ADMIN_API_KEY"));
        let err = raw(&PRODUCTION[..4]).validate().unwrap_err();
        assert_eq!(err, ConfigError::Missing("JWT_SECRET"));
        let err = raw(&PRODUCTION[..6]).validate().unwrap_err();
        assert_eq!(err, ConfigError::Missing("ENCRYPTION_KEY"));
        assert!(raw(&PRODUCTION).validate().is_ok());
    }

    #[test]
    fn short_jwt_secret_is_refused() {
        let err = raw(&[
            "--app-env",
            "production",
            "--admin-api-key",
            "an-admin-key-long-enough",
            "--jwt-secret",
            "short",
            "--encryption-key",
            &"ab".repeat(32),
        ])
        .validate()
        .unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Invalid {
                key: "JWT_SECRET",
                ..
            }
        ));
    }

    #[test]
    fn settings_that_would_break_at_run_time_are_refused() {
        for (flag, value, key) in [
            (
                "--upstream-connect-timeout-ms",
                "0",
                "UPSTREAM_CONNECT_TIMEOUT_MS",
            ),
            ("--tenant-max-in-flight", "0", "TENANT_MAX_IN_FLIGHT"),
            ("--audit-buffer-bytes", "65536", "AUDIT_BUFFER_BYTES"),
            ("--tenant-max-in-flight", "10001", "TENANT_MAX_IN_FLIGHT"),
            (
                "--tenant-max-in-flight",
                "18446744073709551615",
                "TENANT_MAX_IN_FLIGHT",
            ),
        ] {
            let mut args = PRODUCTION.to_vec();
            args.extend([flag, value]);
            let err = raw(&args).validate().unwrap_err();
            assert!(
                matches!(err, ConfigError::Invalid { key: k, .. } if k == key),
                "{flag} {value}: {err:?}"
            );
        }
        let mut args = PRODUCTION.to_vec();
        args.extend(["--tenant-max-in-flight", "10000"]);
        assert!(raw(&args).validate().is_ok());
        // One PostgreSQL connection leaves no part of the pool free of audit writes; the
        // embedded store has no pool.
        for (url, size, refused) in [
            ("postgres://sb@db/sb", "1", true),
            ("postgresql://sb@db/sb", "1", true),
            ("postgres://sb@db/sb", "2", false),
            ("sqlite://switchboard.db", "1", false),
        ] {
            let mut args = PRODUCTION.to_vec();
            args.extend(["--database-url", url, "--database-pool-size", size]);
            let validated = raw(&args).validate();
            assert_eq!(
                matches!(
                    validated,
                    Err(ConfigError::Invalid {
                        key: "DATABASE_POOL_SIZE",
                        ..
                    })
                ),
                refused,
                "{url} {size}: {:?}",
                validated.as_ref().err()
            );
        }
    }

    #[test]
    fn the_request_timeout_must_outlast_the_upstream_timeout() {
        for (upstream, request) in [("30000", "1000"), ("30000", "30000")] {
            let mut args = PRODUCTION.to_vec();
            args.extend([
                "--upstream-timeout-ms",
                upstream,
                "--request-timeout-ms",
                request,
            ]);
            let err = raw(&args).validate().unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::Invalid {
                        key: "REQUEST_TIMEOUT_MS",
                        ..
                    }
                ),
                "{err:?}"
            );
        }
    }

    #[test]
    fn a_drain_of_no_time_and_a_short_metrics_token_are_refused() {
        for (flag, value, key) in [
            ("--drain-timeout-secs", "0", "DRAIN_TIMEOUT_SECS"),
            ("--metrics-token", "short", "METRICS_TOKEN"),
        ] {
            let mut args = PRODUCTION.to_vec();
            args.extend([flag, value]);
            match raw(&args).validate() {
                Err(ConfigError::Invalid { key: refused, .. }) => assert_eq!(refused, key),
                other => panic!("{flag}: {other:?}"),
            }
        }
        let mut args = PRODUCTION.to_vec();
        args.extend(["--metrics-token", "metrics-token-0123456789"]);
        assert!(raw(&args).validate().is_ok());
    }

    #[test]
    fn debug_shows_no_credential_of_a_url() {
        let mut args = PRODUCTION.to_vec();
        args.extend([
            "--upstream-mcp-url",
            "https://user:pw-secret@up.example/mcp?key=q-secret",
        ]);
        let (config, _) = raw(&args).validate().unwrap();
        let shown = format!("{config:?}");
        assert!(shown.contains("up.example/mcp"), "{shown}");
        assert!(!shown.contains("secret"), "{shown}");
        let migrate = MigrateConfig {
            database_url: Some("postgres://sb:pw-secret@db/sb".into()),
            database_pool_size: 1,
            log_format: LogFormat::Json,
        };
        assert!(!format!("{migrate:?}").contains("secret"));
    }

    #[test]
    fn a_zero_that_would_mean_at_once_is_refused() {
        for (flag, key) in [
            ("--jwt-ttl-secs", "JWT_TTL_SECS"),
            ("--tenant-idle-secs", "TENANT_IDLE_SECS"),
            ("--tenant-restart-window-secs", "TENANT_RESTART_WINDOW_SECS"),
            ("--mcp-session-idle-secs", "MCP_SESSION_IDLE_SECS"),
        ] {
            let mut args = PRODUCTION.to_vec();
            args.extend([flag, "0"]);
            match raw(&args).validate() {
                Err(ConfigError::Invalid { key: refused, .. }) => assert_eq!(refused, key),
                other => panic!("{flag}: {other:?}"),
            }
        }
    }

    #[test]
    fn no_duration_may_exceed_a_year() {
        for (flag, key) in [
            ("--tool-cache-ttl-secs", "TOOL_CACHE_TTL_SECS"),
            ("--drain-timeout-secs", "DRAIN_TIMEOUT_SECS"),
        ] {
            let mut args = PRODUCTION.to_vec();
            args.extend([flag, "18446744073709551615"]);
            match raw(&args).validate() {
                Err(ConfigError::Invalid { key: refused, .. }) => assert_eq!(refused, key),
                other => panic!("{flag}: {other:?}"),
            }
        }
        let mut args = PRODUCTION.to_vec();
        args.extend(["--tool-cache-ttl-secs", "31536000"]);
        assert!(raw(&args).validate().is_ok(), "a year is allowed");
    }

    #[test]
    fn development_generates_secrets_once_and_keeps_them() {
        let (_dir, file) = dev_secrets_file();
        let file = file.as_str();
        let (first, generated) = raw(&["--dev-secrets-file", file]).validate().unwrap();
        assert_eq!(
            generated.names,
            vec!["ADMIN_API_KEY", "JWT_SECRET", "ENCRYPTION_KEY"]
        );
        let (second, generated) = raw(&["--dev-secrets-file", file]).validate().unwrap();
        assert!(generated.names.is_empty(), "second start generates nothing");
        assert_eq!(first.admin_api_key, second.admin_api_key);
        assert_eq!(first.encryption_key, second.encryption_key);
    }

    #[test]
    fn encryption_key_accepts_hex_and_base64() {
        let hex_key = "11".repeat(32);
        assert_eq!(parse_encryption_key(&hex_key).unwrap(), [0x11; 32]);
        use base64::engine::general_purpose::{
            STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD,
        };
        // Bytes whose base64 has `+` and `/` (or `-` and `_`), and padding.
        let key: [u8; 32] = std::array::from_fn(|i| if i % 3 == 0 { 0xfb } else { 0xff });
        for engine in [STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD] {
            let written = engine.encode(key);
            assert_eq!(parse_encryption_key(&written).ok(), Some(key), "{written}");
        }
        assert!(parse_encryption_key("too-short").is_err());
    }

    #[test]
    fn worker_threads_is_a_positive_count_or_unset() {
        let (_dir, file) = dev_secrets_file();
        let file = file.as_str();
        let (config, _) = raw(&["--dev-secrets-file", file]).validate().unwrap();
        assert_eq!(config.worker_threads, None);
        let (config, _) = raw(&["--dev-secrets-file", file, "--worker-threads", "1"])
            .validate()
            .unwrap();
        assert_eq!(config.worker_threads.map(|n| n.get()), Some(1));
        for bad in ["0", "-1", "two"] {
            let flag = format!("--worker-threads={bad}");
            let refused = Cli::try_parse_from(["switchboard", flag.as_str()]);
            let message = refused.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(message.contains("--worker-threads"), "{bad}: {message}");
        }
    }

    #[test]
    fn secret_debug_hides_the_value() {
        let s = Secret::new("hunter2-very-secret");
        assert!(!format!("{s:?}").contains("hunter2"));
    }

    #[test]
    fn config_debug_shows_no_secret_and_no_database_url() {
        let mut config = Config::for_tests();
        config.database_url = Some("postgres://sb:db-password-123@db/sb".into());
        let shown = format!("{config:?}");
        for secret in [
            config.admin_api_key.expose(),
            config.jwt_secret.expose(),
            "db-password-123",
        ] {
            assert!(!shown.contains(secret), "{shown}");
        }
        let key = config.encryption_key;
        assert!(
            !shown.contains(&format!("{}, {}", key[0], key[1])),
            "{shown}"
        );
        assert!(!shown.contains(&hex::encode(key)), "{shown}");
    }

    #[test]
    fn cors_origins_are_plain_origins() {
        let with = |origins: &str| {
            let mut args = PRODUCTION.to_vec();
            args.extend(["--cors-origins", origins]);
            raw(&args).validate().map(|(config, _)| config.cors_origins)
        };
        assert_eq!(
            with("https://app.example.com, http://localhost:5173").unwrap(),
            ["https://app.example.com", "http://localhost:5173"]
        );
        assert!(with("").unwrap().is_empty());
        for bad in [
            "*",
            "https://app.example.com/",
            "https://app.example.com/path",
            "app.example.com",
            "ftp://app.example.com",
        ] {
            match with(bad) {
                Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "CORS_ORIGINS", "{bad}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
