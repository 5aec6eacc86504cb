//! Final-answer extraction and normalisation for the math rewards (pure string functions).
//!
//! A completion's answer is, in order of preference:
//! 1. the content of the last complete `\boxed{...}` or `\fbox{...}` (balanced braces, `\{` and
//!    `\}` do not count; the brace-less form `\boxed 5` is accepted too),
//! 2. the content of the last complete `<answer>...</answer>` tag,
//! 3. the last number in the text (`-12`, `1,000`, `3.5`, `.5`, `3/4`).
//!
//! A gold answer (the dataset's answer column) is a JSON number, or a string that is either a
//! GSM8K-style solution (`... #### 42`: the text after the last `####`), a solution containing
//! a `\boxed{...}` (its last one), or the answer itself.
//!
//! Both sides are then normalised ([`normalize`]) and compared ([`Answer`]): exactly as rationals
//! (`i128` numerator and denominator) where both parse as numbers, else as normalised strings
//! (case-sensitive, since `x` and `X` differ in math).

use std::sync::OnceLock;

use regex::Regex;
use serde_json::Value;

/// An exact rational number `num / den`, reduced, with `den > 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rational {
    num: i128,
    den: i128,
}

impl Rational {
    /// `num / den` reduced; `None` if `den == 0` or the reduction overflows.
    pub fn new(num: i128, den: i128) -> Option<Self> {
        if den == 0 {
            return None;
        }
        let g = gcd(num.unsigned_abs(), den.unsigned_abs()).max(1);
        let g = i128::try_from(g).ok()?;
        let (mut num, mut den) = (num / g, den / g);
        if den < 0 {
            num = num.checked_neg()?;
            den = den.checked_neg()?;
        }
        Some(Self { num, den })
    }

    /// `self / other`; `None` on division by zero or overflow.
    fn checked_div(self, other: Self) -> Option<Self> {
        Self::new(
            self.num.checked_mul(other.den)?,
            self.den.checked_mul(other.num)?,
        )
    }

    fn checked_neg(self) -> Option<Self> {
        Some(Self {
            num: self.num.checked_neg()?,
            den: self.den,
        })
    }
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// A normalised answer: a number where the text parses as one, else the normalised text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Integers, decimals and fractions, compared exactly (`0.5 == \frac{1}{2}`, `3 == 3.0`).
    Number(Rational),
    /// Anything else, compared as the normalised string (`\sqrt{2}`, `(A)`, `x^2+1`).
    Text(String),
}

impl Answer {
    /// Normalises `raw` and classifies it; `None` if nothing is left after normalisation.
    pub fn parse(raw: &str) -> Option<Self> {
        let norm = normalize(raw);
        if norm.is_empty() {
            return None;
        }
        Some(match parse_rational(&norm) {
            Some(r) => Answer::Number(r),
            None => Answer::Text(norm),
        })
    }
}

/// The answer a completion commits to (see the module doc for the order); `None` if it has no
/// box, no answer tag and no number.
pub fn extract_completion_answer(text: &str) -> Option<&str> {
    last_boxed(text)
        .or_else(|| last_answer_tag(text))
        .or_else(|| last_number(text))
}

/// The gold answer of a dataset cell, parsed; `None` for null/bool/array/object cells and for
/// strings with nothing left after extraction and normalisation.
pub fn parse_gold(value: &Value) -> Option<Answer> {
    match value {
        Value::Number(n) => Answer::parse(&n.to_string()),
        Value::String(s) => {
            let raw = match s.rfind("####") {
                Some(i) => &s[i + 4..],
                None => last_boxed(s).unwrap_or(s),
            };
            Answer::parse(raw)
        }
        _ => None,
    }
}

/// Whether `completion` states `gold`: its extracted answer parses and equals the gold one.
pub fn is_correct(completion: &str, gold: &Answer) -> bool {
    extract_completion_answer(completion)
        .and_then(Answer::parse)
        .is_some_and(|a| &a == gold)
}

