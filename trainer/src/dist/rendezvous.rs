//! Rendezvous from torchrun's environment.
//!
//! Every launcher we support (torchrun, `scripts/launch`, a hand-written job script)
//! describes a rank with the same variables: `RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `LOCAL_WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT` (torchrun's `GROUP_RANK`,
//! `ROLE_*` and `TORCHELASTIC_*` are tolerated; `TORCHELASTIC_RESTART_COUNT` is
//! reported). With none of them set the process is a world of one.
//!
//! One pod per rank (a Kubernetes Indexed Job): `RANK` may be left out and is then
//! the Job's `JOB_COMPLETION_INDEX`; without `LOCAL_RANK` / `LOCAL_WORLD_SIZE` a rank
//! is alone on its host (local rank 0 of 1), so it takes `cuda:0`, the metrics port
//! itself and all the host's cores. Launchers that start several ranks per host
//! (torchrun, `scripts/launch`) always set both.
//!
//! Rank 0 serves a [`StoreServer`] and every rank registers `rank/{r}` in it, then
//! waits for all others; a rank that never arrives produces
//! [`CommError::RendezvousTimeout`] listing the missing ranks.
//!
//! Job secret: `GRPO_JOB_SECRET` or `GRPO_JOB_SECRET_FILE` ([`JobSecret`]); the store
//! and the ring admit only processes that prove they know it (see [`super::auth`]).
//!
//! Store port: torchrun's agent already serves its own c10d TCPStore on `MASTER_PORT`
//! (and says so with `TORCHELASTIC_USE_AGENT_STORE=True`), so under torchrun ours
//! listens on `MASTER_PORT + 1`; elsewhere on `MASTER_PORT`. `GRPO_STORE_PORT`
//! overrides both. We do not speak c10d's private TCPStore protocol, which changes
//! between PyTorch releases.

use std::net::SocketAddr;
use std::time::Duration;

use super::auth::JobSecret;
use super::error::CommError;
use super::store::{StoreClient, StoreServer};

/// One rank's place in the job, as the launcher described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RendezvousEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// Where rank 0's key-value store listens (see the module docs).
    pub store_port: u16,
    /// torchrun's restart counter (0 outside torchrun), for logs.
    pub restart_count: u32,
    /// Shared by every rank of the job; authenticates store and ring connections.
    pub job_secret: JobSecret,
}

impl RendezvousEnv {
    /// Reads the process environment.
    pub fn from_env() -> Result<RendezvousEnv, CommError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// A world of one with no networking, for single-process runs and tests.
    pub fn single() -> RendezvousEnv {
        RendezvousEnv {
            rank: 0,
            world_size: 1,
            local_rank: 0,
            local_world_size: 1,
            master_addr: "127.0.0.1".into(),
            master_port: 0,
            store_port: 0,
            restart_count: 0,
            job_secret: JobSecret::none(),
        }
    }

    /// A rank of a one-host job whose store is on `127.0.0.1:port` (tests, benchmarks).
    pub fn loopback(rank: usize, world_size: usize, port: u16) -> RendezvousEnv {
        RendezvousEnv {
            rank,
            world_size,
            local_rank: rank,
            local_world_size: world_size,
            master_addr: "127.0.0.1".into(),
            master_port: port,
            store_port: port,
            restart_count: 0,
            job_secret: JobSecret::none(),
        }
    }

