//! The trainer's Prometheus endpoint.
//!
//! Every step the loop produces a [`StepLog`]: metric names as TRL logs them
//! (`reward`, `rewards/accuracy/mean`, `clip_ratio/low_mean`, `completions/mean_length`,
//! ...). The same values go to the console/log line, to `output_dir/metrics.jsonl`
//! ([`crate::runlog`]) and to Prometheus, named by Prometheus' conventions (no `:`,
//! units in the name, durations as histograms):
//! - every entry but the `time/*` ones becomes a gauge `trainer_<name>` with every
//!   character outside `[a-zA-Z0-9_]` turned into `_` (`rewards/accuracy/mean` ->
//!   `trainer_rewards_accuracy_mean`), created on first use;
//! - `time/step` is observed by the histogram `trainer_step_duration_seconds`, the other
//!   `time/<phase>` entries by `trainer_phase_duration_seconds{phase}` (phases named as
//!   the step's spans: `rollout`, `reward`, `forward_backward`, `optimizer`,
//!   `weight_sync`);
//! - [`Metrics::record_step`] also sets `trainer_step` and
//!   `trainer_last_step_timestamp_seconds` (what the stuck-run alert watches).
//!
//! Fixed metrics: model-state bytes per kind (`trainer_model_state_bytes{kind}`), rollout
//! worker health and weight version (`trainer_worker_healthy{worker}`,
//! `trainer_worker_weight_version{worker}`), a step counter, and the phase the rank is in
//! (`trainer_phase{phase}` is 1 for the current phase and 0 for the others;
//! `trainer_phase_start_timestamp_seconds` is when it began), for the "rank stuck in one
//! phase" alert. Every series carries the `rank` label.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{
    Encoder, Gauge, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// One step's metrics by TRL name, in a stable order.
pub type StepLog = BTreeMap<String, f64>;

/// Step and phase durations: from tens of milliseconds (tiny CPU runs) to an hour.
const DURATION_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
    1000.0, 2500.0, 5000.0,
];

/// What a rank is doing, as `trainer_phase{phase}` exports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Loading, rendezvous, connecting to the workers, resuming.
    Startup,
    Rollout,
    Reward,
    ForwardBackward,
    Optimizer,
    WeightSync,
    Checkpoint,
    Eval,
    /// The run ended (last step, or stopped by SIGTERM).
    Done,
}

impl Phase {
    pub const ALL: [Phase; 9] = [
        Phase::Startup,
        Phase::Rollout,
        Phase::Reward,
        Phase::ForwardBackward,
        Phase::Optimizer,
        Phase::WeightSync,
        Phase::Checkpoint,
        Phase::Eval,
        Phase::Done,
    ];

    /// The `phase` label value (the step's span names).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Startup => "startup",
            Phase::Rollout => "rollout",
            Phase::Reward => "reward",
            Phase::ForwardBackward => "forward_backward",
            Phase::Optimizer => "optimizer",
            Phase::WeightSync => "weight_sync",
            Phase::Checkpoint => "checkpoint",
            Phase::Eval => "eval",
            Phase::Done => "done",
        }
    }
}

/// The `phase` label of a `time/<name>` step-log entry (`None` for `time/step`).
pub fn timing_phase(trl_name: &str) -> Option<String> {
    let name = trl_name.strip_prefix("time/")?;
    Some(match name {
        "step" => return None,
        "generate" => "rollout".into(),
        "weight_push" => "weight_sync".into(),
        other => sanitise(other),
    })
}

