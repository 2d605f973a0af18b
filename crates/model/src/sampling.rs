//! Choosing the next token from logits: greedy, temperature, top-k, top-p and
//! repetition penalty, reproducible from a seed.

use rand::{Rng, SeedableRng, rngs::StdRng};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// Softmax temperature; `0` picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None` or `0`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability reaches `p` (`None`: all).
    pub top_p: Option<f32>,
    /// Divides positive (multiplies negative) logits of recently seen tokens; `1` is off.
    pub repetition_penalty: f32,
    /// How many of the latest tokens the penalty looks at.
    pub repeat_last_n: usize,
    /// Seed of the random generator: equal seeds give equal samples.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.7,
            top_k: Some(40),
            top_p: Some(0.9),
            repetition_penalty: 1.1,
            repeat_last_n: 64,
            seed: 299_792_458,
        }
    }
}

impl SamplingParams {
    /// Always the most likely token, no penalty.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            ..Self::default()
        }
    }

    /// Refuses values outside their meaningful range.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Sampling(m));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return bad(format!("top_p must be in (0, 1], got {p}"));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!(
                "repetition penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

/// A stateful sampler: its random stream advances with every draw.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    /// A sampler seeded from `params.seed`.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let rng = StdRng::seed_from_u64(params.seed);
        Ok(Self { params, rng })
    }

    /// Picks the next token given the logits and the tokens so far.
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        // A vocabulary's worth of logits is copied only to be penalized.
        let mut logits = std::borrow::Cow::Borrowed(logits);
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let logits = logits.to_mut();
            let start = history.len().saturating_sub(p.repeat_last_n);
            let mut seen = history[start..].to_vec();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(l) = logits.get_mut(id as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(&logits);
        }
        let mut candidates: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / p.temperature))
            .collect();
        if candidates.is_empty() {
            return argmax(&logits);
        }
        candidates.sort_unstable_by(|a, b| b.1.total_cmp(&a.1));
        if let Some(k) = p.top_k.filter(|&k| k > 0) {
            candidates.truncate(k);
        }
        let max = candidates[0].1;
        let mut probs: Vec<f32> = candidates.iter().map(|(_, l)| (l - max).exp()).collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if let Some(top_p) = p.top_p {
            let mut cumulative = 0.0;
            let keep = probs
                .iter()
                .position(|q| {
                    cumulative += q;
                    cumulative >= top_p
                })
                .map_or(probs.len(), |i| i + 1);
            probs.truncate(keep);
        }
        let total: f32 = probs.iter().sum();
        let mut draw = self.rng.random::<f32>() * total;
        for (i, q) in probs.iter().enumerate() {
            if draw < *q {
                return candidates[i].0;
            }
            draw -= q;
        }
        candidates[probs.len() - 1].0
    }
}

/// Index of the largest logit (the first on ties; NaNs never win unless
/// every logit is one, then the last).
pub fn argmax(logits: &[f32]) -> u32 {
    // The largest value first, over independent lanes so it vectorizes (a
    // scan keeping the best index does not, and greedy decoding runs one
    // per token over the whole vocabulary), then where it first occurs.
    const LANES: usize = 16;
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let chunks = logits.chunks_exact(LANES);
    let rest = chunks.remainder().iter().copied();
    for chunk in chunks {
        for (lane, &l) in lanes.iter_mut().zip(chunk) {
            *lane = lane.max(l);
        }
    }
    let max = lanes
        .into_iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, f32::max);
    logits
        .iter()
        .position(|&l| l == max)
        .unwrap_or(logits.len().saturating_sub(1)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_largest_and_passes_over_nans() {
        let nan = f32::NAN;
        let inf = f32::INFINITY;
        let mut long = vec![0.5f32; 37];
        long[20] = 2.0;
        long[33] = 2.0;
        let cases: &[(&[f32], u32)] = &[
            (&[], 0),
            (&[1.0, 3.0, 3.0, -1.0], 1),
            (&[nan, 1.0, nan], 1),
            (&[nan, -inf], 1),
            (&[-inf, nan], 0),
            (&[nan, nan, nan], 2),
            (&[-inf, -inf], 0),
            (&[1.0, inf, nan], 1),
            (&long, 20),
        ];
        for (logits, want) in cases {
            assert_eq!(argmax(logits), *want, "{logits:?}");
        }
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(SamplingParams::greedy()).unwrap();
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9], &[]), 1);
    }

    #[test]
    fn repetition_penalty_can_change_the_winner() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..SamplingParams::greedy()
        };
        let mut s = Sampler::new(params).unwrap();
        assert_eq!(s.sample(&[0.0, 3.0, 2.0], &[1]), 2);
    }

    #[test]
    fn top_k_one_is_greedy_whatever_the_temperature() {
        let params = SamplingParams {
            temperature: 5.0,
            top_k: Some(1),
            top_p: None,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&[0.0, 1.0, 0.5], &[]), 1);
        }
    }

    #[test]
    fn top_p_drops_the_tail() {
        // Token 0 has ~88% of the mass; p = 0.5 keeps it alone.
        let params = SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: Some(0.5),
            repetition_penalty: 1.0,
            ..SamplingParams::default()
        };
        let mut s = Sampler::new(params).unwrap();
        for _ in 0..50 {
            assert_eq!(s.sample(&[4.0, 2.0, 0.0], &[]), 0);
        }
    }

    #[test]
    fn equal_seeds_give_equal_samples_and_temperature_spreads_them() {
        let params = SamplingParams {
            temperature: 1.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 42,
            ..SamplingParams::default()
        };
        let logits = [0.0f32; 8];
        let draw = |p: SamplingParams| {
            let mut s = Sampler::new(p).unwrap();
            (0..64).map(|_| s.sample(&logits, &[])).collect::<Vec<_>>()
        };
        let a = draw(params.clone());
        assert_eq!(a, draw(params.clone()));
        let mut distinct = a.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert!(
            distinct.len() >= 4,
            "uniform logits should spread: {distinct:?}"
        );
        assert_ne!(a, draw(SamplingParams { seed: 43, ..params }));
    }

    #[test]
    fn invalid_parameters_are_refused() {
        for p in [
            SamplingParams {
                temperature: -1.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: Some(0.0),
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: Some(1.5),
                ..SamplingParams::default()
            },
            SamplingParams {
                repetition_penalty: 0.0,
                ..SamplingParams::default()
            },
        ] {
            assert!(matches!(Sampler::new(p), Err(ModelError::Sampling(_))));
        }
    }
}