/// Content of the last complete `\boxed{...}` / `\fbox{...}` (or `\boxed x`) in `text`.
pub fn last_boxed(text: &str) -> Option<&str> {
    let mut starts: Vec<(usize, usize)> = ["\\boxed", "\\fbox"]
        .iter()
        .flat_map(|cmd| text.match_indices(cmd).map(|(i, m)| (i, i + m.len())))
        .collect();
    starts.sort_unstable();
    starts
        .iter()
        .rev()
        .find_map(|&(_, after)| command_argument(text, after))
}

/// The argument of a command whose name ends at byte `after`: a balanced `{...}` group, or,
/// after at least one space, the following run of non-space characters up to `$`.
fn command_argument(text: &str, after: usize) -> Option<&str> {
    let rest = &text[after..];
    if rest.starts_with(|c: char| c.is_ascii_alphabetic()) {
        return None; // a longer command name (`\boxedx`), not ours
    }
    let trimmed = rest.trim_start();
    if trimmed.starts_with('{') {
        let open = after + (rest.len() - trimmed.len());
        let close = matching_brace(text, open)?;
        return Some(&text[open + 1..close]);
    }
    if trimmed.len() == rest.len() {
        return None;
    }
    let token = trimmed
        .split(|c: char| c.is_whitespace() || c == '$')
        .next()
        .unwrap_or("");
    (!token.is_empty()).then_some(token)
}

/// Byte index of the `}` closing the `{` at byte `open`; `\{` and `\}` are literal braces.
fn matching_brace(text: &str, open: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    let mut i = open;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' => i += 1, // skip the escaped character (`\{`, `\}`, `\\`)
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Trimmed content of the last complete `<answer>...</answer>` tag.
pub fn last_answer_tag(text: &str) -> Option<&str> {
    let end = text.rfind("</answer>")?;
    let start = text[..end].rfind("<answer>")? + "<answer>".len();
    Some(text[start..end].trim())
}

fn number_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"[-+\x{2212}]?(?:(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?:/\d+)?")
            .expect("the number pattern is a valid regex")
    })
}

/// The last number in `text`; a sign directly after a letter or digit (`x-3`, `10-3`) is an
/// operator, not part of the number.
pub fn last_number(text: &str) -> Option<&str> {
    let m = number_regex().find_iter(text).last()?;
    let s = m.as_str();
    let signed = s.starts_with(['-', '+', '\u{2212}']);
    let after_operand = text[..m.start()]
        .chars()
        .next_back()
        .is_some_and(|c| c.is_alphanumeric() || c == ')' || c == '}');
    if signed && after_operand {
        let sign_len = s.chars().next().map_or(0, char::len_utf8);
        return Some(&s[sign_len..]);
    }
    Some(s)
}

