//! Collective communication between trainer ranks.
//!
//! Data flow: a launcher (torchrun or `scripts/launch`) starts one process per rank
//! and describes it in the environment → [`RendezvousEnv::from_env`] parses that →
//! [`connect`] meets the other ranks through rank 0's key-value store and builds the
//! one backend that fits → the trainer calls [`Communicator`] collectives on tensors.
//!
//! Backends: [`SingleComm`] (one rank), [`RingComm`] (CPU tensors, TCP ring) and
//! [`NcclComm`] (CUDA tensors). [`connect`] is the only place that chooses between
//! them; shard boundaries come from [`ShardLayout`] in every backend. [`AsyncComm`]
//! queues collectives on a thread of their own so callers can overlap them with
//! compute.
//! See docs/collectives.md for the protocols, timeouts and benchmark.

pub mod async_comm;
pub mod auth;
pub mod comm;
pub mod error;
pub mod nccl;
mod reduce;
pub mod rendezvous;
pub mod ring;
pub mod shard;
pub mod shared;
pub mod single;
pub mod store;

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tch::Device;

pub use async_comm::{AsyncComm, InFlight, Pending};
pub use auth::JobSecret;
pub use comm::{Communicator, Dtype, ReduceOp};
pub use error::CommError;
pub use nccl::NcclComm;
pub use rendezvous::{intra_op_threads, Rendezvous, RendezvousEnv};
pub use ring::RingComm;
pub use shard::ShardLayout;
pub use shared::SharedComm;
pub use single::SingleComm;

/// Which communicator [`connect`] builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `single` for one rank, `nccl` when the tensors live on CUDA, `ring` otherwise.
    #[default]
    Auto,
    Single,
    Ring,
    Nccl,
}

/// Settings of the `dist` component (the `[dist]` table of the trainer config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// Backend choice; `auto` follows the tensors' device.
    pub backend: Backend,
    /// Upper bound in seconds on every wait for another rank: rendezvous, each
    /// socket read or write, each NCCL collective. Must be at least 1.
    pub timeout_secs: u64,
    /// Ring chunk size in bytes (pipelining granularity); at least 8.
    pub ring_chunk_bytes: usize,
}

impl Default for DistConfig {
    fn default() -> Self {
        DistConfig {
            backend: Backend::Auto,
            timeout_secs: 300,
            ring_chunk_bytes: 1 << 20,
        }
    }
}

impl DistConfig {
    /// Cross-field checks; errors name the field and the allowed values.
    pub fn validate(&self) -> Result<(), CommError> {
        if self.timeout_secs == 0 {
            return Err(CommError::Config {
                field: "timeout_secs",
                detail: "must be at least 1".into(),
            });
        }
        if self.ring_chunk_bytes < 8 {
            return Err(CommError::Config {
                field: "ring_chunk_bytes",
                detail: format!("must be at least 8, got {}", self.ring_chunk_bytes),
            });
        }
        Ok(())
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

/// The backend `connect` builds for this configuration, device and world size.
pub fn choose_backend(requested: Backend, device: Device, world_size: usize) -> Backend {
    match (requested, device, world_size) {
        (Backend::Auto, _, 1) => Backend::Single,
        (Backend::Auto, Device::Cuda(_), _) => Backend::Nccl,
        (Backend::Auto, _, _) => Backend::Ring,
        (explicit, _, _) => explicit,
    }
}

/// Joins the job described by `env` and returns the communicator for tensors on
/// `device`. The single place where a backend is chosen.
pub fn connect(
    cfg: &DistConfig,
    env: &RendezvousEnv,
    device: Device,
) -> Result<Box<dyn Communicator>, CommError> {
    cfg.validate()?;
    match choose_backend(cfg.backend, device, env.world_size) {
        Backend::Single | Backend::Auto => {
            if env.world_size != 1 {
                return Err(CommError::Config {
                    field: "backend",
                    detail: format!(
                        "`single` needs WORLD_SIZE=1, got {} (allowed: auto, ring, nccl)",
                        env.world_size
                    ),
                });
            }
            Ok(Box::new(SingleComm))
        }
        Backend::Ring => {
            let rdzv = Rendezvous::join(env, cfg.timeout())?;
            Ok(Box::new(RingComm::connect(rdzv, cfg.ring_chunk_bytes)?))
        }
        Backend::Nccl => {
            let Device::Cuda(index) = device else {
                return Err(CommError::Config {
                    field: "backend",
                    detail: format!(
                        "`nccl` needs a CUDA device, got {device:?} (allowed for CPU: auto, ring)"
                    ),
                });
            };
            // Probe before rendezvous so a machine without CUDA fails fast and alone.
            nccl::probe(index)?;
            let rdzv = Rendezvous::join(env, cfg.timeout())?;
            Ok(Box::new(NcclComm::connect(rdzv, index)?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_choice() {
        assert_eq!(
            choose_backend(Backend::Auto, Device::Cpu, 1),
            Backend::Single
        );
        assert_eq!(
            choose_backend(Backend::Auto, Device::Cuda(0), 1),
            Backend::Single
        );
        assert_eq!(choose_backend(Backend::Auto, Device::Cpu, 4), Backend::Ring);
        assert_eq!(
            choose_backend(Backend::Auto, Device::Cuda(1), 2),
            Backend::Nccl
        );
        assert_eq!(
            choose_backend(Backend::Ring, Device::Cuda(0), 2),
            Backend::Ring
        );
        assert_eq!(
            choose_backend(Backend::Nccl, Device::Cuda(0), 1),
            Backend::Nccl
        );
    }

    #[test]
    fn config_validation_names_the_field() {
        assert!(DistConfig::default().validate().is_ok());
        let bad = DistConfig {
            timeout_secs: 0,
            ..DistConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(CommError::Config {
                field: "timeout_secs",
                ..
            })
        ));
        let bad = DistConfig {
            ring_chunk_bytes: 4,
            ..DistConfig::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(CommError::Config {
                field: "ring_chunk_bytes",
                ..
            })
        ));
    }

    #[test]
    fn config_rejects_unknown_fields() {
        let ok: DistConfig =
            serde_json::from_str(r#"{"backend": "ring", "timeout_secs": 5}"#).unwrap();
        assert_eq!((ok.backend, ok.timeout_secs), (Backend::Ring, 5));
        let err = serde_json::from_str::<DistConfig>(r#"{"timeout": 5}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `timeout`"), "{err}");
    }

    #[test]
    fn single_rank_needs_no_network_and_nccl_on_cpu_is_refused() {
        let comm = connect(
            &DistConfig::default(),
            &RendezvousEnv::single(),
            Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            (comm.backend(), comm.rank(), comm.world_size()),
            ("single", 0, 1)
        );
        let cfg = DistConfig {
            backend: Backend::Nccl,
            ..DistConfig::default()
        };
        let err = connect(&cfg, &RendezvousEnv::single(), Device::Cpu)
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                CommError::Config {
                    field: "backend",
                    ..
                }
            ),
            "{err}"
        );
    }
}
