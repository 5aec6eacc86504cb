//! The parsed answer: an expression tree over exact numbers, decimals, symbols and constants,
//! plus the containers answers come in (sets, tuples, intervals, matrices, relations).
//! Evaluation is exact where it can be ([`Expr::exact`], rationals) and otherwise in `f64`
//! ([`Expr::eval`]), with free symbols bound by the caller (sampled points).

use std::collections::BTreeSet;

use crate::rational::Rational;

/// A relation between two sides of a chain `a < b <= c`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl RelOp {
    /// The same relation read right to left (`a < b` is `b > a`).
    pub fn flipped(self) -> Self {
        match self {
            RelOp::Lt => RelOp::Gt,
            RelOp::Gt => RelOp::Lt,
            RelOp::Le => RelOp::Ge,
            RelOp::Ge => RelOp::Le,
            other => other,
        }
    }
}

/// Elementary functions the parser knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Func {
    Sqrt,
    Sin,
    Cos,
    Tan,
    Cot,
    Sec,
    Csc,
    Asin,
    Acos,
    Atan,
    Sinh,
    Cosh,
    Tanh,
    Ln,
    /// `\log x` (base 10, as sympy's LaTeX parser reads it).
    Log10,
    /// `\log_b x`: arguments `[b, x]`.
    LogBase,
    Exp,
    Abs,
    Floor,
    Ceil,
    Factorial,
    /// `\binom{n}{k}`.
    Binom,
    /// `\sqrt[n]{x}`: arguments `[n, x]`.
    Root,
    Max,
    Min,
    Gcd,
    Lcm,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// An integer, or a fraction of two integer literals (`\frac{1}{2}`, `1/2`).
    Num(Rational),
    /// A decimal literal (`0.5`, `3.14`), sympy's `Float`: compared rounded.
    Float(f64),
    Sym(String),
    Pi,
    E,
    Inf,
    Add(Vec<Expr>),
    Mul(Vec<Expr>),
    Div(Box<Expr>, Box<Expr>),
    Pow(Box<Expr>, Box<Expr>),
    Neg(Box<Expr>),
    Call(Func, Vec<Expr>),
    /// `x\%`: the value is `x / 100`, but `9\%` against `9` compares the integers.
    Percent(Box<Expr>),
    /// A chain `e0 op0 e1 op1 e2 ...` (`ops.len() == sides.len() - 1`).
    Rel(Vec<Expr>, Vec<RelOp>),
    Set(Vec<Expr>),
    Tuple(Vec<Expr>),
    Interval {
        lo: Box<Expr>,
        hi: Box<Expr>,
        left_open: bool,
        right_open: bool,
    },
    Union(Vec<Expr>),
    Matrix(Vec<Vec<Expr>>),
    Reals,
    Empty,
}

impl Expr {
    pub fn negate(e: Expr) -> Expr {
        match e {
            Expr::Num(r) => r
                .checked_neg()
                .map_or_else(|| Expr::Neg(Box::new(Expr::Num(r))), Expr::Num),
            Expr::Float(f) => Expr::Float(-f),
            other => Expr::Neg(Box::new(other)),
        }
    }

    /// Whether this is a number literal (sympy's atomic `Number`), possibly as a percentage.
    pub fn atomic_number(&self) -> bool {
        match self {
            Expr::Num(_) | Expr::Float(_) => true,
            Expr::Percent(inner) => matches!(**inner, Expr::Num(_) | Expr::Float(_)),
            _ => false,
        }
    }

    pub fn is_float_literal(&self) -> bool {
        match self {
            Expr::Float(_) => true,
            Expr::Percent(inner) => matches!(**inner, Expr::Float(_)),
            _ => false,
        }
    }

    /// The integer of an integer literal or integer percentage (`9`, `9\%`).
    pub fn integer_literal(&self) -> Option<i128> {
        match self {
            Expr::Num(r) if r.is_integer() => Some(r.num),
            Expr::Percent(inner) => inner.integer_literal(),
            _ => None,
        }
    }

