//! LaTeX clean-up before parsing, in math-verify's order: boxed content, styling and
//! spacing commands, words for operators and percentages, trailing units, malformed
//! operators (`\frac12`, `\sqrt3`, `^(x)`, `sqrt(x)`).

use std::sync::OnceLock;

use regex::Regex;

/// How several `\boxed{}` in one text combine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Boxed {
    /// Every box, joined by commas (a latex environment's content).
    All,
    /// The last box, plus the boxes just before it when they are adjacent or separated by
    /// `,`, `;`, `and`, `or` (a completion that boxes each of several answers).
    Last,
}

fn find_box(text: &str, end: usize) -> Option<(usize, usize)> {
    let b = text[..end].rfind("\\boxed").map(|i| (i, i + 6));
    let f = text[..end].rfind("\\fbox").map(|i| (i, i + 5));
    match (b, f) {
        (Some(x), Some(y)) => Some(if x.0 > y.0 { x } else { y }),
        (x, y) => x.or(y),
    }
}

fn close_brace(text: &str, open: usize, limit: usize) -> Option<usize> {
    let bytes = text.as_bytes();
    let mut depth = 0usize;
    for (i, &c) in bytes.iter().enumerate().take(limit).skip(open) {
        match c {
            b'{' => depth += 1,
            b'}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            _ => {}
        }
    }
    None
}

fn separator_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| Regex::new(r"\b(and|or)\b|,|;").expect("valid regex"))
}

/// The content of the boxes in `text` (see [`Boxed`]); `None` when there is no box.
pub fn boxed_content(text: &str, mode: Boxed) -> Option<String> {
    let mut results: Vec<String> = Vec::new();
    let mut limit = text.len();
    let mut search_end = text.len();
    let mut last_start: Option<usize> = None;
    while let Some((start, cmd_end)) = find_box(text, search_end) {
        let rest = &text[cmd_end..limit];
        let skipped = rest.len() - rest.trim_start().len();
        let open = cmd_end + skipped;
        if open >= limit {
            break;
        }
        if text.as_bytes()[open] != b'{' {
            if results.is_empty() {
                results.push(text[open..limit].trim().to_string());
            }
            break;
        }
        let Some(close) = close_brace(text, open, limit) else {
            if results.is_empty() {
                results.push(text[open + 1..limit].trim().to_string());
            }
            break;
        };
        let content = text[open + 1..close].trim().to_string();
        if mode == Boxed::Last {
            if let Some(next_start) = last_start {
                let between = &text[close + 1..next_start];
                let near = between.len() < 10;
                let separated = results.last() != Some(&content)
                    && between.len() < 70
                    && separator_regex().is_match(between);
                if !(near || separated) {
                    break;
                }
            }
        }
        if results.last() != Some(&content) {
            results.push(content);
        }
        last_start = Some(start);
        limit = start;
        search_end = start;
    }
    if results.is_empty() {
        return None;
    }
    results.reverse();
    Some(results.join(","))
}

struct Rules {
    left_right: Regex,
    remove: Regex,
    font: Regex,
    frac: Regex,
    and_or: Regex,
    and_or_text: Regex,
    percent_word: Regex,
    inf: Regex,
    ldots: Regex,
    unit_word: Regex,
    paren_power: Regex,
    sqrt_paren: Regex,
}

/// Units dropped after a number at the end of an answer (with `s`/`es` plurals).
const UNITS: &[&str] = &[
    "integer", "point", "feet", "foot", "digit", "pound", "meal", "edge", "student", "multiple",
    "degree", "deg", "mph", "kmph", "kmh", "ft", "sq m", "mile", "monkey", "prime", "ratio", "rd",
    "gm", "lb", "tile", "per", "dm", "gain", "way", "east", "west", "north", "south", "t", "h",
    "men", "soldier", "pie", "excess", "st", "inches", "inch", "noon", "cent", "gal", "gallon",
    "c", "acre", "th", "sq", "mark", "l", "toy", "coin", "profit", "yr", "women", "am", "pm", "hr",
    "square", "rupee", "rounds", "cubic", "cc", "s", "ohm", "number", "day", "hour", "minute",
    "min", "second", "man", "woman", "sec", "cube", "mt", "hectare", "more", "unit", "rs", "kg",
    "g", "month", "km", "m", "cm", "mm", "apple", "liter", "litre", "loss", "yard", "year",
    "increase", "decrease", "d", "less", "metre", "meter", "o",
];

