//! Session ids that carry their own session: an `Mcp-Session-Id` is the base64url of
//! `nonce || ciphertext` (XChaCha20-Poly1305 under `ENCRYPTION_KEY`, see [`crate::cipher`])
//! of the tenant and the client's `initialize` parameters (protocol version, capabilities,
//! client info). Any replica can open it and rebuild the session, so a fleet needs no
//! sticky load balancing and no shared session table.
//!
//! An id opens for [`SESSION_ID_LIFETIME`] after it was sealed. That bounds how long the
//! fleet must remember a session its client ended (`DELETE`, see [`super::sessions`]), and
//! what a leaked id is worth. The replica that holds a session keeps serving it past that
//! age; only rebuilding it elsewhere (or after a restart) needs a fresh id.
//!
//! An id that does not open (forged, garbled, another key, too old) is simply unknown: rmcp
//! answers 404 "session not found" and the client initialises again. The associated data is
//! a label of its own, so a sealed upstream token can never pass for a session id or the
//! reverse.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use rmcp::model::InitializeRequestParams;
use rmcp::transport::streamable_http_server::session::{
    SessionState, SessionStore, SessionStoreError,
};
use serde::{Deserialize, Serialize};

use crate::cipher::TokenCipher;

/// Associated data of every sealed session id; bump the version to invalidate all ids.
/// (v2 added the time of issue: v1 ids, which have none, no longer open.)
const SESSION_AAD: &[u8] = b"switchboard/mcp-session-id/v2";

/// How long after it was sealed a session id can still be opened (to rebuild the session
/// on a replica that does not hold it).
pub const SESSION_ID_LIFETIME: Duration = Duration::from_secs(24 * 60 * 60);

/// How far apart replicas' clocks may be: an id sealed further in the future does not open,
/// and ended sessions are recorded this much longer than [`SESSION_ID_LIFETIME`].
pub const CLOCK_SKEW_ALLOWED: Duration = Duration::from_secs(60 * 60);

/// Longest id we try to open: a bound on work for garbage headers. No longer id is sealed.
const MAX_ID_LEN: usize = 8 * 1024;

/// The most JSON an `initialize`'s parameters may take: they travel in the session id (with
/// the tenant id, a nonce and a tag, in base64), which must stay within [`MAX_ID_LEN`] to
/// open on another replica, or here after a restart. Real clients send a few hundred bytes.
pub const MAX_INITIALIZE_PARAMS: usize = 5 * 1024;

/// Whether `params` fit in a session id (see [`MAX_INITIALIZE_PARAMS`]).
pub fn params_fit(params: &InitializeRequestParams) -> bool {
    serde_json::to_vec(params).is_ok_and(|json| json.len() <= MAX_INITIALIZE_PARAMS)
}

/// What a session id carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionClaims {
    /// The tenant that opened the session; only its credentials may use the id.
    #[serde(rename = "t")]
    pub tenant: String,
    /// The client's `initialize` parameters, replayed when another replica rebuilds it.
    #[serde(rename = "p")]
    pub params: InitializeRequestParams,
    /// When the id was sealed, in seconds since the Unix epoch (the sealing replica's clock).
    #[serde(rename = "i")]
    pub issued: u64,
}

impl SessionClaims {
    /// The claims of a session `tenant` opens now with `params`.
    pub fn new(tenant: String, params: InitializeRequestParams) -> Self {
        Self {
            tenant,
            params,
            issued: unix_seconds(SystemTime::now()),
        }
    }
}

fn unix_seconds(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Seals and opens session ids.
#[derive(Clone)]
pub struct SessionSeal {
    cipher: TokenCipher,
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("the session could not be sealed")]
    Seal,
}

impl SessionSeal {
    pub fn new(cipher: TokenCipher) -> Self {
        Self { cipher }
    }

    /// A fresh session id for `claims` (a new random nonce each time, so ids are unique).
    pub fn seal(&self, claims: &SessionClaims) -> Result<String, SealError> {
        let plain = serde_json::to_vec(claims).map_err(|_| SealError::Seal)?;
        let sealed = self
            .cipher
            .seal_bytes(SESSION_AAD, &plain)
            .map_err(|_| SealError::Seal)?;
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sealed);
        // An id that could not be opened again is no id: refused rather than handed out.
        if id.len() > MAX_ID_LEN {
            return Err(SealError::Seal);
        }
        Ok(id)
    }

    /// The claims of a session id sealed under this key within [`SESSION_ID_LIFETIME`], or
    /// `None` for anything else.
    pub fn open(&self, id: &str) -> Option<SessionClaims> {
        self.open_at(id, SystemTime::now())
    }

    /// [`Self::open`] as of `now`.
    fn open_at(&self, id: &str, now: SystemTime) -> Option<SessionClaims> {
        if id.len() > MAX_ID_LEN {
            return None;
        }
        let sealed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(id)
            .ok()?;
        let plain = self.cipher.open_bytes(SESSION_AAD, &sealed).ok()?;
        let claims: SessionClaims = serde_json::from_slice(&plain).ok()?;
        let now = unix_seconds(now);
        // An id from a replica whose clock runs a little ahead counts as new; one from
        // further ahead would open for longer than ended sessions are recorded.
        let fresh = claims.issued <= now.saturating_add(CLOCK_SKEW_ALLOWED.as_secs())
            && now.saturating_sub(claims.issued) <= SESSION_ID_LIFETIME.as_secs();
        fresh.then_some(claims)
    }
}

