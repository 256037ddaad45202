//! Where log lines wait for stdout: a queue one background thread writes
//! out a tick after the first line comes, many lines to a `write`.
//!
//! A request's line must not make a tokio worker wait on a slow stdout
//! pipe, so a thread does the writing. `tracing_appender`'s non-blocking
//! writer hands that thread each line through a channel and wakes it per
//! line: measured at saturation (`bench/RESULTS.md` entry 66), its thread
//! cost 4.3 to 4.8 µs of CPU per request and 0.2 context switches. Here a
//! line is copied into a buffer under an uncontended lock; the thread is
//! woken only by the first line after a quiet spell, lets [`TICK`] pass so
//! the lines that follow gather behind it, and writes them all at once.
//!
//! Nothing is dropped: while [`MAX_QUEUED`] bytes wait (stdout stalled), a
//! line's writer waits for room, as a blocking write would. Lines come out
//! in the order they were queued, each whole.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long the thread lets lines gather before it writes them: the most
/// a line waits for its `write` while stdout keeps up.
pub const TICK: Duration = Duration::from_millis(10);
/// Queued bytes that cut the tick short: a burst is written as it comes
/// instead of piling up for a whole tick.
const EARLY_WRITE: usize = 256 * 1024;
/// Queued bytes past which a line's writer waits for the thread.
const MAX_QUEUED: usize = 4 * 1024 * 1024;

/// What the thread is doing, so that a line knows whether to wake it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writer {
    /// Asleep until a line comes: the next line wakes it.
    Parked,
    /// Letting lines gather; only a full [`EARLY_WRITE`] wakes it early.
    Gathering,
    /// Writing a batch; it looks at the queue again when done.
    Writing,
}

struct Queue {
    bytes: Vec<u8>,
    writer: Writer,
    /// Lines waiting for room.
    waiting: usize,
    closed: bool,
    /// The thread has written everything and ended.
    done: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the thread: a first line, a full queue, closing.
    wake: Condvar,
    /// Wakes lines waiting for room, and [`LogFlush`] when the thread ends.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Nothing panics while holding the lock but an allocation failure,
        // which aborts; a poisoned queue still holds whole lines.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The writer the subscriber formats lines into.
pub struct LogQueue {
    shared: Arc<Shared>,
}

/// Writes what is queued when dropped, and stops the thread. Lines logged
/// after that are not written.
pub struct LogFlush {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// A queue written to `out` by a thread named `log-writer`.
pub fn start<W: Write + Send + 'static>(out: W) -> io::Result<(LogQueue, LogFlush)> {
    start_gathering(out, TICK)
}

/// [`start`], with lines gathering for `tick` (tests lengthen it, to see
/// what else ends a gathering).
fn start_gathering<W: Write + Send + 'static>(
    out: W,
    tick: Duration,
) -> io::Result<(LogQueue, LogFlush)> {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            bytes: Vec::with_capacity(64 * 1024),
            writer: Writer::Parked,
            waiting: 0,
            closed: false,
            done: false,
        }),
        wake: Condvar::new(),
        room: Condvar::new(),
    });
    let thread = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("log-writer".into())
            .spawn(move || write_out(&shared, out, tick))?
    };
    Ok((
        LogQueue {
            shared: Arc::clone(&shared),
        },
        LogFlush {
            shared,
            thread: Some(thread),
        },
    ))
}

/// The thread: park, gather for a tick, swap the queue out, write it.
fn write_out<W: Write>(shared: &Shared, mut out: W, tick: Duration) {
    // Two buffers swapped in turn, so the queue keeps its capacity and a
    // steady load allocates nothing.
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        let mut queue = shared.lock();
        while queue.bytes.is_empty() && !queue.closed {
            queue.writer = Writer::Parked;
            queue = shared.wake.wait(queue).unwrap_or_else(|e| e.into_inner());
        }
        if queue.bytes.is_empty() {
            // Closed, and everything written.
            queue.done = true;
            shared.room.notify_all();
            return;
        }
        queue.writer = Writer::Gathering;
        queue = shared
            .wake
            .wait_timeout_while(queue, tick, |q| !q.closed && q.bytes.len() < EARLY_WRITE)
            .unwrap_or_else(|e| e.into_inner())
            .0;
        std::mem::swap(&mut batch, &mut queue.bytes);
        queue.writer = Writer::Writing;
        if queue.waiting > 0 {
            shared.room.notify_all();
        }
        drop(queue);
        // A failed stdout has nowhere to be reported; its lines are lost,
        // as with any writer. The process does not stop for it.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
    }
}

