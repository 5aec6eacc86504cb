//! Checkpoints never lose the last good state: a disk that fills mid-save (a child
//! process under RLIMIT_FSIZE), a crash between the two renames, a corrupted newest
//! checkpoint (fallback to the previous one), `latest` on an unreadable root, and a rank
//! whose save fails making every rank fail promptly, naming it.
mod engine_support;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use engine_support::{engine, forward_backward, optim, run_world, same_weights, weights};
use serde_json::json;
use trainer::zero::checkpoint::{checkpoints, latest_checkpoint, prune_stale};

const CHILD_ENV: &str = "CHECKPOINT_SAFETY_CHILD_ROOT";

/// One rank, trained `steps` steps, saved under `root`.
fn trained_and_saved(root: &Path, steps: u64) -> Vec<(String, tch::Tensor)> {
    let mut e = engine(1, 0, 0, optim());
    for s in 0..steps {
        forward_backward(&mut e, s, 1.0);
        e.step().unwrap();
    }
    e.save_checkpoint(root, &json!({"steps": steps}), 0, None)
        .unwrap();
    weights(&mut e)
}

/// The child's side of the disk-full test (a no-op unless the parent set CHILD_ENV):
/// loads step 1, saves it again in place and then step 2, under a file size limit
/// that no shard fits; both saves must fail.
#[test]
fn disk_full_child() {
    let Ok(root) = std::env::var(CHILD_ENV) else {
        return;
    };
    let root = Path::new(&root);
    let mut e = engine(1, 0, 0, optim());
    e.load_checkpoint(&root.join("step-00000001")).unwrap();
    let again = e.save_checkpoint(root, &json!({"steps": 1}), 0, None);
    println!("SAVE-AGAIN: {again:?}");
    forward_backward(&mut e, 1, 1.0);
    e.step().unwrap();
    let next = e.save_checkpoint(root, &json!({"steps": 2}), 0, None);
    println!("SAVE-NEXT: {next:?}");
}

#[test]
fn a_full_disk_keeps_the_previous_checkpoint_loadable() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    let saved = trained_and_saved(&root, 1);

    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe);
    child
        .args([
            "--exact",
            "disk_full_child",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &root);
    // SAFETY: setrlimit and signal are async-signal-safe; nothing else runs in between.
    unsafe {
        child.pre_exec(|| {
            // Writes past 64 KiB fail with EFBIG instead of killing the process.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: 64 << 10,
                rlim_max: 64 << 10,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = child.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in ["SAVE-AGAIN: Err(", "SAVE-NEXT: Err("] {
        assert!(stdout.contains(line), "{line} missing in: {stdout}");
    }

    // The old copy is intact and is what `latest` finds; the new step never appeared.
    let latest = latest_checkpoint(&root).unwrap().unwrap();
    assert!(latest.ends_with("step-00000001"), "{}", latest.display());
    assert!(!root.join("step-00000002").exists());
    let mut e = engine(1, 0, 0, optim());
    let state = e.load_checkpoint(&latest).unwrap();
    assert_eq!(state["steps"], 1);
    assert!(same_weights(&weights(&mut e), &saved));

    // The next save with room prunes the failed temporaries and succeeds.
    forward_backward(&mut e, 1, 1.0);
    e.step().unwrap();
    e.save_checkpoint(&root, &json!({"steps": 2}), 0, None)
        .unwrap();
    let names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| n.starts_with("step-")),
        "stale temporaries left: {names:?}"
    );
    assert_eq!(checkpoints(&root).unwrap().len(), 2);
}

#[test]
fn a_crash_between_the_renames_restores_the_old_copy() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    trained_and_saved(&root, 1);
    // As if a re-save of step 1 had set the old copy aside and died before renaming
    // the new one in, leaving its temporary behind.
    std::fs::rename(root.join("step-00000001"), root.join(".old-step-00000001")).unwrap();
    std::fs::create_dir_all(root.join(".tmp-step-00000001")).unwrap();
    std::fs::write(root.join(".tmp-step-00000001/rank0.json"), b"partial").unwrap();
    assert!(latest_checkpoint(&root).unwrap().is_none());
    prune_stale(&root).unwrap();
    assert!(latest_checkpoint(&root)
        .unwrap()
        .unwrap()
        .ends_with("step-00000001"));
    assert!(!root.join(".tmp-step-00000001").exists());
    let mut e = engine(1, 0, 0, optim());
    e.load_checkpoint(&root.join("step-00000001")).unwrap();
}

#[test]
fn a_corrupted_newest_checkpoint_falls_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let mut e = engine(1, 0, 0, optim());
    forward_backward(&mut e, 0, 1.0);
    e.step().unwrap();
    e.save_checkpoint(&root, &json!({"steps": 1}), 0, None)
        .unwrap();
    let at_one = weights(&mut e);
    forward_backward(&mut e, 1, 1.0);
    e.step().unwrap();
    let newest = e
        .save_checkpoint(&root, &json!({"steps": 2}), 0, None)
        .unwrap();
    // Flip one byte of the newest shard file.
    let shard = newest.join("rank0.safetensors");
    let mut bytes = std::fs::read(&shard).unwrap();
    let at = bytes.len() - 5;
    bytes[at] ^= 0xff;
    std::fs::write(&shard, bytes).unwrap();

    let mut e = engine(1, 0, 0, optim());
    let err = e.resume(&newest, false).unwrap_err().to_string();
    assert!(err.contains("checksum"), "{err}");
    let (dir_loaded, state) = e.resume(&newest, true).unwrap();
    assert!(
        dir_loaded.ends_with("step-00000001"),
        "{}",
        dir_loaded.display()
    );
    assert_eq!(state["steps"], 1);
    assert_eq!(e.steps_done(), 1);
    assert!(same_weights(&weights(&mut e), &at_one));
}

#[test]
fn latest_fails_loudly_when_the_root_cannot_be_listed() {
    let dir = tempfile::tempdir().unwrap();
    assert!(latest_checkpoint(&dir.path().join("missing"))
        .unwrap()
        .is_none());
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").unwrap();
    let e = latest_checkpoint(&file).unwrap_err().to_string();
    assert!(e.contains("not-a-dir"), "{e}");
}

#[test]
fn a_rank_that_cannot_save_fails_every_rank_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ckpt");
    // Rank 0 exports to hf/ with auxiliary files copied from `src`, where a directory
    // stands in the place of tokenizer.json: the copy fails on rank 0 only.
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("tokenizer.json")).unwrap();
    let t = Instant::now();
    let results = run_world(2, |rank, port| {
        let mut e = engine(2, rank, port, optim());
        forward_backward(&mut e, 0, 1.0);
        e.step().unwrap();
        e.save_checkpoint(&root, &json!({}), 0, Some(&src))
            .map_err(|e| e.to_string())
    });
    let took = t.elapsed();
    let e0 = results[0].as_ref().unwrap_err();
    let e1 = results[1].as_ref().unwrap_err();
    assert!(e0.contains("tokenizer.json"), "{e0}");
    assert!(e1.contains("rank 0 could not save it"), "{e1}");
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert!(latest_checkpoint(&root).unwrap().is_none());
}