/// The trainer's metrics registry.
pub struct Metrics {
    registry: Registry,
    dynamic: Mutex<BTreeMap<String, Gauge>>,
    pub steps_total: IntCounter,
    pub step: Gauge,
    pub last_step_timestamp_seconds: Gauge,
    pub step_duration_seconds: prometheus::Histogram,
    pub phase_duration_seconds: HistogramVec,
    pub phase: IntGaugeVec,
    pub phase_start_timestamp_seconds: Gauge,
    pub model_state_bytes: GaugeVec,
    pub worker_healthy: GaugeVec,
    pub worker_weight_version: GaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn sanitise(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect()
}

/// `rewards/accuracy/mean` -> `trainer_rewards_accuracy_mean`.
pub fn prometheus_name(trl_name: &str) -> String {
    format!("trainer_{}", sanitise(trl_name))
}

/// Seconds since the Unix epoch (what Prometheus' `time()` compares with).
pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl Metrics {
    /// A registry with the fixed metrics; `rank` labels every series.
    pub fn new(rank: usize) -> Metrics {
        let mut labels = std::collections::HashMap::new();
        labels.insert("rank".to_string(), rank.to_string());
        let registry =
            Registry::new_custom(None, Some(labels)).expect("static registry settings are valid");
        let gauge = |n: &str, h: &str| Gauge::new(n, h).expect("static metric");
        let gauge_vec =
            |n: &str, h: &str, l: &str| GaugeVec::new(Opts::new(n, h), &[l]).expect("static");
        let m = Metrics {
            registry,
            dynamic: Mutex::new(BTreeMap::new()),
            steps_total: IntCounter::new("trainer_steps_total", "Optimizer steps done")
                .expect("static metric"),
            step: gauge("trainer_step", "Optimizer steps done, resumed ones included"),
            last_step_timestamp_seconds: gauge(
                "trainer_last_step_timestamp_seconds",
                "Unix time at which the last optimizer step was logged (the start before the first)",
            ),
            step_duration_seconds: prometheus::Histogram::with_opts(
                HistogramOpts::new(
                    "trainer_step_duration_seconds",
                    "Wall-clock seconds of a step (a GRPO round: generation to weight push)",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
            )
            .expect("static metric"),
            phase_duration_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "trainer_phase_duration_seconds",
                    "Wall-clock seconds spent in one phase of a step",
                )
                .buckets(DURATION_BUCKETS.to_vec()),
                &["phase"],
            )
            .expect("static metric"),
            phase: IntGaugeVec::new(
                Opts::new(
                    "trainer_phase",
                    "1 for the phase this rank is in now, 0 for the others",
                ),
                &["phase"],
            )
            .expect("static metric"),
            phase_start_timestamp_seconds: gauge(
                "trainer_phase_start_timestamp_seconds",
                "Unix time at which this rank entered its current phase",
            ),
            model_state_bytes: gauge_vec(
                "trainer_model_state_bytes",
                "Bytes of model state this rank holds (kind: params, grads, optimizer)",
                "kind",
            ),
            worker_healthy: gauge_vec(
                "trainer_worker_healthy",
                "1 when the rollout worker answered its last call, else 0",
                "worker",
            ),
            worker_weight_version: gauge_vec(
                "trainer_worker_weight_version",
                "Weight version the rollout worker last reported",
                "worker",
            ),
        };
        for c in [
            Box::new(m.steps_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.step.clone()),
            Box::new(m.last_step_timestamp_seconds.clone()),
            Box::new(m.step_duration_seconds.clone()),
            Box::new(m.phase_duration_seconds.clone()),
            Box::new(m.phase.clone()),
            Box::new(m.phase_start_timestamp_seconds.clone()),
            Box::new(m.model_state_bytes.clone()),
            Box::new(m.worker_healthy.clone()),
            Box::new(m.worker_weight_version.clone()),
        ] {
            m.registry.register(c).expect("names are unique");
        }
        // "No step since" counts from the start until the first step.
        m.last_step_timestamp_seconds.set(unix_now());
        m.enter_phase(Phase::Startup);
        m
    }

    /// Marks `phase` as the one this rank is in from now on.
    pub fn enter_phase(&self, phase: Phase) {
        for p in Phase::ALL {
            self.phase
                .with_label_values(&[p.as_str()])
                .set(i64::from(p == phase));
        }
        self.phase_start_timestamp_seconds.set(unix_now());
    }

    /// Sets the gauge of every entry of `log` but the `time/*` ones (creating it on
    /// first use).
    pub fn record(&self, log: &StepLog) {
        let mut dynamic = self.dynamic.lock().unwrap_or_else(|p| p.into_inner());
        for (name, value) in log {
            if name.starts_with("time/") {
                continue;
            }
            let gauge = dynamic.entry(name.clone()).or_insert_with(|| {
                let g = Gauge::new(prometheus_name(name), format!("TRL metric `{name}`"))
                    .expect("sanitised name is valid");
                // Two TRL names can only collide after sanitising if they differ in
                // punctuation alone; the second then stays unexported.
                let _ = self.registry.register(Box::new(g.clone()));
                g
            });
            gauge.set(*value);
        }
    }

    /// A finished optimizer step: [`Metrics::record`], the `time/*` entries into the
    /// duration histograms, and the step number and its timestamp.
    pub fn record_step(&self, step: u64, log: &StepLog) {
        self.record(log);
        for (name, &secs) in log {
            if !secs.is_finite() || secs < 0.0 {
                continue;
            }
            if name == "time/step" {
                self.step_duration_seconds.observe(secs);
            } else if let Some(phase) = timing_phase(name) {
                self.phase_duration_seconds
                    .with_label_values(&[phase.as_str()])
                    .observe(secs);
            }
        }
        self.step.set(step as f64);
        self.last_step_timestamp_seconds.set(unix_now());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = vec![];
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into memory cannot fail");
        String::from_utf8(buf).expect("Prometheus text is UTF-8")
    }
}

