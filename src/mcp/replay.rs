//! The event streams of the calls the fast path answers as streams ([`super::fast_path`]),
//! kept so that a client whose connection broke can resume one with a `GET` and
//! `Last-Event-ID`, as rmcp's server keeps its own. MCP says that a disconnection is not a
//! cancel: the call runs on, and what it sends waits here for the client to come back.
//!
//! An event's id is `<process>-<stream>-<index>`: `<process>` is random for each process, so
//! that an id from before a restart, or from another replica, names no stream here (such a
//! resume goes to rmcp, which answers it with an empty stream, as it does for an id it does
//! not know); `<stream>` numbers the streams of this process; `<index>` is the event's place
//! in its stream, 0 being the priming event (no message: it gives the client an id to resume
//! from before the first message, and how long to wait before it does, [`RETRY_AFTER`]).
//! rmcp's own ids are `<index>` or `<index>/<request>`.
//!
//! Bounds: a stream keeps its last [`PROGRESS_KEPT`] progress messages, within
//! [`PROGRESS_BYTES`], and its result: a reader (or a resume) behind what is kept goes on
//! from the oldest message kept, and what it missed is counted as dropped progress, as the
//! relay counts what a client falls behind on. An ended stream is kept for
//! [`KEPT_AFTER_END`], and the ended streams together within [`ENDED_BYTES`] of messages,
//! the oldest going first, one tenant's within [`TENANT_ENDED_BYTES`] (its own oldest going
//! first), so that one tenant's large results cannot push out every other tenant's; one
//! stream of more than an eighth of the whole is not kept once it ends (its reader, if it
//! has one, still gets it all). A stream goes with its session.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::http::HeaderValue;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use rmcp::model::ServerJsonRpcMessage;
use tokio::sync::Notify;

/// How long an ended stream is kept for a client to resume (rmcp's own default).
pub const KEPT_AFTER_END: Duration = Duration::from_secs(60);

/// The bytes of messages all ended streams keep together at most.
pub const ENDED_BYTES: usize = 32 << 20;

/// Of those, one tenant's at most.
pub const TENANT_ENDED_BYTES: usize = ENDED_BYTES / 4;

/// Progress messages one stream keeps at most: the latest.
pub const PROGRESS_KEPT: usize = 256;

/// The bytes of progress one stream keeps at most.
pub const PROGRESS_BYTES: usize = 1 << 20;

/// How often ended streams past [`KEPT_AFTER_END`] are looked for, besides when a stream
/// opens or ends, or a resume comes.
pub const SWEEP_EVERY: Duration = Duration::from_secs(10);

/// What a kept stream costs besides its messages and names: its place in the maps and the
/// queue, its locks and counters (counted against the bounds on ended streams).
const STREAM_OVERHEAD: usize = 256;

/// How often a stream that carries nothing else says it is alive (rmcp's default).
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// How long a client whose stream broke should wait before it resumes, told in the priming
/// event (`retry`), as rmcp's server tells it on its own streams (its default).
pub const RETRY_AFTER: Duration = Duration::from_secs(3);

/// Every stream of this process kept for resumption.
pub struct Replays {
    /// This process's part of every event id.
    process: String,
    next: AtomicU64,
    streams: Mutex<Streams>,
}

#[derive(Default)]
struct Streams {
    by_number: HashMap<u64, Arc<Replay>>,
    /// The ended streams, in the order they ended.
    ended: VecDeque<Ended>,
    ended_bytes: usize,
    /// The bytes of each tenant's ended streams.
    tenant_bytes: HashMap<String, usize>,
}

/// An ended stream kept: when it ended, its number, its tenant and its bytes.
struct Ended {
    at: Instant,
    number: u64,
    tenant: String,
    bytes: usize,
}

/// One call's event stream.
pub struct Replay {
    number: u64,
    session: String,
    tenant: String,
    events: Mutex<Events>,
    /// Told of each message and of the end.
    added: Notify,
}

#[derive(Default)]
struct Events {
    /// The messages kept, as JSON, in order: `kept[i]` is the stream's message `first + i`,
    /// its event `first + i + 1`. Until the stream ends, all are progress.
    kept: VecDeque<Arc<str>>,
    /// The place of `kept[0]` among all of the stream's messages: those before it were
    /// progress, let go for the bounds.
    first: usize,
    /// The bytes of `kept`.
    bytes: usize,
    ended: bool,
}

