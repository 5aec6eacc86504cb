//! The NCCL backend. Without a GPU only the refusal path can run: asking for NCCL
//! must give a clear error, never a panic or abort. The `*_gpu` tests check every
//! collective exactly on CUDA tensors and skip with a message when no GPU is present.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{check_all_collectives, free_port, ring_config, run_world_on};
use tch::{Cuda, Device};
use trainer::dist::{self, Backend, CommError, DistConfig, RendezvousEnv};

fn nccl_config() -> DistConfig {
    DistConfig {
        backend: Backend::Nccl,
        timeout_secs: 60,
        ..DistConfig::default()
    }
}

fn skip_without_gpu(test: &str, gpus: i64) -> bool {
    if Cuda::device_count() < gpus {
        eprintln!(
            "skipping {test}: needs {gpus} CUDA device(s), found {}",
            Cuda::device_count()
        );
        return true;
    }
    false
}

#[test]
fn nccl_without_cuda_is_a_clear_error() {
    if Cuda::is_available() {
        eprintln!("skipping nccl_without_cuda_is_a_clear_error: this machine has CUDA");
        return;
    }
    let err = dist::nccl::probe(0).expect_err("probe must fail without CUDA");
    assert!(matches!(err, CommError::NcclUnavailable(_)), "{err}");
    // The factory probes before rendezvous, so this fails at once and alone.
    let env = RendezvousEnv::loopback(0, 2, free_port());
    let err = dist::connect(&nccl_config(), &env, Device::Cuda(0))
        .err()
        .unwrap();
    assert!(
        matches!(&err, CommError::NcclUnavailable(msg) if msg.contains("libcuda.so") || msg.contains("CUDA")),
        "{err}"
    );
}

#[test]
fn nccl_single_rank_collectives_are_exact_gpu() {
    if skip_without_gpu("nccl_single_rank_collectives_are_exact_gpu", 1) {
        return;
    }
    let results = run_world_on(1, &nccl_config(), Device::Cuda(0), |comm| {
        assert_eq!(comm.backend(), "nccl");
        check_all_collectives(comm, 30_011, Device::Cuda(0))
    });
    results.into_iter().for_each(|r| {
        r.unwrap();
    });
}

#[test]
fn ring_accepts_cuda_tensors_gpu() {
    if skip_without_gpu("ring_accepts_cuda_tensors_gpu", 1) {
        return;
    }
    let results = run_world_on(2, &ring_config(60, 4096), Device::Cuda(0), |comm| {
        check_all_collectives(comm, 30_011, Device::Cuda(0))
    });
    results.into_iter().for_each(|r| {
        r.unwrap();
    });
}

#[test]
fn nccl_two_ranks_under_scripts_launch_gpu() {
    if skip_without_gpu("nccl_two_ranks_under_scripts_launch_gpu", 2) {
        return;
    }
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(repo.join("scripts/launch"))
        .args(["--nproc-per-node", "2", "--master-port"])
        .arg(free_port().to_string())
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_trainer"))
        .args(["dist-check", "--cuda", "--timeout-secs", "120"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(
        text.matches("dist-check ok: backend nccl").count(),
        2,
        "{text}"
    );
}
