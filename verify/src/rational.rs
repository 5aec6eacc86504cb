//! Exact rationals over `i128`; every operation is checked and yields `None` on overflow, so the
//! caller falls back to floating point instead of wrapping.

/// `num / den`, reduced, `den > 0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rational {
    pub num: i128,
    pub den: i128,
}

fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Rational {
    pub const ZERO: Rational = Rational { num: 0, den: 1 };
    pub const ONE: Rational = Rational { num: 1, den: 1 };

    /// `num / den` reduced; `None` for a zero denominator or overflow.
    pub fn new(num: i128, den: i128) -> Option<Self> {
        if den == 0 {
            return None;
        }
        let g = i128::try_from(gcd(num.unsigned_abs(), den.unsigned_abs()).max(1)).ok()?;
        let (mut num, mut den) = (num / g, den / g);
        if den < 0 {
            num = num.checked_neg()?;
            den = den.checked_neg()?;
        }
        Some(Self { num, den })
    }

    pub fn int(n: i128) -> Self {
        Self { num: n, den: 1 }
    }

    pub fn is_integer(self) -> bool {
        self.den == 1
    }

    pub fn checked_add(self, o: Self) -> Option<Self> {
        let g = i128::try_from(gcd(self.den as u128, o.den as u128)).ok()?;
        let den = (self.den / g).checked_mul(o.den)?;
        let num = self
            .num
            .checked_mul(o.den / g)?
            .checked_add(o.num.checked_mul(self.den / g)?)?;
        Self::new(num, den)
    }

    pub fn checked_neg(self) -> Option<Self> {
        Some(Self {
            num: self.num.checked_neg()?,
            den: self.den,
        })
    }

    pub fn checked_mul(self, o: Self) -> Option<Self> {
        let g1 = i128::try_from(gcd(self.num.unsigned_abs(), o.den as u128).max(1)).ok()?;
        let g2 = i128::try_from(gcd(o.num.unsigned_abs(), self.den as u128).max(1)).ok()?;
        Self::new(
            (self.num / g1).checked_mul(o.num / g2)?,
            (self.den / g2).checked_mul(o.den / g1)?,
        )
    }

    pub fn recip(self) -> Option<Self> {
        Self::new(self.den, self.num)
    }

    pub fn checked_div(self, o: Self) -> Option<Self> {
        self.checked_mul(o.recip()?)
    }

    /// `self ^ e` for an integer exponent of magnitude at most 256.
    pub fn pow(self, e: i128) -> Option<Self> {
        if e.unsigned_abs() > 256 {
            return None;
        }
        let base = if e < 0 { self.recip()? } else { self };
        let mut out = Self::ONE;
        for _ in 0..e.unsigned_abs() {
            out = out.checked_mul(base)?;
        }
        Some(out)
    }

    pub fn to_f64(self) -> f64 {
        self.num as f64 / self.den as f64
    }

    /// Parses `123`, `1.25`, `.5`, `3.` exactly.
    pub fn parse_decimal(s: &str) -> Option<Self> {
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
            return None;
        }
        let mut num: i128 = 0;
        let mut den: i128 = 1;
        for b in int.bytes().chain(frac.bytes()) {
            num = num.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
        }
        for _ in frac.bytes() {
            den = den.checked_mul(10)?;
        }
        Self::new(num, den)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_exact_and_checked() {
        let half = Rational::new(1, 2).unwrap();
        let third = Rational::new(1, 3).unwrap();
        assert_eq!(half.checked_add(third), Rational::new(5, 6));
        assert_eq!(half.checked_mul(third), Rational::new(1, 6));
        assert_eq!(half.checked_div(third), Rational::new(3, 2));
        assert_eq!(Rational::new(6, -4), Rational::new(-3, 2));
        assert_eq!(Rational::new(1, 0), None);
        assert_eq!(Rational::int(2).pow(-3), Rational::new(1, 8));
        assert_eq!(Rational::int(10).pow(200), None);
        assert_eq!(Rational::parse_decimal("1.250"), Rational::new(5, 4));
        assert_eq!(Rational::parse_decimal(".5"), Rational::new(1, 2));
        assert_eq!(Rational::parse_decimal("1e5"), None);
    }
}
