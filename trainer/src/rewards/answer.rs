//! Correctness of a completion against a gold answer, for the `accuracy`, `length` and `cosine`
//! rewards: a thin layer over the [`verify`] crate (math-verify's grade, see its docs).
//!
//! A gold answer (the dataset's answer column) is a JSON number, or a string: a GSM8K-style
//! solution (`... #### 42`: the text after the last `####`), a solution containing a
//! `\boxed{...}` (its last one), or the answer itself in LaTeX without delimiters (MATH-500's
//! `answer` column: `\frac{14}{3}`, `(3, \frac{\pi}{2})`), which is read as if inside `$...$`.
//!
//! A completion's answer is extracted as math-verify does with the last `\boxed{}` first (as
//! open-r1 configures it), then an `<answer>` tag, then "final answer is ...", "answer: ...", then
//! any LaTeX span or plain number, the last one first. The two are then compared by
//! [`verify::verify`]: exact rationals, decimals rounded to 6 places, expressions numerically or
//! at sampled points, sets in any order, tuples, intervals, matrices, `x = 3` against `3`.

use serde_json::Value;
pub use verify::Parsed as Answer;

/// Whether a string carries its own math delimiters or box (else it is bare LaTeX).
fn delimited(s: &str) -> bool {
    ["$", "\\(", "\\[", "\\boxed", "\\fbox"]
        .iter()
        .any(|d| s.contains(d))
}

/// The gold answer of a dataset cell, parsed; `None` for null/bool/array/object cells and for
/// strings in which nothing can be found.
pub fn parse_gold(value: &Value) -> Option<Answer> {
    let text = match value {
        Value::Number(n) => n.to_string(),
        Value::String(s) => match s.rfind("####") {
            Some(i) => s[i + 4..].trim().to_string(),
            None => s.trim().to_string(),
        },
        _ => return None,
    };
    if text.is_empty() {
        return None;
    }
    let parsed = if delimited(&text) {
        verify::parse(&text)
    } else {
        // Bare LaTeX (`x^2+1`, `\{1,2\}`) is only read inside math delimiters.
        let wrapped = verify::parse(&format!("${text}$"));
        if wrapped.expr.is_some() {
            wrapped
        } else {
            verify::parse(&text)
        }
    };
    (!parsed.is_empty()).then_some(parsed)
}

/// The answer a completion commits to, as text (the span extraction chose); `None` if it has none.
pub fn extract_completion_answer(text: &str) -> Option<String> {
    let parsed = verify::parse(text);
    if parsed.is_empty() {
        return None;
    }
    parsed.fallback
}

/// Whether `completion` states `gold`.
pub fn is_correct(completion: &str, gold: &Answer) -> bool {
    verify::verify(gold, &verify::parse(completion))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn extraction_prefers_the_last_box_then_the_answer_tag() {
        let cases: &[(&str, Option<&str>)] = &[
            ("so \\boxed{42} and 7", Some("42")),
            (
                "\\boxed{1} then a long detour that changes our mind entirely: \\boxed{2}",
                Some("2"),
            ),
            ("\\boxed{\\frac{1}{2}}", Some("\\frac{1}{2}")),
            ("\\fbox{7} is it", Some("7")),
            ("<answer>\n 12 \n</answer> 99", Some("12")),
            ("the answer is -7.", Some("-7")),
            ("no digits here", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(
                extract_completion_answer(text).as_deref(),
                *want,
                "text {text:?}"
            );
        }
    }

    #[test]
    fn gold_answers() {
        for gold in [
            json!(42),
            json!(0.25),
            json!("42"),
            json!("#### 1,000"),
            json!("\\frac{7}{2}"),
            json!("x^2 + 1"),
        ] {
            assert!(parse_gold(&gold).is_some(), "gold {gold}");
        }
        for gold in [
            json!("#### "),
            json!(""),
            Value::Null,
            json!(true),
            json!([1]),
        ] {
            assert!(parse_gold(&gold).is_none(), "gold {gold}");
        }
    }

    #[test]
    fn correctness_table() {
        let cases: &[(&str, Value, bool)] = &[
            ("The answer is \\boxed{0.5}", json!("\\frac{1}{2}"), true),
            ("\\boxed{\\frac12}", json!(0.5), true),
            ("\\boxed{3.0}", json!("3"), true),
            ("\\boxed{3}", json!("#### 3"), true),
            ("<answer>\n1,000\n</answer>", json!(1000), true),
            ("so 24 + 48 = 72", json!("#### 72"), true),
            ("\\boxed{+4}", json!(4), true),
            ("$\\boxed{\\left(1, 2\\right)}$", json!("(1,2)"), true),
            ("\\boxed{x = \\sqrt{3}}", json!("\\sqrt3"), true),
            ("\\boxed{\\text{B}}", json!("B"), true),
            ("\\boxed{50\\%}", json!("50"), true),
            ("\\boxed{5\\text{ cm}}", json!("5"), true),
            (
                "The sum is $\\boxed{\\frac{7}{2}}$.",
                json!("The sum is $\\boxed{3.5}$."),
                true,
            ),
            // What the old string comparison missed.
            ("\\boxed{\\{3, 1, 2\\}}", json!("\\{1, 2, 3\\}"), true),
            ("\\boxed{[0, 1)}", json!("[0,1)"), true),
            ("\\boxed{(x+1)^2}", json!("x^2+2x+1"), true),
            (
                "\\boxed{\\frac{\\sqrt{2}}{2}}",
                json!("\\frac{1}{\\sqrt2}"),
                true,
            ),
            (
                "\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}",
                json!("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
                true,
            ),
            ("\\boxed{4}", json!("3"), false),
            ("\\boxed{0.33}", json!("1/3"), false),
            ("\\boxed{[0, 1]}", json!("[0,1)"), false),
            ("\\boxed{(x-1)^2}", json!("x^2+2x+1"), false),
            ("I do not know", json!("3"), false),
            ("\\boxed{}", json!("3"), false),
            ("the answer is 3 but \\boxed{4}", json!("3"), false),
        ];
        for (completion, gold, want) in cases {
            let gold_answer = parse_gold(gold).unwrap();
            assert_eq!(
                is_correct(completion, &gold_answer),
                *want,
                "completion {completion:?} gold {gold}"
            );
        }
    }
}
