//! Coalescing of identical cacheable misses across all workers. Owns: the in-flight map from a
//! cache key to the one request fetching it, and what that request has received of a streamed
//! answer so far; the others wait and read the cache, or follow the stream as it arrives.
//! Must not: be touched by requests that are not cacheable misses (the map has a lock).
//!
//! Waiters on other workers cannot be woken from the leader's thread (monoio runs without
//! cross-thread wakers), so they look at the flight every `POLL`: a few milliseconds against
//! an upstream call of hundreds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a waiter checks on its leader.
pub const POLL: Duration = Duration::from_millis(2);

/// The keys being fetched from upstream right now, by any worker.
#[derive(Default)]
pub struct Flights {
    in_flight: Mutex<HashMap<Vec<u8>, Arc<Flight>>>,
}

#[derive(Default)]
struct Flight {
    /// The leader is done: answer stored, failed, or given up.
    done: AtomicBool,
    stream: Mutex<Stream>,
    /// Backends that failed the leader: its waiters, released without an answer, do not try
    /// them again (one failure does not eject a backend, and each would wait on it in turn).
    failed: Mutex<Vec<Arc<str>>>,
}

/// A streamed answer as the leader receives it, for the waiters that follow it.
#[derive(Default)]
struct Stream {
    /// The upstream's event-stream bytes so far, as the cache keeps them (usage chunk and all).
    bytes: Vec<u8>,
    /// Who answers, for the followers' headers.
    origin: Option<Origin>,
    /// The leader read it to its end (cacheable or not); else it was cut off upstream.
    complete: bool,
    /// Not passed on (too large to keep with nobody following): waiters go on their own.
    abandoned: bool,
    /// A follower has taken some of the bytes: the stream can no longer start over.
    taken: bool,
}

/// The tier, backend and model a followed stream comes from.
#[derive(Clone)]
pub struct Origin {
    pub tier: Option<Arc<str>>,
    pub backend: Arc<str>,
    pub model: Arc<str>,
}

/// Held by the request that fetches a key; dropping it (answer stored, failed, or the client
/// left) releases the waiters, which then look in the cache or go upstream themselves.
pub struct Lead<'a> {
    flights: &'a Flights,
    key: Vec<u8>,
    flight: Arc<Flight>,
}

impl Lead<'_> {
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Passes on what arrived of a streamed answer to the waiters following it.
    pub fn publish(&self, origin: impl FnOnce() -> Origin, bytes: &[u8]) {
        let mut s = lock(&self.flight.stream);
        s.origin.get_or_insert_with(origin);
        s.bytes.extend_from_slice(bytes);
    }

    /// Forgets what was passed on of a stream that failed, for another backend's answer to
    /// take its place; refused (false) once a follower has taken some of it.
    pub fn restart(&self) -> bool {
        let mut s = lock(&self.flight.stream);
        if s.taken {
            return false;
        }
        *s = Stream::default();
        true
    }

    /// The streamed answer was read to its end (else followers get an error event).
    pub fn complete(&self) {
        let mut s = lock(&self.flight.stream);
        s.complete = !s.abandoned;
    }

    /// Calls `f` with the stream passed on so far.
    pub fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        f(&lock(&self.flight.stream).bytes)
    }

    /// Stops passing the stream on: waiting requests go upstream on their own.
    pub fn abandon(&self) {
        lock(&self.flight.stream).abandoned = true;
    }

    pub fn is_abandoned(&self) -> bool {
        lock(&self.flight.stream).abandoned
    }

    /// `backend` failed this request (a 5xx or 429, a connection or timeout failure).
    pub fn failed(&self, backend: &Arc<str>) {
        let mut failed = lock(&self.flight.failed);
        if !failed.contains(backend) {
            failed.push(backend.clone());
        }
    }

    /// Others wait for this answer (the map and this lead hold the other two references).
    pub fn has_followers(&self) -> bool {
        Arc::strong_count(&self.flight) > 2
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        lock(&self.flights.in_flight).remove(&self.key);
        self.flight.done.store(true, Ordering::Release);
    }
}

pub enum Role<'a> {
    /// Nobody is fetching this key: fetch it, and hold the lead until the answer is stored.
    Lead(Lead<'a>),
    /// Another request is fetching it: await this, then read the cache.
    Wait(Waiter),
}

/// Resolves once the leader of a key is done.
pub struct Waiter(Arc<Flight>);

/// What a follower sees of a streamed answer.
pub struct Progress {
    /// The leader is done: no more bytes will come.
    pub done: bool,
    /// ... and the leader read the stream to its end.
    pub complete: bool,
    pub origin: Option<Origin>,
}

impl Waiter {
    pub fn is_done(&self) -> bool {
        self.0.done.load(Ordering::Acquire)
    }

