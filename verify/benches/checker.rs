//! Time per (gold, prediction) pair of `verify::check` over the agreement corpus.
//! Prints one JSON line `{"pairs", "rounds", "us_per_pair", "max_us"}`; scripts/bench/checker.sh
//! runs it next to math-verify on the same pairs and prints the ratio.

use std::time::Instant;

fn main() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/math_verify_corpus.jsonl"
    );
    let text = std::fs::read_to_string(path).expect("corpus file");
    let pairs: Vec<(String, String)> = text
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("corpus line");
            (
                v["gold"].as_str().unwrap_or_default().to_string(),
                v["pred"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    // Warm-up: the extraction and normalisation regexes compile on first use.
    for (g, p) in &pairs {
        std::hint::black_box(verify::check(g, p));
    }
    let rounds = 50;
    let mut per_pair = vec![0.0f64; pairs.len()];
    let mut hits = 0usize;
    let start = Instant::now();
    for _ in 0..rounds {
        for (i, (g, p)) in pairs.iter().enumerate() {
            let t = Instant::now();
            hits += usize::from(std::hint::black_box(verify::check(g, p)));
            per_pair[i] += t.elapsed().as_secs_f64() * 1e6;
        }
    }
    // The slowest pair by its mean over the rounds (a single slow sample is the scheduler).
    let (slowest, total_us) =
        per_pair
            .iter()
            .enumerate()
            .fold((0, 0.0), |m, (i, &t)| if t > m.1 { (i, t) } else { m });
    let max_us = total_us / rounds as f64;
    eprintln!("slowest pair (mean {max_us:.1} us): {:?}", pairs[slowest]);
    let total = start.elapsed().as_secs_f64();
    let per_pair_us = total * 1e6 / (rounds * pairs.len()) as f64;
    println!(
        "{{\"pairs\": {}, \"rounds\": {rounds}, \"us_per_pair\": {per_pair_us:.3}, \"max_us\": {max_us:.1}, \"equivalent\": {}}}",
        pairs.len(),
        hits / rounds
    );
}
