//! Equivalence of two parsed answers, in math-verify's order (`sympy_expr_eq`): assignments
//! and equations unwrapped against plain values, relations against sets, structural equality,
//! relations, sets/tuples/intervals, symbols and words, then numbers and expressions.
//!
//! Numbers: where either side is a decimal literal both are rounded to [`FLOAT_ROUNDING`]
//! places (`1/3` equals `0.333333`, not `0.33`); integers and rationals compare exactly;
//! `9\%` equals `9` and `0.09`. Constant expressions (`\frac{\sqrt2}{2}`, `\sin(\pi/6)`)
//! compare numerically to [`REL_TOL`]; expressions with variables compare at
//! [`NUM_POINTS`] sampled points (sympy's `simplify(a - b) == 0`).

use crate::expr::{Expr, RelOp};

/// Decimal places decimals are rounded to (math-verify's `float_rounding`).
pub const FLOAT_ROUNDING: i32 = 6;
/// Relative tolerance of numeric comparisons of exact expressions.
pub const REL_TOL: f64 = 1e-9;
/// Points at which expressions with variables are compared.
pub const NUM_POINTS: usize = 6;
/// Largest set or tuple compared element by element.
pub const MAX_ELEMENTS: usize = 256;

/// Whether `e` is built of symbols only (`x`, `ab`, `a+b`, `x_1`): an assignment's left side.
pub fn only_symbols(e: &Expr) -> bool {
    match e {
        Expr::Sym(_) => true,
        Expr::Mul(v) | Expr::Add(v) => v.iter().all(only_symbols),
        Expr::Div(a, b) => only_symbols(a) && only_symbols(b),
        // `f^{-1}(x)`: an inverse function's name.
        Expr::Pow(a, b) => {
            only_symbols(a)
                && (matches!(**b, Expr::Neg(_)) || matches!(**b, Expr::Num(r) if r.num < 0))
        }
        // `(a, b) = (1, 2)`: a pair of unknowns (which the parser may read as an interval).
        Expr::Tuple(v) | Expr::Set(v) => v.iter().all(only_symbols),
        Expr::Interval { lo, hi, .. } => only_symbols(lo) && only_symbols(hi),
        _ => false,
    }
}

fn is_equation(e: &Expr) -> bool {
    matches!(e, Expr::Rel(_, ops) if ops.iter().all(|o| *o == RelOp::Eq))
}

fn is_assignment(e: &Expr) -> bool {
    is_equation(e) && matches!(e, Expr::Rel(sides, _) if only_symbols(&sides[0]))
}

fn last_rhs(e: &Expr) -> Expr {
    match e {
        Expr::Rel(sides, _) => sides.last().cloned().unwrap_or(Expr::Empty),
        other => other.clone(),
    }
}

/// `a = b = c` as `a = c`.
fn truncate_chain(e: &Expr) -> Expr {
    match e {
        Expr::Rel(sides, _) if sides.len() > 2 => Expr::Rel(
            vec![sides[0].clone(), sides[sides.len() - 1].clone()],
            vec![RelOp::Eq],
        ),
        other => other.clone(),
    }
}

/// A one-variable relation (`x > 3`, `1 < x \le 2`) as the interval it describes.
fn relation_as_set(e: &Expr) -> Option<Expr> {
    let Expr::Rel(sides, ops) = e else {
        return None;
    };
    let var = sides.iter().position(|s| matches!(s, Expr::Sym(_)))?;
    if sides
        .iter()
        .enumerate()
        .any(|(i, s)| i != var && !s.symbols().is_empty())
    {
        return None;
    }
    let (mut lo, mut hi) = (Expr::negate(Expr::Inf), Expr::Inf);
    let (mut lo_open, mut hi_open) = (true, true);
    for (k, op) in ops.iter().enumerate() {
        // Read each relation as `left op right` with the variable on one side.
        let (other, op) = if k + 1 == var {
            (&sides[k], op.flipped())
        } else if k == var {
            (&sides[k + 1], *op)
        } else {
            return None;
        };
        // Now: var op other.
        match op {
            RelOp::Lt | RelOp::Le => {
                hi = other.clone();
                hi_open = op == RelOp::Lt;
            }
            RelOp::Gt | RelOp::Ge => {
                lo = other.clone();
                lo_open = op == RelOp::Gt;
            }
            RelOp::Eq => return Some(Expr::Set(vec![other.clone()])),
            RelOp::Ne => return None,
        }
    }
    Some(Expr::Interval {
        lo: Box::new(lo),
        hi: Box::new(hi),
        left_open: lo_open,
        right_open: hi_open,
    })
}

