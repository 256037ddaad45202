//! CPU-heavy steps that must not stall the other streams.
//!
//! The processor runs one async worker thread by default (a sidecar beside
//! one Envoy: measured 5 to 7 % more throughput than two,
//! `bench/RESULTS.md` entry 26). Every stream's messages are answered on
//! it, so a step that computes for milliseconds (rendering Envoy's
//! resources on a reload) would hold every other stream's answer that
//! long. [`heavy`] runs such a step with `block_in_place`: the worker's
//! other tasks move to a fresh thread while this one computes. Not for
//! request bodies: measured, a multi-MB body read that way cost twice the
//! CPU and memory (`bench/RESULTS.md` entry 29), more than the wait it
//! spares other streams.

use tokio::runtime::{Handle, RuntimeFlavor};

/// Runs `step`, a computation of a millisecond or more, without holding
/// up the runtime's other tasks. Outside a multi-threaded runtime (unit
/// tests, tools) it simply runs.
pub fn heavy<R>(step: impl FnOnce() -> R) -> R {
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(step)
        }
        _ => step(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_without_a_runtime() {
        assert_eq!(heavy(|| 2 + 2), 4);
    }

    #[tokio::test]
    async fn runs_on_a_current_thread_runtime() {
        assert_eq!(heavy(|| 2 + 2), 4);
    }

    /// On the multi-threaded runtime with one worker, a task queued on
    /// that worker runs while a heavy step there blocks (without
    /// `block_in_place` it would wait for the step, which waits for it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn other_tasks_run_during_a_heavy_step() {
        let on_the_worker = tokio::spawn(async {
            let (tx, rx) = std::sync::mpsc::channel();
            let other = tokio::spawn(async move {
                let _ = tx.send(());
            });
            let got = heavy(|| rx.recv_timeout(std::time::Duration::from_secs(2)));
            other.await.unwrap();
            got
        });
        assert!(
            on_the_worker.await.unwrap().is_ok(),
            "the other task never ran during the step"
        );
    }
}