    /// Bytes of a streamed answer have arrived and are passed on: it can be followed.
    pub fn started(&self) -> bool {
        let s = lock(&self.0.stream);
        !s.bytes.is_empty() && !s.abandoned
    }

    /// Waits until the leader is done or gave up passing its stream on, or `ready` says the
    /// answer is there (a leader keeps the lead while it writes to a slow client; its answer
    /// is stored before that).
    pub async fn wait(&self, ready: impl Fn() -> bool) {
        while !self.is_done() && !lock(&self.0.stream).abandoned && !ready() {
            monoio::time::sleep(POLL).await;
        }
    }

    /// The backends that failed the leader so far.
    pub fn failed_backends(&self) -> Vec<Arc<str>> {
        lock(&self.0.failed).clone()
    }

    /// Appends the streamed answer's bytes from offset `from` on to `out` (with its origin
    /// on the first read, from 0).
    pub fn read(&self, from: usize, out: &mut Vec<u8>) -> Progress {
        // Looked at before the bytes: once done, every byte is there.
        let done = self.is_done();
        let mut s = lock(&self.0.stream);
        let new = s.bytes.get(from..).unwrap_or_default();
        out.extend_from_slice(new);
        s.taken |= !new.is_empty();
        Progress {
            done,
            complete: s.complete,
            origin: if from == 0 { s.origin.clone() } else { None },
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Flights {
    pub fn join(&self, key: &[u8]) -> Role<'_> {
        let mut in_flight = lock(&self.in_flight);
        if let Some(flight) = in_flight.get(key) {
            return Role::Wait(Waiter(flight.clone()));
        }
        let flight = Arc::new(Flight::default());
        in_flight.insert(key.to_vec(), flight.clone());
        Role::Lead(Lead {
            flights: self,
            key: key.to_vec(),
            flight,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_leads_the_others_wait_until_it_is_done_on_any_thread() {
        let flights = Flights::default();
        let Role::Lead(lead) = flights.join(b"k") else {
            panic!("first caller leads")
        };
        let waiter = std::thread::scope(|s| {
            s.spawn(|| match flights.join(b"k") {
                Role::Wait(w) => w,
                Role::Lead(_) => panic!("a caller on another thread waits too"),
            })
            .join()
            .unwrap()
        });
        assert!(
            matches!(flights.join(b"other"), Role::Lead(_)),
            "other keys are independent"
        );
        assert!(!waiter.is_done());
        let b: Arc<str> = "b".into();
        lead.failed(&b);
        lead.failed(&b);
        assert_eq!(waiter.failed_backends(), [b], "each failed backend once");
        drop(lead);
        assert!(waiter.is_done(), "released when the leader is done");
        assert!(
            matches!(flights.join(b"k"), Role::Lead(_)),
            "the key is free again"
        );
    }

    #[test]
    fn followers_read_a_stream_from_where_they_are() {
        let flights = Flights::default();
        let Role::Lead(lead) = flights.join(b"k") else {
            panic!("first caller leads")
        };
        assert!(!lead.has_followers());
        let Role::Wait(follower) = flights.join(b"k") else {
            panic!("second caller waits")
        };
        assert!(lead.has_followers() && !follower.started());
        let origin = || Origin {
            tier: None,
            backend: "b".into(),
            model: "m".into(),
        };
        let mut seen = Vec::new();
        let p = follower.read(0, &mut seen);
        assert!(!p.done && p.origin.is_none() && seen.is_empty());
        lead.publish(origin, b"data: 1\n\n");
        lead.publish(origin, b"data: 2\n\n");
        let p = follower.read(seen.len(), &mut seen);
        assert_eq!(seen, b"data: 1\n\ndata: 2\n\n");
        assert_eq!(&*p.origin.unwrap().backend, "b");
        assert!(!lead.restart(), "a follower has some of it");
        lead.complete();
        drop(lead);
        let p = follower.read(seen.len(), &mut seen);
        assert!(p.done && p.complete);
        assert_eq!(seen.len(), 18, "nothing twice");
    }

    #[test]
    fn a_stream_nobody_took_any_of_starts_over() {
        let flights = Flights::default();
        let Role::Lead(lead) = flights.join(b"k") else {
            panic!("first caller leads")
        };
        let Role::Wait(follower) = flights.join(b"k") else {
            panic!("second caller waits")
        };
        let origin = |backend: &str| Origin {
            tier: None,
            backend: backend.into(),
            model: "m".into(),
        };
        lead.publish(|| origin("failed"), b"data: 1");
        assert!(lead.restart() && !follower.started());
        lead.publish(|| origin("good"), b"data: 2\n\n");
        let mut seen = Vec::new();
        let p = follower.read(0, &mut seen);
        assert_eq!(
            (seen.as_slice(), &*p.origin.unwrap().backend),
            (&b"data: 2\n\n"[..], "good")
        );
    }
}
