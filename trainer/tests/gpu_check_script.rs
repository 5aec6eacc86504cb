//! `scripts/gpu-check.sh` on a machine without a GPU: it says so, writes a report that
//! says so, and exits 0 without building or running anything.
use std::path::PathBuf;
use std::process::Command;

fn has_nvidia_gpu() -> bool {
    Command::new("nvidia-smi")
        .arg("-L")
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("GPU"))
}

#[test]
fn gpu_check_without_a_gpu_says_so_and_exits_0() {
    if has_nvidia_gpu() {
        eprintln!("skipping gpu_check_without_a_gpu_says_so_and_exits_0: this machine has a GPU");
        return;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tempfile::tempdir().unwrap();
    let run = Command::new("bash")
        .arg(root.join("scripts/gpu-check.sh"))
        .arg("--out")
        .arg(out.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "exit {:?}: {stdout}", run.status);
    assert!(stdout.contains("no NVIDIA GPU"), "{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!(report["gpu"], serde_json::json!(false));
    let text = std::fs::read_to_string(out.path().join("report.txt")).unwrap();
    assert!(text.contains("nothing was checked"), "{text}");
}