    pub fn is_relation(&self) -> bool {
        matches!(self, Expr::Rel(..))
    }

    pub fn is_set_like(&self) -> bool {
        matches!(
            self,
            Expr::Set(_)
                | Expr::Tuple(_)
                | Expr::Interval { .. }
                | Expr::Union(_)
                | Expr::Reals
                | Expr::Empty
        )
    }

    /// Names of the free symbols, sorted.
    pub fn symbols(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        self.collect_symbols(&mut out);
        out
    }

    fn collect_symbols(&self, out: &mut BTreeSet<String>) {
        match self {
            Expr::Sym(s) => {
                out.insert(s.clone());
            }
            _ => self.for_each_child(|c| c.collect_symbols(out)),
        }
    }

    /// Calls `f` on this node and every node below it.
    pub fn visit(&self, f: &mut dyn FnMut(&Expr)) {
        f(self);
        self.for_each_child(|c| c.visit(f));
    }

    fn for_each_child(&self, mut f: impl FnMut(&Expr)) {
        match self {
            Expr::Add(v) | Expr::Mul(v) | Expr::Call(_, v) | Expr::Set(v) | Expr::Tuple(v) => {
                v.iter().for_each(f)
            }
            Expr::Union(v) | Expr::Rel(v, _) => v.iter().for_each(f),
            Expr::Div(a, b) | Expr::Pow(a, b) => {
                f(a);
                f(b)
            }
            Expr::Interval { lo, hi, .. } => {
                f(lo);
                f(hi)
            }
            Expr::Neg(a) | Expr::Percent(a) => f(a),
            Expr::Matrix(rows) => rows.iter().flatten().for_each(f),
            _ => {}
        }
    }

    /// Exact value where the expression is rational arithmetic on literals (percentages count
    /// as `/100`, decimals as their exact decimal value).
    pub fn exact(&self) -> Option<Rational> {
        match self {
            Expr::Num(r) => Some(*r),
            Expr::Float(_) => None,
            Expr::Neg(a) => a.exact()?.checked_neg(),
            Expr::Add(v) => v
                .iter()
                .try_fold(Rational::ZERO, |acc, e| acc.checked_add(e.exact()?)),
            Expr::Mul(v) => v
                .iter()
                .try_fold(Rational::ONE, |acc, e| acc.checked_mul(e.exact()?)),
            Expr::Div(a, b) => a.exact()?.checked_div(b.exact()?),
            Expr::Pow(a, b) => {
                let e = b.exact()?;
                if !e.is_integer() {
                    return None;
                }
                a.exact()?.pow(e.num)
            }
            Expr::Percent(a) => a.exact()?.checked_div(Rational::int(100)),
            Expr::Call(Func::Abs, v) if v.len() == 1 => {
                let r = v[0].exact()?;
                Some(Rational {
                    num: r.num.checked_abs()?,
                    den: r.den,
                })
            }
            Expr::Call(Func::Factorial, v) if v.len() == 1 => {
                let r = v[0].exact()?;
                if !r.is_integer() || !(0..=30).contains(&r.num) {
                    return None;
                }
                (1..=r.num).try_fold(Rational::ONE, |acc, k| acc.checked_mul(Rational::int(k)))
            }
            _ => None,
        }
    }

