//! Coalescing of identical cacheable misses within a worker. Owns: the in-flight map from a
//! cache key to the one request fetching it; the others wait, then read the cache.
//! Must not: cross threads. Waiters and leader run on one worker's runtime, so wakers are
//! local and nothing here is atomic; identical misses on different workers each go upstream.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
struct Flight {
    done: Cell<bool>,
    waiters: RefCell<Vec<Waker>>,
}

/// The keys this worker is fetching from upstream right now.
#[derive(Default)]
pub struct Flights {
    in_flight: RefCell<HashMap<Vec<u8>, Rc<Flight>>>,
}

/// Held by the request that fetches a key; dropping it (answer stored, failed, or the client
/// left) releases the waiters, which then look in the cache or go upstream themselves.
pub struct Lead<'a> {
    flights: &'a Flights,
    key: Vec<u8>,
}

impl Drop for Lead<'_> {
    fn drop(&mut self) {
        if let Some(flight) = self.flights.in_flight.borrow_mut().remove(&self.key) {
            flight.done.set(true);
            for waker in flight.waiters.take() {
                waker.wake();
            }
        }
    }
}

/// Resolves when the leader of a key is done.
pub struct Wait(Rc<Flight>);

impl Future for Wait {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0.done.get() {
            return Poll::Ready(());
        }
        self.0.waiters.borrow_mut().push(cx.waker().clone());
        Poll::Pending
    }
}

pub enum Role<'a> {
    /// Nobody is fetching this key: fetch it, and hold the lead until the answer is stored.
    Lead(Lead<'a>),
    /// Another request is fetching it: wait for it.
    Wait(Wait),
}

impl Flights {
    pub fn join(&self, key: &[u8]) -> Role<'_> {
        let mut in_flight = self.in_flight.borrow_mut();
        if let Some(flight) = in_flight.get(key) {
            return Role::Wait(Wait(flight.clone()));
        }
        in_flight.insert(key.to_vec(), Rc::default());
        Role::Lead(Lead {
            flights: self,
            key: key.to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(std::sync::atomic::AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    #[test]
    fn one_leads_the_others_wait_until_it_is_done() {
        let flights = Flights::default();
        let Role::Lead(lead) = flights.join(b"k") else {
            panic!("first caller leads")
        };
        let Role::Wait(mut wait) = flights.join(b"k") else {
            panic!("second caller waits")
        };
        assert!(
            matches!(flights.join(b"other"), Role::Lead(_)),
            "other keys are independent"
        );
        let count = Arc::new(Count(Default::default()));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut wait).poll(&mut cx).is_pending());
        drop(lead);
        assert_eq!(
            count.0.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "the waiter was woken"
        );
        assert!(Pin::new(&mut wait).poll(&mut cx).is_ready());
        assert!(
            matches!(flights.join(b"k"), Role::Lead(_)),
            "the key is free again"
        );
    }
}