    /// Parses the variables `get` returns; pure, so every rule is unit-tested.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<RendezvousEnv, CommError> {
        // An Indexed Job's pod knows its rank as the completion index.
        let rank_var = if get("RANK").is_none() && get("JOB_COMPLETION_INDEX").is_some() {
            "JOB_COMPLETION_INDEX"
        } else {
            "RANK"
        };
        match (get(rank_var).is_some(), get("WORLD_SIZE").is_some()) {
            (false, false) => return Ok(Self::single()),
            (true, true) => {}
            (has_rank, _) => {
                return Err(CommError::Env {
                    var: if has_rank { "WORLD_SIZE" } else { "RANK" },
                    detail: format!(
                        "is not set although {} is (a launcher sets both)",
                        if has_rank { rank_var } else { "WORLD_SIZE" }
                    ),
                })
            }
        }
        let num = |var: &'static str| -> Result<Option<usize>, CommError> {
            get(var)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| CommError::Env {
                        var,
                        detail: format!("must be a non-negative integer, got {v:?}"),
                    })
                })
                .transpose()
        };
        let required = |var: &'static str| -> Result<usize, CommError> {
            num(var)?.ok_or(CommError::Env {
                var,
                detail: "is not set".into(),
            })
        };
        let rank = required(rank_var)?;
        let world_size = required("WORLD_SIZE")?;
        if world_size == 0 {
            return Err(CommError::Env {
                var: "WORLD_SIZE",
                detail: "must be at least 1".into(),
            });
        }
        if rank >= world_size {
            return Err(CommError::Env {
                var: rank_var,
                detail: format!("is {rank}, must be below WORLD_SIZE={world_size}"),
            });
        }
        // Without the local variables a rank is alone on its host (one pod per rank).
        let local_rank = num("LOCAL_RANK")?.unwrap_or(0);
        let local_world_size = num("LOCAL_WORLD_SIZE")?.unwrap_or(1);
        if local_rank >= local_world_size {
            return Err(CommError::Env {
                var: "LOCAL_RANK",
                detail: format!(
                    "is {local_rank}, must be below LOCAL_WORLD_SIZE={local_world_size}"
                ),
            });
        }
        let port = |var: &'static str, value: String| -> Result<u16, CommError> {
            value.trim().parse::<u16>().map_err(|_| CommError::Env {
                var,
                detail: format!("must be a port number (0-65535), got {value:?}"),
            })
        };
        let multi = world_size > 1;
        let master_addr = match get("MASTER_ADDR") {
            Some(addr) if !addr.trim().is_empty() => addr.trim().to_string(),
            _ if multi => {
                return Err(CommError::Env {
                    var: "MASTER_ADDR",
                    detail: "is not set (needed when WORLD_SIZE > 1)".into(),
                })
            }
            _ => "127.0.0.1".into(),
        };
        let master_port = match get("MASTER_PORT") {
            Some(p) => port("MASTER_PORT", p)?,
            None if multi => {
                return Err(CommError::Env {
                    var: "MASTER_PORT",
                    detail: "is not set (needed when WORLD_SIZE > 1)".into(),
                })
            }
            None => 0,
        };
        let agent_store = get("TORCHELASTIC_USE_AGENT_STORE")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
        let store_port = match get("GRPO_STORE_PORT") {
            Some(p) => port("GRPO_STORE_PORT", p)?,
            None if agent_store => master_port.checked_add(1).ok_or(CommError::Env {
                var: "MASTER_PORT",
                detail: "is 65535, leaving no port for the store above it; set GRPO_STORE_PORT"
                    .into(),
            })?,
            None => master_port,
        };
        let restart_count = get("TORCHELASTIC_RESTART_COUNT")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let job_secret = JobSecret::from_vars(&get)?;
        Ok(RendezvousEnv {
            rank,
            world_size,
            local_rank,
            local_world_size,
            master_addr,
            master_port,
            store_port,
            restart_count,
            job_secret,
        })
    }
}

/// A completed rendezvous: every rank registered with the store. Backends keep it
/// for the lifetime of the communicator (rank 0's holds the store server).
pub struct Rendezvous {
    pub env: RendezvousEnv,
    pub store: StoreClient,
    pub timeout: Duration,
    _server: Option<StoreServer>,
}

