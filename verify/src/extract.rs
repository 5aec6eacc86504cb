//! Finding the answer in a text: candidate spans by priority, as math-verify's extraction
//! with `LatexExtractionConfig(boxed_match_priority=0)` and `ExprExtractionConfig()` does,
//! plus `<answer>` tags.
//!
//! Priorities, first that parses wins: 0 the last `\boxed{}` (with the boxes just before it
//! when they list several answers); 1 the last `<answer>...</answer>`; 2 a LaTeX span after
//! "final answer ... is"; 3 a LaTeX span or number after the word "answer"; 4 any LaTeX span
//! (`$..$`, `$$..$$`, `\(..\)`, `\[..\]`, ` [..] `, `\frac{1}{2}`) or plain number or
//! arithmetic (`1,000.5`, `2,74`, `10/9`, `28 %`). Within a priority the span ending last is
//! tried first. Spans joined by `and`/`or`/`,` form one set of answers.

/// One candidate span: where it ends (for ordering) and its kind.
#[derive(Debug, Clone)]
pub struct Span {
    pub start: usize,
    pub end: usize,
    pub kind: SpanKind,
}

#[derive(Debug, Clone)]
pub enum SpanKind {
    /// LaTeX contents (each of a chain) with a percent sign after each.
    Latex(Vec<(String, bool)>),
    /// A plain number (`1,000.5` -> `1000.5`), possibly a percentage.
    Number { text: String, percent: bool },
    /// Plain arithmetic (`10/9`, `2^3`).
    Arith(String),
    /// Content of boxes.
    Boxed(String),
}

fn bytes_find(hay: &[u8], from: usize, pat: &[u8]) -> Option<usize> {
    hay.get(from..)?
        .windows(pat.len())
        .position(|w| w == pat)
        .map(|p| p + from)
}

/// A LaTeX environment starting exactly at `i`: `(content_start, content_end, end)`.
fn env_at(s: &str, i: usize) -> Option<(usize, usize, usize)> {
    if i >= s.len() || !s.is_char_boundary(i) {
        return None;
    }
    let b = s.as_bytes();
    let escaped = i > 0 && b[i - 1] == b'\\';
    if b.get(i..i + 2) == Some(b"$$") && !escaped {
        let close = bytes_find(b, i + 2, b"$$")?;
        return (close > i + 2 && b[close - 1] != b'\\').then_some((i + 2, close, close + 2));
    }
    if b.get(i..i + 2) == Some(b"\\[") && !escaped {
        let close = bytes_find(b, i + 2, b"\\]")?;
        return (close > i + 2).then_some((i + 2, close, close + 2));
    }
    if b.get(i..i + 2) == Some(b"\\(") && !escaped {
        let mut j = i + 2;
        while j + 1 < b.len() {
            if b[j] == b'\n' {
                return None;
            }
            if b[j] == b'\\' && b[j + 1] == b')' {
                return (j > i + 2).then_some((i + 2, j, j + 2));
            }
            j += 1;
        }
        return None;
    }
    if b[i] == b'$' && !escaped && !(i > 0 && b[i - 1].is_ascii_digit()) {
        let mut j = i + 1;
        while j < b.len() {
            match b[j] {
                b'\n' => return None,
                b'\\' if b.get(j + 1) == Some(&b'$') => j += 2,
                b'$' => return (j > i + 1).then_some((i + 1, j, j + 1)),
                _ => j += 1,
            }
        }
        return None;
    }
    if b[i].is_ascii_whitespace() && b.get(i + 1) == Some(&b'[') {
        let mut j = i + 2;
        while j < b.len() && !matches!(b[j], b'\n' | b'[' | b']') {
            j += 1;
        }
        if j < b.len()
            && b[j] == b']'
            && j > i + 2
            && b.get(j + 1).is_some_and(|c| c.is_ascii_whitespace())
        {
            return Some((i + 2, j, j + 2));
        }
        return None;
    }
    if s[i..].starts_with("\\frac{") || s[i..].starts_with("-\\frac{") {
        let open = s[i..].find('{')? + i;
        let after = simple_number_group(s, open)?;
        let end = simple_number_group(s, after)?;
        return Some((i, end, end));
    }
    None
}