fn rules() -> &'static Rules {
    static R: OnceLock<Rules> = OnceLock::new();
    R.get_or_init(|| {
        let re = |p: &str| Regex::new(p).expect("valid normalisation regex");
        let units = UNITS.join("|");
        Rules {
            left_right: re(r"\\m?(?:left|right)\s*(\\[{}|]|[{}()\[\]|.]|\\[lr]?(?:vert|brace|brack|angle|floor|ceil|group))"),
            remove: re(r#"\\mathrm\{th\}|\\!\s*|\\text\s*\{\s*\}|\\\$|\$|\\displaystyle|\\quad|\\qquad|"|''"#),
            font: re(r"\\(?:mathrm|mathit|mathbf|textnormal|textbf|textit|textrm|mbox)\b"),
            frac: re(r"\\[dtc]frac"),
            and_or: re(r"(?:,\s*)?\s*\b(?:and|or)\b"),
            and_or_text: re(r",?\s*\\text\{\s*(?:and|or)\s*\}"),
            percent_word: re(r"\s*(?:\\text\{\s*)?\b(?:percentage|percent|pct)\b(?:\s*\})?"),
            inf: re(r"\binfinity\b|\binf\b"),
            ldots: re(r",?\s*\\(?:ldots|cdots|dots)"),
            unit_word: re(&format!(r"(\d|\}}|\s)\s*(?:{units})(?:s|es)?\s*$")),
            paren_power: re(r"\^\s?\(([^()]*)\)"),
            sqrt_paren: re(r"(?:^|[^\\a-zA-Z])sqrt\s?\(([^()]*)\)"),
        }
    })
}

/// Where a trailing unit starts: the first `\text{` (or `\mbox{`) when the text ends with `}`,
/// `}^2` or `}{^2}` (math-verify cuts from there to the end, whatever lies between).
fn trailing_text_start(s: &str) -> Option<usize> {
    let t = s.trim_end();
    let b = t.as_bytes();
    let n = b.len();
    let ends = t.ends_with('}')
        || (n >= 3 && b[n - 1].is_ascii_digit() && b[n - 2] == b'^' && b[n - 3] == b'}')
        || t.ends_with("}{^2}")
        || t.ends_with("}{^3}");
    if !ends {
        return None;
    }
    [t.find("\\text{"), t.find("\\mbox{")]
        .into_iter()
        .flatten()
        .min()
}