impl Rendezvous {
    /// Joins the job described by `env`: rank 0 serves the store on all interfaces at
    /// `env.store_port`; every rank registers and waits up to `timeout` for the rest.
    pub fn join(env: &RendezvousEnv, timeout: Duration) -> Result<Rendezvous, CommError> {
        let server = if env.rank == 0 {
            if !env.job_secret.is_set() && env.world_size > 1 {
                tracing::warn!(
                    port = env.store_port,
                    "no job secret (GRPO_JOB_SECRET / GRPO_JOB_SECRET_FILE): any process that \
                     reaches the store port can join this job, read or write its keys"
                );
            }
            Some(StoreServer::bind(
                SocketAddr::from(([0, 0, 0, 0], env.store_port)),
                env.job_secret.clone(),
            )?)
        } else {
            None
        };
        let port = server.as_ref().map_or(env.store_port, |s| s.addr().port());
        let store = StoreClient::connect(&env.master_addr, port, timeout, &env.job_secret)
            .map_err(|e| match e {
                // Only rank 0 serves the store: not reaching it means rank 0 is missing
                // (a refused job secret is reported as it is).
                CommError::Store { ref detail, .. }
                    if env.rank != 0 && !detail.contains("job secret") =>
                {
                    CommError::RendezvousTimeout {
                        missing: vec![0],
                        world_size: env.world_size,
                        timeout,
                    }
                }
                other => other,
            })?;
        store.set(&format!("rank/{}", env.rank), b"")?;
        let keys: Vec<String> = (0..env.world_size).map(|r| format!("rank/{r}")).collect();
        match store.wait(&keys, timeout) {
            Ok(()) => {}
            Err(CommError::StoreTimeout { missing, .. }) => {
                let mut missing: Vec<usize> = missing
                    .iter()
                    .filter_map(|k| k.strip_prefix("rank/")?.parse().ok())
                    .collect();
                missing.sort_unstable();
                return Err(CommError::RendezvousTimeout {
                    missing,
                    world_size: env.world_size,
                    timeout,
                });
            }
            Err(CommError::Store { .. }) if env.rank != 0 => {
                return Err(CommError::RendezvousTimeout {
                    missing: vec![0],
                    world_size: env.world_size,
                    timeout,
                })
            }
            Err(other) => return Err(other),
        }
        Ok(Rendezvous {
            env: env.clone(),
            store,
            timeout,
            _server: server,
        })
    }
}

