//! A recursive-descent parser for answers written in LaTeX or plain notation (`\frac{1}{2}`,
//! `1/2`, `2**3`, `\sqrt[3]{x}`, `\{1, 2\}`, `[0, 1)`, `x \le 3`, `\begin{pmatrix}..`).
//!
//! Grammar (loosest first): list `a, b; c` -> union `A \cup B` -> relation chain `a < b = c`
//! -> sum `+ - \pm` -> product `* \cdot \times / \div` and juxtaposition (`2x`, `3\sqrt{2}`)
//! -> unary minus -> postfix (`^`, `_`, `!`, `\%`, `'`) -> atom. Letters are one-letter
//! symbols (`xy` is `x*y`, as in sympy's LaTeX parser); `e` is Euler's number.
//! Nesting depth and input length are bounded, so parsing is linear and cannot overflow the stack.

use crate::expr::{Expr, Func, RelOp};
use crate::rational::Rational;

/// The plain-syntax power `**`, whose exponent is a whole number (`2**10`), unlike LaTeX's
/// `2^10` (which is `2^1 0`).
const POW2: char = '\u{1}';

/// Longest input (bytes) the parser accepts; longer answers are compared as strings.
pub const MAX_INPUT: usize = 4096;
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Num(String),
    Letter(char),
    Cmd(String),
    Text(String),
    P(char),
}

fn lex(s: &str) -> Option<Vec<Tok>> {
    let b: Vec<char> = s.chars().collect();
    let mut i = 0;
    let mut out = Vec::new();
    while i < b.len() {
        let c = b[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit()
            || (c == '.' && b.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            let st = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            if i < b.len() && b[i] == '.' && b.get(i + 1) != Some(&'.') {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    i += 1;
                }
            }
            out.push(Tok::Num(b[st..i].iter().collect()));
        } else if c.is_ascii_alphabetic() {
            out.push(Tok::Letter(c));
            i += 1;
        } else if c == '\\' {
            i += 1;
            let st = i;
            while i < b.len() && b[i].is_ascii_alphabetic() {
                i += 1;
            }
            if i == st {
                // A control symbol: `\{`, `\}`, `\%`, `\|`, `\\`, spacing `\,`.
                let Some(&d) = b.get(i) else { break };
                i += 1;
                match d {
                    '{' => out.push(Tok::Cmd("lbrace".into())),
                    '}' => out.push(Tok::Cmd("rbrace".into())),
                    '%' => out.push(Tok::P('%')),
                    '|' => out.push(Tok::P('|')),
                    '\\' => out.push(Tok::P('\n')),
                    // A thin space inside a number (`2\,024`) is not a thousands separator to
                    // sympy's grammar; the answer does not parse (compared as a string).
                    ',' | ';' | ':'
                        if matches!(out.last(), Some(Tok::Num(_)))
                            && b.get(i).is_some_and(|c| c.is_ascii_digit()) =>
                    {
                        return None
                    }
                    _ => {}
                }
                continue;
            }
            let name: String = b[st..i].iter().collect();
            match name.as_str() {
                "text" | "mbox" | "textrm" | "textbf" | "textit" | "mathrm" | "mathit"
                | "mathbf" | "operatorname" | "mathbb" | "mathcal" | "boldsymbol" | "mathsf" => {
                    while i < b.len() && b[i] == ' ' {
                        i += 1;
                    }
                    if b.get(i) != Some(&'{') {
                        if name == "mathbb" {
                            if let Some(&l) = b.get(i) {
                                out.push(Tok::Cmd(format!("mathbb{l}")));
                                i += 1;
                            }
                        }
                        continue;
                    }
                    let close = matching(&b, i)?;
                    let inner: String = b[i + 1..close].iter().collect();
                    i = close + 1;
                    match name.as_str() {
                        "operatorname" => out.push(Tok::Cmd(inner.trim().to_string())),
                        "mathbb" => out.push(Tok::Cmd(format!("mathbb{}", inner.trim()))),
                        "text" | "mbox" | "textrm" | "textbf" | "textit" => {
                            out.push(Tok::Text(inner.trim().to_string()))
                        }
                        // Font commands keep their content as math.
                        _ => out.extend(lex(&inner)?),
                    }
                }
                "left" | "right" | "bigl" | "bigr" | "Bigl" | "Bigr" | "big" | "Big"
                | "displaystyle" | "quad" | "qquad" | "limits" | "middle" => {}
                _ => out.push(Tok::Cmd(name)),
            }
        } else {
            i += 1;
            match c {
                '*' if b.get(i) == Some(&'*') => {
                    i += 1;
                    out.push(Tok::P(POW2));
                }
                '×' | '·' | '⋅' => out.push(Tok::P('*')),
                '÷' => out.push(Tok::P('/')),
                '−' | '–' => out.push(Tok::P('-')),
                'π' => out.push(Tok::Cmd("pi".into())),
                '∞' => out.push(Tok::Cmd("infty".into())),
                '√' => out.push(Tok::Cmd("sqrt".into())),
                '≤' => out.push(Tok::Cmd("le".into())),
                '≥' => out.push(Tok::Cmd("ge".into())),
                '≠' => out.push(Tok::Cmd("ne".into())),
                '±' => out.push(Tok::Cmd("pm".into())),
                '∪' => out.push(Tok::Cmd("cup".into())),
                '°' => out.push(Tok::Cmd("circ".into())),
                '$' => {}
                c if c.is_alphabetic() => out.push(Tok::Letter(c)),
                c => out.push(Tok::P(c)),
            }
        }
    }
    Some(out)
}

