//! A progress line on stderr for long-running request batches: done/total, rate, ETA and
//! generated tokens per second. Redrawn in place on a terminal, one line every 10 s otherwise.

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counters updated by the request tasks.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: u64,
    pub done: AtomicU64,
    pub tokens: AtomicU64,
    start: Instant,
    stop: AtomicBool,
}

impl Progress {
    pub fn new(label: &str, total: u64) -> Arc<Self> {
        Arc::new(Self {
            label: label.into(),
            total,
            done: AtomicU64::new(0),
            tokens: AtomicU64::new(0),
            start: Instant::now(),
            stop: AtomicBool::new(false),
        })
    }

    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Generated tokens per second since the start.
    pub fn tokens_per_sec(&self) -> f64 {
        self.tokens.load(Ordering::Relaxed) as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }

    /// The line as it is drawn.
    pub fn line(&self) -> String {
        let done = self.done.load(Ordering::Relaxed);
        let secs = self.start.elapsed().as_secs_f64();
        let frac = if self.total == 0 {
            1.0
        } else {
            done as f64 / self.total as f64
        };
        let width = 30;
        let filled = ((frac * width as f64) as usize).min(width);
        let eta = if done == 0 {
            "?".to_string()
        } else {
            format_secs(secs / done as f64 * (self.total.saturating_sub(done)) as f64)
        };
        format!(
            "{} [{}{}] {done}/{} ({:.0}%) {} elapsed, ETA {eta}, {:.0} tok/s",
            self.label,
            "#".repeat(filled),
            ".".repeat(width - filled),
            self.total,
            100.0 * frac,
            format_secs(secs),
            self.tokens_per_sec()
        )
    }

    /// Draws until [`Progress::finish`] (spawned on the runtime).
    pub async fn run(self: Arc<Self>) {
        let tty = std::io::stderr().is_terminal();
        let every = if tty {
            Duration::from_millis(250)
        } else {
            Duration::from_secs(10)
        };
        while !self.stop.load(Ordering::Relaxed) {
            tokio::time::sleep(every).await;
            let mut err = std::io::stderr();
            let _ = if tty {
                write!(err, "\r{}", self.line())
            } else {
                writeln!(err, "{}", self.line())
            };
        }
    }

    pub fn finish(&self) {
        self.stop.store(true, Ordering::Relaxed);
        eprintln!("\r{}", self.line());
    }
}

pub fn format_secs(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, s % 3600 / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}
