//! Who may talk to the worker, and over what: the API key, TLS material, and the server
//! limits both front ends apply ([`ServeOptions`]).
//!
//! Data flow: `main.rs` reads the key from `ROLLOUT_API_KEY` or the file
//! `--api-key-file` names ([`ApiKey::from_sources`]; never a command-line value, which
//! `ps` shows to every user) and builds [`ServeOptions::from_config`], which also loads
//! the PEM files of [`ServerConfig`]. HTTP checks `Authorization: Bearer <key>` in a
//! middleware (`http.rs`), gRPC the `authorization` metadata in [`GrpcGuard`], a tower
//! layer in front of the service that also caps the size of every request but the
//! weight stream. Keys are compared in constant time. docs/security.md has the threat
//! model.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use subtle::ConstantTimeEq;
use tonic::Status;

use crate::config::ServerConfig;

/// Why the security settings could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum SecurityError {
    #[error("{what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("API key: {0}")]
    Key(String),
    #[error("TLS: {0}")]
    Tls(String),
}

/// The bearer token clients must present. Debug output never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(Arc<str>);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

impl ApiKey {
    /// A key of visible ASCII characters (it travels in an HTTP header).
    pub fn new(key: &str) -> Result<ApiKey, SecurityError> {
        let key = key.trim();
        if key.is_empty() {
            return Err(SecurityError::Key("is empty".into()));
        }
        if !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SecurityError::Key(
                "must be printable ASCII without spaces (it is sent as an HTTP header)".into(),
            ));
        }
        Ok(ApiKey(key.into()))
    }

    /// The key from the environment value (`ROLLOUT_API_KEY`) or a file holding it;
    /// both given is an error, neither is no key.
    pub fn from_sources(
        env_value: Option<&str>,
        file: Option<&Path>,
    ) -> Result<Option<ApiKey>, SecurityError> {
        match (env_value, file) {
            (Some(_), Some(_)) => Err(SecurityError::Key(
                "both ROLLOUT_API_KEY and --api-key-file are set; use one".into(),
            )),
            (Some(v), None) => ApiKey::new(v).map(Some),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|source| SecurityError::Read {
                    what: "API key file",
                    path: path.to_path_buf(),
                    source,
                })?;
                ApiKey::new(&text).map(Some)
            }
            (None, None) => Ok(None),
        }
    }

    /// The key itself, for a client to send.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether `header` (an `Authorization` value) is `Bearer <this key>`; constant
    /// time in the key's content.
    pub fn accepts(&self, header: Option<&[u8]>) -> bool {
        let Some(h) = header else { return false };
        let Some(token) = h.strip_prefix(b"Bearer ") else {
            return false;
        };
        bool::from(token.trim_ascii().ct_eq(self.0.as_bytes()))
    }
}