/// rmcp's external session store, backed by nothing but the id itself: `load` opens the
/// id, `store` and `delete` have nothing to do (the state travels with the client).
pub struct SealedSessionStore {
    seal: SessionSeal,
}

impl SealedSessionStore {
    pub fn new(seal: SessionSeal) -> Self {
        Self { seal }
    }
}

#[async_trait::async_trait]
impl SessionStore for SealedSessionStore {
    async fn load(&self, session_id: &str) -> Result<Option<SessionState>, SessionStoreError> {
        Ok(self
            .seal
            .open(session_id)
            .map(|claims| SessionState::new(claims.params)))
    }

    async fn store(&self, _id: &str, _state: &SessionState) -> Result<(), SessionStoreError> {
        Ok(())
    }

    async fn delete(&self, _id: &str) -> Result<(), SessionStoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn claims() -> SessionClaims {
        let params = serde_json::json!({"protocolVersion": "2025-11-25",
            "capabilities": {"roots": {"listChanged": true}},
            "clientInfo": {"name": "c", "version": "1"}});
        SessionClaims::new(
            "acme".into(),
            serde_json::from_value(params).expect("params"),
        )
    }

    #[test]
    fn ids_round_trip_are_unique_and_do_not_show_the_tenant() {
        let seal = SessionSeal::new(TokenCipher::new(&[3; 32]));
        let id = seal.seal(&claims()).expect("seal");
        assert!(!id.contains("acme"));
        assert!(id.bytes().all(|b| b.is_ascii_graphic()));
        assert_ne!(seal.seal(&claims()).expect("seal"), id);
        let opened = seal.open(&id).expect("opens");
        assert_eq!(opened.tenant, "acme");
        assert_eq!(opened.params.protocol_version.as_str(), "2025-11-25");
    }

    #[test]
    fn params_at_the_bound_seal_into_an_id_that_opens() {
        let seal = SessionSeal::new(TokenCipher::new(&[3; 32]));
        let params = |name_len: usize| -> InitializeRequestParams {
            let params = serde_json::json!({"protocolVersion": "2025-11-25",
                "capabilities": {"experimental": {"x": {}}},
                "clientInfo": {"name": "n".repeat(name_len), "version": "1"}});
            serde_json::from_value(params).expect("params")
        };
        let json_len = |p: &InitializeRequestParams| serde_json::to_vec(p).expect("json").len();
        let base = json_len(&params(0));
        let largest = params(MAX_INITIALIZE_PARAMS - base);
        assert_eq!(json_len(&largest), MAX_INITIALIZE_PARAMS);
        assert!(params_fit(&largest));
        assert!(!params_fit(&params(MAX_INITIALIZE_PARAMS - base + 1)));
        // With a tenant id longer than any this service makes.
        let claims = SessionClaims::new("tenant-".repeat(10), largest);
        let id = seal.seal(&claims).expect("seals");
        assert!(
            seal.open(&id).is_some(),
            "an id of {} bytes opens",
            id.len()
        );
        let too_big = SessionClaims::new("t".into(), params(2 * MAX_INITIALIZE_PARAMS));
        assert!(seal.seal(&too_big).is_err(), "no id that would not open");
    }

    #[test]
    fn forged_garbled_foreign_key_or_token_ids_do_not_open() {
        let cipher = TokenCipher::new(&[3; 32]);
        let seal = SessionSeal::new(cipher.clone());
        let id = seal.seal(&claims()).expect("seal");
        let mut garbled = id.clone().into_bytes();
        garbled[30] = if garbled[30] == b'A' { b'B' } else { b'A' };
        let garbled = String::from_utf8(garbled).expect("ascii");
        assert!(seal.open(&garbled).is_none());
        assert!(seal.open("not-a-session").is_none());
        assert!(seal.open("").is_none());
        let other = SessionSeal::new(TokenCipher::new(&[4; 32]));
        assert!(other.open(&id).is_none());
        // A sealed upstream token (tenant id as associated data) is not a session id.
        let token = cipher.seal("acme", &Secret::new("{}")).expect("seal");
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token);
        assert!(seal.open(&token).is_none());
    }

    #[test]
    fn an_id_opens_for_its_lifetime_and_not_after() {
        let seal = SessionSeal::new(TokenCipher::new(&[3; 32]));
        let id = seal.seal(&claims()).expect("seal");
        let now = SystemTime::now();
        let day = SESSION_ID_LIFETIME;
        let hour = Duration::from_secs(3600);
        assert!(seal.open_at(&id, now + day - hour).is_some());
        assert!(seal.open_at(&id, now + day + hour).is_none());
        // Sealed by a replica whose clock is a little ahead: still open; far ahead: not.
        assert!(seal
            .open_at(&id, now - hour + Duration::from_secs(60))
            .is_some());
        assert!(seal.open_at(&id, now - 2 * hour).is_none());
    }
}