/// Whether `pred` is equivalent to `gold` (the comparison is not symmetric: assignments and
/// relation-versus-set follow the gold side, as in math-verify).
pub fn expr_eq(gold: &Expr, pred: &Expr) -> bool {
    let (ga, pa) = (is_assignment(gold), is_assignment(pred));
    let (ge, pe) = (is_equation(gold), is_equation(pred));
    let mut g = if ga {
        truncate_chain(gold)
    } else {
        gold.clone()
    };
    let mut p = if pa {
        truncate_chain(pred)
    } else {
        pred.clone()
    };
    if pe && !ge {
        p = last_rhs(&p);
    } else if ga && !pe {
        g = last_rhs(&g);
    }
    if g.is_relation() && p.is_set_like() {
        if let Some(s) = relation_as_set(&g) {
            g = s;
        }
    }
    if g == p {
        return true;
    }
    if g.is_relation() && p.is_relation() {
        return relation_eq(&g, &p);
    }
    if g.is_set_like() || p.is_set_like() {
        return sets_eq(&g, &p);
    }
    if matches!(g, Expr::Sym(_)) || matches!(p, Expr::Sym(_)) {
        return symbols_eq(&g, &p);
    }
    if let (Expr::Matrix(a), Expr::Matrix(b)) = (&g, &p) {
        return a.len() == b.len()
            && a.iter().zip(b).all(|(ra, rb)| {
                ra.len() == rb.len() && ra.iter().zip(rb).all(|(x, y)| expr_eq(x, y))
            });
    }
    if matches!(g, Expr::Matrix(_))
        || matches!(p, Expr::Matrix(_))
        || g.is_relation()
        || p.is_relation()
    {
        return false;
    }
    numeric_eq(&g, &p) || symbolic_eq(&g, &p)
}

fn constant(e: &Expr) -> Option<f64> {
    e.eval(&|_| None)
}

fn close(a: f64, b: f64) -> bool {
    if a.is_nan() || b.is_nan() {
        return false;
    }
    if a.is_infinite() || b.is_infinite() {
        return a == b;
    }
    (a - b).abs() <= REL_TOL * a.abs().max(b.abs()).max(1e-300) || (a - b).abs() < 1e-12
}

/// Both rounded to [`FLOAT_ROUNDING`] decimals as sympy's `Float.round` does: scaled in
/// binary, then half to even (0.1000005 rounds to 0.1).
fn rounded_eq(a: f64, b: f64) -> bool {
    let scale = 10f64.powi(FLOAT_ROUNDING);
    a.is_finite() && b.is_finite() && (a * scale).round_ties_even() == (b * scale).round_ties_even()
}

fn has_float(e: &Expr) -> bool {
    let mut found = false;
    e.visit(&mut |x| found |= matches!(x, Expr::Float(_)));
    found
}

fn float_in_exponent(e: &Expr) -> bool {
    let mut found = false;
    e.visit(&mut |x| {
        if let Expr::Pow(_, exp) = x {
            found |= has_float(exp);
        }
    });
    found
}

/// math-verify's `sympy_numeric_eq` for scalars, with sympy's float semantics: a decimal
/// against a rational rounds both; against an integer, or inside arithmetic, floats are
/// binary values that must agree exactly (`1.23456789 \times 10^8` is not 123456789).
fn numeric_eq(g: &Expr, p: &Expr) -> bool {
    let floats = has_float(g) || has_float(p);
    let values = (constant(g), constant(p));
    if g.atomic_number() || p.atomic_number() {
        if g.is_float_literal() || p.is_float_literal() {
            let integer_side = matches!(g, Expr::Num(r) if r.is_integer())
                || matches!(p, Expr::Num(r) if r.is_integer());
            return match values {
                (Some(a), Some(b)) if integer_side => a == b,
                (Some(a), Some(b)) => rounded_eq(a, b),
                _ => false,
            };
        }
        if let (Some(a), Some(b)) = (g.integer_literal(), p.integer_literal()) {
            return a == b;
        }
        if !floats {
            if let (Some(a), Some(b)) = (g.exact(), p.exact()) {
                return a == b;
            }
        }
    }
    match values {
        (Some(a), Some(b)) if !floats => close(a, b),
        (Some(a), Some(b)) => a == b && !float_in_exponent(g) && !float_in_exponent(p),
        _ => false,
    }
}

