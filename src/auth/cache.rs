//! The credential cache: tenant records remembered after a successful lookup, by API key
//! hash and by tenant id, so that a tenant call costs no database round trip while an entry
//! is fresh (`CREDENTIAL_CACHE_TTL_SECS`) and keeps working while the database is down.
//!
//! Availability over freshness: when the store is `Unavailable`, an entry past its TTL is
//! still used, up to [`STALE_LIMIT`], so tool calls go on through a database outage. It is
//! never a way around a revocation: every tenant change on the [`ChangeFeed`] (this
//! replica's admin API, and other replicas' through PostgreSQL NOTIFY) drops the entries
//! before the next lookup. Bounded by `CREDENTIAL_CACHE_SIZE` (0 turns caching off).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::broadcast::{self, error::TryRecvError};

use crate::store::TenantRecord;
use crate::tenants::{ChangeFeed, TenantChange};

/// How long past its last lookup an entry may still stand in for a database that is down.
pub const STALE_LIMIT: Duration = Duration::from_secs(600);

/// How old an entry may be for a use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// Within the TTL: good enough instead of a lookup.
    Fresh,
    /// Within [`STALE_LIMIT`]: good enough only when the lookup cannot be made.
    Stale,
}

struct Entry {
    record: TenantRecord,
    stored: Instant,
}

struct Inner {
    by_key: HashMap<Vec<u8>, Entry>,
    by_id: HashMap<String, Entry>,
    /// Bumped by every invalidation; a lookup that started before one does not fill.
    generation: u64,
    /// The tenant changes not applied yet. Drained under the lock before every read, so a
    /// change published before a lookup starts (a rotation through this replica's admin
    /// API, say) is always applied before that lookup: no window, no background task.
    changes: broadcast::Receiver<TenantChange>,
}

pub struct CredentialCache {
    inner: Mutex<Inner>,
    capacity: usize,
    ttl: Duration,
}