/// Intra-op threads for libtorch in this rank, decided once at start-up:
/// an explicit setting wins; otherwise `OMP_NUM_THREADS` is honoured as PyTorch
/// honours it (torchrun sets it to 1 when it starts several ranks per host;
/// `scripts/launch` sets `cores / ranks per host`); otherwise the host's cores are
/// split evenly among its ranks so they do not oversubscribe the CPU.
pub fn intra_op_threads(
    explicit: Option<usize>,
    omp_num_threads: Option<&str>,
    cores: usize,
    local_world_size: usize,
) -> usize {
    if let Some(n) = explicit.filter(|&n| n > 0) {
        return n;
    }
    if let Some(n) = omp_num_threads
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    (cores / local_world_size.max(1)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn parse(vars: &[(&str, &str)]) -> Result<RendezvousEnv, CommError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        RendezvousEnv::from_vars(|k| map.get(k).cloned())
    }

    const TORCHRUN: &[(&str, &str)] = &[
        ("RANK", "3"),
        ("WORLD_SIZE", "4"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("GROUP_RANK", "1"),
        ("ROLE_RANK", "3"),
        ("ROLE_NAME", "default"),
        ("ROLE_WORLD_SIZE", "4"),
        ("MASTER_ADDR", "node0"),
        ("MASTER_PORT", "29500"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        ("TORCHELASTIC_RESTART_COUNT", "2"),
        ("TORCHELASTIC_MAX_RESTARTS", "3"),
        ("TORCHELASTIC_RUN_ID", "none"),
        ("OMP_NUM_THREADS", "1"),
    ];

    #[test]
    fn torchrun_environment_uses_the_port_above_the_agent_store() {
        let env = parse(TORCHRUN).unwrap();
        assert_eq!(
            env,
            RendezvousEnv {
                rank: 3,
                world_size: 4,
                local_rank: 1,
                local_world_size: 2,
                master_addr: "node0".into(),
                master_port: 29500,
                store_port: 29501,
                restart_count: 2,
                job_secret: JobSecret::none(),
            }
        );
        let mut vars = TORCHRUN.to_vec();
        vars.push(("GRPO_JOB_SECRET", "s"));
        assert_eq!(parse(&vars).unwrap().job_secret, JobSecret::new("s"));
    }

    #[test]
    fn grpo_store_port_overrides_and_plain_launchers_use_master_port() {
        let mut vars = TORCHRUN.to_vec();
        vars.push(("GRPO_STORE_PORT", "40000"));
        assert_eq!(parse(&vars).unwrap().store_port, 40000);
        let plain = parse(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "127.0.0.1"),
            ("MASTER_PORT", "1234"),
        ])
        .unwrap();
        assert_eq!(
            (plain.store_port, plain.local_rank, plain.local_world_size),
            (1234, 0, 1)
        );
    }

    #[test]
    fn one_pod_per_rank_is_local_rank_0_of_1_and_takes_the_completion_index() {
        // What an Indexed Job pod of the pod-per-rank layout sees (deploy/overlays).
        let env = parse(&[
            ("JOB_COMPLETION_INDEX", "5"),
            ("WORLD_SIZE", "8"),
            ("MASTER_ADDR", "grpo-trainer-0.grpo-trainer"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap();
        assert_eq!(
            (
                env.rank,
                env.world_size,
                env.local_rank,
                env.local_world_size
            ),
            (5, 8, 0, 1)
        );
        assert_eq!(env.store_port, 29500);
        // RANK wins (scripts/launch inside an Indexed Job pod of the pod-per-node layout).
        let env = parse(&[
            ("JOB_COMPLETION_INDEX", "1"),
            ("RANK", "9"),
            ("WORLD_SIZE", "16"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "8"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "29500"),
        ])
        .unwrap();
        assert_eq!((env.rank, env.local_rank, env.local_world_size), (9, 1, 8));
        for (vars, var) in [
            (
                &[("JOB_COMPLETION_INDEX", "8"), ("WORLD_SIZE", "8")][..],
                "JOB_COMPLETION_INDEX",
            ),
            (
                &[("JOB_COMPLETION_INDEX", "x"), ("WORLD_SIZE", "8")][..],
                "JOB_COMPLETION_INDEX",
            ),
            (&[("JOB_COMPLETION_INDEX", "0")][..], "WORLD_SIZE"),
        ] {
            match parse(vars) {
                Err(CommError::Env { var: got, .. }) => assert_eq!(got, var, "{vars:?}"),
                other => panic!("{vars:?}: expected an error naming {var}, got {other:?}"),
            }
        }
    }

    #[test]
    fn no_variables_is_a_world_of_one() {
        assert_eq!(parse(&[]).unwrap(), RendezvousEnv::single());
        let one = parse(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap();
        assert_eq!(one.world_size, 1);
    }

    #[test]
    fn bad_values_name_the_variable() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("RANK", "0")], "WORLD_SIZE"),
            (&[("WORLD_SIZE", "2")], "RANK"),
            (&[("RANK", "2"), ("WORLD_SIZE", "2")], "RANK"),
            (&[("RANK", "x"), ("WORLD_SIZE", "2")], "RANK"),
            (&[("RANK", "0"), ("WORLD_SIZE", "0")], "WORLD_SIZE"),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_PORT", "1")],
                "MASTER_ADDR",
            ),
            (
                &[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")],
                "MASTER_PORT",
            ),
            (
                &[
                    ("RANK", "0"),
                    ("WORLD_SIZE", "2"),
                    ("MASTER_ADDR", "h"),
                    ("MASTER_PORT", "70000"),
                ],
                "MASTER_PORT",
            ),
            (
                &[
                    ("RANK", "1"),
                    ("WORLD_SIZE", "2"),
                    ("LOCAL_RANK", "1"),
                    ("LOCAL_WORLD_SIZE", "1"),
                ],
                "LOCAL_RANK",
            ),
        ];
        for (vars, var) in cases {
            match parse(vars) {
                Err(CommError::Env { var: got, .. }) => assert_eq!(got, *var, "{vars:?}"),
                other => panic!("{vars:?}: expected an error naming {var}, got {other:?}"),
            }
        }
        let mut vars = TORCHRUN.to_vec();
        vars.retain(|(k, _)| *k != "MASTER_PORT");
        vars.push(("MASTER_PORT", "65535"));
        assert!(matches!(
            parse(&vars),
            Err(CommError::Env {
                var: "MASTER_PORT",
                ..
            })
        ));
    }

    #[test]
    fn intra_op_thread_policy() {
        assert_eq!(intra_op_threads(Some(3), Some("1"), 16, 2), 3);
        assert_eq!(intra_op_threads(None, Some("1"), 16, 2), 1);
        assert_eq!(intra_op_threads(None, Some(" 4 "), 16, 2), 4);
        assert_eq!(intra_op_threads(None, Some("junk"), 16, 2), 8);
        assert_eq!(intra_op_threads(Some(0), None, 16, 4), 4);
        assert_eq!(intra_op_threads(None, None, 2, 4), 1);
    }
}