impl Events {
    /// Messages so far, kept or let go.
    fn sent(&self) -> usize {
        self.first + self.kept.len()
    }
}

impl Default for Replays {
    fn default() -> Self {
        Self {
            process: uuid::Uuid::new_v4().simple().to_string()[..12].to_owned(),
            next: AtomicU64::new(0),
            streams: Mutex::default(),
        }
    }
}

impl Replays {
    /// A new stream of `tenant`'s call in `session`.
    pub fn open(&self, session: &str, tenant: &str) -> Arc<Replay> {
        let replay = Arc::new(Replay {
            number: self.next.fetch_add(1, Ordering::Relaxed),
            session: session.to_owned(),
            tenant: tenant.to_owned(),
            events: Mutex::default(),
            added: Notify::new(),
        });
        let mut streams = self.lock();
        streams.forget_expired(Instant::now());
        streams.by_number.insert(replay.number, replay.clone());
        replay
    }

    /// Puts the call's result last in `replay`, which is then kept for [`KEPT_AFTER_END`].
    pub fn end(&self, replay: &Replay, result: &ServerJsonRpcMessage) {
        self.end_with(replay, Some(result));
    }

    /// Ends `replay`'s stream with no result: its call was cancelled by the client, which
    /// is not answered (as MCP asks of a receiver of `notifications/cancelled`).
    pub fn end_unanswered(&self, replay: &Replay) {
        self.end_with(replay, None);
    }

    fn end_with(&self, replay: &Replay, result: Option<&ServerJsonRpcMessage>) {
        let messages = {
            let mut events = replay.lock();
            if let Some(json) = result.and_then(as_json) {
                events.bytes += json.len();
                events.kept.push_back(json);
            }
            events.ended = true;
            events.bytes
        };
        // What keeping it costs: its messages, and its own copies of its session id (up to
        // a few KiB when sealed) and tenant, and its entries.
        let bytes = messages + replay.session.len() + 2 * replay.tenant.len() + STREAM_OVERHEAD;
        replay.added.notify_waiters();
        let mut streams = self.lock();
        if bytes > ENDED_BYTES / 8 {
            // Kept, it would push out the streams of many other calls.
            streams.by_number.remove(&replay.number);
            return;
        }
        if !streams.by_number.contains_key(&replay.number) {
            // Its session ended meanwhile.
            return;
        }
        let now = Instant::now();
        streams.ended.push_back(Ended {
            at: now,
            number: replay.number,
            tenant: replay.tenant.clone(),
            bytes,
        });
        streams.ended_bytes += bytes;
        *streams
            .tenant_bytes
            .entry(replay.tenant.clone())
            .or_default() += bytes;
        streams.forget_expired(now);
        while streams
            .tenant_bytes
            .get(&replay.tenant)
            .copied()
            .unwrap_or(0)
            > TENANT_ENDED_BYTES
        {
            let Some(oldest) = streams.ended.iter().position(|e| e.tenant == replay.tenant) else {
                break;
            };
            streams.forget_at(oldest);
        }
        while streams.ended_bytes > ENDED_BYTES {
            streams.forget_at(0);
        }
    }

    /// The stream `last_event_id` names, if it is one of this process's, kept, and
    /// `tenant`'s in `session`, with the place of the first message after it.
    pub fn resume(
        &self,
        session: &str,
        tenant: &str,
        last_event_id: &str,
    ) -> Option<(Arc<Replay>, usize)> {
        let (process, rest) = last_event_id.split_once('-')?;
        let (number, index) = rest.split_once('-')?;
        if process != self.process {
            return None;
        }
        let (number, index) = (number.parse::<u64>().ok()?, index.parse::<usize>().ok()?);
        let replay = {
            let mut streams = self.lock();
            streams.forget_expired(Instant::now());
            streams.by_number.get(&number)?.clone()
        };
        let known = index <= replay.lock().sent();
        (replay.session == session && replay.tenant == tenant && known).then_some((replay, index))
    }

    /// Forgets the ended streams past [`KEPT_AFTER_END`].
    pub fn forget_expired(&self) {
        self.lock().forget_expired(Instant::now());
    }

