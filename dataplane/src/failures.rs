//! Log lines for failed upstream attempts. Owns: telling the operator why an attempt failed
//! (the caller hears it in its error answer), at most one line per backend a second on each
//! worker, and the count of those not shown (with the next line, or after a second without
//! one).
//! Must not: write a line per failure during an outage (the flood would cost more than the
//! failures).

use std::cell::RefCell;
use std::time::{Duration, Instant};

/// At most one line per backend this often, per worker.
const INTERVAL: Duration = Duration::from_secs(1);

#[derive(Default)]
pub struct FailureLog {
    slots: RefCell<Slots>,
}

/// Per backend index of table `version`.
#[derive(Default)]
struct Slots {
    version: u64,
    backends: Vec<Option<Shown>>,
}

#[derive(Clone)]
struct Shown {
    name: std::sync::Arc<str>,
    /// When the backend's last line went out.
    at: Instant,
    /// Its failures since, not shown.
    not_shown: u32,
}

impl FailureLog {
    /// Notes a failed attempt on backend `index` (`name`) of table `version`; returns the line
    /// written, if one was.
    pub fn failed(
        &self,
        version: u64,
        (index, name): (usize, &std::sync::Arc<str>),
        request_id: u64,
        message: &str,
    ) -> Option<String> {
        let now = Instant::now();
        let not_shown = {
            let mut slots = self.slots.borrow_mut();
            if slots.version != version {
                // Indices of another table: what the old one did not show is said now.
                flush(&mut slots.backends, now, Duration::ZERO);
                slots.backends.clear();
                slots.version = version;
            }
            if slots.backends.len() <= index {
                slots.backends.resize(index + 1, None);
            }
            let slot = &mut slots.backends[index];
            if let Some(shown) = slot {
                if now.duration_since(shown.at) < INTERVAL {
                    shown.not_shown += 1;
                    return None;
                }
            }
            let fresh = Shown {
                name: name.clone(),
                at: now,
                not_shown: 0,
            };
            slot.replace(fresh).map_or(0, |s| s.not_shown)
        };
        let id = crate::proxy::hex_id(request_id);
        let id = std::str::from_utf8(&id).unwrap_or("?");
        let mut line = format!("attempt on backend `{name}` failed (request {id}): {message}");
        if not_shown > 0 {
            line.push_str(&format!(
                "; {not_shown} more of its failures not shown since the last line"
            ));
        }
        crate::balancer::log(format_args!("{line}"));
        Some(line)
    }

    /// Says how many failures were not shown of each backend whose last line is over a
    /// second old; returns how many lines that wrote.
    pub fn flush(&self) -> usize {
        flush(
            &mut self.slots.borrow_mut().backends,
            Instant::now(),
            INTERVAL,
        )
    }
}

fn flush(backends: &mut [Option<Shown>], now: Instant, age: Duration) -> usize {
    let mut lines = 0;
    for shown in backends.iter_mut().flatten() {
        if shown.not_shown > 0 && now.duration_since(shown.at) >= age {
            let (name, n) = (&shown.name, shown.not_shown);
            crate::balancer::log(format_args!(
                "backend `{name}`: {n} more failed attempts, not shown one by one"
            ));
            shown.not_shown = 0;
            lines += 1;
        }
    }
    lines
}

/// A worker's flush of its failure log, once a second.
pub async fn flush_every_second(worker: std::rc::Rc<crate::server::Worker>) {
    while !worker.shared.is_draining() {
        monoio::time::sleep(INTERVAL).await;
        worker.failures.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn one_line_per_backend_a_second_counting_the_rest() {
        let log = FailureLog::default();
        let (a, b, c) = (Arc::from("a"), Arc::from("b"), Arc::from("c"));
        let line = log.failed(1, (0, &a), 1, "boom").unwrap();
        assert!(
            line.contains("backend `a`") && line.contains("boom"),
            "{line}"
        );
        assert!(log.failed(1, (0, &a), 2, "boom").is_none());
        assert!(log.failed(1, (0, &a), 3, "boom").is_none());
        // Another backend has its own allowance.
        assert!(log.failed(1, (1, &b), 4, "boom").is_some());
        // The next line of `a`, once the second is over, counts what was not shown.
        let age = |log: &FailureLog| {
            log.slots.borrow_mut().backends[0].as_mut().unwrap().at -= INTERVAL;
        };
        age(&log);
        let line = log.failed(1, (0, &a), 5, "boom").unwrap();
        assert!(
            line.ends_with("; 2 more of its failures not shown since the last line"),
            "{line}"
        );
        // Without a next failure, the count is said once the second is over.
        assert!(log.failed(1, (0, &a), 6, "boom").is_none());
        assert_eq!(log.flush(), 0, "not yet");
        age(&log);
        assert_eq!(log.flush(), 1);
        assert_eq!(log.flush(), 0, "said once");
        // A new table starts afresh (its indices may name other backends).
        assert!(log.failed(2, (0, &c), 7, "boom").is_some());
    }
}
