//! How the client reaches a worker: the API key it sends, TLS, and HTTP/2 keepalive.
//!
//! Data flow: [`Transport::from_config`] reads the key (`ROLLOUT_API_KEY`, or the file
//! `rollout.api_key_file` names) and the PEM files once; [`Transport::connect`] opens a
//! channel to one url (TLS for `https://`), and every call on it carries
//! `authorization: Bearer <key>` through [`Auth`], a tonic interceptor.
use super::error::ProbeError;
use crate::config::invalid::{bad, InvalidConfig};
use std::path::Path;
use std::time::Duration;

use proto::v1::rollout_service_client::RolloutServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::config::RolloutConfig;

/// HTTP/2 PING interval and answer timeout on idle and busy connections alike: a worker
/// that vanished without a FIN (power loss, a partition) is noticed in seconds.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// Adds the `authorization` metadata to every call.
#[derive(Clone, Default)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A channel to one worker with its credentials.
#[derive(Clone)]
pub struct Conn {
    channel: Channel,
    auth: Auth,
}

/// The generated client over an authenticated channel.
pub type WorkerClient = RolloutServiceClient<InterceptedService<Channel, Auth>>;

impl Conn {
    pub fn client(self) -> WorkerClient {
        RolloutServiceClient::with_interceptor(self.channel, self.auth)
    }
}

/// Credentials and TLS settings shared by every connection of a client.
#[derive(Clone, Default)]
pub struct Transport {
    auth: Auth,
    tls: Option<ClientTlsConfig>,
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transport")
            .field("api_key", &self.auth.0.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

fn read(field: &str, path: &Path) -> Result<Vec<u8>, InvalidConfig> {
    std::fs::read(path).map_err(|e| {
        bad(
            &format!("rollout.{field}"),
            format!("rollout.{field}: cannot read {}: {e}", path.display()),
        )
    })
}

impl Transport {
    /// The key from `env_key` (ROLLOUT_API_KEY) or `rollout.api_key_file`, and the TLS
    /// files of `cfg`; errors name the field.
    pub fn from_config(
        cfg: &RolloutConfig,
        env_key: Option<&str>,
    ) -> Result<Transport, InvalidConfig> {
        let key = match (env_key, &cfg.api_key_file) {
            (Some(_), Some(_)) => {
                return Err(bad(
                    "rollout.api_key_file",
                    "rollout.api_key_file is set and so is ROLLOUT_API_KEY; use one",
                ))
            }
            (Some(k), None) => Some(k.trim().to_string()),
            (None, Some(path)) => Some(
                String::from_utf8_lossy(&read("api_key_file", path)?)
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        let auth = match key {
            None => Auth(None),
            Some(k) if k.is_empty() => {
                return Err(bad(
                    "rollout.api_key_file",
                    "the API key (ROLLOUT_API_KEY or rollout.api_key_file) is empty",
                ))
            }
            Some(k) => Auth(Some(format!("Bearer {k}").parse().map_err(|_| {
                bad(
                    "rollout.api_key_file",
                    "the API key must be printable ASCII without spaces",
                )
            })?)),
        };
        let tls = match &cfg.ssl_ca_certs {
            None => None,
            Some(ca) => {
                let mut t = ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(read("ssl_ca_certs", ca)?));
                if let (Some(cert), Some(key)) = (&cfg.ssl_certfile, &cfg.ssl_keyfile) {
                    t = t.identity(Identity::from_pem(
                        read("ssl_certfile", cert)?,
                        read("ssl_keyfile", key)?,
                    ));
                }
                Some(t)
            }
        };
        Ok(Transport { auth, tls })
    }

    /// Connects to `url` within `timeout`.
    pub async fn connect(&self, url: String, timeout: Duration) -> Result<Conn, ProbeError> {
        let mut endpoint = Endpoint::from_shared(url.clone())
            .map_err(|error| ProbeError::Endpoint { error })?
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        if url.starts_with("https://") {
            let tls = self.tls.clone().ok_or(ProbeError::NoCaCerts)?;
            endpoint = endpoint
                .tls_config(tls)
                .map_err(|error| ProbeError::Tls { error })?;
        }
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| ProbeError::Connect { error })?;
        Ok(Conn {
            channel,
            auth: self.auth.clone(),
        })
    }
}