/// Serves `GET /metrics` on `listener` until the runtime stops.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    use axum::{routing::get, Router};
    let app = Router::new().route(
        "/metrics",
        get(move || {
            let m = metrics.clone();
            async move { ([("content-type", "text/plain; version=0.0.4")], m.render()) }
        }),
    );
    axum::serve(listener, app).await
}

/// Binds `addr` and serves in the background on `rt`; returns the bound address.
pub fn spawn(
    rt: &tokio::runtime::Runtime,
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> std::io::Result<SocketAddr> {
    let listener = rt.block_on(tokio::net::TcpListener::bind(addr))?;
    let bound = listener.local_addr()?;
    rt.spawn(async move {
        if let Err(e) = serve(listener, metrics).await {
            tracing::warn!(error = %e, "metrics endpoint stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitised_and_values_exported() {
        assert_eq!(
            prometheus_name("rewards/accuracy/mean"),
            "trainer_rewards_accuracy_mean"
        );
        let m = Metrics::new(1);
        let mut log = StepLog::new();
        log.insert("reward".into(), 0.25);
        log.insert("clip_ratio/low_mean".into(), 0.5);
        m.record(&log);
        log.insert("reward".into(), 0.75);
        m.record(&log);
        m.model_state_bytes
            .with_label_values(&["params"])
            .set(1024.0);
        let text = m.render();
        assert!(text.contains("trainer_reward{rank=\"1\"} 0.75"), "{text}");
        assert!(
            text.contains("trainer_clip_ratio_low_mean{rank=\"1\"} 0.5"),
            "{text}"
        );
        assert!(
            text.contains("trainer_model_state_bytes{kind=\"params\",rank=\"1\"} 1024"),
            "{text}"
        );
    }

    #[test]
    fn timings_become_histograms_and_steps_are_timestamped() {
        let m = Metrics::new(0);
        let mut log = StepLog::new();
        log.insert("time/step".into(), 3.0);
        log.insert("time/generate".into(), 2.0);
        log.insert("time/weight_push".into(), 0.3);
        log.insert("time/forward_backward".into(), 0.6);
        log.insert("loss".into(), 0.1);
        let before = unix_now();
        m.record_step(7, &log);
        let text = m.render();
        for want in [
            "trainer_step_duration_seconds_count{rank=\"0\"} 1",
            "trainer_step_duration_seconds_bucket{rank=\"0\",le=\"5\"} 1",
            "trainer_step_duration_seconds_bucket{rank=\"0\",le=\"2.5\"} 0",
            "trainer_phase_duration_seconds_sum{phase=\"rollout\",rank=\"0\"} 2",
            "trainer_phase_duration_seconds_count{phase=\"weight_sync\",rank=\"0\"} 1",
            "trainer_phase_duration_seconds_count{phase=\"forward_backward\",rank=\"0\"} 1",
            "trainer_step{rank=\"0\"} 7",
            "trainer_loss{rank=\"0\"} 0.1",
        ] {
            assert!(text.contains(want), "{want} missing:\n{text}");
        }
        assert!(!text.contains("trainer_time_"), "{text}");
        let ts = m.last_step_timestamp_seconds.get();
        assert!(ts >= before && ts <= unix_now(), "{ts}");
        // Every name follows Prometheus' conventions: no ':' anywhere.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(!name.contains(':'), "{name}");
        }
    }

    #[test]
    fn exactly_one_phase_is_current() {
        let m = Metrics::new(2);
        let t0 = m.phase_start_timestamp_seconds.get();
        assert!(t0 > 0.0);
        m.enter_phase(Phase::WeightSync);
        let text = m.render();
        assert!(text.contains("trainer_phase{phase=\"weight_sync\",rank=\"2\"} 1"));
        assert!(text.contains("trainer_phase{phase=\"startup\",rank=\"2\"} 0"));
        let current: i64 = Phase::ALL
            .iter()
            .map(|p| m.phase.with_label_values(&[p.as_str()]).get())
            .sum();
        assert_eq!(current, 1);
        assert!(m.phase_start_timestamp_seconds.get() >= t0);
        assert_eq!(timing_phase("time/generate").as_deref(), Some("rollout"));
        assert_eq!(timing_phase("time/step"), None);
        assert_eq!(timing_phase("loss"), None);
    }

    #[test]
    fn endpoint_serves_over_http() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let m = Arc::new(Metrics::new(0));
        m.steps_total.inc();
        let addr = spawn(&rt, "127.0.0.1:0".parse().unwrap(), m).unwrap();
        let body = rt.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        });
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("trainer_steps_total{rank=\"0\"} 1"), "{body}");
    }
}
