//! Prometheus metrics, named after vLLM's so existing dashboards and alerts work.
//!
//! Data flow: the engine thread updates gauges once per loop and counters/histograms as
//! tokens are sampled and groups finish; the gRPC service records weight updates; the
//! HTTP `/metrics` route renders [`Metrics::render`] in the text exposition format.
//! Names follow vLLM (`vllm:num_requests_running`, `vllm:time_to_first_token_seconds`,
//! ...) where vLLM has the concept, with vLLM's `model_name` label (the served model
//! name) that vLLM's Grafana dashboards filter on; the worker-specific ones (weight
//! version and updates, rejections) follow Prometheus' conventions (`rollout_` prefix,
//! no `:`, units in the name) and carry `model_name` too. vLLM counts requests where we
//! count sequences for the running/waiting gauges (one request of n completions is n
//! sequences); the help text says which.
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

/// vLLM's buckets for time to first token (seconds), with finer ones for CPU tiny models.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's inter-token latency buckets, extended below 10 ms.
const ITL_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
];
/// vLLM's request latency buckets.
const REQUEST_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
];
/// Weight updates: from a fraction of a second (tiny models) to minutes (large ones).
const UPDATE_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
];

/// Every metric of the worker, registered in its own registry.
pub struct Metrics {
    registry: Registry,
    pub num_requests_running: IntGauge,
    pub num_requests_waiting: IntGauge,
    pub kv_cache_usage_perc: Gauge,
    pub prefix_cache_queries: IntCounter,
    pub prefix_cache_hits: IntCounter,
    pub prompt_tokens_total: IntCounter,
    pub generation_tokens_total: IntCounter,
    pub num_preemptions_total: IntCounter,
    pub request_success_total: IntCounterVec,
    pub requests_rejected_total: IntCounterVec,
    pub time_to_first_token_seconds: Histogram,
    pub inter_token_latency_seconds: Histogram,
    pub e2e_request_latency_seconds: Histogram,
    pub request_queue_time_seconds: Histogram,
    pub weight_version: IntGauge,
    pub weight_update_duration_seconds: Histogram,
    pub weight_updates_total: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn histogram(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
        .expect("valid histogram options")
}

impl Metrics {
    /// Every metric, labelled `model_name = served_model_name` (what `/v1/models` lists:
    /// [`crate::WorkerConfig::model_name`]).
    pub fn new(served_model_name: &str) -> Self {
        let gauge = |n: &str, h: &str| IntGauge::new(n, h).expect("valid gauge");
        let counter = |n: &str, h: &str| IntCounter::new(n, h).expect("valid counter");
        let counter_vec = |n: &str, h: &str, l: &str| {
            IntCounterVec::new(Opts::new(n, h), &[l]).expect("valid counter")
        };
        let m = Metrics {
            registry: Registry::new_custom(
                None,
                Some(
                    [("model_name".to_string(), served_model_name.to_string())]
                        .into_iter()
                        .collect(),
                ),
            )
            .expect("a constant label is valid"),
            num_requests_running: gauge(
                "vllm:num_requests_running",
                "Number of sequences in the running batch (a request of n completions counts n).",
            ),
            num_requests_waiting: gauge(
                "vllm:num_requests_waiting",
                "Number of sequences accepted and waiting to be scheduled (preempted ones included).",
            ),
            kv_cache_usage_perc: Gauge::new(
                "vllm:kv_cache_usage_perc",
                "KV-cache usage: fraction of the paged KV blocks in use (1 = full); shared prefix blocks count once.",
            )
            .expect("valid gauge"),
            prefix_cache_queries: counter(
                "vllm:prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache (full blocks).",
            ),
            prefix_cache_hits: counter(
                "vllm:prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache (their KV blocks reused, not computed).",
            ),
            prompt_tokens_total: counter(
                "vllm:prompt_tokens_total",
                "Number of prompt tokens accepted (prompt length times n per request).",
            ),
            generation_tokens_total: counter(
                "vllm:generation_tokens_total",
                "Number of tokens generated.",
            ),
            num_preemptions_total: counter(
                "vllm:num_preemptions_total",
                "Cumulative number of sequences preempted for lack of KV-cache budget (they are recomputed).",
            ),
            request_success_total: counter_vec(
                "vllm:request_success_total",
                "Number of finished completions by finish reason (stop: stop token or string; length: max tokens or context).",
                "finished_reason",
            ),
            requests_rejected_total: counter_vec(
                "rollout_requests_rejected_total",
                "Requests refused before queueing, by reason (invalid_argument, overloaded, unavailable).",
                "reason",
            ),
            time_to_first_token_seconds: histogram(
                "vllm:time_to_first_token_seconds",
                "Seconds from a group's arrival to its first sampled token.",
                TTFT_BUCKETS,
            ),
            inter_token_latency_seconds: histogram(
                "vllm:inter_token_latency_seconds",
                "Seconds between consecutive tokens of a sequence.",
                ITL_BUCKETS,
            ),
            e2e_request_latency_seconds: histogram(
                "vllm:e2e_request_latency_seconds",
                "Seconds from a group's arrival to all its completions finishing.",
                REQUEST_BUCKETS,
            ),
            request_queue_time_seconds: histogram(
                "vllm:request_queue_time_seconds",
                "Seconds a group waited before its first sequence was scheduled.",
                REQUEST_BUCKETS,
            ),
            weight_version: gauge(
                "rollout_weight_version",
                "Version of the weights now serving (0: the checkpoint loaded at start).",
            ),
            weight_update_duration_seconds: histogram(
                "rollout_weight_update_duration_seconds",
                "Seconds from the first chunk of an applied update to the new weights serving (receive, assemble, drain, apply).",
                UPDATE_BUCKETS,
            ),
            weight_updates_total: counter_vec(
                "rollout_weight_updates_total",
                "Weight updates by outcome (applied, rejected, superseded, cancelled).",
                "outcome",
            ),
        };
        let collectors: Vec<Box<dyn prometheus::core::Collector>> = vec![
            Box::new(m.num_requests_running.clone()),
            Box::new(m.num_requests_waiting.clone()),
            Box::new(m.kv_cache_usage_perc.clone()),
            Box::new(m.prefix_cache_queries.clone()),
            Box::new(m.prefix_cache_hits.clone()),
            Box::new(m.prompt_tokens_total.clone()),
            Box::new(m.generation_tokens_total.clone()),
            Box::new(m.num_preemptions_total.clone()),
            Box::new(m.request_success_total.clone()),
            Box::new(m.requests_rejected_total.clone()),
            Box::new(m.time_to_first_token_seconds.clone()),
            Box::new(m.inter_token_latency_seconds.clone()),
            Box::new(m.e2e_request_latency_seconds.clone()),
            Box::new(m.request_queue_time_seconds.clone()),
            Box::new(m.weight_version.clone()),
            Box::new(m.weight_update_duration_seconds.clone()),
            Box::new(m.weight_updates_total.clone()),
        ];
        for c in collectors {
            m.registry.register(c).expect("metric names are unique");
        }
        // Label values that exist from the start, so dashboards see zeros.
        for r in ["stop", "length"] {
            m.request_success_total.with_label_values(&[r]);
        }
        for r in ["invalid_argument", "overloaded", "unavailable"] {
            m.requests_rejected_total.with_label_values(&[r]);
        }
        for r in ["applied", "rejected"] {
            m.weight_updates_total.with_label_values(&[r]);
        }
        m
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = vec![];
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_help_and_histograms_have_buckets() {
        let m = Metrics::new("tiny");
        m.time_to_first_token_seconds.observe(0.03);
        m.request_success_total.with_label_values(&["stop"]).inc();
        let text = m.render();
        for name in [
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
            "vllm:prompt_tokens_total",
            "vllm:generation_tokens_total",
            "vllm:time_to_first_token_seconds",
            "vllm:inter_token_latency_seconds",
            "vllm:e2e_request_latency_seconds",
            "vllm:request_success_total",
            "rollout_weight_version",
            "rollout_weight_update_duration_seconds",
            "rollout_weight_updates_total",
            "rollout_requests_rejected_total",
        ] {
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "{name} has no help"
            );
        }
        assert!(
            text.contains(
                "vllm:time_to_first_token_seconds_bucket{model_name=\"tiny\",le=\"0.04\"} 1"
            ),
            "{text}"
        );
        assert!(text.contains(
            "vllm:time_to_first_token_seconds_bucket{model_name=\"tiny\",le=\"0.02\"} 0"
        ));
        assert!(text.contains(
            "vllm:request_success_total{finished_reason=\"stop\",model_name=\"tiny\"} 1"
        ));
        // Our own names follow Prometheus' conventions; only vLLM's keep the ':'.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            assert!(
                !name.contains(':') || name.starts_with("vllm:"),
                "{name} is not vLLM's and has a ':'"
            );
            assert!(line.contains("model_name=\"tiny\""), "{line}");
        }
    }
}