/// Normalises an answer for comparison. Steps, in order:
/// - trim; strip enclosing `$...$`, `$$...$$`, `\(...\)`, `\[...\]`;
/// - unicode minus `−` to `-`; LaTeX `{,}` to `,`;
/// - drop `\left`, `\right`, `\displaystyle`, spacing (`\!`, `\,`, `\;`, `\:`, `\ `, `\quad`,
///   `\qquad`), degrees (`^\circ`, `^{\circ}`), percent (`\%`, `%`) and dollars (`\$`, `$`);
/// - drop a trailing unit `\text{cm}` / `\mbox{...}` / `\mathrm{...}` (letters only) after a number;
/// - unwrap `\text{x}`, `\textbf{x}`, `\textit{x}`, `\mathrm{x}`, `\mathbf{x}`, `\mbox{x}` to `x`;
/// - `\dfrac`/`\tfrac` to `\frac`, and brace the arguments of `\frac` and `\sqrt` (`\frac12` to
///   `\frac{1}{2}`, `\sqrt2` to `\sqrt{2}`);
/// - remove all whitespace; a leading `+`, a trailing `.`;
/// - `x=5` to `5` (one `=`, a plain variable name on the left);
/// - thousands separators (`1,000,000` to `1000000`) when the whole answer is such a number.
pub fn normalize(raw: &str) -> String {
    let mut s = strip_math_delimiters(raw.trim()).replace('\u{2212}', "-");
    s = s.replace("{,}", ",");
    for cmd in ["\\left", "\\right", "\\displaystyle", "\\qquad", "\\quad"] {
        s = remove_command(&s, cmd);
    }
    for lit in [
        "\\!",
        "\\,",
        "\\;",
        "\\:",
        "\\ ",
        "^{\\circ}",
        "^\\circ",
        "\\%",
        "%",
        "\\$",
        "$",
    ] {
        s = s.replace(lit, "");
    }
    s = strip_unit_suffix(&s);
    for cmd in [
        "\\text", "\\textbf", "\\textit", "\\mathrm", "\\mathbf", "\\mbox",
    ] {
        s = unwrap_command(&s, cmd);
    }
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac");
    s = brace_arguments(&s, "\\frac", 2);
    s = brace_arguments(&s, "\\sqrt", 1);
    s.retain(|c| !c.is_whitespace());
    if let Some(rest) = s.strip_prefix('+') {
        s = rest.to_string();
    }
    while s.ends_with('.') {
        s.pop();
    }
    if let Some((lhs, rhs)) = s.split_once('=') {
        let variable = lhs.starts_with(|c: char| c.is_ascii_alphabetic())
            && lhs.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if variable && !rhs.is_empty() && !rhs.contains('=') {
            s = rhs.to_string();
        }
    }
    if is_thousands_number(&s) {
        s.retain(|c| c != ',');
    }
    s
}

fn strip_math_delimiters(s: &str) -> String {
    let mut s = s;
    loop {
        let inner = [("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")]
            .iter()
            .find_map(|(open, close)| {
                let inner = s.strip_prefix(open)?.strip_suffix(close)?;
                Some(inner.trim())
            });
        match inner {
            Some(inner) if inner.len() < s.len() => s = inner,
            _ => return s.to_string(),
        }
    }
}

