//! The trainer's Prometheus endpoint.
//!
//! Every step the loop produces a [`StepLog`]: metric names as TRL logs them
//! (`reward`, `rewards/accuracy/mean`, `clip_ratio/low_mean`, `completions/mean_length`,
//! ...). The same values go to the console/log line and to gauges named
//! `trainer_<name>` with every character outside `[a-zA-Z0-9_]` turned into `_`
//! (`rewards/accuracy/mean` -> `trainer_rewards_accuracy_mean`), created on first use.
//! Fixed metrics: model-state bytes per kind (`trainer_model_state_bytes{kind}`), rollout
//! worker health and weight version (`trainer_worker_healthy{worker}`,
//! `trainer_worker_weight_version{worker}`) and a step counter.
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus::{Encoder, Gauge, GaugeVec, IntCounter, Opts, Registry, TextEncoder};

/// One step's metrics by TRL name, in a stable order.
pub type StepLog = BTreeMap<String, f64>;

/// The trainer's metrics registry.
pub struct Metrics {
    registry: Registry,
    dynamic: Mutex<BTreeMap<String, Gauge>>,
    pub steps_total: IntCounter,
    pub model_state_bytes: GaugeVec,
    pub worker_healthy: GaugeVec,
    pub worker_weight_version: GaugeVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

/// `rewards/accuracy/mean` -> `trainer_rewards_accuracy_mean`.
pub fn prometheus_name(trl_name: &str) -> String {
    let body: String = trl_name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("trainer_{body}")
}

impl Metrics {
    /// A registry with the fixed metrics; `rank` labels every series.
    pub fn new(rank: usize) -> Metrics {
        let mut labels = std::collections::HashMap::new();
        labels.insert("rank".to_string(), rank.to_string());
        let registry =
            Registry::new_custom(None, Some(labels)).expect("static registry settings are valid");
        let steps_total =
            IntCounter::new("trainer_steps_total", "Optimizer steps done").expect("static metric");
        let model_state_bytes = GaugeVec::new(
            Opts::new(
                "trainer_model_state_bytes",
                "Bytes of model state this rank holds (kind: params, grads, optimizer)",
            ),
            &["kind"],
        )
        .expect("static metric");
        let worker_healthy = GaugeVec::new(
            Opts::new(
                "trainer_worker_healthy",
                "1 when the rollout worker answered its last call, else 0",
            ),
            &["worker"],
        )
        .expect("static metric");
        let worker_weight_version = GaugeVec::new(
            Opts::new(
                "trainer_worker_weight_version",
                "Weight version the rollout worker last reported",
            ),
            &["worker"],
        )
        .expect("static metric");
        for c in [
            Box::new(steps_total.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(model_state_bytes.clone()),
            Box::new(worker_healthy.clone()),
            Box::new(worker_weight_version.clone()),
        ] {
            registry.register(c).expect("names are unique");
        }
        Metrics {
            registry,
            dynamic: Mutex::new(BTreeMap::new()),
            steps_total,
            model_state_bytes,
            worker_healthy,
            worker_weight_version,
        }
    }

    /// Sets the gauge of every entry of `log` (creating it on first use).
    pub fn record(&self, log: &StepLog) {
        let mut dynamic = self.dynamic.lock().expect("metrics lock");
        for (name, value) in log {
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