/// `\ ` (a spacing command) to a space; `\\ ` (a line break) stays.
fn backslash_space(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.peek() {
                Some(&'\\') => {
                    out.push_str("\\\\");
                    chars.next();
                }
                Some(&' ') => {
                    out.push(' ');
                    chars.next();
                }
                _ => out.push(c),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// `\\frac` (a doubled backslash before a command name, from escaped JSON) to `\frac`.
fn double_backslash_command(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = String::with_capacity(s.len());
    let mut last = 0;
    for i in 0..b.len().saturating_sub(2) {
        if b[i] == b'\\'
            && b[i + 1] == b'\\'
            && b[i + 2].is_ascii_alphabetic()
            && (i == 0 || b[i - 1] != b'\\')
        {
            out.push_str(&s[last..i]);
            last = i + 1;
        }
    }
    out.push_str(&s[last..]);
    out
}

/// Normalises one extracted answer (see the module doc). `boxed` selects how boxes combine;
/// `None` leaves `\boxed` to the caller.
pub fn normalize(text: &str, boxed: Option<Boxed>) -> String {
    let r = rules();
    let mut s = match boxed {
        Some(mode) => boxed_content(text, mode).unwrap_or_else(|| text.to_string()),
        None => text.to_string(),
    };
    s = s.replace("\\mathrm{T}", "T").replace("\\mathrm{d}", "d");
    s = r.left_right.replace_all(&s, "$1").into_owned();
    s = s.replace("\\left.", "").replace("\\right.", "");
    s = r.remove.replace_all(&s, "").into_owned();
    s = r.font.replace_all(&s, "\\text").into_owned();
    s = r.frac.replace_all(&s, "\\frac").into_owned();
    s = s.replace("{,}", ",");
    s = r.and_or_text.replace_all(&s, ",").into_owned();
    s = r.and_or.replace_all(&s, ",").into_owned();
    s = backslash_space(&s).replace(['\n', '\t'], " ");
    s = r.ldots.replace_all(&s, " ").into_owned();
    s = r.percent_word.replace_all(&s, "\\%").into_owned();
    s = r.inf.replace_all(&s, "\\infty").into_owned();
    if !s.contains("matrix") && !s.contains("array") {
        s = double_backslash_command(&s);
    }
    // Units: a trailing `\text{...}` (possibly squared), then unit words, twice.
    if let Some(cut) = trailing_text_start(&s) {
        let stripped = s[..cut].trim().to_string();
        if !stripped.is_empty() {
            s = stripped;
        }
    }
    for _ in 0..2 {
        let t = r.unit_word.replace(&s, "$1").trim().to_string();
        if !t.is_empty() && t != s {
            s = t;
        }
    }
    s = s.trim().to_string();
    if s.starts_with('.') {
        s.insert(0, '0');
    }
    s = r.paren_power.replace_all(&s, "^{$1}").into_owned();
    s = r
        .sqrt_paren
        .replace_all(&s, |c: &regex::Captures<'_>| {
            let m = c.get(0).map_or("", |m| m.as_str());
            let lead = &m[..m.find("sqrt").unwrap_or(0)];
            format!("{lead}\\sqrt{{{}}}", &c[1])
        })
        .into_owned();
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boxes_combine() {
        assert_eq!(
            boxed_content("so \\boxed{1} and \\boxed{2}", Boxed::Last).as_deref(),
            Some("1,2")
        );
        assert_eq!(
            boxed_content(
                "\\boxed{1} is wrong: after a long digression over several lines of checking, we find instead that \\boxed{2}",
                Boxed::Last
            )
            .as_deref(),
            Some("2")
        );
        assert_eq!(
            boxed_content("\\boxed{\\frac{1}{2}}.", Boxed::Last).as_deref(),
            Some("\\frac{1}{2}")
        );
        assert_eq!(boxed_content("\\fbox{7}", Boxed::All).as_deref(), Some("7"));
        assert_eq!(
            boxed_content("\\boxed{3", Boxed::Last).as_deref(),
            Some("3")
        );
        assert_eq!(boxed_content("none", Boxed::Last), None);
    }

    #[test]
    fn normalisation_table() {
        let cases = [
            ("\\left( 1, 2 \\right)", "( 1, 2 )"),
            ("\\dfrac{3}{4}", "\\frac{3}{4}"),
            ("5\\text{ cm}", "5"),
            ("5 cm", "5"),
            ("\\frac{1}{3} \\textbf{meters}", "\\frac{1}{3}"),
            ("\\text{Evelyn}", "\\text{Evelyn}"),
            ("1 and 2", "1, 2"),
            ("28 percent", "28\\%"),
            ("14{,}916", "14,916"),
            (".5", "0.5"),
            ("2^(3)", "2^{3}"),
            ("sqrt(2)", "\\sqrt{2}"),
            ("\\$18", "18"),
            ("a \\\\ b", "a \\\\ b"),
            ("x\\ y", "x y"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize(raw, Some(Boxed::All)), want, "{raw:?}");
        }
    }
}