/// `{-?\d+([.,]\d+)?}` at `open`: the index after `}`.
fn simple_number_group(s: &str, open: usize) -> Option<usize> {
    let rest = s.get(open..)?.strip_prefix('{')?;
    let close = rest.find('}')?;
    let inner = &rest[..close];
    let digits = inner.strip_prefix('-').unwrap_or(inner);
    let (a, b) = digits.split_once(['.', ',']).unwrap_or((digits, "0"));
    let ok =
        !a.is_empty() && !b.is_empty() && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_digit());
    ok.then_some(open + 1 + close + 1)
}

/// A percent sign or word right after a span: the index after it.
fn percent_after(s: &str, i: usize) -> Option<usize> {
    let rest = &s[i..];
    let t = rest.trim_start();
    let skip = rest.len() - t.len();
    for p in [
        "\\%",
        "%",
        "percentage",
        "Percentage",
        "percent",
        "Percent",
        "pct",
        "Pct",
    ] {
        if t.starts_with(p) {
            return Some(i + skip + p.len());
        }
    }
    None
}

/// Every LaTeX span (with chains of up to 5 more joined by `and`/`or`/`,`), left to right.
pub fn latex_spans(s: &str) -> Vec<Span> {
    let mut out = Vec::new();
    let mut i = 0;
    let b = s.as_bytes();
    while i < b.len() {
        let Some((cs, ce, mut end)) = env_at(s, i) else {
            i += 1;
            continue;
        };
        let start = i;
        let pct = percent_after(s, end);
        if let Some(p) = pct {
            end = p;
        }
        let mut parts = vec![(s[cs..ce].to_string(), pct.is_some())];
        while parts.len() < 6 {
            let rest = &s[end..];
            let t = rest.trim_start();
            let mut j = end + rest.len() - t.len();
            let sep = [",and", ",or", "and", "or", ","]
                .iter()
                .find(|p| t.starts_with(**p));
            let Some(sep) = sep else { break };
            j += sep.len();
            let r2 = &s[j..];
            let j2 = j + r2.len() - r2.trim_start().len();
            let Some((cs2, ce2, mut e2)) =
                env_at(s, j2).or_else(|| env_at(s, j2.saturating_sub(1)))
            else {
                break;
            };
            let pct2 = percent_after(s, e2);
            if let Some(p) = pct2 {
                e2 = p;
            }
            parts.push((s[cs2..ce2].to_string(), pct2.is_some()));
            end = e2;
        }
        out.push(Span {
            start,
            end,
            kind: SpanKind::Latex(parts),
        });
        i = end.max(i + 1);
    }
    out
}

const OPS: &[u8] = b"+-*/^()";

fn is_currency(c: char) -> bool {
    "$€£¥₹₽₪₩₫฿".contains(c)
}

/// Plain numbers and arithmetic, each preceded by the start, a space or `=` (optionally `**`).
/// The two are scanned independently (a number inside a failed arithmetic span still counts).
pub fn plain_spans(s: &str) -> Vec<Span> {
    let chars: Vec<(usize, char)> = s.char_indices().collect();
    let mut out = scan(s, &chars, true);
    out.extend(scan(s, &chars, false));
    out
}

