//! Sealing of upstream credentials at rest: XChaCha20-Poly1305 under `ENCRYPTION_KEY`.
//!
//! A sealed value is `nonce (24 bytes) || ciphertext+tag`. The tenant id is the associated
//! data, so a sealed token copied into another tenant's row does not open there.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::config::Secret;

const NONCE_LEN: usize = 24;

#[derive(Clone)]
pub struct TokenCipher {
    aead: XChaCha20Poly1305,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CipherError {
    #[error("sealing failed")]
    Seal,
    #[error("the sealed value does not open under this key")]
    Open,
}

impl TokenCipher {
    pub fn new(key: &[u8; 32]) -> Self {
        Self {
            aead: XChaCha20Poly1305::new(key.into()),
        }
    }

    /// Seals `token` for `tenant_id` under a fresh random nonce.
    pub fn seal(&self, tenant_id: &str, token: &Secret) -> Result<Vec<u8>, CipherError> {
        self.seal_bytes(tenant_id.as_bytes(), token.expose().as_bytes())
    }

    /// Opens a value sealed by [`TokenCipher::seal`] for the same tenant.
    pub fn open(&self, tenant_id: &str, sealed: &[u8]) -> Result<Secret, CipherError> {
        let plain = self.open_bytes(tenant_id.as_bytes(), sealed)?;
        String::from_utf8(plain)
            .map(Secret::new)
            .map_err(|_| CipherError::Open)
    }

    /// Seals `msg` bound to the associated data `aad` under a fresh random nonce:
    /// `nonce || ciphertext+tag`. Distinct `aad` labels keep different kinds of sealed
    /// values (upstream tokens, MCP session ids) from opening as one another.
    pub fn seal_bytes(&self, aad: &[u8], msg: &[u8]) -> Result<Vec<u8>, CipherError> {
        let nonce_bytes: [u8; NONCE_LEN] = rand::random();
        let nonce = XNonce::from(nonce_bytes);
        let sealed = self
            .aead
            .encrypt(&nonce, Payload { msg, aad })
            .map_err(|_| CipherError::Seal)?;
        let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
        out.extend_from_slice(&nonce_bytes);
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// Opens a value sealed by [`TokenCipher::seal_bytes`] with the same `aad`.
    pub fn open_bytes(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, CipherError> {
        if sealed.len() < NONCE_LEN {
            return Err(CipherError::Open);
        }
        let (nonce_bytes, body) = sealed.split_at(NONCE_LEN);
        let nonce_array: [u8; NONCE_LEN] = nonce_bytes.try_into().map_err(|_| CipherError::Open)?;
        self.aead
            .decrypt(&XNonce::from(nonce_array), Payload { msg: body, aad })
            .map_err(|_| CipherError::Open)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open_round_trips_and_hides_the_token() {
        let cipher = TokenCipher::new(&[1; 32]);
        let token = Secret::new("ia-token-abc123");
        let sealed = cipher.seal("tenant-a", &token).unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"ia-tok"));
        assert_eq!(cipher.open("tenant-a", &sealed).unwrap(), token);
        assert_ne!(
            cipher.seal("tenant-a", &token).unwrap(),
            sealed,
            "fresh nonce"
        );
    }

    #[test]
    fn wrong_tenant_or_key_does_not_open() {
        let sealed = TokenCipher::new(&[1; 32])
            .seal("tenant-a", &Secret::new("t"))
            .unwrap();
        assert_eq!(
            TokenCipher::new(&[1; 32]).open("tenant-b", &sealed),
            Err(CipherError::Open)
        );
        assert_eq!(
            TokenCipher::new(&[2; 32]).open("tenant-a", &sealed),
            Err(CipherError::Open)
        );
        assert_eq!(
            TokenCipher::new(&[1; 32]).open("tenant-a", &sealed[..10]),
            Err(CipherError::Open)
        );
    }
}
