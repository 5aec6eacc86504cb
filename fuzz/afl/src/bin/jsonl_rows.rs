//! AFL++ target: a JSON-lines dataset file (trainer::data::read_rows). Any bytes must
//! give rows or an error naming what is wrong, never a panic.
use trainer::data::{read_rows, DataFormat};

fn main() {
    let path = std::env::temp_dir().join(format!("afl-rows-{}.jsonl", std::process::id()));
    afl::fuzz!(|bytes: &[u8]| {
        std::fs::write(&path, bytes).unwrap();
        let _ = read_rows(&path, DataFormat::Jsonl);
    });
}