    /// Forgets the streams of `session`, which ended.
    pub fn forget_session(&self, session: &str) {
        let mut streams = self.lock();
        streams
            .by_number
            .retain(|_, replay| replay.session != session);
        let Streams {
            by_number,
            ended,
            ended_bytes,
            tenant_bytes,
        } = &mut *streams;
        ended.retain(|e| {
            let kept = by_number.contains_key(&e.number);
            if !kept {
                uncount(e, ended_bytes, tenant_bytes);
            }
            kept
        });
    }

    /// `replay` as an event stream, from its start (with the priming event first).
    pub fn stream(&self, replay: Arc<Replay>) -> Response {
        self.stream_from(replay, None)
    }

    /// `replay` as an event stream from its message at `from` (as [`Self::resume`] gives
    /// it), to its end.
    pub fn resumed(&self, replay: Arc<Replay>, from: usize) -> Response {
        self.stream_from(replay, Some(from))
    }

    fn stream_from(&self, replay: Arc<Replay>, resumed_at: Option<usize>) -> Response {
        let prefix = format!("{}-{}-", self.process, replay.number);
        let priming = resumed_at.is_none().then(|| {
            Ok(Event::default()
                .id(format!("{prefix}0"))
                .retry(RETRY_AFTER)
                .data(""))
        });
        let from = resumed_at.unwrap_or(0);
        let messages = futures::stream::unfold((replay, from), move |(replay, next)| {
            let prefix = prefix.clone();
            async move {
                let (at, message) = replay.next_from(next).await?;
                let event = Event::default()
                    .id(format!("{prefix}{}", at + 1))
                    .data(&*message);
                Some((Ok::<_, Infallible>(event), (replay, at + 1)))
            }
        });
        let events = futures::StreamExt::chain(futures::stream::iter(priming), messages);
        let mut response = Sse::new(events)
            .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
            .into_response();
        // Proxies that buffer answers (nginx) would hold the progress back.
        response
            .headers_mut()
            .insert("x-accel-buffering", HeaderValue::from_static("no"));
        response
    }

