//! `scripts/launch --config_file FILE` with accelerate launch configs: the ranks, the
//! rendezvous and the ZeRO / precision settings each rank's trainer reads.
use std::path::PathBuf;
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

const ZERO3: &str = "\
compute_environment: LOCAL_MACHINE
debug: false
deepspeed_config:
  deepspeed_multinode_launcher: standard
  offload_optimizer_device: none
  offload_param_device: none
  zero3_init_flag: true
  zero3_save_16bit_model: true
  zero_stage: 3
distributed_type: DEEPSPEED
downcast_bf16: 'no'
machine_rank: 1
main_process_ip: 10.1.2.3
main_process_port: 29555
main_training_function: main
mixed_precision: bf16
num_machines: 2
num_processes: 4
rdzv_backend: static
same_network: true
tpu_env: []
tpu_use_cluster: false
tpu_use_sudo: false
use_cpu: false
";

/// Runs the launcher on `config` and a command echoing each rank's environment; returns
/// (exit status, stdout lines sorted, stderr).
fn launch(config: &str, extra: &[&str]) -> (bool, Vec<String>, String) {
    // Its own directory: the tests of this file run in parallel.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("accelerate.yaml");
    std::fs::write(&file, config).unwrap();
    let out = Command::new(repo().join("scripts/launch"))
        .arg("--config_file")
        .arg(&file)
        .args(extra)
        .args([
            "--",
            "sh",
            "-c",
            "echo $RANK $WORLD_SIZE $LOCAL_RANK $MASTER_ADDR $MASTER_PORT ${TRAINER__ZERO__STAGE:-unset} ${TRAINER__ZERO__COMPUTE_DTYPE:-unset}",
        ])
        .env_remove("TRAINER__ZERO__STAGE")
        .env_remove("TRAINER__ZERO__COMPUTE_DTYPE")
        .output()
        .unwrap();
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    lines.sort();
    (
        out.status.success(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn accelerate_zero3_config_gives_ranks_rendezvous_and_settings() {
    // 4 processes on 2 machines, this one machine_rank 1: global ranks 2 and 3.
    let (ok, lines, err) = launch(ZERO3, &[]);
    assert!(ok, "{err}");
    assert_eq!(
        lines,
        vec![
            "[rank2]: 2 4 0 10.1.2.3 29555 3 bfloat16",
            "[rank3]: 3 4 1 10.1.2.3 29555 3 bfloat16",
        ]
    );
    // Offload settings are none: nothing to report for them.
    assert!(!err.contains("offload"), "{err}");

    // Command-line flags win over the file (accelerate's rule).
    let (ok, lines, err) = launch(
        ZERO3,
        &["--machine_rank", "0", "--main_process_port", "29600"],
    );
    assert!(ok, "{err}");
    assert_eq!(lines[0], "[rank0]: 0 4 0 10.1.2.3 29600 3 bfloat16");

    // A DDP config without DeepSpeed or mixed precision sets no trainer settings.
    let ddp =
        "distributed_type: MULTI_GPU\nmixed_precision: 'no'\nnum_machines: 1\nnum_processes: 2\n";
    let (ok, lines, err) = launch(ddp, &[]);
    assert!(ok, "{err}");
    assert_eq!(
        lines,
        vec![
            "[rank0]: 0 2 0 127.0.0.1 29500 unset unset",
            "[rank1]: 1 2 1 127.0.0.1 29500 unset unset",
        ]
    );
}

#[test]
fn bad_accelerate_configs_are_named() {
    let (ok, _, err) = launch("mixed_precision: fp16\nnum_processes: 1\n", &[]);
    assert!(!ok && err.contains("fp16 is not supported"), "{err}");
    let (ok, _, err) = launch("num_processes: 3\nnum_machines: 2\n", &[]);
    assert!(!ok && err.contains("multiple of num_machines"), "{err}");
    let (ok, _, err) = launch("deepspeed_config:\n  zero_stage: 4\n", &[]);
    assert!(
        !ok && err.contains("zero_stage must be 0, 1, 2 or 3"),
        "{err}"
    );
    let (ok, _, err) = launch(
        "num_processes: 1\ndeepspeed_config:\n  zero_stage: 2\n  offload_optimizer_device: cpu\n",
        &[],
    );
    assert!(ok, "{err}");
    assert!(err.contains("offload_optimizer_device"), "{err}");
}