fn scan(s: &str, chars: &[(usize, char)], arith: bool) -> Vec<Span> {
    let mut out = Vec::new();
    let n = chars.len();
    let byte = |k: usize| chars.get(k).map_or(s.len(), |c| c.0);
    let mut k = 0;
    while k < n {
        let anchored = k == 0 || chars[k - 1].1.is_whitespace() || chars[k - 1].1 == '=';
        if !anchored {
            k += 1;
            continue;
        }
        let mut j = k;
        if j + 1 < n && chars[j].1 == '*' && chars[j + 1].1 == '*' {
            j += 2;
        }
        let span_start = byte(j);
        if arith {
            if let Some((end_k, text)) = arith_at(chars, j) {
                out.push(Span {
                    start: span_start,
                    end: byte(end_k),
                    kind: SpanKind::Arith(text),
                });
                k = end_k.max(k + 1);
                continue;
            }
            k += 1;
            continue;
        }
        let mut m = j;
        if m < n && is_currency(chars[m].1) {
            m += 1;
        }
        if let Some((end_k, text)) = number_at(chars, m) {
            let mut end = byte(end_k);
            let mut percent = false;
            if let Some(p) = percent_after(s, end) {
                if !s[end..p].contains("\\%") {
                    percent = true;
                    end = p;
                }
            }
            out.push(Span {
                start: span_start,
                end,
                kind: SpanKind::Number { text, percent },
            });
            let next = chars.iter().position(|c| c.0 >= end).unwrap_or(n);
            k = next.max(k + 1);
            continue;
        }
        k += 1;
    }
    out
}

fn digit(chars: &[(usize, char)], k: usize) -> bool {
    chars.get(k).is_some_and(|c| c.1.is_ascii_digit())
}

/// A number at char index `k` (see the module doc): end index and the number with
/// separators removed and a decimal comma made a point.
fn number_at(chars: &[(usize, char)], k: usize) -> Option<(usize, String)> {
    if k > 0 && digit(chars, k - 1) {
        return None;
    }
    let mut i = k;
    let neg = chars.get(i).is_some_and(|c| c.1 == '-');
    if neg {
        i += 1;
    }
    let sign = if neg { "-" } else { "" };
    // Thousands separators: [1-9]\d{0,2}([ ,]\d{3})+ (.\d+)?
    if chars.get(i).is_some_and(|c| ('1'..='9').contains(&c.1)) {
        let mut lead = i;
        while lead < i + 3 && digit(chars, lead) {
            lead += 1;
        }
        let mut groups = 0;
        let mut e = lead;
        while chars.get(e).is_some_and(|c| c.1 == ',' || c.1 == ' ')
            && (1..=3).all(|d| digit(chars, e + d))
            && !digit(chars, e + 4)
        {
            e += 4;
            groups += 1;
        }
        if groups > 0 {
            let mut text: String = chars[i..e]
                .iter()
                .map(|c| c.1)
                .filter(|c| c.is_ascii_digit())
                .collect();
            if chars.get(e).is_some_and(|c| c.1 == '.') && digit(chars, e + 1) {
                let mut f = e + 1;
                while digit(chars, f) {
                    f += 1;
                }
                text.push('.');
                text.extend(chars[e + 1..f].iter().map(|c| c.1));
                e = f;
            }
            return Some((e, format!("{sign}{}", strip_zeros(&text))));
        }
    }
    if digit(chars, i) {
        let mut e = i;
        while digit(chars, e) {
            e += 1;
        }
        let int: String = chars[i..e].iter().map(|c| c.1).collect();
        if chars.get(e).is_some_and(|c| c.1 == '.' || c.1 == ',') && digit(chars, e + 1) {
            let mut f = e + 1;
            while digit(chars, f) {
                f += 1;
            }
            let frac: String = chars[e + 1..f].iter().map(|c| c.1).collect();
            return Some((f, format!("{sign}{}.{frac}", strip_zeros(&int))));
        }
        return Some((e, format!("{sign}{}", strip_zeros(&int))));
    }
    if !neg && chars.get(i).is_some_and(|c| c.1 == '.') && digit(chars, i + 1) {
        let mut f = i + 1;
        while digit(chars, f) {
            f += 1;
        }
        let frac: String = chars[i + 1..f].iter().map(|c| c.1).collect();
        return Some((f, format!("0.{frac}")));
    }
    None
}

fn strip_zeros(s: &str) -> String {
    let t = s.trim_start_matches('0');
    if t.is_empty() || t.starts_with('.') {
        format!("0{t}")
    } else {
        t.to_string()
    }
}

