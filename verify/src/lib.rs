//! A math answer checker at math-verify's grade, in Rust: the accuracy reward, `trainer eval`
//! and the data filter of `trainer generate` use it.
//!
//! Data flow: a text (gold solution or completion) -> [`extract`] finds candidate spans by
//! priority (last `\boxed{}`, `<answer>` tag, "final answer is", "answer: ...", any LaTeX or
//! plain number) -> [`normalize`] cleans the LaTeX -> [`parser`] builds an [`Expr`] -> the
//! first span that parses is the answer, kept with the first span's text as a string
//! fallback ([`Parsed`]). [`verify`] then compares gold and prediction ([`equiv`]): exact
//! rationals, decimals rounded to `float_rounding = 6` places, constant expressions
//! numerically, expressions with variables at sampled points, sets in any order, tuples,
//! intervals, matrices, relations (`x = 3` against `3`, `2x = 6` against `x = 3`).
//!
//! Work per pair is bounded: inputs over [`parser::MAX_INPUT`] bytes are compared as strings,
//! nesting depth is capped, exponents and factorials are capped, set matching is quadratic in
//! at most [`equiv::MAX_ELEMENTS`] elements, and expressions with variables are evaluated at a
//! fixed number of points.

pub mod equiv;
pub mod expr;
pub mod extract;
pub mod normalize;
pub mod parser;
pub mod rational;

pub use expr::Expr;

use extract::{Span, SpanKind};
use normalize::{normalize, Boxed};

/// What extraction found: the parsed answer (if any span parsed) and the text of the first
/// span tried (compared as a string when neither side parses).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Parsed {
    pub expr: Option<Expr>,
    pub fallback: Option<String>,
}

impl Parsed {
    /// Whether nothing at all was found.
    pub fn is_empty(&self) -> bool {
        self.expr.is_none() && self.fallback.as_deref().is_none_or(|s| s.trim().is_empty())
    }

    /// A display form of the extracted answer: the parsed span's text or the fallback.
    pub fn text(&self) -> Option<&str> {
        self.fallback.as_deref()
    }
}

/// Whole-string number with thousands separators (`1,000`, `-12,345.5`).
fn comma_number(s: &str) -> Option<Expr> {
    let t = s.trim();
    let body = t.strip_prefix('-').unwrap_or(t);
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    let mut groups = int.split(',');
    let head = groups.next()?;
    if !(1..=3).contains(&head.len()) || !head.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut count = 0;
    for g in groups {
        if g.len() != 3 || !g.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        count += 1;
    }
    if count == 0 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits: String = t.chars().filter(|c| *c != ',').collect();
    parser::parse(&digits)
}

/// Parses normalised LaTeX; on failure, the part after the last `=` of a chain `a = b = c`.
pub fn parse_latex(latex: &str) -> Option<Expr> {
    if latex.contains("**") {
        return None; // Python's power operator is plain syntax, not LaTeX
    }
    if let Some(e) = comma_number(latex) {
        return Some(e);
    }
    if let Some(e) = parser::parse(latex) {
        return Some(e);
    }
    if !latex.contains(',') && !latex.contains(';') {
        let parts = split_equals(latex);
        if parts.len() > 2 {
            return parser::parse(parts.last()?);
        }
    }
    None
}

/// Splits at `=` not preceded by `\`, `<`, `>` or `!`.
fn split_equals(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut last = 0;
    let b = s.as_bytes();
    for (i, &c) in b.iter().enumerate() {
        if c == b'=' && !(i > 0 && matches!(b[i - 1], b'\\' | b'<' | b'>' | b'!')) {
            parts.push(&s[last..i]);
            last = i + 1;
        }
    }
    parts.push(&s[last..]);
    parts
}

fn percent(e: Expr) -> Expr {
    Expr::Percent(Box::new(e))
}