impl LogQueue {
    fn push(&self, line: &[u8]) {
        let mut queue = self.shared.lock();
        while queue.bytes.len() >= MAX_QUEUED && !queue.closed {
            queue.waiting += 1;
            queue = self
                .shared
                .room
                .wait(queue)
                .unwrap_or_else(|e| e.into_inner());
            queue.waiting -= 1;
        }
        let before = queue.bytes.len();
        queue.bytes.extend_from_slice(line);
        let wake = match queue.writer {
            Writer::Parked => {
                queue.writer = Writer::Gathering;
                true
            }
            // Once per batch: the line that fills it.
            Writer::Gathering => before < EARLY_WRITE && queue.bytes.len() >= EARLY_WRITE,
            Writer::Writing => false,
        };
        drop(queue);
        if wake {
            self.shared.wake.notify_one();
        }
    }
}

impl<'a> MakeWriter<'a> for LogQueue {
    type Writer = &'a LogQueue;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Write for &LogQueue {
    /// The subscriber writes each line with one call: it is queued whole.
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        self.push(line);
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// How long the exit waits for the last lines to be written: a stdout
/// nobody reads must not keep the process from ending.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(1);

impl Drop for LogFlush {
    fn drop(&mut self) {
        let mut queue = self.shared.lock();
        queue.closed = true;
        self.shared.wake.notify_one();
        self.shared.room.notify_all();
        let (queue, waited) = self
            .shared
            .room
            .wait_timeout_while(queue, FLUSH_TIMEOUT, |q| !q.done)
            .unwrap_or_else(|e| e.into_inner());
        drop(queue);
        if let Some(thread) = self.thread.take() {
            if !waited.timed_out() {
                let _ = thread.join();
            }
            // Otherwise the thread is left in its `write`; the process
            // ends without it.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// An `out` the test can read.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// An `out` whose writes wait while the test holds the gate.
    #[derive(Clone)]
    struct Gated(Arc<Mutex<()>>, Captured);

    impl Write for Gated {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let _open = self.0.lock().unwrap();
            self.1.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn wait_for(out: &Captured, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !out.text().contains(want) {
            assert!(Instant::now() < deadline, "never written: {want}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_line_is_written_after_a_quiet_spell_too() {
        let out = Captured::default();
        let (queue, _flush) = start(out.clone()).unwrap();
        (&queue).write_all(b"one\n").unwrap();
        wait_for(&out, "one\n");
        // Quiet: the thread parks, and the next line must wake it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while queue.shared.lock().writer != Writer::Parked {
            assert!(Instant::now() < deadline, "the thread never parked");
            std::thread::sleep(Duration::from_millis(1));
        }
        (&queue).write_all(b"two\n").unwrap();
        (&queue).write_all(b"three\n").unwrap();
        wait_for(&out, "three\n");
        assert_eq!(out.text(), "one\ntwo\nthree\n");
    }

    /// A gathering that reaches [`EARLY_WRITE`] is written before its tick
    /// ends: with a tick of an hour, the only way out before the close.
    #[test]
    fn a_full_batch_is_written_before_its_tick() {
        let out = Captured::default();
        let (queue, _flush) = start_gathering(out.clone(), Duration::from_secs(3600)).unwrap();
        let line = format!("{}\n", "x".repeat(1023));
        let lines = EARLY_WRITE / line.len();
        // The first line wakes the thread, which then gathers for the hour.
        (&queue).write_all(line.as_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while queue.shared.lock().writer != Writer::Gathering {
            assert!(
                Instant::now() < deadline,
                "the thread never began gathering"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        for _ in 1..lines - 1 {
            (&queue).write_all(line.as_bytes()).unwrap();
        }
        // One line short of the mark: still gathering, nothing written.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(out.text().len(), 0, "written before the batch was full");
        // The line that reaches the mark wakes the thread.
        (&queue).write_all(line.as_bytes()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while out.text().len() < EARLY_WRITE {
            assert!(
                Instant::now() < deadline,
                "a full batch waited for its tick"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(out.text(), line.repeat(lines));
    }

    #[test]
    fn lines_from_many_threads_come_out_whole_and_in_order() {
        let out = Captured::default();
        let (queue, flush) = start(out.clone()).unwrap();
        std::thread::scope(|s| {
            for t in 0..4 {
                let queue = &queue;
                s.spawn(move || {
                    for i in 0..20_000 {
                        queue
                            .make_writer()
                            .write_all(format!("{t}:{i}\n").as_bytes())
                            .unwrap();
                    }
                });
            }
        });
        drop(flush);
        let text = out.text();
        assert_eq!(text.lines().count(), 80_000);
        for t in 0..4 {
            let mine: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("{t}:")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..20_000).collect::<Vec<_>>(), "thread {t}");
        }
    }

    /// A burst of three times the queue's limit goes out in several
    /// writes, none above the limit, and whole.
    #[test]
    fn a_burst_is_written_in_pieces_without_losing_lines() {
        #[derive(Clone, Default)]
        struct Sizes(Arc<Mutex<Vec<usize>>>);
        impl Write for Sizes {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().push(b.len());
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let sizes = Sizes::default();
        let (queue, flush) = start(sizes.clone()).unwrap();
        let line = [b'x'; 1024];
        let lines = 3 * MAX_QUEUED / line.len();
        for _ in 0..lines {
            (&queue).write_all(&line).unwrap();
        }
        drop(flush);
        let sizes = sizes.0.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 3 * MAX_QUEUED);
        assert!(sizes.len() >= 3, "{sizes:?}");
        assert!(
            sizes.iter().all(|&n| n <= MAX_QUEUED + line.len()),
            "{sizes:?}"
        );
    }

    /// A stalled stdout holds writers at the limit instead of growing the
    /// queue without bound; once it moves, every line gets out.
    #[test]
    fn a_stalled_out_holds_writers_back_without_losing_lines() {
        let out = Captured::default();
        let gate = Arc::new(Mutex::new(()));
        let closed = gate.lock().unwrap();
        let (queue, flush) = start(Gated(Arc::clone(&gate), out.clone())).unwrap();
        let line = [b'x'; 1024];
        let lines = 3 * MAX_QUEUED / line.len();
        std::thread::scope(|s| {
            let writer = s.spawn(|| {
                for _ in 0..lines {
                    (&queue).write_all(&line).unwrap();
                }
            });
            std::thread::sleep(Duration::from_millis(300));
            assert!(!writer.is_finished(), "the writer never waited");
            assert!(queue.shared.lock().bytes.len() <= MAX_QUEUED + line.len());
            drop(closed);
        });
        drop(flush);
        assert_eq!(out.text().len(), 3 * MAX_QUEUED);
    }

    /// A stdout nobody reads must not keep the process from ending: the
    /// flush gives up after [`FLUSH_TIMEOUT`].
    #[test]
    fn the_flush_gives_up_on_a_stdout_that_never_moves() {
        let gate = Arc::new(Mutex::new(()));
        let _closed = gate.lock().unwrap();
        let (queue, flush) = start(Gated(Arc::clone(&gate), Captured::default())).unwrap();
        (&queue).write_all(b"stuck\n").unwrap();
        let started = Instant::now();
        // In a thread of its own: a flush that waited for ever must fail
        // the test, not hang it.
        let (sent, dropped) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            drop(flush);
            let _ = sent.send(());
        });
        dropped
            .recv_timeout(FLUSH_TIMEOUT * 5)
            .expect("the flush waited for the stalled stdout");
        let took = started.elapsed();
        assert!(took >= FLUSH_TIMEOUT, "{took:?}");
        assert!(took < FLUSH_TIMEOUT * 5, "{took:?}");
    }
}