fn matching(b: &[char], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut i = open;
    while i < b.len() {
        match b[i] {
            '\\' => i += 1,
            '{' => depth += 1,
            '}' => {
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

/// Parses a whole answer; `None` where any part of it is not understood.
pub fn parse(s: &str) -> Option<Expr> {
    if s.len() > MAX_INPUT {
        return None;
    }
    let toks = lex(s)?;
    if toks.is_empty() {
        return None;
    }
    let mut p = Parser {
        t: toks,
        i: 0,
        depth: 0,
        abs: 0,
    };
    let items = p.list(&[])?;
    if p.i != p.t.len() {
        return None;
    }
    Some(match items.len() {
        1 => items.into_iter().next()?,
        _ => Expr::Set(items),
    })
}

struct Parser {
    t: Vec<Tok>,
    i: usize,
    depth: usize,
    abs: usize,
}

fn cmd_func(name: &str) -> Option<Func> {
    Some(match name {
        "sin" => Func::Sin,
        "cos" => Func::Cos,
        "tan" => Func::Tan,
        "cot" => Func::Cot,
        "sec" => Func::Sec,
        "csc" => Func::Csc,
        "arcsin" => Func::Asin,
        "arccos" => Func::Acos,
        "arctan" => Func::Atan,
        "sinh" => Func::Sinh,
        "cosh" => Func::Cosh,
        "tanh" => Func::Tanh,
        "ln" => Func::Ln,
        "log" => Func::Log10,
        "exp" => Func::Exp,
        "max" => Func::Max,
        "min" => Func::Min,
        "gcd" => Func::Gcd,
        "lcm" => Func::Lcm,
        _ => return None,
    })
}

fn rel_op(t: &Tok) -> Option<RelOp> {
    Some(match t {
        Tok::P('=') => RelOp::Eq,
        Tok::P('<') => RelOp::Lt,
        Tok::P('>') => RelOp::Gt,
        Tok::Cmd(c) => match c.as_str() {
            "le" | "leq" | "leqslant" => RelOp::Le,
            "ge" | "geq" | "geqslant" => RelOp::Ge,
            "lt" => RelOp::Lt,
            "gt" => RelOp::Gt,
            "ne" | "neq" => RelOp::Ne,
            // A congruence `n \equiv 17 \pmod{20}` states the residue.
            "equiv" => RelOp::Eq,
            _ => return None,
        },
        _ => return None,
    })
}

/// Whether `e` is built of symbols only (`x`, `ab`, `x_1`): the left side of an assignment.
pub fn only_symbols(e: &Expr) -> bool {
    match e {
        Expr::Sym(_) => true,
        Expr::Mul(v) => v.iter().all(only_symbols),
        _ => false,
    }
}

impl Parser {
    fn peek(&self) -> Option<&Tok> {
        self.t.get(self.i)
    }

    fn eat(&mut self, t: &Tok) -> bool {
        if self.peek() == Some(t) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn eat_cmd(&mut self, name: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Cmd(c)) if c == name) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    fn enter(&mut self) -> Option<()> {
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    /// `item (, item)*` up to (not including) one of `stops`, or the end.
    fn list(&mut self, stops: &[Tok]) -> Option<Vec<Expr>> {
        let mut items = Vec::new();
        loop {
            if self.peek().is_none_or(|t| stops.contains(t)) {
                break;
            }
            items.extend(self.element()?);
            if !(self.eat(&Tok::P(',')) || self.eat(&Tok::P(';'))) {
                break;
            }
        }
        Some(items)
    }

    /// One list item; `a \pm b` yields two.
    fn element(&mut self) -> Option<Vec<Expr>> {
        let e = self.union()?;
        Some(match e {
            // `x = \pm 2`: the side is the set of both values.
            Expr::Rel(sides, ops) => {
                let sides = sides
                    .into_iter()
                    .map(|side| {
                        let mut v = expand_pm(side);
                        if v.len() == 1 {
                            v.pop().unwrap_or(Expr::Empty)
                        } else {
                            Expr::Set(v)
                        }
                    })
                    .collect();
                vec![Expr::Rel(sides, ops)]
            }
            e => expand_pm(e),
        })
    }

    fn union(&mut self) -> Option<Expr> {
        let first = self.relation()?;
        if !matches!(self.peek(), Some(Tok::Cmd(c)) if c == "cup") {
            return Some(first);
        }
        let mut parts = vec![first];
        while self.eat_cmd("cup") {
            parts.push(self.relation()?);
        }
        Some(Expr::Union(parts))
    }

    fn relation(&mut self) -> Option<Expr> {
        let mut sides = vec![self.sum()?];
        let mut ops = Vec::new();
        loop {
            if self.eat_cmd("approx") {
                let rhs = self.sum()?;
                // An approximation keeps the exact side: `x \approx 1.4` is 1.4, `\sqrt2 \approx 1.4` is `\sqrt2`.
                if sides.len() == 1 && only_symbols(&sides[0]) {
                    sides[0] = rhs;
                }
                continue;
            }
            if self.eat_cmd("in") {
                let rhs = self.union()?;
                if sides.len() == 1 && only_symbols(&sides[0]) {
                    return Some(rhs);
                }
                return None;
            }
            let Some(op) = self.peek().and_then(rel_op) else {
                break;
            };
            self.i += 1;
            // `<=` and `>=` written with two characters.
            let op = match (op, self.peek()) {
                (RelOp::Lt, Some(Tok::P('='))) => {
                    self.i += 1;
                    RelOp::Le
                }
                (RelOp::Gt, Some(Tok::P('='))) => {
                    self.i += 1;
                    RelOp::Ge
                }
                _ => op,
            };
            ops.push(op);
            sides.push(self.sum()?);
        }
        if ops.is_empty() {
            sides.pop()
        } else {
            Some(Expr::Rel(sides, ops))
        }
    }

    fn sum(&mut self) -> Option<Expr> {
        self.enter()?;
        let mut terms = vec![self.term()?];
        loop {
            match self.peek() {
                Some(Tok::P('+')) => {
                    self.i += 1;
                    terms.push(self.term()?);
                }
                Some(Tok::P('-')) => {
                    self.i += 1;
                    terms.push(Expr::negate(self.term()?));
                }
                Some(Tok::Cmd(c)) if c == "pm" || c == "mp" => {
                    self.i += 1;
                    terms.push(pm_marker(self.term()?));
                }
                _ => break,
            }
        }
        self.depth -= 1;
        Some(if terms.len() == 1 {
            terms.pop()?
        } else {
            Expr::Add(terms)
        })
    }

    fn starts_atom(&self) -> bool {
        match self.peek() {
            Some(Tok::Num(_)) | Some(Tok::Letter(_)) | Some(Tok::Text(_)) => true,
            Some(Tok::P('(')) | Some(Tok::P('{')) => true,
            Some(Tok::P('[')) => false,
            Some(Tok::P('|')) => self.abs == 0,
            Some(Tok::Cmd(c)) => !matches!(
                c.as_str(),
                "cdot"
                    | "times"
                    | "div"
                    | "pm"
                    | "mp"
                    | "cup"
                    | "cap"
                    | "le"
                    | "leq"
                    | "ge"
                    | "geq"
                    | "ne"
                    | "neq"
                    | "lt"
                    | "gt"
                    | "approx"
                    | "in"
                    | "equiv"
                    | "leqslant"
                    | "geqslant"
                    | "rbrace"
                    | "rfloor"
                    | "rceil"
                    | "end"
                    | "right"
                    | "setminus"
                    | "to"
                    | "rightarrow"
                    | "implies"
                    | "quad"
            ),
            _ => false,
        }
    }

    fn term(&mut self) -> Option<Expr> {
        let mut acc = self.unary()?;
        loop {
            match self.peek() {
                Some(Tok::P('*')) => {
                    self.i += 1;
                    acc = mul(acc, self.unary()?);
                }
                Some(Tok::Cmd(c)) if c == "cdot" || c == "times" => {
                    self.i += 1;
                    acc = mul(acc, self.unary()?);
                }
                Some(Tok::P('/')) | Some(Tok::P(':')) => {
                    self.i += 1;
                    acc = div(acc, self.unary()?);
                }
                Some(Tok::Cmd(c)) if c == "div" => {
                    self.i += 1;
                    acc = div(acc, self.unary()?);
                }
                // A mixed number: `1\frac{1}{2}` is 3/2.
                Some(Tok::Cmd(c))
                    if c == "frac"
                        && matches!(acc, Expr::Num(r) if r.is_integer() && r.num >= 0) =>
                {
                    let f = self.postfix()?;
                    acc = match f {
                        Expr::Num(_) => Expr::Add(vec![acc, f]),
                        other => mul(acc, other),
                    };
                }
                // The modulus of a congruence is not part of the value.
                Some(Tok::Cmd(c)) if c == "pmod" || c == "bmod" || c == "mod" => {
                    self.i += 1;
                    self.group()?;
                }
                _ if self.starts_atom() => acc = mul(acc, self.postfix()?),
                _ => break,
            }
        }
        Some(acc)
    }

    fn unary(&mut self) -> Option<Expr> {
        if self.eat(&Tok::P('-')) {
            self.enter()?;
            let e = Expr::negate(self.unary()?);
            self.depth -= 1;
            return Some(e);
        }
        if self.eat(&Tok::P('+')) {
            return self.unary();
        }
        if self.eat_cmd("pm") || self.eat_cmd("mp") {
            let x = self.unary()?;
            return Some(Expr::Add(vec![pm_marker(x)]));
        }
        self.postfix()
    }

    fn postfix(&mut self) -> Option<Expr> {
        let mut base = self.atom()?;
        loop {
            match self.peek() {
                Some(Tok::P(POW2)) => {
                    self.i += 1;
                    let exp = self.unary()?;
                    base = Expr::Pow(Box::new(base), Box::new(exp));
                }
                Some(Tok::P('^')) => {
                    self.i += 1;
                    if self.eat_cmd("circ") {
                        continue; // degrees: the number itself
                    }
                    if self.peek() == Some(&Tok::P('{'))
                        && self.t.get(self.i + 1) == Some(&Tok::Cmd("circ".into()))
                        && self.t.get(self.i + 2) == Some(&Tok::P('}'))
                    {
                        self.i += 3;
                        continue;
                    }
                    let exp = self.exponent()?;
                    base = Expr::Pow(Box::new(base), Box::new(exp));
                }
                Some(Tok::P('_')) => {
                    self.i += 1;
                    let sub = self.script_text()?;
                    base = match base {
                        Expr::Sym(s) => Expr::Sym(format!("{s}_{sub}")),
                        _ => return None,
                    };
                }
                Some(Tok::P('!')) => {
                    self.i += 1;
                    base = Expr::Call(Func::Factorial, vec![base]);
                }
                Some(Tok::P('%')) => {
                    self.i += 1;
                    base = Expr::Percent(Box::new(base));
                }
                Some(Tok::P('\'')) => {
                    self.i += 1;
                    base = match base {
                        Expr::Sym(s) => Expr::Sym(format!("{s}'")),
                        _ => return None,
                    };
                }
                Some(Tok::Cmd(c)) if c == "circ" => {
                    self.i += 1;
                }
                _ => break,
            }
        }
        Some(base)
    }

    /// The argument of `^`: a group, or one token with an optional sign.
    fn exponent(&mut self) -> Option<Expr> {
        if self.eat(&Tok::P('-')) {
            return Some(Expr::negate(self.exponent()?));
        }
        match self.peek()? {
            Tok::Num(n) => {
                // `x^23` in LaTeX is `x^2 3`; only the first digit is the exponent.
                let n = n.clone();
                self.i += 1;
                if n.len() > 1 && !n.contains('.') {
                    let (first, rest) = n.split_at(1);
                    self.t.insert(self.i, Tok::Num(rest.to_string()));
                    return number(first);
                }
                number(&n)
            }
            Tok::Letter(c) => {
                let c = *c;
                self.i += 1;
                Some(letter(c))
            }
            _ => self.atom(),
        }
    }

    /// Subscript text: `x_1`, `x_{12}`, `a_n`.
    fn script_text(&mut self) -> Option<String> {
        let t = self.t.get(self.i)?.clone();
        self.i += 1;
        Some(match t {
            Tok::Num(n) => n,
            Tok::Letter(c) => c.to_string(),
            Tok::Cmd(c) => c,
            Tok::P('{') => {
                let mut s = String::new();
                let mut depth = 1;
                loop {
                    let t = self.t.get(self.i)?.clone();
                    self.i += 1;
                    match t {
                        Tok::P('{') => depth += 1,
                        Tok::P('}') => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    match t {
                        Tok::Num(n) => s.push_str(&n),
                        Tok::Letter(c) | Tok::P(c) => s.push(c),
                        Tok::Cmd(c) | Tok::Text(c) => s.push_str(&c),
                    }
                }
                s
            }
            _ => return None,
        })
    }

    /// A `{...}` group as one expression.
    fn group(&mut self) -> Option<Expr> {
        if !self.eat(&Tok::P('{')) {
            // A bare one-token argument (`\frac12` reaches here only as `\frac{1}{2}`).
            return match self.peek()?.clone() {
                Tok::Num(n) => {
                    // `\frac12` is `\frac{1}{2}`: a bare argument is one digit.
                    self.i += 1;
                    if n.len() > 1 && !n.contains('.') {
                        let (first, rest) = n.split_at(1);
                        self.t.insert(self.i, Tok::Num(rest.to_string()));
                        return number(first);
                    }
                    number(&n)
                }
                Tok::Letter(c) => {
                    self.i += 1;
                    Some(letter(c))
                }
                _ => self.atom(),
            };
        }
        self.enter()?;
        let items = self.list(&[Tok::P('}')])?;
        self.depth -= 1;
        if !self.eat(&Tok::P('}')) {
            return None;
        }
        match items.len() {
            0 => None,
            1 => items.into_iter().next(),
            _ => Some(Expr::Set(items)),
        }
    }

    fn atom(&mut self) -> Option<Expr> {
        self.enter()?;
        let r = self.atom_inner();
        self.depth -= 1;
        r
    }

    fn atom_inner(&mut self) -> Option<Expr> {
        let t = self.peek()?.clone();
        self.i += 1;
        match t {
            Tok::Num(n) => number(&n),
            Tok::Letter(c) => Some(letter(c)),
            Tok::Text(s) => text(&s),
            Tok::P('{') => {
                self.i -= 1;
                self.group()
            }
            Tok::P('(') | Tok::P('[') => self.bracket(t == Tok::P('(')),
            Tok::P('|') => {
                self.abs += 1;
                let inner = self.sum();
                self.abs -= 1;
                let inner = inner?;
                self.eat(&Tok::P('|'))
                    .then(|| Expr::Call(Func::Abs, vec![inner]))
            }
            Tok::Cmd(c) => self.command(&c),
            _ => None,
        }
    }

    /// `( ... )` or `[ ... ]`: a parenthesised expression, an interval, or a tuple.
    fn bracket(&mut self, paren: bool) -> Option<Expr> {
        let items = self.list(&[Tok::P(')'), Tok::P(']')])?;
        let right_open = if self.eat(&Tok::P(')')) {
            true
        } else if self.eat(&Tok::P(']')) {
            false
        } else {
            return None;
        };
        let left_open = paren;
        match items.len() {
            0 => None,
            1 if left_open == right_open => items.into_iter().next(),
            1 => None,
            2 => {
                let mut it = items.into_iter();
                let (lo, hi) = (it.next()?, it.next()?);
                // An empty interval is meant as a pair: (2, 1) is a tuple.
                let reversed = match (lo.eval(&|_| None), hi.eval(&|_| None)) {
                    (Some(a), Some(b)) => {
                        (left_open && right_open && b <= a) || (!left_open && !right_open && b < a)
                    }
                    _ => false,
                };
                if reversed {
                    return Some(Expr::Tuple(vec![lo, hi]));
                }
                Some(Expr::Interval {
                    lo: Box::new(lo),
                    hi: Box::new(hi),
                    left_open,
                    right_open,
                })
            }
            _ => Some(Expr::Tuple(items)),
        }
    }

    fn command(&mut self, c: &str) -> Option<Expr> {
        match c {
            "pi" => Some(Expr::Pi),
            "infty" | "infin" => Some(Expr::Inf),
            "frac" | "dfrac" | "tfrac" | "cfrac" => {
                let num = self.group()?;
                let den = self.group()?;
                Some(div(num, den))
            }
            "sqrt" => {
                if self.eat(&Tok::P('[')) {
                    let n = self.sum()?;
                    if !self.eat(&Tok::P(']')) {
                        return None;
                    }
                    let x = self.group()?;
                    return Some(Expr::Call(Func::Root, vec![n, x]));
                }
                let x = self.group()?;
                Some(Expr::Call(Func::Sqrt, vec![x]))
            }
            "binom" | "dbinom" | "tbinom" => {
                let n = self.group()?;
                let k = self.group()?;
                Some(Expr::Call(Func::Binom, vec![n, k]))
            }
            "lbrace" => {
                let items = self.list(&[Tok::Cmd("rbrace".into())])?;
                self.eat_cmd("rbrace").then_some(if items.is_empty() {
                    Expr::Empty
                } else {
                    Expr::Set(items)
                })
            }
            "emptyset" => Some(Expr::Empty),
            "mathbbR" | "R" | "Reals" => Some(Expr::Reals),
            "lfloor" | "lceil" => {
                let inner = self.sum()?;
                let close = if c == "lfloor" { "rfloor" } else { "rceil" };
                self.eat_cmd(close).then(|| {
                    Expr::Call(
                        if c == "lfloor" {
                            Func::Floor
                        } else {
                            Func::Ceil
                        },
                        vec![inner],
                    )
                })
            }
            "lvert" | "vert" => {
                let inner = self.sum()?;
                (self.eat_cmd("rvert") || self.eat_cmd("vert"))
                    .then(|| Expr::Call(Func::Abs, vec![inner]))
            }
            "langle" => {
                let items = self.list(&[Tok::Cmd("rangle".into())])?;
                self.eat_cmd("rangle").then_some(Expr::Tuple(items))
            }
            "begin" => self.matrix(),
            "log" if self.peek() == Some(&Tok::P('_')) => {
                self.i += 1;
                // `\log_e` reads `e` as a letter, as sympy's LaTeX parser does.
                let base = match self.group()? {
                    Expr::E => Expr::Sym("e".into()),
                    b => b,
                };
                let x = self.func_arg()?;
                Some(Expr::Call(Func::LogBase, vec![base, x]))
            }
            _ => {
                if let Some(f) = cmd_func(c) {
                    // `\sin^2 x` is `(\sin x)^2`.
                    let power = if self.eat(&Tok::P('^')) {
                        Some(self.exponent()?)
                    } else {
                        None
                    };
                    let args = if matches!(f, Func::Max | Func::Min | Func::Gcd | Func::Lcm) {
                        if !self.eat(&Tok::P('(')) {
                            return None;
                        }
                        let a = self.list(&[Tok::P(')')])?;
                        if !self.eat(&Tok::P(')')) {
                            return None;
                        }
                        a
                    } else {
                        vec![self.func_arg()?]
                    };
                    let call = Expr::Call(f, args);
                    return Some(match power {
                        Some(p) => Expr::Pow(Box::new(call), Box::new(p)),
                        None => call,
                    });
                }
                // Greek letters and other named symbols.
                if c.chars().all(|ch| ch.is_ascii_alphabetic()) && !NOT_SYMBOLS.contains(&c) {
                    return Some(Expr::Sym(c.to_lowercase()));
                }
                None
            }
        }
    }

    /// The argument of `\sin`, `\ln`...: a parenthesised or braced group, else a power term.
    /// `\cos 2x` is `\cos(2x)`: a bare argument takes the letters and digits after it.
    fn func_arg(&mut self) -> Option<Expr> {
        if matches!(self.peek()?, Tok::P('(') | Tok::P('{')) {
            return self.postfix();
        }
        let mut arg = self.postfix()?;
        while matches!(self.peek(), Some(Tok::Letter(_)) | Some(Tok::Num(_))) {
            arg = mul(arg, self.postfix()?);
        }
        Some(arg)
    }

    /// `\begin{pmatrix} a & b \\ c & d \end{pmatrix}` (any `*matrix` or `array` environment).
    fn matrix(&mut self) -> Option<Expr> {
        let env = self.script_text_braced()?;
        if !(env.ends_with("matrix") || env == "array") {
            return None;
        }
        if env == "array" && self.peek() == Some(&Tok::P('{')) {
            self.script_text_braced()?; // column spec
        }
        let mut rows = Vec::new();
        let mut row = Vec::new();
        loop {
            if self.eat_cmd("end") {
                self.script_text_braced()?;
                break;
            }
            let stops = [Tok::P('&'), Tok::P('\n'), Tok::Cmd("end".into())];
            let e = self.union()?;
            row.push(e);
            if self.eat(&Tok::P('&')) {
                continue;
            }
            if self.eat(&Tok::P('\n')) {
                rows.push(std::mem::take(&mut row));
                if self.peek() == Some(&stops[2]) {
                    continue;
                }
                continue;
            }
            if self.peek() != Some(&stops[2]) {
                return None;
            }
        }
        if !row.is_empty() {
            rows.push(row);
        }
        let width = rows.first()?.len();
        rows.iter()
            .all(|r| r.len() == width)
            .then_some(Expr::Matrix(rows))
    }

    fn script_text_braced(&mut self) -> Option<String> {
        if self.peek() != Some(&Tok::P('{')) {
            return None;
        }
        self.script_text()
    }
}

const NOT_SYMBOLS: &[&str] = &[
    "end", "right", "left", "rbrace", "rangle", "rfloor", "rceil", "hline",
];

/// Symbols are lower-cased (as latex2sympy does by default), and `e` is Euler's number.
fn letter(c: char) -> Expr {
    let c = c.to_lowercase().next().unwrap_or(c);
    if c == 'e' {
        Expr::E
    } else {
        Expr::Sym(c.to_string())
    }
}

fn number(n: &str) -> Option<Expr> {
    if n.contains('.') {
        let v: f64 = n.parse().ok()?;
        return Some(Expr::Float(v));
    }
    match Rational::parse_decimal(n) {
        Some(r) => Some(Expr::Num(r)),
        None => Some(Expr::Float(n.parse().ok()?)),
    }
}

/// `\text{...}`: a number or expression inside is parsed; words become one symbol.
fn text(s: &str) -> Option<Expr> {
    let mut s = s.trim();
    while let Some(inner) = s.strip_prefix('(').and_then(|t| t.strip_suffix(')')) {
        s = inner.trim();
    }
    if s.is_empty() {
        return None;
    }
    if s.chars().any(|c| c.is_ascii_digit()) {
        if let Some(e) = parse(s) {
            return Some(e);
        }
    }
    Some(Expr::Sym(s.to_lowercase()))
}

fn mul(a: Expr, b: Expr) -> Expr {
    match a {
        Expr::Mul(mut v) => {
            v.push(b);
            Expr::Mul(v)
        }
        a => Expr::Mul(vec![a, b]),
    }
}

/// `a / b`; two integer literals make one rational literal (sympy's `Rational`).
fn div(a: Expr, b: Expr) -> Expr {
    if let (Some(x), Some(y)) = (int_lit(&a), int_lit(&b)) {
        if let Some(r) = Rational::new(x, y) {
            return Expr::Num(r);
        }
    }
    Expr::Div(Box::new(a), Box::new(b))
}

fn int_lit(e: &Expr) -> Option<i128> {
    match e {
        Expr::Num(r) if r.is_integer() => Some(r.num),
        Expr::Neg(inner) => int_lit(inner)?.checked_neg(),
        _ => None,
    }
}

fn pm_marker(x: Expr) -> Expr {
    Expr::Call(Func::Max, vec![Expr::Sym("\u{0}pm".into()), x])
}

/// Expands the `\pm` markers the sum parser leaves: `a \pm b` is `[a + b, a - b]`.
fn expand_pm(e: Expr) -> Vec<Expr> {
    fn is_marker(e: &Expr) -> Option<&Expr> {
        match e {
            Expr::Call(Func::Max, v) if v.len() == 2 && v[0] == Expr::Sym("\u{0}pm".into()) => {
                Some(&v[1])
            }
            _ => None,
        }
    }
    match &e {
        Expr::Add(terms) if terms.iter().any(|t| is_marker(t).is_some()) => {
            let plus: Vec<Expr> = terms
                .iter()
                .map(|t| is_marker(t).cloned().unwrap_or_else(|| t.clone()))
                .collect();
            let minus: Vec<Expr> = terms
                .iter()
                .map(|t| is_marker(t).map_or_else(|| t.clone(), |x| Expr::negate(x.clone())))
                .collect();
            let simplify = |mut v: Vec<Expr>| {
                if v.len() == 1 {
                    v.pop().unwrap_or(Expr::Empty)
                } else {
                    Expr::Add(v)
                }
            };
            vec![simplify(plus), simplify(minus)]
        }
        _ => vec![e],
    }
}