/// Removes `cmd` where it is a whole command name (not followed by a letter).
fn remove_command(s: &str, cmd: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(cmd) {
        let after = &rest[i + cmd.len()..];
        out.push_str(&rest[..i]);
        if after.starts_with(|c: char| c.is_ascii_alphabetic()) {
            out.push_str(cmd);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Replaces `cmd{x}` by `x` (balanced braces) where `cmd` is a whole command name.
fn unwrap_command(s: &str, cmd: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find(cmd) {
        out.push_str(&rest[..i]);
        let after = i + cmd.len();
        let group = rest[after..]
            .starts_with('{')
            .then(|| matching_brace(rest, after))
            .flatten();
        match group {
            Some(close) => {
                out.push_str(&rest[after + 1..close]);
                rest = &rest[close + 1..];
            }
            None => {
                out.push_str(cmd);
                rest = &rest[after..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Drops a trailing `\text{...}`-style group of letters and spaces when what precedes it is a
/// number (`5\text{ cm}` to `5`): units are not part of the answer.
fn strip_unit_suffix(s: &str) -> String {
    let trimmed = s.trim_end();
    if !trimmed.ends_with('}') {
        return s.to_string();
    }
    for cmd in ["\\text", "\\mbox", "\\mathrm"] {
        let Some(i) = trimmed.rfind(cmd) else {
            continue;
        };
        let open = i + cmd.len();
        let unit = trimmed[open..].trim_start();
        let open = trimmed.len() - unit.len();
        if !unit.starts_with('{') || matching_brace(trimmed, open) != Some(trimmed.len() - 1) {
            continue;
        }
        let content = &trimmed[open + 1..trimmed.len() - 1];
        let letters = content.chars().any(|c| c.is_alphabetic())
            && content.chars().all(|c| c.is_alphabetic() || c == ' ');
        let prefix = trimmed[..i].trim();
        if letters && !prefix.is_empty() && parse_rational(&normalize(prefix)).is_some() {
            return prefix.to_string();
        }
    }
    s.to_string()
}

/// Rewrites `cmd` with `n` arguments so that every argument is a `{...}` group: a bare argument is
/// one character or one `\command` (`\frac12`, `\frac\pi2`, `\sqrt3`). Arguments of unknown shape
/// are left as they are.
fn brace_arguments(s: &str, cmd: &str, n: usize) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    let mut rest = s;
    while let Some(i) = rest.find(cmd) {
        out.push_str(&rest[..i]);
        out.push_str(cmd);
        let mut pos = i + cmd.len();
        if rest[pos..].starts_with(|c: char| c.is_ascii_alphabetic()) {
            rest = &rest[pos..]; // a longer command name
            continue;
        }
        let mut args = Vec::with_capacity(n);
        for _ in 0..n {
            match take_argument(rest, pos) {
                Some((arg, next)) => {
                    args.push(brace_arguments(arg, cmd, n));
                    pos = next;
                }
                None => break,
            }
        }
        if args.len() == n {
            for arg in args {
                out.push('{');
                out.push_str(&arg);
                out.push('}');
            }
            rest = &rest[pos..];
        } else {
            rest = &rest[i + cmd.len()..];
        }
    }
    out.push_str(rest);
    out
}

/// One macro argument starting at byte `pos` (after spaces): a `{...}` group's content, a
/// `\command` name, or a single character. Returns it and the byte index after it.
fn take_argument(s: &str, pos: usize) -> Option<(&str, usize)> {
    let rest = &s[pos..];
    let trimmed = rest.trim_start();
    let start = pos + (rest.len() - trimmed.len());
    let first = trimmed.chars().next()?;
    match first {
        '{' => {
            let close = matching_brace(s, start)?;
            Some((&s[start + 1..close], close + 1))
        }
        // `}` ends the enclosing group; `[` opens an optional argument (`\sqrt[3]{x}`).
        '}' | '[' => None,
        '\\' => {
            let name_len = trimmed[1..]
                .find(|c: char| !c.is_ascii_alphabetic())
                .unwrap_or(trimmed.len() - 1);
            if name_len == 0 {
                return None;
            }
            Some((&s[start..start + 1 + name_len], start + 1 + name_len))
        }
        c => Some((&s[start..start + c.len_utf8()], start + c.len_utf8())),
    }
}

/// `-?\d{1,3}(,\d{3})+(\.\d+)?` over the whole string.
fn is_thousands_number(s: &str) -> bool {
    let s = s.strip_prefix('-').unwrap_or(s);
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let mut groups = int.split(',');
    let head_ok = groups
        .next()
        .is_some_and(|g| (1..=3).contains(&g.len()) && g.bytes().all(|b| b.is_ascii_digit()));
    let mut count = 0;
    let tail_ok = groups.all(|g| {
        count += 1;
        g.len() == 3 && g.bytes().all(|b| b.is_ascii_digit())
    });
    head_ok && tail_ok && count > 0 && frac.bytes().all(|b| b.is_ascii_digit())
}

/// Parses a normalised answer as an exact rational: an integer or decimal (`-12`, `3.50`, `.5`,
/// `3.`), `a/b` of two such numbers, or `\frac{a}{b}` of two rationals, optionally negated.
/// `None` for anything else, for a zero denominator and for numbers beyond `i128`.
pub fn parse_rational(s: &str) -> Option<Rational> {
    if let Some(rest) = s.strip_prefix('-') {
        return parse_rational(rest)?.checked_neg();
    }
    if let Some(args) = s.strip_prefix("\\frac") {
        let (num, next) = take_argument(args, 0)?;
        let (den, end) = take_argument(args, next)?;
        if end != args.len() || !args.starts_with('{') {
            return None;
        }
        return parse_rational(num)?.checked_div(parse_rational(den)?);
    }
    if let Some((num, den)) = s.split_once('/') {
        return parse_decimal(num)?.checked_div(parse_decimal(den)?);
    }
    parse_decimal(s)
}

/// `\d+`, `\d+.\d*` or `.\d+` as an exact rational.
fn parse_decimal(s: &str) -> Option<Rational> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    if int.is_empty() && frac.is_empty() {
        return None;
    }
    if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut num: i128 = 0;
    let mut den: i128 = 1;
    for b in int.bytes() {
        num = num.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
    }
    for b in frac.bytes() {
        num = num.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
        den = den.checked_mul(10)?;
    }
    Rational::new(num, den)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn r(num: i128, den: i128) -> Answer {
        Answer::Number(Rational::new(num, den).unwrap())
    }

    fn t(s: &str) -> Answer {
        Answer::Text(s.to_string())
    }

    #[test]
    fn extraction_prefers_box_then_tag_then_last_number() {
        let cases: &[(&str, Option<&str>)] = &[
            ("so \\boxed{42} and 7", Some("42")),
            ("\\boxed{1} then \\boxed{2}", Some("2")),
            ("\\boxed{\\frac{1}{2}}", Some("\\frac{1}{2}")),
            ("\\boxed{\\{1, 2\\}}", Some("\\{1, 2\\}")),
            ("\\fbox{7} is it", Some("7")),
            ("\\boxed 5$ done", Some("5")),
            ("\\boxed{3} and then \\boxed{4", Some("3")),
            ("<answer>\n 12 \n</answer> 99", Some("12")),
            ("<answer>1</answer> <answer>x+1</answer>", Some("x+1")),
            ("<answer> \\boxed{8} </answer>", Some("8")),
            ("<answer>5", Some("5")),
            ("it costs 1,250 dollars, or 3.5 each", Some("3.5")),
            ("we get 10-3", Some("3")),
            ("the answer is -7.", Some("-7")),
            ("ratio 3/4", Some("3/4")),
            ("x = (2, 5)", Some("5")),
            ("no digits here", None),
            ("", None),
        ];
        for (text, want) in cases {
            assert_eq!(extract_completion_answer(text), *want, "text {text:?}");
        }
    }

    #[test]
    fn normalisation_table() {
        let cases: &[(&str, &str)] = &[
            ("  42 ", "42"),
            ("$42$", "42"),
            ("$$ 42 $$", "42"),
            ("\\(x^2\\)", "x^2"),
            ("\\[ \\sqrt2 \\]", "\\sqrt{2}"),
            ("\\left( 1, 2 \\right)", "(1,2)"),
            ("\\rightarrow", "\\rightarrow"),
            ("\\!3\\,000", "3000"),
            ("1,000", "1000"),
            ("1,234,567.25", "1234567.25"),
            ("(1,2)", "(1,2)"),
            ("1{,}000", "1000"),
            ("\\text{Yes}", "Yes"),
            ("\\textbf{(B)}", "(B)"),
            ("5\\text{ cm}", "5"),
            ("5 \\mbox{meters}", "5"),
            ("x\\text{ cm}", "xcm"),
            ("\\dfrac{3}{4}", "\\frac{3}{4}"),
            ("\\tfrac12", "\\frac{1}{2}"),
            ("\\frac\\pi2", "\\frac{\\pi}{2}"),
            ("\\frac{\\frac12}{3}", "\\frac{\\frac{1}{2}}{3}"),
            ("+5", "5"),
            ("\u{2212}5", "-5"),
            ("42.", "42"),
            ("90^\\circ", "90"),
            ("50\\%", "50"),
            ("\\$18", "18"),
            ("x = 5", "5"),
            ("a_1=\\frac{1}{2}", "\\frac{1}{2}"),
            ("x+1=5", "x+1=5"),
            ("\\displaystyle \\frac{1}{2}", "\\frac{1}{2}"),
            ("", ""),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw), *want, "raw {raw:?}");
        }
    }

    #[test]
    fn parsing_table() {
        let cases: &[(&str, Option<Answer>)] = &[
            ("3", Some(r(3, 1))),
            ("3.0", Some(r(3, 1))),
            ("3.00", Some(r(3, 1))),
            ("-0.5", Some(r(-1, 2))),
            (".5", Some(r(1, 2))),
            ("1/2", Some(r(1, 2))),
            ("2/4", Some(r(1, 2))),
            ("-\\frac{3}{6}", Some(r(-1, 2))),
            ("\\frac{-1}{2}", Some(r(-1, 2))),
            ("\\dfrac{1}{0.5}", Some(r(2, 1))),
            ("\\frac12", Some(r(1, 2))),
            ("\\frac{\\frac{1}{2}}{2}", Some(r(1, 4))),
            ("1,000.00", Some(r(1000, 1))),
            ("1/0", Some(t("1/0"))),
            ("\\frac{1}{0}", Some(t("\\frac{1}{0}"))),
            ("\\sqrt{2}", Some(t("\\sqrt{2}"))),
            ("\\frac{\\pi}{2}", Some(t("\\frac{\\pi}{2}"))),
            ("1e5", Some(t("1e5"))),
            // Beyond i128: compared as the normalised digits.
            (
                "123456789012345678901234567890123456789012",
                Some(t("123456789012345678901234567890123456789012")),
            ),
            ("$ $", None),
            ("\\text{}", None),
        ];
        for (raw, want) in cases {
            assert_eq!(Answer::parse(raw), *want, "raw {raw:?}");
        }
    }

    #[test]
    fn gold_answers() {
        let cases: &[(Value, Option<Answer>)] = &[
            (json!(42), Some(r(42, 1))),
            (json!(0.25), Some(r(1, 4))),
            (json!("42"), Some(r(42, 1))),
            (
                json!("Natalia sold 48/2 = 24 clips.\n#### 1,000"),
                Some(r(1000, 1)),
            ),
            (json!("The sum is $\\boxed{\\frac{7}{2}}$."), Some(r(7, 2))),
            (json!("\\boxed{\\text{(C)}}"), Some(t("(C)"))),
            (json!("x^2 + 1"), Some(t("x^2+1"))),
            (json!("#### "), None),
            (json!(""), None),
            (Value::Null, None),
            (json!(true), None),
            (json!([1]), None),
        ];
        for (gold, want) in cases {
            assert_eq!(parse_gold(gold), *want, "gold {gold}");
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
            ("\\boxed{\u{2212}4}", json!(-4), true),
            ("\\boxed{+4}", json!(4), true),
            ("$\\boxed{\\left(1, 2\\right)}$", json!("(1,2)"), true),
            ("\\boxed{x = \\sqrt{3}}", json!("\\sqrt3"), true),
            ("\\boxed{\\text{B}}", json!("B"), true),
            ("\\boxed{50\\%}", json!("50"), true),
            ("\\boxed{5\\text{ cm}}", json!("5"), true),
            ("\\boxed{4}", json!("3"), false),
            ("\\boxed{0.33}", json!("1/3"), false),
            ("\\boxed{b}", json!("B"), false),
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

    #[test]
    fn rational_reduction_and_overflow() {
        assert_eq!(Rational::new(6, -4), Rational::new(-3, 2));
        assert_eq!(Rational::new(0, 5), Rational::new(0, 1));
        assert_eq!(Rational::new(1, 0), None);
        assert_eq!(
            parse_decimal("1.0000000000000000000000000000000000000001"),
            None
        );
    }
}