    /// Streams kept now (for tests).
    pub fn len(&self) -> usize {
        self.lock().by_number.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    // A poisoned lock is used as it is: every change under it is whole.
    fn lock(&self) -> MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Streams {
    fn forget_expired(&mut self, now: Instant) {
        while self
            .ended
            .front()
            .is_some_and(|e| now.duration_since(e.at) >= KEPT_AFTER_END)
        {
            self.forget_at(0);
        }
    }

    /// Forgets the ended stream at `place` in [`Self::ended`].
    fn forget_at(&mut self, place: usize) {
        let Some(gone) = self.ended.remove(place) else {
            return;
        };
        uncount(&gone, &mut self.ended_bytes, &mut self.tenant_bytes);
        self.by_number.remove(&gone.number);
    }
}

/// Takes the bytes of an ended stream forgotten out of the counts.
fn uncount(gone: &Ended, ended_bytes: &mut usize, tenant_bytes: &mut HashMap<String, usize>) {
    *ended_bytes -= gone.bytes;
    if let Some(bytes) = tenant_bytes.get_mut(&gone.tenant) {
        *bytes -= gone.bytes;
        if *bytes == 0 {
            tenant_bytes.remove(&gone.tenant);
        }
    }
}

impl Replay {
    /// Adds an upstream progress message: the oldest kept go past [`PROGRESS_KEPT`] or
    /// [`PROGRESS_BYTES`] (the newest is kept whatever its size).
    pub fn progress(&self, message: &ServerJsonRpcMessage) {
        let Some(json) = as_json(message) else {
            return;
        };
        {
            let mut events = self.lock();
            events.bytes += json.len();
            events.kept.push_back(json);
            // The newest stays, however big: a reader waiting for it gets it.
            while events.kept.len() > 1
                && (events.kept.len() > PROGRESS_KEPT || events.bytes > PROGRESS_BYTES)
            {
                let Some(oldest) = events.kept.pop_front() else {
                    break;
                };
                events.bytes -= oldest.len();
                events.first += 1;
            }
        }
        self.added.notify_waiters();
    }

    /// The message at `index`, or the oldest kept after it when it was let go (the ones
    /// missed counted as dropped), with its place, once there is one; `None` past the last
    /// of an ended stream.
    async fn next_from(&self, index: usize) -> Option<(usize, Arc<str>)> {
        loop {
            // Registered before the look, so that no message added between is missed.
            let added = self.added.notified();
            {
                let events = self.lock();
                let at = index.max(events.first);
                if let Some(message) = events.kept.get(at - events.first) {
                    if at > index {
                        crate::metrics::progress_dropped((at - index) as u64);
                    }
                    return Some((at, message.clone()));
                }
                if events.ended {
                    return None;
                }
            }
            added.await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, Events> {
        self.events.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A message as the JSON of its event. Serialising rmcp's message types does not fail; if
/// one did, the message is left out (logged) rather than the stream broken.
fn as_json(message: &ServerJsonRpcMessage) -> Option<Arc<str>> {
    match serde_json::to_string(message) {
        Ok(json) => Some(json.into()),
        Err(error) => {
            tracing::error!(%error, "an MCP message could not be written as JSON: left out");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use rmcp::model::{CallToolResponse, CallToolResult, ContentBlock, RequestId, ServerResult};

    use super::*;

    /// A call's result whose text has `bytes` bytes.
    fn result(bytes: usize) -> ServerJsonRpcMessage {
        let result = CallToolResult::success(vec![ContentBlock::text("a".repeat(bytes))]);
        ServerJsonRpcMessage::response(
            ServerResult::from(CallToolResponse::from(result)),
            RequestId::Number(1),
        )
    }

    fn id_of(replays: &Replays, replay: &Replay, index: usize) -> String {
        format!("{}-{}-{index}", replays.process, replay.number)
    }

    #[test]
    fn a_stream_resumes_only_for_its_session_and_tenant_from_an_event_it_sent() {
        let replays = Replays::default();
        let replay = replays.open("s", "t");
        replay.progress(&result(1));
        replays.end(&replay, &result(2));
        let (found, from) = replays
            .resume("s", "t", &id_of(&replays, &replay, 1))
            .unwrap();
        assert_eq!((found.number, from), (replay.number, 1));
        assert!(replays
            .resume("s", "t", &id_of(&replays, &replay, 2))
            .is_some());
        for refused in [
            replays.resume("other session", "t", &id_of(&replays, &replay, 1)),
            replays.resume("s", "other tenant", &id_of(&replays, &replay, 1)),
            // Past the last event it sent.
            replays.resume("s", "t", &id_of(&replays, &replay, 3)),
            // Another process's, and rmcp's own.
            replays.resume("s", "t", &format!("x{}", id_of(&replays, &replay, 1))),
            replays.resume("s", "t", "1/2"),
            replays.resume("s", "t", "0"),
        ] {
            assert!(refused.is_none());
        }
        replays.forget_session("s");
        assert!(replays
            .resume("s", "t", &id_of(&replays, &replay, 1))
            .is_none());
        assert!(replays.is_empty());
    }

    #[tokio::test]
    async fn a_stream_keeps_its_latest_progress_and_its_result() {
        let replays = Replays::default();
        let replay = replays.open("s", "t");
        for _ in 0..PROGRESS_KEPT + 5 {
            replay.progress(&result(1));
        }
        replays.end(&replay, &result(1));
        {
            let events = replay.lock();
            assert_eq!((events.first, events.kept.len()), (5, PROGRESS_KEPT + 1));
        }
        // A reader from the start goes on from the oldest kept; one within reads on.
        assert_eq!(replay.next_from(0).await.unwrap().0, 5);
        assert_eq!(replay.next_from(7).await.unwrap().0, 7);
        assert!(replay.next_from(PROGRESS_KEPT + 6).await.is_none());
        // And within bytes: a big update takes the place of many small ones.
        let replay = replays.open("s", "t");
        for _ in 0..10 {
            replay.progress(&result(1));
        }
        // Its JSON ten bytes short of the bound: none of the small ones fits beside it.
        let wrapping = as_json(&result(0)).unwrap().len();
        replay.progress(&result(PROGRESS_BYTES - 10 - wrapping));
        {
            let events = replay.lock();
            assert_eq!((events.kept.len(), events.sent()), (1, 11));
            assert_eq!(events.bytes, PROGRESS_BYTES - 10);
        }
        // One past the bound on its own is kept, alone, for whoever waits for it.
        replay.progress(&result(PROGRESS_BYTES));
        let events = replay.lock();
        assert_eq!((events.kept.len(), events.sent()), (1, 12));
    }

    #[test]
    fn ended_streams_go_after_their_time_and_a_huge_one_at_once() {
        let replays = Replays::default();
        let replay = replays.open("s", "t");
        replays.end(&replay, &result(1));
        let huge = replays.open("s", "t");
        replays.end(&huge, &result(ENDED_BYTES / 8));
        assert_eq!(replays.len(), 1, "the huge one is not kept");
        replays
            .lock()
            .forget_expired(Instant::now() + KEPT_AFTER_END);
        assert!(replays.is_empty());
        assert_eq!(replays.lock().ended_bytes, 0);
    }

    #[test]
    fn ended_streams_are_kept_within_their_bytes_the_oldest_going_first() {
        let replays = Replays::default();
        let big = ENDED_BYTES / 9;
        // Each of another tenant: the tenants' own bound stays out of it.
        let streams: Vec<Arc<Replay>> = (0..12)
            .map(|n| replays.open("s", &format!("t{n}")))
            .collect();
        // A stream still running is never dropped for the bytes.
        for replay in &streams[1..] {
            replays.end(replay, &result(big));
        }
        let kept: Vec<u64> = {
            let streams = replays.lock();
            let mut kept: Vec<u64> = streams.by_number.keys().copied().collect();
            kept.sort_unstable();
            assert!(streams.ended_bytes <= ENDED_BYTES);
            kept
        };
        // Nine fit, less their JSON's few bytes more: eight.
        assert_eq!(
            kept,
            [0, 4, 5, 6, 7, 8, 9, 10, 11].map(|n| streams[n].number)
        );
    }

    #[test]
    fn a_tenant_past_its_share_of_ended_streams_loses_its_own_oldest() {
        let replays = Replays::default();
        let big = ENDED_BYTES / 9;
        let other = replays.open("s2", "other");
        replays.end(&other, &result(big));
        // Two fit in a quarter, a third does not.
        let own: Vec<Arc<Replay>> = (0..3).map(|_| replays.open("s", "busy")).collect();
        for replay in &own {
            replays.end(replay, &result(big));
        }
        let streams = replays.lock();
        let mut kept: Vec<u64> = streams.by_number.keys().copied().collect();
        kept.sort_unstable();
        assert_eq!(kept, [other.number, own[1].number, own[2].number]);
        assert!(streams.tenant_bytes["busy"] <= TENANT_ENDED_BYTES);
        assert_eq!(
            streams.ended_bytes,
            streams.tenant_bytes.values().sum::<usize>()
        );
        drop(streams);
        replays.forget_session("s");
        assert_eq!(replays.len(), 1);
        assert!(!replays.lock().tenant_bytes.contains_key("busy"));
    }

    #[test]
    fn an_ended_stream_counts_its_session_id_and_tenant_too() {
        let replays = Replays::default();
        // Streams with next to no messages, in a session whose id takes a quarter of a
        // tenant's share: only three of them fit in it.
        let session = "s".repeat(TENANT_ENDED_BYTES / 4);
        for _ in 0..10 {
            let replay = replays.open(&session, "t");
            replays.end(&replay, &result(1));
        }
        let streams = replays.lock();
        assert_eq!(streams.by_number.len(), 3);
        assert!(streams.tenant_bytes["t"] <= TENANT_ENDED_BYTES);
        assert!(streams.tenant_bytes["t"] > 3 * session.len());
    }

    #[tokio::test]
    async fn a_reader_waits_for_what_comes_and_ends_with_the_stream() {
        let replays = Replays::default();
        let replay = replays.open("s", "t");
        let reader = {
            let replay = replay.clone();
            tokio::spawn(async move {
                let mut read = Vec::new();
                while let Some((_, message)) = replay.next_from(read.len()).await {
                    read.push(message);
                }
                read.len()
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        replay.progress(&result(1));
        tokio::time::sleep(Duration::from_millis(20)).await;
        replays.end(&replay, &result(1));
        let read = tokio::time::timeout(Duration::from_secs(5), reader).await;
        assert_eq!(read.expect("the reader ended").unwrap(), 2);
    }
}
