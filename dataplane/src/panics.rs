//! What a panic ends. A bug that panics while serving one connection closes that connection
//! and nothing else; a panic anywhere else (a worker's accept loop, health checks, the control
//! plane's tasks, the main thread) ends the process with status 101, so that a supervisor
//! restarts a whole router instead of one that serves on with a dead worker (whose queued
//! connections would hang), no health checks or no budget days.

use pin_project_lite::pin_project;
use std::cell::Cell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

thread_local! {
    /// Set while a connection's handler runs on this thread.
    static CONTAINED: Cell<bool> = const { Cell::new(false) };
}

/// Makes any panic outside `contain` end the process, after the usual message. Called once,
/// by the commands that serve.
pub fn exit_on_uncontained_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        if !CONTAINED.with(Cell::get) {
            // Not `eprintln!`: it panics when stderr is gone, and a panic here aborts.
            let message =
                "switchyard: a panic outside a connection's handler: exiting (status 101)\n";
            let _ = std::io::Write::write_all(&mut std::io::stderr(), message.as_bytes());
            std::process::exit(101);
        }
    }));
}

pin_project! {
    /// A connection's handler whose panics are caught: `Err` once it panicked.
    pub struct Contained<F> {
        #[pin]
        inner: F,
    }
}

pub fn contain<F: Future>(inner: F) -> Contained<F> {
    Contained { inner }
}

impl<F: Future> Future for Contained<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.project().inner;
        let was = CONTAINED.with(|c| c.replace(true));
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx)));
        CONTAINED.with(|c| c.set(was));
        match polled {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt as _;

    /// The hook is process-wide, so it is tried in a child: this test binary run again for
    /// this test alone, told by the environment what to do.
    #[test]
    fn a_panic_outside_a_handler_ends_the_process_and_one_inside_does_not() {
        if let Ok(what) = std::env::var("SWITCHYARD_PANIC_CHILD") {
            exit_on_uncontained_panic();
            let caught = contain(async { panic!("in a handler") }).now_or_never();
            assert!(matches!(caught, Some(Err(_))));
            assert!(!CONTAINED.with(Cell::get));
            if what == "outside" {
                panic!("outside a handler");
            }
            return;
        }
        let run = |what: &str| {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "panics::tests::a_panic_outside_a_handler_ends_the_process_and_one_inside_does_not",
                    "--nocapture",
                ])
                .env("SWITCHYARD_PANIC_CHILD", what)
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            (out.status.code(), text)
        };
        let (code, text) = run("inside");
        assert_eq!(code, Some(0), "{text}");
        assert!(text.contains("1 passed"), "{text}");
        let (code, text) = run("outside");
        // Exited from the hook: the test harness never got to report a failed test.
        assert_eq!(code, Some(101), "{text}");
        assert!(text.contains("exiting (status 101)"), "{text}");
        assert!(!text.contains("test result"), "{text}");
    }
}
