//! Authentication, TLS and limits of both front ends, against a real worker serving the
//! tiny fixture on `127.0.0.1:0`: the API key (HTTP `Authorization: Bearer`, gRPC
//! `authorization` metadata, open health and metrics), TLS and mutual TLS with
//! certificates generated here (rcgen), request and response limits, the HTTP header
//! timeout, the connection limit, the idle keep-alive cap, and a shutdown bounded in
//! time with a stream open.
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tiny_config;
use proto::v1 as pb;
use proto::v1::rollout_service_client::RolloutServiceClient;
use rollout_worker::{ApiKey, EngineHandle, Metrics, ServeOptions, WorkerConfig};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

const KEY: &str = "test-key-0123456789";

struct Served {
    grpc: std::net::SocketAddr,
    http: std::net::SocketAddr,
    engine: EngineHandle,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), rollout_worker::ServeError>>,
}

async fn serve(config: &WorkerConfig, opts: ServeOptions) -> Served {
    let engine = EngineHandle::load(config, Arc::new(Metrics::new("test"))).unwrap();
    let g = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let h = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (grpc, http) = (g.local_addr().unwrap(), h.local_addr().unwrap());
    let (stop, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(rollout_worker::serve_with(
        g,
        h,
        engine.clone(),
        opts,
        async move {
            let _ = rx.await;
        },
    ));
    Served {
        grpc,
        http,
        engine,
        stop,
        task,
    }
}

impl Served {
    async fn shutdown(self) -> Duration {
        let t = Instant::now();
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
        t.elapsed()
    }
}

fn keyed() -> ServeOptions {
    ServeOptions {
        api_key: Some(ApiKey::new(KEY).unwrap()),
        ..ServeOptions::default()
    }
}

async fn channel(addr: std::net::SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn generate_req(max_new_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        prompts: vec![pb::Prompt {
            id: "p".into(),
            input: Some(pb::prompt::Input::TokenIds(pb::TokenIds {
                ids: vec![1, 2, 3],
            })),
        }],
        n: 2,
        sampling: Some(pb::SamplingParams {
            max_new_tokens,
            seed: Some(1),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn generate(
    client: &mut RolloutServiceClient<Channel>,
    req: pb::GenerateRequest,
    key: Option<&str>,
) -> Result<usize, tonic::Status> {
    let mut r = tonic::Request::new(req);
    if let Some(k) = key {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {k}").parse().unwrap());
    }
    let mut stream = client.generate(r).await?.into_inner();
    let mut groups = 0;
    while let Some(g) = stream.message().await? {
        assert_eq!(g.completions.len(), 2);
        groups += 1;
    }
    Ok(groups)
}

#[tokio::test]
async fn api_key_is_required_on_both_front_ends_except_health_and_metrics() {
    let s = serve(&tiny_config(), keyed()).await;
    let http = reqwest::Client::new();
    let base = format!("http://{}", s.http);
    let body = json!({"prompt": [1, 2, 3], "max_tokens": 2});
    for auth in [None, Some("Bearer wrong"), Some(KEY)] {
        let mut r = http.post(format!("{base}/v1/completions")).json(&body);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        let resp = r.send().await.unwrap();
        assert_eq!(resp.status(), 401, "auth {auth:?}");
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "authentication_error", "{v}");
    }
    let models = http.get(format!("{base}/v1/models")).send().await.unwrap();
    assert_eq!(models.status(), 401);
    let ok = http
        .post(format!("{base}/v1/completions"))
        .bearer_auth(KEY)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    for open in ["/health", "/metrics"] {
        let r = http.get(format!("{base}{open}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{open}");
    }

    let mut client = RolloutServiceClient::new(channel(s.grpc).await);
    let e = generate(&mut client, generate_req(2), None)
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("authorization"), "{e:?}");
    let e = generate(&mut client, generate_req(2), Some("wrong"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        generate(&mut client, generate_req(2), Some(KEY))
            .await
            .unwrap(),
        1
    );
    // A weight push without the key never reaches the assembler.
    let push = client
        .update_weights(futures::stream::iter(vec![pb::WeightUpdateMessage {
            kind: Some(pb::weight_update_message::Kind::Commit(pb::Commit {
                version: u64::MAX,
            })),
        }]))
        .await
        .unwrap_err();
    assert_eq!(push.code(), tonic::Code::Unauthenticated);
    assert_eq!(s.engine.stats().weight_version, 0);
    let info = client.get_info(pb::GetInfoRequest {}).await.unwrap_err();
    assert_eq!(info.code(), tonic::Code::Unauthenticated);
    client.health(pb::HealthRequest {}).await.unwrap();
    s.shutdown().await;

    // Health and metrics closed too when configured so.
    let mut c = tiny_config();
    c.server.open_health_and_metrics = false;
    let opts = ServeOptions {
        open_health_and_metrics: false,
        ..keyed()
    };
    let s = serve(&c, opts).await;
    let r = http
        .get(format!("http://{}/health", s.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let mut client = RolloutServiceClient::new(channel(s.grpc).await);
    let e = client.health(pb::HealthRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    s.shutdown().await;
}

/// A CA, a server certificate for `localhost` signed by it, and a client certificate.
struct Pki {
    ca_pem: String,
    server_cert: String,
    server_key: String,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(vec![]).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca_cert, &ca_key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into()]);
    let (client_cert, client_key) = leaf(vec!["trainer".into()]);
    Pki {
        ca_pem: ca_cert.pem(),
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}

/// `GET path` over TLS with an optional client identity; the status line, or the error.
async fn https_get(
    addr: std::net::SocketAddr,
    path: &str,
    ca_pem: &str,
    client: Option<(&str, &str)>,
) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .map(|c| c.unwrap())
                    .collect(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let mut tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    tls.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = vec![];
    tls.read_to_end(&mut out).await.map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out);
    text.lines()
        .next()
        .map(str::to_string)
        .ok_or_else(|| "no response".to_string())
}

fn tls_config(dir: &std::path::Path, p: &Pki, mutual: bool) -> WorkerConfig {
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let mut c = tiny_config();
    c.server.ssl_certfile = Some(write("server.pem", &p.server_cert));
    c.server.ssl_keyfile = Some(write("server.key", &p.server_key));
    if mutual {
        c.server.ssl_ca_certs = Some(write("ca.pem", &p.ca_pem));
    }
    c
}

#[tokio::test]
async fn tls_and_mutual_tls_on_both_front_ends() {
    let p = pki();
    let dir = tempfile::tempdir().unwrap();
    let c = tls_config(dir.path(), &p, false);
    let s = serve(&c, ServeOptions::from_config(&c.server, None).unwrap()).await;
    let line = https_get(s.http, "/health", &p.ca_pem, None).await.unwrap();
    assert!(line.contains("200"), "{line}");
    // Plain HTTP to the TLS port gets no HTTP answer.
    let mut plain = tokio::net::TcpStream::connect(s.http).await.unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![];
    let _ = tokio::time::timeout(Duration::from_secs(5), plain.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200 OK"));
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&p.ca_pem))
        .domain_name("localhost");
    let ch = Endpoint::from_shared(format!("https://{}", s.grpc))
        .unwrap()
        .tls_config(tls.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = RolloutServiceClient::new(ch);
    assert_eq!(
        generate(&mut client, generate_req(2), None).await.unwrap(),
        1
    );
    s.shutdown().await;

    // Mutual TLS: no client certificate, no connection; a certificate of the CA works.
    let c = tls_config(dir.path(), &p, true);
    let s = serve(&c, ServeOptions::from_config(&c.server, None).unwrap()).await;
    let refused = https_get(s.http, "/health", &p.ca_pem, None).await;
    assert!(refused.is_err(), "{refused:?}");
    let line = https_get(
        s.http,
        "/health",
        &p.ca_pem,
        Some((&p.client_cert, &p.client_key)),
    )
    .await
    .unwrap();
    assert!(line.contains("200"), "{line}");
    let anonymous = Endpoint::from_shared(format!("https://{}", s.grpc))
        .unwrap()
        .tls_config(tls.clone())
        .unwrap()
        .connect()
        .await;
    if let Ok(ch) = anonymous {
        let mut client = RolloutServiceClient::new(ch);
        assert!(client.health(pb::HealthRequest {}).await.is_err());
    }
    let ch = Endpoint::from_shared(format!("https://{}", s.grpc))
        .unwrap()
        .tls_config(tls.identity(Identity::from_pem(&p.client_cert, &p.client_key)))
        .unwrap()
        .connect()
        .await
        .unwrap();
    RolloutServiceClient::new(ch)
        .health(pb::HealthRequest {})
        .await
        .unwrap();
    s.shutdown().await;
}

#[tokio::test]
async fn oversized_requests_and_responses_are_refused_with_clear_errors() {
    let mut c = tiny_config();
    c.engine.max_response_tokens = 1000;
    let opts = ServeOptions {
        max_request_bytes: 4096,
        ..ServeOptions::default()
    };
    let s = serve(&c, opts).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/completions", s.http);
    let cases = [
        (
            json!({"prompt": [1, 2], "max_tokens": 200, "n": 8}),
            "max_response_tokens",
        ),
        (
            json!({"prompt": [1, 2], "max_tokens": 10, "logprobs": 20, "n": 8}),
            "top_logprobs = 20",
        ),
        (
            json!({"prompt": [1, 2], "max_tokens": 2, "stop": vec!["x"; 17]}),
            "at most 16",
        ),
        (
            json!({"prompt": [1, 2], "max_tokens": 2, "stop": ["y".repeat(300)]}),
            "stop[0] is 300 bytes",
        ),
    ];
    for (body, want) in cases {
        let r = http.post(&url).json(&body).send().await.unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let v: serde_json::Value = r.json().await.unwrap();
        let msg = v["error"]["message"].as_str().unwrap().to_string();
        assert!(msg.contains(want), "{want}: {msg}");
    }
    let mut client = RolloutServiceClient::new(channel(s.grpc).await);
    let mut wide = generate_req(200);
    wide.n = 8;
    let e = generate(&mut client, wide, None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("max_response_tokens"), "{e:?}");
    let mut big = generate_req(2);
    big.prompts[0].input = Some(pb::prompt::Input::TokenIds(pb::TokenIds {
        ids: vec![300; 4000],
    }));
    let e = generate(&mut client, big, None).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_request_bytes"), "{e:?}");
    // The worker still serves.
    assert_eq!(
        generate(&mut client, generate_req(2), None).await.unwrap(),
        1
    );
    s.shutdown().await;
}

#[tokio::test]
async fn slow_headers_are_cut_and_connections_are_limited() {
    let opts = ServeOptions {
        header_read_timeout: Duration::from_millis(500),
        max_connections: 2,
        ..ServeOptions::default()
    };
    let s = serve(&tiny_config(), opts).await;
    // A client that never finishes its headers is disconnected after the timeout.
    let mut slow = tokio::net::TcpStream::connect(s.http).await.unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let t = Instant::now();
    let mut buf = vec![];
    let r = tokio::time::timeout(Duration::from_secs(10), slow.read_to_end(&mut buf)).await;
    assert!(r.is_ok(), "the slow client was never cut");
    let cut = t.elapsed();
    assert!(
        cut >= Duration::from_millis(400) && cut < Duration::from_secs(5),
        "{cut:?}"
    );
    drop(slow);
    // Two idle connections hold both slots; a third is closed at once.
    let mut held = vec![];
    for _ in 0..2 {
        held.push(tokio::net::TcpStream::connect(s.http).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = tokio::net::TcpStream::connect(s.http).await.unwrap();
    let _ = third
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let mut buf = vec![];
    let n = tokio::time::timeout(Duration::from_secs(2), third.read_to_end(&mut buf))
        .await
        .expect("the refused connection is closed promptly");
    assert!(
        n.is_err() || buf.is_empty(),
        "{:?}",
        String::from_utf8_lossy(&buf)
    );
    drop(held);
    // The slots free up again.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = reqwest::get(format!("http://{}/health", s.http))
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    s.shutdown().await;
}

/// Sends `GET /health` on `conn` and reads the response: (its head, whether the server
/// closed the connection after it).
async fn health_on(conn: &mut tokio::net::TcpStream) -> (String, bool) {
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![];
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed before the response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    while buf.len() < head_end + len {
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed inside the body");
        buf.extend_from_slice(&chunk[..n]);
    }
    let closed = matches!(
        tokio::time::timeout(Duration::from_millis(300), conn.read(&mut chunk)).await,
        Ok(Ok(0) | Err(_))
    );
    (head, closed)
}

#[tokio::test]
async fn responses_that_would_leave_too_many_idle_connections_close_them() {
    let opts = ServeOptions {
        max_idle_connections: 1,
        ..ServeOptions::default()
    };
    let s = serve(&tiny_config(), opts).await;
    // Alone, a connection stays alive across requests.
    let mut a = tokio::net::TcpStream::connect(s.http).await.unwrap();
    for _ in 0..2 {
        let (head, closed) = health_on(&mut a).await;
        assert!(head.starts_with("http/1.1 200"), "{head}");
        assert!(!head.contains("connection: close") && !closed, "{head}");
    }
    // With `a` idle, a second one would make two idle connections: it is closed.
    let mut b = tokio::net::TcpStream::connect(s.http).await.unwrap();
    let (head, closed) = health_on(&mut b).await;
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close") && closed, "{head}");
    // `a` is still served, and kept.
    let (head, closed) = health_on(&mut a).await;
    assert!(!head.contains("connection: close") && !closed, "{head}");
    s.shutdown().await;
    // 0: every response closes its connection.
    let opts = ServeOptions {
        max_idle_connections: 0,
        ..ServeOptions::default()
    };
    let s = serve(&tiny_config(), opts).await;
    let mut c = tokio::net::TcpStream::connect(s.http).await.unwrap();
    let (head, closed) = health_on(&mut c).await;
    assert!(head.contains("connection: close") && closed, "{head}");
    s.shutdown().await;
}

#[tokio::test]
async fn shutdown_with_an_open_stream_is_bounded() {
    let opts = ServeOptions {
        shutdown_timeout: Duration::from_millis(500),
        ..ServeOptions::default()
    };
    let s = serve(&tiny_config(), opts).await;
    // A paused engine never finishes the request: its SSE stream stays open.
    s.engine.set_paused(true);
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/completions", s.http))
        .json(&json!({"prompt": [1, 2], "max_tokens": 4, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut client = RolloutServiceClient::new(channel(s.grpc).await);
    let pending = tokio::spawn(async move { generate(&mut client, generate_req(2), None).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let took = s.shutdown().await;
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    let r = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the open gRPC stream ends")
        .unwrap();
    assert!(r.is_err(), "{r:?}");
    drop(resp);
}
