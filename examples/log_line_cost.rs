//! What the request log line costs the processor: emits `--lines` lines
//! shaped like `extproc::report`'s, at `--rate` per second, through the
//! processor's own logging (`logging::init`, so the same formatter, queue
//! and writer thread), and prints the CPU they took per line: the emitting
//! thread's and the whole process's (the writer thread included).
//!
//! Run with stdout to a file or a pipe, as in production:
//! `cargo run --release --example log_line_cost -- 4000 20000 > /tmp/lines`.
//! A third argument sets the log level: at `warn` no line is written, which
//! gives the loop's own cost to subtract.
//! Between lines the emitting thread sleeps, as a worker waits for the next
//! request, so the writer thread parks and has to be woken as it would be.

use std::time::{Duration, Instant};

use ai_gateway_extproc::logging::{self, LogFormat};

fn cpu_seconds(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clocks used exist on
    // every Linux this runs on.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let mut number = |default: u64| -> Result<u64, String> {
        args.next().map_or(Ok(default), |a| {
            a.parse().map_err(|e| format!("{a:?}: {e}"))
        })
    };
    let rate = number(4000)?.max(1);
    let lines = number(20_000)?;
    let level = args.next().unwrap_or_else(|| "info".into());
    let flush = logging::init(Some(&level), LogFormat::Text)?;
    let gap = Duration::from_nanos(1_000_000_000 / rate);
    let thread0 = cpu_seconds(libc::CLOCK_THREAD_CPUTIME_ID);
    let process0 = cpu_seconds(libc::CLOCK_PROCESS_CPUTIME_ID);
    let start = Instant::now();
    let mut due = start;
    for _ in 0..lines {
        due += gap;
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        tracing::info!(
            request_id = "8f2a4c1e-5b6d-4e7f-9a0b-1c2d3e4f5a6b",
            method = "POST",
            path = "/v1/chat/completions",
            client = "-",
            model = "gpt-4o-mini",
            response_model = "gpt-4o-mini-2024-07-18",
            backend = "tars",
            attempts = "-",
            status = 200u16,
            error = "-",
            limit = "-",
            outcome = "ok",
            stream = false,
            input_tokens = Some(12u64),
            output_tokens = Some(34u64),
            cached_input_tokens = Some(0u64),
            reasoning_tokens = None::<u64>,
            duration_ms = 1.234f64,
            ttfb_ms = Some(0.9f64),
            "request"
        );
    }
    let thread = cpu_seconds(libc::CLOCK_THREAD_CPUTIME_ID) - thread0;
    // The last lines written too, as the writer thread ends.
    drop(flush);
    let process = cpu_seconds(libc::CLOCK_PROCESS_CPUTIME_ID) - process0;
    let per_line = |seconds: f64| seconds * 1e6 / lines.max(1) as f64;
    eprintln!(
        "{lines} lines at {rate}/s, {level}: emitting thread {:.2} µs/line, process {:.2} µs/line",
        per_line(thread),
        per_line(process),
    );
    Ok(())
}