/// A key into the cache.
#[derive(Debug, Clone, Copy)]
pub enum CacheKey<'a> {
    /// SHA-256 of an API key.
    KeyHash(&'a [u8]),
    TenantId(&'a str),
}

impl CredentialCache {
    /// `capacity` entries per index, trusted for `ttl`; invalidated by `changes`.
    pub fn new(capacity: usize, ttl: Duration, changes: &ChangeFeed) -> Self {
        Self {
            inner: Mutex::new(Inner {
                by_key: HashMap::new(),
                by_id: HashMap::new(),
                generation: 0,
                changes: changes.subscribe(),
            }),
            capacity,
            ttl,
        }
    }

    /// The record under `key`, when it is young enough for `freshness`.
    pub fn get(&self, key: CacheKey<'_>, freshness: Freshness) -> Option<TenantRecord> {
        let max_age = match freshness {
            Freshness::Fresh => self.ttl,
            Freshness::Stale => STALE_LIMIT.max(self.ttl),
        };
        let mut inner = self.lock()?;
        inner.apply_changes();
        let entry = match key {
            CacheKey::KeyHash(hash) => inner.by_key.get(hash),
            CacheKey::TenantId(id) => inner.by_id.get(id),
        }?;
        (entry.stored.elapsed() < max_age).then(|| entry.record.clone())
    }

    /// The generation to pass to [`Self::fill`] after a lookup started now.
    pub fn generation(&self) -> u64 {
        match self.lock() {
            Some(mut inner) => {
                inner.apply_changes();
                inner.generation
            }
            None => u64::MAX,
        }
    }

    /// Remembers `record` from a lookup that started at `generation`; skipped when a
    /// tenant change came in meanwhile (the record may predate it).
    pub fn fill(&self, record: &TenantRecord, generation: u64) {
        if self.capacity == 0 {
            return;
        }
        let Some(mut inner) = self.lock() else { return };
        inner.apply_changes();
        if inner.generation != generation {
            return;
        }
        let stored = Instant::now();
        let (capacity, hash) = (self.capacity, record.api_key_hash.clone());
        make_room(&mut inner.by_key, &hash, capacity);
        inner.by_key.insert(
            hash,
            Entry {
                record: record.clone(),
                stored,
            },
        );
        make_room(&mut inner.by_id, &record.id, capacity);
        inner.by_id.insert(
            record.id.clone(),
            Entry {
                record: record.clone(),
                stored,
            },
        );
    }

    /// Entries held now (by API key hash, by tenant id), for tests and metrics.
    pub fn len(&self) -> (usize, usize) {
        match self.lock() {
            Some(mut inner) => {
                inner.apply_changes();
                (inner.by_key.len(), inner.by_id.len())
            }
            None => (0, 0),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == (0, 0)
    }

    /// `None` only when a thread panicked holding the lock; the cache is then bypassed
    /// (every call asks the store), which is safe.
    fn lock(&self) -> Option<std::sync::MutexGuard<'_, Inner>> {
        self.inner.lock().ok()
    }
}

impl Inner {
    fn apply_changes(&mut self) {
        loop {
            match self.changes.try_recv() {
                Ok(TenantChange::One(id)) => self.forget(&id),
                // A lagging receiver missed some changes: any entry may be stale.
                Ok(TenantChange::All) | Err(TryRecvError::Lagged(_)) => self.clear(),
                Err(TryRecvError::Empty | TryRecvError::Closed) => return,
            }
        }
    }

    fn forget(&mut self, tenant_id: &str) {
        self.generation = self.generation.wrapping_add(1);
        self.by_id.remove(tenant_id);
        // An old key of the tenant may sit under another hash: look at every entry.
        self.by_key.retain(|_, e| e.record.id != tenant_id);
    }

    fn clear(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        self.by_id.clear();
        self.by_key.clear();
    }
}

/// Frees a slot for `key` in a full map: entries past the stale limit go first, then the
/// oldest one. Linear, but only when the map is full.
fn make_room<K, Q>(map: &mut HashMap<K, Entry>, key: &Q, capacity: usize)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq + Clone,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if map.len() < capacity || map.contains_key(key) {
        return;
    }
    map.retain(|_, e| e.stored.elapsed() < STALE_LIMIT);
    if map.len() < capacity {
        return;
    }
    let oldest = map
        .iter()
        .min_by_key(|(_, e)| e.stored)
        .map(|(k, _)| k.clone());
    if let Some(oldest) = oldest {
        map.remove::<K>(&oldest);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, hash: u8) -> TenantRecord {
        TenantRecord::for_tests(id, hash)
    }

    #[test]
    fn fills_and_invalidates_on_the_change_feed() {
        let feed = ChangeFeed::new(16);
        let cache = CredentialCache::new(10, Duration::from_secs(30), &feed);
        let (a, b) = (record("tenant-a", 1), record("tenant-b", 2));
        cache.fill(&a, cache.generation());
        cache.fill(&b, cache.generation());
        assert_eq!(
            cache.get(CacheKey::KeyHash(&[1; 32]), Freshness::Fresh),
            Some(a)
        );
        feed.publish("tenant-a");
        assert_eq!(
            cache.get(CacheKey::KeyHash(&[1; 32]), Freshness::Stale),
            None
        );
        assert_eq!(
            cache.get(CacheKey::TenantId("tenant-a"), Freshness::Stale),
            None
        );
        assert!(cache
            .get(CacheKey::TenantId("tenant-b"), Freshness::Fresh)
            .is_some());
        feed.publish_all();
        assert!(cache.is_empty());
    }

    #[test]
    fn a_lookup_that_raced_a_change_does_not_fill() {
        let feed = ChangeFeed::new(16);
        let cache = CredentialCache::new(10, Duration::from_secs(30), &feed);
        let started = cache.generation();
        feed.publish("tenant-a");
        cache.fill(&record("tenant-a", 1), started);
        assert!(cache.is_empty());
    }

    #[test]
    fn past_the_ttl_only_stale_use_and_bounded() {
        let feed = ChangeFeed::new(16);
        let cache = CredentialCache::new(2, Duration::ZERO, &feed);
        for (i, id) in ["t1", "t2", "t3"].iter().enumerate() {
            cache.fill(&record(id, i as u8), cache.generation());
        }
        assert_eq!(cache.len(), (2, 2));
        assert!(cache
            .get(CacheKey::TenantId("t3"), Freshness::Fresh)
            .is_none());
        assert!(cache
            .get(CacheKey::TenantId("t3"), Freshness::Stale)
            .is_some());
    }
}