/// Deterministic sample values for the `k`-th variable at point `j`: spread over (0.3, 3.5),
/// avoiding integers and simple fractions where identities coincide by accident.
fn sample(var: usize, point: usize) -> f64 {
    const BASE: [f64; NUM_POINTS] = [0.731, 1.377, 2.219, 0.413, 3.141_7, 1.823];
    BASE[point] + 0.271 * var as f64 + 0.0173 * (var * var) as f64
}

/// sympy's `simplify(a - b) == 0`, at sampled points: equal wherever both are defined, and
/// defined at the same points, with at least two points defined.
fn symbolic_eq(g: &Expr, p: &Expr) -> bool {
    let mut vars: Vec<String> = g.symbols().into_iter().collect();
    for v in p.symbols() {
        if !vars.contains(&v) {
            vars.push(v);
        }
    }
    if vars.is_empty() {
        return false;
    }
    let mut defined = 0;
    for point in 0..NUM_POINTS {
        let env = |name: &str| {
            vars.iter()
                .position(|v| v == name)
                .map(|k| sample(k, point))
        };
        let (a, b) = (g.eval(&env), p.eval(&env));
        match (a, b) {
            (Some(a), Some(b)) if a.is_finite() && b.is_finite() => {
                if !close(a, b) {
                    return false;
                }
                defined += 1;
            }
            (Some(a), Some(b)) if a.is_nan() && b.is_nan() => {}
            _ => return false,
        }
    }
    defined >= 2
}

/// math-verify's `sympy_compare_symbols`: a word against the product of its letters
/// (`\text{abc}` against `abc`), `e` against Euler's number, names case-insensitive.
fn symbols_eq(g: &Expr, p: &Expr) -> bool {
    fn letters(e: &Expr) -> Option<String> {
        match e {
            Expr::Sym(s) => Some(s.clone()),
            Expr::E => Some("e".into()),
            Expr::Mul(v) => v.iter().map(letters).collect(),
            _ => None,
        }
    }
    match (g, p) {
        (Expr::Sym(a), Expr::Sym(b)) => a.to_lowercase() == b.to_lowercase(),
        (Expr::Sym(a), other) | (other, Expr::Sym(a)) => {
            letters(other).is_some_and(|l| l.to_lowercase() == a.to_lowercase())
        }
        _ => false,
    }
}

/// math-verify's `sympy_compare_relational`: same relation with equal `lhs - rhs`, the
/// flipped relation, or the same solutions (here: `lhs - rhs` equal up to a constant factor,
/// positive for inequalities).
fn relation_eq(g: &Expr, p: &Expr) -> bool {
    let (Expr::Rel(gs, gops), Expr::Rel(ps, pops)) = (g, p) else {
        return false;
    };
    if gops.len() != pops.len() {
        return false;
    }
    if gops.len() > 1 {
        // Chains compare relation by relation.
        return (0..gops.len()).all(|k| {
            relation_eq(
                &Expr::Rel(vec![gs[k].clone(), gs[k + 1].clone()], vec![gops[k]]),
                &Expr::Rel(vec![ps[k].clone(), ps[k + 1].clone()], vec![pops[k]]),
            )
        });
    }
    let diff = |sides: &[Expr]| Expr::Add(vec![sides[0].clone(), Expr::negate(sides[1].clone())]);
    let (dg, dp) = (diff(gs), diff(ps));
    let (go, po) = (gops[0], pops[0]);
    if go == po && scalar_eq(&dg, &dp) {
        return true;
    }
    if go.flipped() == po && go != RelOp::Eq && scalar_eq(&dg, &Expr::negate(dp.clone())) {
        return true;
    }
    // Same solution set: dg = c * dp for a constant c (c > 0 keeps an inequality's direction).
    let vars_g = dg.symbols();
    if vars_g.is_empty() || vars_g != dp.symbols() {
        return false;
    }
    let vars: Vec<String> = vars_g.into_iter().collect();
    let mut ratio: Option<f64> = None;
    for point in 0..NUM_POINTS {
        let env = |name: &str| {
            vars.iter()
                .position(|v| v == name)
                .map(|k| sample(k, point))
        };
        let (Some(a), Some(b)) = (dg.eval(&env), dp.eval(&env)) else {
            return false;
        };
        if !a.is_finite() || !b.is_finite() || b.abs() < 1e-12 {
            return false;
        }
        let r = a / b;
        match ratio {
            None => ratio = Some(r),
            Some(r0) if close(r0, r) => {}
            Some(_) => return false,
        }
    }
    let Some(r) = ratio else { return false };
    // sympy's `solve` comparison succeeds for equations in several variables (`2x + 2y = 2`
    // against `x + y = 1`); for one variable and for inequalities math-verify 0.9.0 answers
    // false, and so do we.
    let _ = r;
    vars.len() > 1 && go == RelOp::Eq && po == RelOp::Eq
}