/// PEM material of a TLS server, read once at start.
#[derive(Clone)]
pub struct TlsMaterial {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    /// CA certificates client certificates must chain to (mutual TLS).
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, SecurityError> {
    std::fs::read(path).map_err(|source| SecurityError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

impl TlsMaterial {
    /// The rustls configuration of the HTTP front end (HTTP/1.1 over TLS).
    pub fn rustls_config(&self) -> Result<Arc<rustls::ServerConfig>, SecurityError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let tls = |e: String| SecurityError::Tls(e);
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| tls(format!("ssl_certfile: {e}")))?;
        if certs.is_empty() {
            return Err(tls("ssl_certfile holds no certificate".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|e| tls(format!("ssl_keyfile: {e}")))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| tls(e.to_string()))?;
        let builder = match &self.client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(pem) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(pem) {
                    let c = c.map_err(|e| tls(format!("ssl_ca_certs: {e}")))?;
                    roots
                        .add(c)
                        .map_err(|e| tls(format!("ssl_ca_certs: {e}")))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| tls(format!("ssl_ca_certs: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|e| tls(format!("ssl_certfile/ssl_keyfile: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }

    /// The tonic configuration of the gRPC front end.
    pub fn tonic_config(&self, handshake_timeout: Duration) -> tonic::transport::ServerTlsConfig {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        let mut c = ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.cert_pem, &self.key_pem))
            .timeout(handshake_timeout);
        if let Some(ca) = &self.client_ca_pem {
            c = c.client_ca_root(Certificate::from_pem(ca));
        }
        c
    }
}

/// How the front ends serve: authentication, TLS and limits.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub api_key: Option<ApiKey>,
    pub open_health_and_metrics: bool,
    pub tls: Option<TlsMaterial>,
    /// Port of the weight data plane (`server.data_port`; 0: any free one).
    pub data_port: u16,
    pub max_connections: usize,
    pub max_idle_connections: usize,
    pub header_read_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub max_request_bytes: usize,
    pub shutdown_timeout: Duration,
}

impl Default for ServeOptions {
    /// No key, no TLS, the default limits of [`ServerConfig`].
    fn default() -> Self {
        let c = ServerConfig::default();
        Self::with_limits(&c, None, None)
    }
}

impl ServeOptions {
    fn with_limits(c: &ServerConfig, api_key: Option<ApiKey>, tls: Option<TlsMaterial>) -> Self {
        let secs = Duration::from_secs_f64;
        ServeOptions {
            api_key,
            open_health_and_metrics: c.open_health_and_metrics,
            tls,
            data_port: c.data_port,
            max_connections: c.max_connections,
            max_idle_connections: c.max_idle_connections,
            header_read_timeout: secs(c.header_read_timeout_secs),
            keepalive_interval: secs(c.keepalive_interval_secs),
            keepalive_timeout: secs(c.keepalive_timeout_secs),
            max_request_bytes: c.max_request_bytes,
            shutdown_timeout: secs(c.shutdown_timeout_secs),
        }
    }

    /// The options of `c` (validated first) with `api_key`; reads the PEM files and
    /// checks that they form a usable TLS configuration.
    pub fn from_config(c: &ServerConfig, api_key: Option<ApiKey>) -> Result<Self, SecurityError> {
        c.validate()
            .map_err(|e| SecurityError::Tls(e.to_string()))?;
        let tls = match (&c.ssl_certfile, &c.ssl_keyfile) {
            (Some(cert), Some(key)) => Some(TlsMaterial {
                cert_pem: read("ssl_certfile", cert)?,
                key_pem: read("ssl_keyfile", key)?,
                client_ca_pem: c
                    .ssl_ca_certs
                    .as_deref()
                    .map(|p| read("ssl_ca_certs", p))
                    .transpose()?,
            }),
            _ => None,
        };
        if let Some(t) = &tls {
            t.rustls_config()?;
        }
        Ok(Self::with_limits(c, api_key, tls))
    }

    /// Whether a request for `path` may skip the key.
    pub(crate) fn is_open(&self, path: &str) -> bool {
        self.open_health_and_metrics && matches!(path, "/health" | "/metrics")
    }
}

/// gRPC methods that carry weights (limited by the service's own message limit).
const UPDATE_WEIGHTS_PATH: &str = "/rollout.v1.RolloutService/UpdateWeights";
const HEALTH_PATH: &str = "/rollout.v1.RolloutService/Health";

/// Tower layer in front of the gRPC service: checks the `authorization` metadata and
/// caps every request body except `UpdateWeights` at `max_request_bytes`.
#[derive(Debug, Clone)]
pub struct GrpcGuardLayer {
    api_key: Option<ApiKey>,
    open_health: bool,
    max_request_bytes: usize,
}

impl GrpcGuardLayer {
    pub fn new(o: &ServeOptions) -> Self {
        GrpcGuardLayer {
            api_key: o.api_key.clone(),
            open_health: o.open_health_and_metrics,
            max_request_bytes: o.max_request_bytes,
        }
    }
}

impl<S> tower_layer::Layer<S> for GrpcGuardLayer {
    type Service = GrpcGuard<S>;
    fn layer(&self, inner: S) -> GrpcGuard<S> {
        GrpcGuard {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcGuard<S> {
    inner: S,
    layer: GrpcGuardLayer,
}

type BoxFuture<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S> tower_service::Service<http::Request<tonic::body::Body>> for GrpcGuard<S>
where
    S: tower_service::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        > + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        let path = req.uri().path();
        if let Some(key) = &self.layer.api_key {
            let open = self.layer.open_health && path == HEALTH_PATH;
            let header = req.headers().get(http::header::AUTHORIZATION);
            if !open && !key.accepts(header.map(|h| h.as_bytes())) {
                let msg = if header.is_some() {
                    "the authorization metadata does not hold this worker's API key"
                } else {
                    "missing authorization metadata: send `authorization: Bearer <ROLLOUT_API_KEY>`"
                };
                let resp = Status::unauthenticated(msg).into_http();
                return Box::pin(async move { Ok(resp) });
            }
        }
        let req = if path == UPDATE_WEIGHTS_PATH {
            req
        } else {
            let limit = self.layer.max_request_bytes;
            req.map(|b| tonic::body::Body::new(LimitedBody::new(b, limit)))
        };
        Box::pin(self.inner.call(req))
    }
}

/// A request body that fails with RESOURCE_EXHAUSTED past `limit` bytes, before they
/// are buffered for decoding.
struct LimitedBody {
    inner: tonic::body::Body,
    left: usize,
    limit: usize,
}

impl LimitedBody {
    fn new(inner: tonic::body::Body, limit: usize) -> Self {
        LimitedBody {
            inner,
            left: limit,
            limit,
        }
    }
}

impl HttpBody for LimitedBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if data.len() > this.left {
                        return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                            "the request is larger than this worker's limit of {} bytes \
                             (server.max_request_bytes); send fewer or shorter prompts per call",
                            this.limit
                        )))));
                    }
                    this.left -= data.len();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            other => other,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_one_source_and_compare_exactly() {
        assert!(ApiKey::from_sources(None, None).unwrap().is_none());
        let k = ApiKey::from_sources(Some(" s3cret\n"), None)
            .unwrap()
            .unwrap();
        assert!(k.accepts(Some(b"Bearer s3cret")));
        assert!(!k.accepts(Some(b"Bearer s3cre")));
        assert!(!k.accepts(Some(b"Bearer s3crett")));
        assert!(!k.accepts(Some(b"s3cret")));
        assert!(!k.accepts(Some(b"Basic s3cret")));
        assert!(!k.accepts(None));
        assert_eq!(format!("{k:?}"), "ApiKey(<redacted>)");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "from-file\n").unwrap();
        let k = ApiKey::from_sources(None, Some(&f)).unwrap().unwrap();
        assert_eq!(k.expose(), "from-file");
        assert!(ApiKey::from_sources(Some("a"), Some(&f)).is_err());
        assert!(ApiKey::from_sources(Some(" "), None).is_err());
        assert!(ApiKey::from_sources(Some("a b"), None).is_err());
        let e = ApiKey::from_sources(None, Some(&dir.path().join("missing"))).unwrap_err();
        assert!(e.to_string().contains("API key file"), "{e}");
    }
}
