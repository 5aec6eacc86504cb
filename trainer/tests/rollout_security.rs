//! The trainer's rollout client against workers that require an API key and TLS: with
//! the key (from `rollout.api_key_file`) and the CA (`rollout.ssl_ca_certs`) it
//! generates; without the key no worker is usable and the error says why.
use std::path::PathBuf;
use std::sync::Arc;

use rollout_worker::{ApiKey, EngineHandle, Metrics, ServeOptions, WorkerConfig};
use trainer::rollout::{PromptJob, RolloutClient, RolloutConfig};

const KEY: &str = "trainer-test-key";

fn worker_config() -> WorkerConfig {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/generated/qwen2-tiny");
    assert!(
        dir.exists(),
        "{} missing: run scripts/test.sh",
        dir.display()
    );
    let mut c = WorkerConfig::new(dir);
    c.device = "cpu".into();
    c
}

/// Serves a keyed worker (TLS when `tls` gives cert and key PEM); returns its gRPC url.
async fn start(tls: Option<(&str, &str, &std::path::Path)>) -> String {
    let mut c = worker_config();
    // Health needs the key too, so a client without it fails its probe.
    c.server.open_health_and_metrics = false;
    if let Some((cert, key, dir)) = tls {
        let (cp, kp) = (dir.join("w.pem"), dir.join("w.key"));
        std::fs::write(&cp, cert).unwrap();
        std::fs::write(&kp, key).unwrap();
        c.server.ssl_certfile = Some(cp);
        c.server.ssl_keyfile = Some(kp);
    }
    let opts = ServeOptions::from_config(&c.server, Some(ApiKey::new(KEY).unwrap())).unwrap();
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    let engine = EngineHandle::load(&c, Arc::new(Metrics::new("test"))).unwrap();
    let g = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("{scheme}://localhost:{}", g.local_addr().unwrap().port());
    tokio::spawn(rollout_worker::serve_with(
        g,
        h,
        engine,
        opts,
        std::future::pending(),
    ));
    url
}

fn config(url: &str, key_file: Option<PathBuf>, ca: Option<PathBuf>) -> RolloutConfig {
    RolloutConfig {
        workers: vec![url.to_string()],
        connect_timeout_secs: 5.0,
        request_timeout_secs: 30.0,
        api_key_file: key_file,
        ssl_ca_certs: ca,
        ..Default::default()
    }
}

async fn generate(client: &RolloutClient) -> usize {
    let jobs = vec![PromptJob {
        key: 1,
        token_ids: vec![1, 2, 3],
    }];
    let sampling = trainer::rollout::Sampling {
        temperature: 1.0,
        top_p: 1.0,
        top_k: 0,
        min_p: 0.0,
        max_new_tokens: 2,
        seed: Some(1),
        ignore_eos: false,
    };
    client
        .generate(jobs, 2, sampling, false, 0, |_| {})
        .await
        .unwrap()
        .len()
}

#[tokio::test]
async fn the_client_sends_the_key_and_verifies_tls() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{KEY}\n")).unwrap();

    let url = start(None).await;
    let err = RolloutClient::connect(config(&url, None, None))
        .await
        .err()
        .expect("no key, no worker")
        .to_string();
    assert!(err.contains("Unauthenticated"), "{err}");
    let client = RolloutClient::connect(config(&url, Some(key_file.clone()), None))
        .await
        .unwrap();
    assert_eq!(generate(&client).await, 1);

    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(vec![]).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf_key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .signed_by(&leaf_key, &ca_cert, &ca_key)
        .unwrap();
    let url = start(Some((&leaf.pem(), &leaf_key.serialize_pem(), dir.path()))).await;
    assert!(url.starts_with("https://"));
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca_cert.pem()).unwrap();
    let client = RolloutClient::connect(config(&url, Some(key_file), Some(ca_file)))
        .await
        .unwrap();
    assert_eq!(generate(&client).await, 1);
}