/// Scalar equality used inside containers and relations (full [`expr_eq`] semantics).
fn scalar_eq(a: &Expr, b: &Expr) -> bool {
    expr_eq(a, b)
}

fn elements(e: &Expr) -> Option<&[Expr]> {
    match e {
        Expr::Set(v) | Expr::Tuple(v) => Some(v),
        _ => None,
    }
}

fn sort_key(e: &Expr) -> f64 {
    let e = if is_assignment(e) {
        last_rhs(e)
    } else {
        e.clone()
    };
    constant(&e).unwrap_or(f64::NAN)
}

/// Element-wise comparison; sets in any order (a greedy matching, which is exact for
/// equivalence classes), tuples in order.
fn elements_eq(g: &[Expr], p: &[Expr], ordered: bool) -> bool {
    if g.len() != p.len() || g.len() > MAX_ELEMENTS {
        return false;
    }
    if ordered {
        return g.iter().zip(p).all(|(a, b)| expr_eq(a, b));
    }
    // Fast path: both sorted by value agree pairwise.
    let mut gs: Vec<&Expr> = g.iter().collect();
    let mut ps: Vec<&Expr> = p.iter().collect();
    gs.sort_by(|a, b| sort_key(a).total_cmp(&sort_key(b)));
    ps.sort_by(|a, b| sort_key(a).total_cmp(&sort_key(b)));
    if gs.iter().zip(&ps).all(|(a, b)| expr_eq(a, b)) {
        return true;
    }
    let mut used = vec![false; p.len()];
    g.iter().all(|a| {
        let hit = p
            .iter()
            .enumerate()
            .position(|(k, b)| !used[k] && expr_eq(a, b));
        if let Some(k) = hit {
            used[k] = true;
        }
        hit.is_some()
    })
}

/// math-verify's `sympy_compare_sets`: intervals by endpoints and openness, finite sets in any
/// order, tuples in order, an open interval against a pair, unions part by part.
fn sets_eq(g: &Expr, p: &Expr) -> bool {
    let wrap = |e: &Expr| {
        if e.is_set_like() {
            e.clone()
        } else {
            Expr::Set(vec![e.clone()])
        }
    };
    let (g, p) = (wrap(g), wrap(p));
    match (&g, &p) {
        (
            Expr::Interval {
                lo: a,
                hi: b,
                left_open: la,
                right_open: ra,
            },
            Expr::Interval {
                lo: c,
                hi: d,
                left_open: lc,
                right_open: rc,
            },
        ) => la == lc && ra == rc && bound_eq(a, c) && bound_eq(b, d),
        (Expr::Set(a), Expr::Set(b)) => elements_eq(a, b, false),
        (Expr::Set(a), Expr::Tuple(b)) => elements_eq(a, b, false),
        (Expr::Tuple(a), Expr::Set(b)) | (Expr::Tuple(a), Expr::Tuple(b)) => {
            elements_eq(a, b, true)
        }
        (
            Expr::Interval {
                lo,
                hi,
                left_open: true,
                right_open: true,
            },
            other,
        )
        | (
            other,
            Expr::Interval {
                lo,
                hi,
                left_open: true,
                right_open: true,
            },
        ) if elements(other).is_some_and(|v| v.len() == 2) => {
            let pair = [(**lo).clone(), (**hi).clone()];
            let v = elements(other).unwrap_or(&[]);
            let ordered = matches!(other, Expr::Tuple(_)) || matches!(g, Expr::Interval { .. });
            if matches!(g, Expr::Interval { .. }) {
                elements_eq(&pair, v, ordered)
            } else {
                elements_eq(v, &pair, ordered)
            }
        }
        (Expr::Union(a), Expr::Union(b)) => elements_eq(a, b, false),
        (Expr::Empty, Expr::Empty) | (Expr::Reals, Expr::Reals) => true,
        (Expr::Reals, Expr::Interval { lo, hi, .. })
        | (Expr::Interval { lo, hi, .. }, Expr::Reals) => {
            constant(lo) == Some(f64::NEG_INFINITY) && constant(hi) == Some(f64::INFINITY)
        }
        _ => false,
    }
}

fn bound_eq(a: &Expr, b: &Expr) -> bool {
    match (constant(a), constant(b)) {
        (Some(x), Some(y)) if x.is_infinite() || y.is_infinite() => x == y,
        _ => expr_eq(a, b),
    }
}
