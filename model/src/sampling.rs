//! Choosing the next token from logits, with HF `generate`'s semantics and order:
//! repetition penalty, then temperature, top-k, top-p; temperature 0 means greedy (argmax,
//! first index on ties, as `torch.argmax`).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// 0 = greedy.
    pub temperature: f32,
    /// Keep the k most likely tokens (ties at the k-th value kept); None or 0 = off.
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold in (0, 1]; None or 1 = off.
    pub top_p: Option<f32>,
    /// HF's CTRL-style penalty on every token already in the sequence; 1 = off.
    pub repetition_penalty: f32,
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repetition_penalty: 1.0,
            seed: 42,
        }
    }
}

impl SamplingConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!("--temperature {} must be >= 0", self.temperature));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(format!("--top-p {p} must be in (0, 1]"));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!(
                "--repetition-penalty {} must be > 0",
                self.repetition_penalty
            ));
        }
        Ok(())
    }
}

pub struct Sampler {
    config: SamplingConfig,
    rng: StdRng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Self {
        let rng = StdRng::seed_from_u64(config.seed);
        Self { config, rng }
    }

    /// Picks the next token. `logits` is modified in place; `context` is every token of the
    /// sequence so far (prompt included), as HF's processors see `input_ids`.
    pub fn sample(&mut self, logits: &mut [f32], context: &[u32]) -> u32 {
        apply_repetition_penalty(logits, context, self.config.repetition_penalty);
        if self.config.temperature == 0.0 {
            return argmax(logits) as u32;
        }
        let t = self.config.temperature;
        if t != 1.0 {
            logits.iter_mut().for_each(|l| *l /= t);
        }
        if let Some(k) = self.config.top_k.filter(|&k| k > 0 && k < logits.len()) {
            top_k_filter(logits, k);
        }
        if let Some(p) = self.config.top_p.filter(|&p| p < 1.0) {
            top_p_filter(logits, p);
        }
        let probs = softmax(logits);
        let r: f64 = self.rng.random();
        let mut acc = 0.0f64;
        let mut last = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                acc += p as f64;
                last = i;
                if r < acc {
                    return i as u32;
                }
            }
        }
        last as u32
    }
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// HF `RepetitionPenaltyLogitsProcessor`: a seen token's logit is divided by the penalty when
/// positive and multiplied by it when negative (each token once, however often it was seen).
pub fn apply_repetition_penalty(logits: &mut [f32], context: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &t in context {
        let t = t as usize;
        if t < logits.len() && !seen[t] {
            seen[t] = true;
            let l = &mut logits[t];
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// HF `TopKLogitsWarper`: everything below the k-th largest value becomes -inf.
pub fn top_k_filter(logits: &mut [f32], k: usize) {
    let mut sorted: Vec<f32> = logits.to_vec();
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    logits
        .iter_mut()
        .filter(|l| **l < kth)
        .for_each(|l| *l = f32::NEG_INFINITY);
}

/// HF `TopPLogitsWarper`: sort ascending, drop the tokens whose cumulative probability is
/// <= 1 - p, always keeping the most likely one.
pub fn top_p_filter(logits: &mut [f32], p: f32) {
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
    let mut cum = 0.0f32;
    let last = order.len() - 1;
    for (rank, &i) in order.iter().enumerate() {
        cum += probs[i];
        if cum <= 1.0 - p && rank != last {
            logits[i] = f32::NEG_INFINITY;
        }
    }
}

pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_matches_hf() {
        let mut l = vec![2.0, -2.0, 1.0, 0.5];
        apply_repetition_penalty(&mut l, &[0, 1, 1, 9], 2.0);
        assert_eq!(l, vec![1.0, -4.0, 1.0, 0.5]);
    }

    #[test]
    fn top_k_keeps_ties() {
        let mut l = vec![1.0, 3.0, 2.0, 2.0, 0.0];
        top_k_filter(&mut l, 2);
        assert_eq!(l, vec![f32::NEG_INFINITY, 3.0, 2.0, 2.0, f32::NEG_INFINITY]);
    }

    #[test]
    fn top_p_keeps_smallest_nucleus() {
        // probs ~ [0.64, 0.24, 0.09, 0.03]
        let mut l = vec![
            (0.64f32).ln(),
            (0.24f32).ln(),
            (0.09f32).ln(),
            (0.03f32).ln(),
        ];
        top_p_filter(&mut l, 0.8);
        assert!(l[0].is_finite() && l[1].is_finite());
        assert!(l[2] == f32::NEG_INFINITY && l[3] == f32::NEG_INFINITY);
        let mut l = vec![0.0f32, -10.0];
        top_p_filter(&mut l, 0.01);
        assert!(l[0].is_finite(), "the most likely token is always kept");
    }

    #[test]
    fn greedy_is_first_argmax_and_sampling_is_seeded() {
        let mut s = Sampler::new(SamplingConfig::default());
        assert_eq!(s.sample(&mut [1.0, 3.0, 3.0], &[]), 1);
        let cfg = SamplingConfig {
            temperature: 1.0,
            seed: 7,
            ..Default::default()
        };
        let logits = vec![0.0f32; 50];
        let a: Vec<u32> = {
            let mut s = Sampler::new(cfg.clone());
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect()
        };
        let b: Vec<u32> = {
            let mut s = Sampler::new(cfg);
            (0..20)
                .map(|_| s.sample(&mut logits.clone(), &[]))
                .collect()
        };
        assert_eq!(a, b);
        assert!(a.iter().any(|&x| x != a[0]), "uniform sampling should vary");
    }
}
