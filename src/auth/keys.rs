//! Tenant identifiers and API keys: made with the OS CSPRNG, shown once, stored as a hash.
//!
//! API keys carry 256 random bits, so a plain SHA-256 is a sound lookup hash (no slow KDF
//! needed: there is nothing to brute-force). The store finds the tenant by an indexed
//! equality on the hash; the key itself never reaches the store, a log or a response
//! other than the one that creates it.

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Secret;

/// Every tenant API key starts with this, so a leaked key is recognisable in a scan and an
/// `Authorization: Bearer` value can be told from a JWT without trying to decode it.
pub const API_KEY_PREFIX: &str = "sbk_";

/// `tenant-` followed by 20 lowercase hex digits (80 random bits).
pub fn new_tenant_id() -> String {
    format!("tenant-{}", hex::encode(rand::random::<[u8; 10]>()))
}

/// A fresh API key: the prefix and 32 random bytes in URL-safe base64.
pub fn new_api_key() -> Secret {
    let bytes: [u8; 32] = rand::random();
    Secret::new(format!(
        "{API_KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

/// The lookup hash stored for an API key.
pub fn hash_api_key(key: &str) -> Vec<u8> {
    Sha256::digest(key.as_bytes()).to_vec()
}

/// A short, non-secret name of a key hash, put in tenant JWTs (`kid`) so that rotating
/// the key also retires every JWT issued under the old one.
pub fn key_generation(hash: &[u8]) -> String {
    hex::encode(&hash[..hash.len().min(6)])
}

/// Whether `value` has the shape of one of our API keys (cheap; says nothing of validity).
pub fn looks_like_api_key(value: &str) -> bool {
    value.starts_with(API_KEY_PREFIX) && value.len() < 256
}

/// Constant-time equality for secrets compared in memory (the admin key).
pub fn secrets_equal(a: &str, b: &str) -> bool {
    let (ha, hb) = (Sha256::digest(a.as_bytes()), Sha256::digest(b.as_bytes()));
    ha.ct_eq(&hb).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_prefixed_and_long() {
        let (a, b) = (new_api_key(), new_api_key());
        assert_ne!(a, b);
        assert!(a.expose().starts_with(API_KEY_PREFIX));
        assert!(a.expose().len() >= API_KEY_PREFIX.len() + 43);
        assert_eq!(hash_api_key(a.expose()).len(), 32);
    }

    #[test]
    fn tenant_ids_have_the_contract_shape() {
        let id = new_tenant_id();
        assert!(id.starts_with("tenant-") && id.len() == 27, "{id}");
    }

    #[test]
    fn secrets_equal_compares_whole_values() {
        assert!(secrets_equal("abc", "abc"));
        assert!(!secrets_equal("abc", "abd"));
        assert!(!secrets_equal("abc", "abcd"));
    }
}
