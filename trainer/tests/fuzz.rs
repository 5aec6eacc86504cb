//! Fuzz targets of the trainer (test_support::fuzz, mutation-based): the answer checker,
//! the rendezvous store's frames, JSONL and Parquet rows, checkpoint manifests and
//! shard files. Each must turn any input into a value or an error, never a panic or a
//! hang; the store must keep serving good clients. In the normal suite each runs a few
//! hundred inputs; `scripts/fuzz.sh` runs them for a bounded time (`FUZZ_SECS`).
mod engine_support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use test_support::fuzz::fuzz;
use trainer::data::{read_rows, DataFormat};
use trainer::dist::store::{StoreClient, StoreServer};
use trainer::dist::JobSecret;
use trainer::rewards::answer;

#[test]
fn fuzz_answer_checker() {
    let seeds: Vec<Vec<u8>> = [
        "The answer is \\boxed{\\frac{3}{4}}",
        "<answer>42</answer>",
        "so x = -1.5e3, then 7/8",
        "\\boxed{\\sqrt{2}} \\boxed{ 1,000 }",
        "<think>hmm</think><answer>\\dfrac{1}{2}</answer>",
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("answer_checker", &seeds, 2000, |bytes| {
        let text = String::from_utf8_lossy(bytes);
        let _ = answer::extract_completion_answer(&text);
        if let Some(gold) = answer::parse_gold(&Value::String(text.to_string())) {
            let _ = answer::is_correct(&text, &gold);
        }
        // A property: a completion stating a gold number exactly is judged correct.
        if let Some(gold) = answer::parse_gold(&json!(7)) {
            assert!(answer::is_correct("<answer>7</answer>", &gold));
        }
    });
}

#[test]
fn fuzz_store_frames() {
    let secret = JobSecret::new("fuzz-secret");
    let server = StoreServer::bind(SocketAddr::from(([127, 0, 0, 1], 0)), secret.clone()).unwrap();
    let addr = server.addr();
    let good =
        StoreClient::connect("127.0.0.1", addr.port(), Duration::from_secs(5), &secret).unwrap();
    // Valid request streams (after an authenticated handshake): SET, GET, WAIT.
    let mut set = vec![1u8];
    put(&mut set, b"k");
    put(&mut set, b"value");
    let mut get = vec![2u8];
    put(&mut get, b"k");
    get.extend_from_slice(&0u64.to_le_bytes());
    let mut wait = vec![3u8];
    wait.extend_from_slice(&1u32.to_le_bytes());
    put(&mut wait, b"k");
    wait.extend_from_slice(&0u64.to_le_bytes());
    let seeds = vec![set.clone(), get, wait, [set.clone(), set].concat()];
    let mut n = 0u64;
    let report = fuzz("store_frames", &seeds, 300, |frames| {
        // Half the inputs skip the handshake: raw bytes at a fresh connection.
        let mut c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        n += 1;
        if n.is_multiple_of(2) {
            if handshake(&mut c, &secret).is_err() {
                return;
            }
        } else {
            let _ = c.write_all(b"GRPOKV02");
        }
        let _ = c.write_all(frames);
        let mut sink = [0u8; 256];
        let _ = c.read(&mut sink);
    });
    assert!(report.execs > 0);
    // The server still answers an honest client.
    good.set("after", b"fuzz").unwrap();
    assert_eq!(good.get("after", Duration::ZERO).unwrap(), b"fuzz");
}

fn put(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

/// The client side of the store handshake, written out (dist::auth's labels).
fn handshake(c: &mut TcpStream, secret: &JobSecret) -> std::io::Result<()> {
    c.write_all(b"GRPOKV02")?;
    let mut hello = [0u8; 40];
    c.read_exact(&mut hello)?;
    let nc = [7u8; 32];
    let mut answer = nc.to_vec();
    answer.extend_from_slice(&secret.mac(b"grpo-store-client", &[&hello[8..], &nc]));
    c.write_all(&answer)?;
    let mut tag = [0u8; 32];
    c.read_exact(&mut tag)
}

#[test]
fn fuzz_jsonl_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.jsonl");
    let seeds: Vec<Vec<u8>> = vec![
        b"{\"prompt\": \"1+1\", \"solution\": \"2\"}\n{\"prompt\": \"x\", \"solution\": 3}\n"
            .to_vec(),
        b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n\n".to_vec(),
        b"[{\"prompt\": \"a\"}, {\"prompt\": \"b\"}]".to_vec(),
    ];
    fuzz("jsonl_rows", &seeds, 1000, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        let _ = read_rows(&path, DataFormat::Jsonl);
    });
}

/// Regression (found by `scripts/fuzz.sh`): a file whose `messages` LIST group has a
/// REQUIRED child made the parquet crate's record reader panic.
#[test]
fn a_parquet_file_with_a_malformed_list_is_an_error() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/regressions/parquet_list_child_required.parquet");
    let e = read_rows(&path, DataFormat::Parquet)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("parquet_list_child_required.parquet") && e.contains("Invalid list type"),
        "{e}"
    );
}

#[test]
fn fuzz_parquet_rows() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("seed.parquet");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let script = format!(
        "import pyarrow as pa, pyarrow.parquet as pq\n\
         pq.write_table(pa.table({{'prompt': ['1+1', 'x'], 'solution': ['2', '3'], \
         'messages': [[{{'role': 'user', 'content': 'hi'}}], []]}}), {:?})",
        seed.display().to_string()
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &script])
        .output()
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/setup.sh)", python.display()));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = dir.path().join("rows.parquet");
    let seeds = vec![std::fs::read(&seed).unwrap()];
    fuzz("parquet_rows", &seeds, 500, |bytes| {
        std::fs::write(&path, bytes).unwrap();
        let _ = read_rows(&path, DataFormat::Parquet);
    });
}

#[test]
fn fuzz_checkpoint_manifests_and_shards() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("ckpt");
    let mut e = engine_support::engine(1, 0, 0, engine_support::optim());
    let good = e.save_checkpoint(&root, &json!({"k": 1}), 0, None).unwrap();
    let files = ["manifest.json", "rank0.json", "rank0.safetensors"];
    let originals: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(good.join(f)).unwrap())
        .collect();
    let manifest: Value = serde_json::from_slice(&originals[0]).unwrap();
    for (i, file) in files.iter().enumerate() {
        let path = good.join(file);
        let seeds = vec![originals[i].clone()];
        let execs = if file.ends_with("safetensors") {
            150
        } else {
            300
        };
        fuzz(&format!("checkpoint_{file}"), &seeds, execs, |bytes| {
            std::fs::write(&path, bytes).unwrap();
            if i > 0 {
                // Re-sign the mutated file in the manifest, so the parser behind the
                // checksum is what gets fuzzed.
                let mut m = manifest.clone();
                m["files"][*file] = json!(format!("{:x}", Sha256::digest(bytes)));
                std::fs::write(good.join("manifest.json"), m.to_string()).unwrap();
            }
            let _ = e.load_checkpoint(&good);
        });
        std::fs::write(&path, &originals[i]).unwrap();
        std::fs::write(good.join("manifest.json"), &originals[0]).unwrap();
    }
    // The untouched checkpoint still loads.
    assert_eq!(e.load_checkpoint(&good).unwrap()["k"], 1);
}
