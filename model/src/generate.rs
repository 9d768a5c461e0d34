//! Autoregressive generation with the KV cache: the prompt is run once, then each new token
//! costs one single-position forward pass.

use burn::tensor::FloatDType;

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
pub fn generate<B: crate::nf4::Nf4Backend>(
    model: &Phi<B>,
    prompt: &[u32],
    config: &GenerationConfig,
    device: &B::Device,
    mut on_token: impl FnMut(u32) -> bool,
) -> Vec<u32> {
    assert!(
        !prompt.is_empty(),
        "generation needs at least one prompt token"
    );
    let mut sampler = Sampler::new(config.sampling.clone());
    let mut cache = model.new_cache();
    let mut context = prompt.to_vec();
    let mut new = Vec::new();
    let mut logits = model.forward_cached(ids_tensor::<B>(prompt, device), &mut cache);
    while new.len() < config.max_new_tokens {
        let mut row = logits
            .cast(FloatDType::F32)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .expect("f32 logits");
        let next = sampler.sample(&mut row, &context);
        new.push(next);
        context.push(next);
        if !on_token(next)
            || config.stop_tokens.contains(&next)
            || new.len() == config.max_new_tokens
        {
            break;
        }
        logits = model.forward_cached(ids_tensor::<B>(&[next], device), &mut cache);
    }
    new
}
