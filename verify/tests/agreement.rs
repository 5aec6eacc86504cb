//! Agreement with math-verify 0.9.0 on the committed corpus (scripts/checker/make_corpus.py ran
//! math-verify on every pair): at least 97% of the verdicts agree, and at most 1% of the pairs
//! are false positives (equivalent for us, not for math-verify).

use serde_json::Value;

fn corpus() -> Vec<(String, String, String, bool)> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/math_verify_corpus.jsonl"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let v: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("{path}:{}: {e}", i + 1));
            let s = |k: &str| {
                v[k].as_str()
                    .unwrap_or_else(|| panic!("{path}:{}: no string {k}", i + 1))
                    .to_string()
            };
            let want = v["math_verify"]
                .as_bool()
                .unwrap_or_else(|| panic!("{path}:{}: no math_verify", i + 1));
            (s("category"), s("gold"), s("pred"), want)
        })
        .collect()
}

#[test]
fn agrees_with_math_verify_on_the_corpus() {
    let rows = corpus();
    assert!(rows.len() >= 500, "corpus too small: {}", rows.len());
    let mut disagree = Vec::new();
    let mut false_pos = 0;
    for (cat, gold, pred, want) in &rows {
        let got = verify::check(gold, pred);
        if got != *want {
            if got {
                false_pos += 1;
            }
            disagree.push(format!(
                "[{cat}] gold {gold:?} pred {pred:?}: math-verify {want}, ours {got}"
            ));
        }
    }
    let n = rows.len() as f64;
    let agreement = 1.0 - disagree.len() as f64 / n;
    let fp_rate = false_pos as f64 / n;
    eprintln!(
        "{} pairs: agreement {:.2}%, false positives {false_pos} ({:.2}%), disagreements:\n{}",
        rows.len(),
        100.0 * agreement,
        100.0 * fp_rate,
        disagree.join("\n")
    );
    assert!(
        agreement >= 0.97,
        "agreement {:.2}% < 97%",
        100.0 * agreement
    );
    assert!(
        fp_rate <= 0.01,
        "false positives {:.2}% > 1%",
        100.0 * fp_rate
    );
}
