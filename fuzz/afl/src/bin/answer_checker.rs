//! AFL++ target: the answer checker (trainer::rewards::answer) on any text, as the
//! gold answer and as a completion. Must return, never panic.
use trainer::rewards::answer;

fn main() {
    afl::fuzz!(|bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let _ = answer::extract_completion_answer(&text);
        if let Some(gold) = answer::parse_gold(&serde_json::Value::String(text.to_string())) {
            let _ = answer::is_correct(&text, &gold);
        }
    });
}
