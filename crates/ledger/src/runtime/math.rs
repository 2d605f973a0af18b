//! Integer arithmetic for consensus: exact `a * b / d` with a 256-bit
//! intermediate, and parts-per-million helpers. No floating point.

use crate::error::TxError;
use crate::types::{Amount, PPM, Ppm};

/// `floor(a * b / d)` computed exactly; `None` when `d == 0` or the result
/// does not fit in `u128`.
pub fn mul_div(a: u128, b: u128, d: u128) -> Option<u128> {
    if d == 0 {
        return None;
    }
    if let Some(p) = a.checked_mul(b) {
        return Some(p / d);
    }
    let (hi, lo) = wide_mul(a, b);
    if hi >= d {
        return None;
    }
    // Schoolbook long division of (hi:lo) by d, one bit at a time; the
    // remainder stays below d, so one conditional subtraction per bit suffices.
    let mut rem = hi;
    let mut q: u128 = 0;
    for i in (0..128).rev() {
        let carry = rem >> 127;
        rem = (rem << 1) | ((lo >> i) & 1);
        if carry == 1 || rem >= d {
            rem = rem.wrapping_sub(d);
            q |= 1u128 << i;
        }
    }
    Some(q)
}

/// The full 256-bit product as (high, low) halves.
fn wide_mul(a: u128, b: u128) -> (u128, u128) {
    let mask = u64::MAX as u128;
    let (a1, a0) = (a >> 64, a & mask);
    let (b1, b0) = (b >> 64, b & mask);
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    let mid = (p00 >> 64) + (p01 & mask) + (p10 & mask);
    let lo = (p00 & mask) | (mid << 64);
    let hi = p11 + (p01 >> 64) + (p10 >> 64) + (mid >> 64);
    (hi, lo)
}

/// `amount * ppm / 1e6`, rounded down. Never overflows because `ppm <= 1e6`.
pub fn ppm_of(amount: Amount, ppm: Ppm) -> Amount {
    mul_div(amount, ppm.min(PPM) as u128, PPM as u128).unwrap_or(0)
}

/// Adds to a ppm value, capped at 1.0.
pub fn ppm_add(v: Ppm, d: Ppm) -> Ppm {
    v.saturating_add(d).min(PPM)
}

/// Subtracts from a ppm value, floored at 0.
pub fn ppm_sub(v: Ppm, d: Ppm) -> Ppm {
    v.saturating_sub(d)
}

/// Checked addition as a transaction error.
pub fn add(a: Amount, b: Amount) -> Result<Amount, TxError> {
    a.checked_add(b).ok_or(TxError::Overflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mul_div_exact_beyond_u128_products() {
        assert_eq!(mul_div(10, 3, 4), Some(7));
        assert_eq!(mul_div(u128::MAX, u128::MAX, u128::MAX), Some(u128::MAX));
        assert_eq!(mul_div(u128::MAX, 2, 4), Some(u128::MAX / 2));
        assert_eq!(mul_div(1 << 100, 1 << 100, 1 << 90), Some(1 << 110));
        assert_eq!(mul_div(u128::MAX, u128::MAX, 1), None);
        assert_eq!(mul_div(1, 1, 0), None);
        let a = 123_456_789_012_345_678_901_234_567u128;
        let b = 987_654_321_098_765_432_109u128;
        let d = 555_555_555_555_555_555_555_555u128;
        // Cross-check against splitting b.
        let q = mul_div(a, b, d).unwrap();
        let lo = mul_div(a, b - 1, d).unwrap();
        assert!(q >= lo && q - lo <= a / d + 1);
    }

    #[test]
    fn ppm_helpers() {
        assert_eq!(ppm_of(1_000_000, 660_000), 660_000);
        assert_eq!(ppm_of(u128::MAX, PPM), u128::MAX);
        assert_eq!(ppm_add(999_000, 5_000), PPM);
        assert_eq!(ppm_sub(10, 50), 0);
    }
}