    /// Numeric value with symbols bound by `env` (`None`: a free symbol is unbound, or the
    /// expression is not a scalar). NaN marks values outside a function's real domain.
    pub fn eval(&self, env: &dyn Fn(&str) -> Option<f64>) -> Option<f64> {
        Some(match self {
            Expr::Num(r) => r.to_f64(),
            Expr::Float(f) => *f,
            Expr::Sym(s) => env(s)?,
            Expr::Pi => std::f64::consts::PI,
            Expr::E => std::f64::consts::E,
            Expr::Inf => f64::INFINITY,
            Expr::Add(v) => {
                let mut s = 0.0;
                for e in v {
                    s += e.eval(env)?;
                }
                s
            }
            Expr::Mul(v) => {
                let mut p = 1.0;
                for e in v {
                    p *= e.eval(env)?;
                }
                p
            }
            Expr::Div(a, b) => a.eval(env)? / b.eval(env)?,
            Expr::Pow(a, b) => {
                let (x, y) = (a.eval(env)?, b.eval(env)?);
                real_pow(x, y, b)
            }
            Expr::Neg(a) => -a.eval(env)?,
            Expr::Percent(a) => a.eval(env)? / 100.0,
            Expr::Call(f, args) => {
                let mut xs = Vec::with_capacity(args.len());
                for a in args {
                    xs.push(a.eval(env)?);
                }
                call(*f, &xs)?
            }
            _ => return None,
        })
    }
}

/// `x^y` over the reals: odd roots of negatives are real (`(-8)^(1/3) = -2`).
fn real_pow(x: f64, y: f64, exponent: &Expr) -> f64 {
    if x < 0.0 && y.fract() != 0.0 {
        if let Some(r) = exponent.exact() {
            if r.den % 2 == 1 {
                return -((-x).powf(y));
            }
        }
        return f64::NAN;
    }
    x.powf(y)
}

fn factorial(n: f64) -> f64 {
    if n < 0.0 || n.fract() != 0.0 || n > 170.0 {
        return f64::NAN;
    }
    (1..=n as u64).map(|k| k as f64).product()
}

fn gcd_f(a: f64, b: f64) -> f64 {
    if a.fract() != 0.0 || b.fract() != 0.0 || a.abs() > 1e15 || b.abs() > 1e15 {
        return f64::NAN;
    }
    let (mut a, mut b) = (a.abs() as u64, b.abs() as u64);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a as f64
}

fn call(f: Func, x: &[f64]) -> Option<f64> {
    let a = *x.first()?;
    Some(match f {
        Func::Sqrt => {
            if a < 0.0 {
                f64::NAN
            } else {
                a.sqrt()
            }
        }
        Func::Sin => a.sin(),
        Func::Cos => a.cos(),
        Func::Tan => a.tan(),
        Func::Cot => 1.0 / a.tan(),
        Func::Sec => 1.0 / a.cos(),
        Func::Csc => 1.0 / a.sin(),
        Func::Asin => a.asin(),
        Func::Acos => a.acos(),
        Func::Atan => a.atan(),
        Func::Sinh => a.sinh(),
        Func::Cosh => a.cosh(),
        Func::Tanh => a.tanh(),
        Func::Ln => a.ln(),
        Func::Log10 => a.log10(),
        Func::LogBase => x.get(1)?.ln() / a.ln(),
        Func::Exp => a.exp(),
        Func::Abs => a.abs(),
        Func::Floor => a.floor(),
        Func::Ceil => a.ceil(),
        Func::Factorial => factorial(a),
        Func::Binom => {
            // n (n-1) ... (n-k+1) / k! for an integer k: defined for any n (`\binom{n+1}{2}`).
            let k = *x.get(1)?;
            if k < 0.0 || k.fract() != 0.0 || k > 170.0 {
                return Some(f64::NAN);
            }
            (0..k as u64).fold(1.0, |acc, j| acc * (a - j as f64) / (j as f64 + 1.0))
        }
        Func::Root => {
            let v = *x.get(1)?;
            if v < 0.0 && a.fract() == 0.0 && (a as i64) % 2 == 1 {
                -(-v).powf(1.0 / a)
            } else {
                v.powf(1.0 / a)
            }
        }
        Func::Max => x.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        Func::Min => x.iter().copied().fold(f64::INFINITY, f64::min),
        Func::Gcd => x.iter().copied().fold(0.0, gcd_f),
        Func::Lcm => x.iter().copied().fold(1.0, |l, v| {
            let g = gcd_f(l, v);
            (l * v / g).abs()
        }),
    })
}