/// Arithmetic at char index `k`: `-?(?-?digit`, then digits, `.`, spaces and operators with
/// at least one operator, ending before `.`, `,`, `:`, a space, `)`, `$` or the end.
fn arith_at(chars: &[(usize, char)], k: usize) -> Option<(usize, String)> {
    let allowed = |c: char| {
        c.is_ascii_digit()
            || c == '.'
            || c.is_whitespace()
            || OPS.contains(&(c as u8))
            || c == '×'
            || c == '÷'
    };
    let mut i = k;
    if chars.get(i).is_some_and(|c| c.1 == '-') {
        i += 1;
    }
    if chars.get(i).is_some_and(|c| c.1 == '(') {
        i += 1;
    }
    if chars.get(i).is_some_and(|c| c.1 == '-') {
        i += 1;
    }
    if !digit(chars, i) {
        return None;
    }
    let mut run = i + 1;
    while run < chars.len()
        && allowed(chars[run].1)
        && chars[run].1.is_ascii() | (chars[run].1 == '×') | (chars[run].1 == '÷')
    {
        run += 1;
    }
    let is_op = |c: char| OPS.contains(&(c as u8)) && c.is_ascii() || c == '×' || c == '÷';
    let mut end = run;
    while end > i + 1 {
        let body: Vec<char> = chars[i + 1..end].iter().map(|c| c.1).collect();
        // An operator followed by at least one more allowed character.
        let op_ok = body
            .iter()
            .enumerate()
            .any(|(p, &c)| is_op(c) && p + 1 < body.len());
        let suffix_ok = match chars.get(end) {
            None => true,
            Some(&(_, c)) => matches!(c, '.' | ',' | ':' | ')' | '$') || c.is_whitespace(),
        };
        if op_ok && suffix_ok {
            let text: String = chars[k..end].iter().map(|c| c.1).collect();
            return Some((end, text.trim_end().to_string()));
        }
        end -= 1;
    }
    None
}

/// Spans after the word "answer" (case-insensitive): the first LaTeX span starting within 50
/// bytes, or a number/arithmetic within 50 bytes or after an `=` within 100.
pub fn answer_word_spans(s: &str, latex: &[Span], plain: &[Span]) -> Vec<Span> {
    let lower = s.to_ascii_lowercase();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(p) = lower[from..].find("answer") {
        let at = from + p + 6;
        if let Some(sp) = latex
            .iter()
            .find(|sp| sp.start >= at && sp.start <= at + 50)
        {
            out.push(sp.clone());
        }
        let eq_limit = at + 100;
        if let Some(sp) = plain.iter().rev().find(|sp| {
            sp.start >= at
                && (sp.start <= at + 51 || (sp.start <= eq_limit && s[at..sp.start].contains('=')))
        }) {
            out.push(sp.clone());
        }
        from = at;
    }
    out
}

/// A LaTeX span right after "final answer ... is" (within 100 bytes).
pub fn final_answer_spans(s: &str, latex: &[Span]) -> Vec<Span> {
    let lower = s.to_ascii_lowercase();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(p) = lower[from..].find("final answer") {
        let at = from + p + 12;
        let window_end = (at + 110).min(s.len());
        if let Some(is) = lower.get(at..window_end).and_then(|w| w.find(" is")) {
            let after = at + is + 3;
            let rest = &s[after..];
            let t = rest.trim_start_matches(':').trim_start();
            let st = after + rest.len() - t.len();
            if let Some(sp) = latex
                .iter()
                .find(|sp| sp.start == st || (st > 0 && sp.start == st - 1))
            {
                out.push(sp.clone());
            }
        }
        from = at;
    }
    out
}

/// Content of the last `<answer>...</answer>`; a last `<answer>` that was never closed (a
/// completion cut at the length limit) runs to the end of the text.
pub fn answer_tag(text: &str) -> Option<&str> {
    let open = text.rfind("<answer>")?;
    let start = open + "<answer>".len();
    let end = text[start..]
        .find("</answer>")
        .map_or(text.len(), |e| start + e);
    Some(text[start..end].trim())
}
