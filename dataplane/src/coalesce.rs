//! Coalescing of identical cacheable misses across all workers. Owns: the in-flight map from a
//! cache key to the one request fetching it; the others wait, then read the cache.
//! Must not: be touched by requests that are not cacheable misses (the map has a lock).
//!
//! Waiters on other workers cannot be woken from the leader's thread (monoio runs without
//! cross-thread wakers), so they look at the flight's flag every `POLL`: a few milliseconds
//! against an upstream call of hundreds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a waiter checks whether its leader is done.
const POLL: Duration = Duration::from_millis(2);

/// The keys being fetched from upstream right now, by any worker.
#[derive(Default)]
pub struct Flights {
    in_flight: Mutex<HashMap<Vec<u8>, Arc<AtomicBool>>>,
}

/// Held by the request that fetches a key; dropping it (answer stored, failed, or the client
/// left) releases the waiters, which then look in the cache or go upstream themselves.
pub struct Lead<'a> {
    flights: &'a Flights,
    key: Vec<u8>,
}

impl Lead<'_> {
    pub fn key(&self) -> &[u8] {
        &self.key
    }
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        let mut in_flight = self.flights.lock();
        if let Some(done) = in_flight.remove(&self.key) {
            done.store(true, Ordering::Release);
        }
    }
}

pub enum Role<'a> {
    /// Nobody is fetching this key: fetch it, and hold the lead until the answer is stored.
    Lead(Lead<'a>),
    /// Another request is fetching it: await this, then read the cache.
    Wait(Waiter),
}

/// Resolves once the leader of a key is done.
pub struct Waiter(Arc<AtomicBool>);

impl Waiter {
    pub fn is_done(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// Waits until the leader is done or `ready` says the answer is there (a leader keeps the
    /// lead while it writes to a slow client; its answer is stored before that).
    pub async fn wait(self, ready: impl Fn() -> bool) {
        while !self.is_done() && !ready() {
            monoio::time::sleep(POLL).await;
        }
    }
}

impl Flights {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Vec<u8>, Arc<AtomicBool>>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn join(&self, key: &[u8]) -> Role<'_> {
        let mut in_flight = self.lock();
        if let Some(done) = in_flight.get(key) {
            return Role::Wait(Waiter(done.clone()));
        }
        in_flight.insert(key.to_vec(), Arc::default());
        Role::Lead(Lead {
            flights: self,
            key: key.to_vec(),
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
        drop(lead);
        assert!(waiter.is_done(), "released when the leader is done");
        assert!(
            matches!(flights.join(b"k"), Role::Lead(_)),
            "the key is free again"
        );
    }
}
