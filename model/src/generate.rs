//! Autoregressive generation with the KV cache: the prompt is run once, then each new token
//! costs one single-position forward pass.

use burn::tensor::FloatDType;

use burn::tensor::backend::Backend;

use crate::cache::KvCache;
use crate::phi::{Phi, ids_tensor};
use crate::sampling::{Sampler, SamplingConfig};

#[derive(Debug, Clone)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    pub sampling: SamplingConfig,
    /// Generation stops after emitting any of these (the eos token is returned, like HF).
    pub stop_tokens: Vec<u32>,
}

/// Generates up to `max_new_tokens` after `prompt`. `on_token` sees each new id as it is
/// chosen (for streaming) and may return false to stop early. Returns the new ids.
pub fn generate<B: crate::ops::Nf4Backend>(
    model: &Phi<B>,
    prompt: &[u32],
    config: &GenerationConfig,
    device: &B::Device,
    on_token: impl FnMut(u32) -> bool,
) -> Vec<u32> {
    let mut context = CachedContext::new(model);
    generate_cached(model, &mut context, prompt, config, device, on_token)
}

/// A KV cache together with the tokens it holds, kept across calls (a chat session): a prompt
/// that starts with tokens already in the cache only runs the rest.
pub struct CachedContext<B: Backend> {
    cache: KvCache<B>,
    tokens: Vec<u32>,
    reused: usize,
}

impl<B: Backend> CachedContext<B> {
    pub fn new(model: &Phi<B>) -> Self {
        Self {
            cache: model.new_cache(),
            tokens: Vec::new(),
            reused: 0,
        }
    }

    /// Positions of the last prompt that were taken from the cache instead of recomputed.
    pub fn reused(&self) -> usize {
        self.reused
    }

    pub fn clear(&mut self) {
        self.cache.clear();
        self.tokens.clear();
        self.reused = 0;
    }
}

/// [`generate`] continuing from `context`: the longest common prefix of `prompt` and the
/// cached tokens is reused (at least the last prompt token is always run, for its logits).
pub fn generate_cached<B: crate::ops::Nf4Backend>(
    model: &Phi<B>,
    context: &mut CachedContext<B>,
    prompt: &[u32],
    config: &GenerationConfig,
    device: &B::Device,
    mut on_token: impl FnMut(u32) -> bool,
) -> Vec<u32> {
    assert!(
        !prompt.is_empty(),
        "generation needs at least one prompt token"
    );
    let common = context
        .tokens
        .iter()
        .zip(prompt)
        .take_while(|(a, b)| a == b)
        .count()
        .min(prompt.len() - 1);
    context.cache.truncate(common);
    context.tokens.truncate(common);
    context.reused = common;
    let mut sampler = Sampler::new(config.sampling.clone());
    let mut seen = prompt.to_vec();
    let mut new = Vec::new();
    let mut logits = model.forward_cached(
        ids_tensor::<B>(&prompt[common..], device),
        &mut context.cache,
    );
    context.tokens.extend_from_slice(&prompt[common..]);
    while new.len() < config.max_new_tokens {
        let mut row = logits
            .cast(FloatDType::F32)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 logits");
        let next = sampler.sample(&mut row, &seen);
        new.push(next);
        seen.push(next);
        if !on_token(next)
            || config.stop_tokens.contains(&next)
            || new.len() == config.max_new_tokens
        {
            break;
        }
        logits = model.forward_cached(ids_tensor::<B>(&[next], device), &mut context.cache);
        context.tokens.push(next);
    }
    new
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PhiConfig;
    use burn::backend::NdArray;

    type B = NdArray<f32>;

    fn tiny() -> PhiConfig {
        let mut c = PhiConfig::phi2();
        c.vocab_size = 97;
        c.hidden_size = 40; // head_dim 10, rotary dim 4
        c.num_attention_heads = 4;
        c.num_key_value_heads = Some(4);
        c.num_hidden_layers = 2;
        c.intermediate_size = 80;
        c
    }

    #[test]
    fn a_cached_context_reuses_the_shared_prefix_and_generates_the_same_tokens() {
        let dev = Default::default();
        <B as Backend>::seed(&dev, 5);
        let model = Phi::<B>::random(&tiny(), &dev);
        let config = GenerationConfig {
            max_new_tokens: 6,
            sampling: Default::default(),
            stop_tokens: vec![],
        };
        let turn1: Vec<u32> = (0..20).map(|i| (i * 13 + 5) % 97).collect();
        let mut ctx = CachedContext::new(&model);
        let reply1 = generate_cached(&model, &mut ctx, &turn1, &config, &dev, |_| true);
        assert_eq!(ctx.reused(), 0);
        assert_eq!(reply1, generate(&model, &turn1, &config, &dev, |_| true));
        // The next prompt: the first turn and the reply, then more, with a changed tail.
        let mut turn2 = turn1.clone();
        turn2.extend(&reply1[..4]);
        turn2.extend([7, 8, 9]);
        let reply2 = generate_cached(&model, &mut ctx, &turn2, &config, &dev, |_| true);
        assert_eq!(ctx.reused(), 24, "the prompt and the replies' fed tokens");
        assert_eq!(reply2, generate(&model, &turn2, &config, &dev, |_| true));
        // A prompt that diverges early reuses only the common part.
        let mut turn3 = turn1[..3].to_vec();
        turn3.extend([1, 2, 3, 4]);
        let reply3 = generate_cached(&model, &mut ctx, &turn3, &config, &dev, |_| true);
        assert_eq!(ctx.reused(), 3);
        assert_eq!(reply3, generate(&model, &turn3, &config, &dev, |_| true));
        // The same prompt again still runs its last token.
        let again = generate_cached(&model, &mut ctx, &turn3, &config, &dev, |_| true);
        assert_eq!(ctx.reused(), turn3.len() - 1);
        assert_eq!(again, reply3);
    }
}