/// Parses one span: the parsed value (or `None`) and its normalised text.
fn parse_span(span: &Span) -> (Option<Expr>, String) {
    match &span.kind {
        SpanKind::Boxed(content) => {
            let norm = normalize(content, None);
            (parse_latex(&norm), norm)
        }
        SpanKind::Latex(parts) => {
            let mut exprs = Vec::new();
            let mut texts = Vec::new();
            for (latex, pct) in parts {
                let norm = normalize(latex, Some(Boxed::All));
                let e = parse_latex(&norm).map(|e| if *pct { percent(e) } else { e });
                exprs.push(e);
                texts.push(norm);
            }
            if exprs.len() > 1 && exprs.iter().all(Option::is_some) {
                let mut all = Vec::new();
                for e in exprs.into_iter().flatten() {
                    match e {
                        Expr::Set(v) => all.extend(v),
                        e => all.push(e),
                    }
                }
                return (Some(Expr::Set(all)), texts.join(" and "));
            }
            (
                exprs.into_iter().next().flatten(),
                texts.into_iter().next().unwrap_or_default(),
            )
        }
        SpanKind::Number { text, percent: pct } => {
            let e = parser::parse(text).map(|e| if *pct { percent(e) } else { e });
            (e, text.clone())
        }
        SpanKind::Arith(text) => (parser::parse(&text.replace('\n', " ")), text.clone()),
    }
}

/// Extracts and parses the answer of `text` (see [`extract`] for the priorities).
pub fn parse(text: &str) -> Parsed {
    let mut fallback: Option<String> = None;
    let try_group = |mut spans: Vec<Span>, fallback: &mut Option<String>| -> Option<Expr> {
        spans.sort_by(|a, b| b.end.cmp(&a.end).then(a.start.cmp(&b.start)));
        for sp in &spans {
            let (e, s) = parse_span(sp);
            if fallback.is_none() && !s.is_empty() {
                *fallback = Some(s);
            }
            if e.is_some() {
                return e;
            }
        }
        None
    };
    let done = |e: Expr, fallback: Option<String>| Parsed {
        expr: Some(e),
        fallback,
    };

    if let Some(first) = text
        .find("\\boxed")
        .into_iter()
        .chain(text.find("\\fbox"))
        .min()
    {
        if let Some(content) = normalize::boxed_content(&text[first..], Boxed::Last) {
            let span = Span {
                start: first,
                end: text.len(),
                kind: SpanKind::Boxed(content),
            };
            if let Some(e) = try_group(vec![span], &mut fallback) {
                return done(e, fallback);
            }
        }
    }
    if let Some(tag) = extract::answer_tag(text) {
        let inner = parse(tag);
        if inner.expr.is_some() {
            return inner;
        }
    }
    let latex = extract::latex_spans(text);
    let plain = extract::plain_spans(text);
    let groups = [
        extract::final_answer_spans(text, &latex),
        extract::answer_word_spans(text, &latex, &plain),
        latex.iter().chain(plain.iter()).cloned().collect(),
    ];
    for g in groups {
        if let Some(e) = try_group(g, &mut fallback) {
            return done(e, fallback);
        }
    }
    Parsed {
        expr: None,
        fallback,
    }
}

/// Whether `pred` states the answer `gold` (both as [`parse`] returns them): any parsed pair
/// equivalent ([`equiv::expr_eq`]), or, where a side did not parse, equal fallback strings.
pub fn verify(gold: &Parsed, pred: &Parsed) -> bool {
    if let (Some(g), Some(p)) = (&gold.expr, &pred.expr) {
        if equiv::expr_eq(g, p) {
            return true;
        }
    }
    match (&gold.fallback, &pred.fallback) {
        (Some(g), Some(p)) => {
            let (g, p) = (g.trim(), p.trim());
            !g.is_empty() && g == p
        }
        _ => false,
    }
}

/// Parses the gold answer and the completion and compares them.
pub fn check(gold: &str, completion: &str) -> bool {
    verify(&parse(gold), &parse(completion))
}
