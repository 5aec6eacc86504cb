//! AFL++ target: the math answer checker (the `verify` crate behind
//! trainer::rewards::answer) on any text, as the gold answer and as a completion,
//! bare and inside math delimiters (as `parse_gold` reads bare LaTeX). Must return,
//! never panic.
fn main() {
    afl::fuzz!(|bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let parsed = verify::parse(&text);
        let wrapped = verify::parse(&format!("${text}$"));
        let _ = verify::verify(&parsed, &wrapped);
        let _ = verify::verify(&wrapped, &parsed);
        let _ = verify::check(&text, &text);
    });
}
