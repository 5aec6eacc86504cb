//! Elastic workers: `rollout.workers` entries of the form `dns:///HOST:PORT` (gRPC's
//! DNS naming) stand for every address HOST resolves to (a Kubernetes headless
//! Service lists its ready pods), re-resolved every `rollout.dns_refresh_secs`, so
//! workers can be added or removed without restarting the trainer. `http://` entries
//! are single workers, as before.
//!
//! Data flow: [`WorkerSource::parse`] at validation; [`resolve`] turns the sources into
//! worker urls (`http://IP:PORT`); the client hands them to
//! [`super::pool::Pool::sync_urls`], which appends new workers (probed at once, and
//! unusable until they serve the current weight version, which the next push gives
//! them) and retires vanished ones (never used again unless they reappear).

use super::error::WorkerEntryError;

/// One `rollout.workers` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerSource {
    /// `http://host:port`: one worker.
    Url(String),
    /// `dns:///host:port`: one worker per address of `host`.
    Dns { host: String, port: u16 },
}

/// The scheme of DNS entries.
pub const DNS_SCHEME: &str = "dns:///";

impl WorkerSource {
    /// Parses an entry; the error says what is wrong with it (the caller names the field).
    pub fn parse(entry: &str) -> Result<WorkerSource, WorkerEntryError> {
        if let Some(rest) = entry.strip_prefix(DNS_SCHEME) {
            let (host, port) = rest
                .rsplit_once(':')
                .ok_or(WorkerEntryError::DnsWithoutPort)?;
            let port: u16 =
                port.parse()
                    .ok()
                    .filter(|&p| p > 0)
                    .ok_or_else(|| WorkerEntryError::BadPort {
                        port: port.to_string(),
                    })?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            if host.is_empty() || host.contains('/') {
                return Err(WorkerEntryError::DnsWithoutHost);
            }
            return Ok(WorkerSource::Dns {
                host: host.to_string(),
                port,
            });
        }
        let rest = entry
            .strip_prefix("http://")
            .or_else(|| entry.strip_prefix("https://"))
            .ok_or(WorkerEntryError::UnknownScheme)?;
        if rest.is_empty() || entry.parse::<tonic::transport::Uri>().is_err() {
            return Err(WorkerEntryError::BadUrl);
        }
        Ok(WorkerSource::Url(entry.to_string()))
    }

    pub fn is_dns(&self) -> bool {
        matches!(self, WorkerSource::Dns { .. })
    }
}

/// The worker urls of `sources`, deduplicated in order of appearance; a DNS entry that
/// does not resolve contributes nothing and an error line (`name: why`).
pub async fn resolve(sources: &[WorkerSource]) -> (Vec<String>, Vec<String>) {
    let mut urls: Vec<String> = vec![];
    let mut errors = vec![];
    for s in sources {
        match s {
            WorkerSource::Url(u) => {
                if !urls.contains(u) {
                    urls.push(u.clone());
                }
            }
            WorkerSource::Dns { host, port } => {
                match tokio::net::lookup_host((host.as_str(), *port)).await {
                    Ok(addrs) => {
                        let mut found: Vec<String> = addrs.map(|a| format!("http://{a}")).collect();
                        found.sort();
                        found.dedup();
                        if found.is_empty() {
                            errors.push(format!("{DNS_SCHEME}{host}:{port}: no address"));
                        }
                        for u in found {
                            if !urls.contains(&u) {
                                urls.push(u);
                            }
                        }
                    }
                    Err(e) => errors.push(format!("{DNS_SCHEME}{host}:{port}: {e}")),
                }
            }
        }
    }
    (urls, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_or_say_why_not() {
        assert_eq!(
            WorkerSource::parse("dns:///grpo-rollout-worker.ns.svc:50051").unwrap(),
            WorkerSource::Dns {
                host: "grpo-rollout-worker.ns.svc".into(),
                port: 50051
            }
        );
        assert_eq!(
            WorkerSource::parse("http://10.0.0.1:50051").unwrap(),
            WorkerSource::Url("http://10.0.0.1:50051".into())
        );
        for (bad, why) in [
            ("dns:///host", "port is required"),
            ("dns:///host:0", "allowed: 1..65535"),
            ("dns:///:50051", "host name"),
            ("10.0.0.1:50051", "must start with http://"),
            ("http://", "not a valid"),
        ] {
            let e = WorkerSource::parse(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[tokio::test]
    async fn a_name_resolves_to_one_url_per_address() {
        let sources = vec![
            WorkerSource::parse("dns:///localhost:50051").unwrap(),
            WorkerSource::parse("http://127.0.0.1:50051").unwrap(),
            WorkerSource::parse("dns:///does-not-exist.invalid:1").unwrap(),
        ];
        let (urls, errors) = resolve(&sources).await;
        assert!(
            urls.contains(&"http://127.0.0.1:50051".to_string()),
            "{urls:?}"
        );
        assert_eq!(
            urls.iter()
                .filter(|u| *u == "http://127.0.0.1:50051")
                .count(),
            1,
            "deduplicated: {urls:?}"
        );
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("dns:///does-not-exist.invalid:1"));
    }
}
