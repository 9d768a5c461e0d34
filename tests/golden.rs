//! Golden tests against HF transformers: tokenization, per-token NLL and greedy generation on
//! two tiny checkpoints in phi-2's on-disk format (see tests/fixtures/make_fixtures.py).

mod common;

use burn::backend::NdArray;
use burn::tensor::{Tensor, TensorData};
use phitune_model::generate::{GenerationConfig, generate};
use phitune_model::phi::ids_tensor;
use phitune_model::sampling::SamplingConfig;
use phitune_model::{Checkpoint, Phi, PhiTokenizer};

type B = NdArray<f32>;

const CHECKPOINTS: [&str; 2] = ["tiny-phi", "tiny-phi-alt"];

fn load(name: &str) -> (Phi<B>, PhiTokenizer) {
    let dir = common::fixtures().join(name);
    let ckpt = Checkpoint::open(&dir).unwrap();
    let tok = PhiTokenizer::from_dir(&dir, ckpt.config()).unwrap();
    (Phi::load(&ckpt, &Default::default()).unwrap(), tok)
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn tokenizer_matches_hf() {
    let exp = common::expected();
    for name in CHECKPOINTS {
        let (_, tok) = load(name);
        for case in exp[name]["tokenize"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text).unwrap(),
                ids(&case["ids"]),
                "{name}: {text:?}"
            );
        }
        assert_eq!(
            tok.eos_token_ids,
            vec![exp["_generator"]["eos_token_id"].as_u64().unwrap() as u32]
        );
    }
}

#[test]
fn per_token_nll_matches_hf() {
    let exp = common::expected();
    let device = Default::default();
    for name in CHECKPOINTS {
        let (model, tok) = load(name);
        for case in exp[name]["score"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let tokens = tok.encode(text).unwrap();
            assert_eq!(
                tokens,
                ids(&case["tokens"]),
                "{name}: token ids of {text:?}"
            );
            let nll = model.token_nll(&tokens, &device);
            let want: Vec<f64> = case["nll"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect();
            assert_eq!(nll.len(), want.len());
            for (i, (got, want)) in nll.iter().zip(&want).enumerate() {
                assert!(
                    (*got as f64 - want).abs() < 1e-3,
                    "{name} {text:?} token {i}: nll {got} vs HF {want}"
                );
            }
        }
    }
}

#[test]
fn greedy_generation_matches_hf() {
    let exp = common::expected();
    let device = Default::default();
    for name in CHECKPOINTS {
        let (model, tok) = load(name);
        for case in exp[name]["greedy"].as_array().unwrap() {
            let prompt = tok.encode(case["prompt"].as_str().unwrap()).unwrap();
            assert_eq!(prompt, ids(&case["prompt_tokens"]));
            let config = GenerationConfig {
                max_new_tokens: case["max_new_tokens"].as_u64().unwrap() as usize,
                sampling: SamplingConfig {
                    repetition_penalty: case["repetition_penalty"].as_f64().unwrap() as f32,
                    ..Default::default()
                },
                stop_tokens: tok.eos_token_ids.clone(),
            };
            let got = generate(&model, &prompt, &config, &device, |_| true);
            assert_eq!(
                got,
                ids(&case["new_tokens"]),
                "{name}: {:?}",
                case["prompt"]
            );
        }
    }
}

/// Incremental decoding with the KV cache must give the logits a full recomputation gives.
#[test]
fn kv_cache_matches_full_recompute() {
    let device = Default::default();
    for name in CHECKPOINTS {
        let (model, tok) = load(name);
        let tokens = tok
            .encode("we went hiking in the mountains and saw a bear")
            .unwrap();
        let full = model.forward(ids_tensor::<B>(&tokens, &device)); // [1, n, V]
        let vocab = model.vocab_size();
        let mut cache = model.new_cache();
        // A 3-token prefix in one pass, then one token at a time.
        let mut steps =
            vec![model.forward_cached(ids_tensor::<B>(&tokens[..3], &device), &mut cache)];
        for &t in &tokens[3..] {
            steps.push(model.forward_cached(ids_tensor::<B>(&[t], &device), &mut cache));
        }
        assert_eq!(cache.len(), tokens.len());
        for (j, step) in steps.into_iter().enumerate() {
            let pos = j + 2;
            let want: Tensor<B, 2> = full.clone().narrow(1, pos, 1).reshape([1, vocab]);
            let diff = (step - want).abs().max().into_scalar();
            assert!(diff < 1e-4, "{name}: position {pos} differs by {diff}");
        }
        // Truncating the cache and re-running a suffix gives the same result again.
        cache.truncate(5);
        let again = model.forward_cached(ids_tensor::<B>(&tokens[5..7], &device), &mut cache);
        let want: Tensor<B, 2> = full.clone().narrow(1, 6, 1).reshape([1, vocab]);
        assert!((again - want).abs().max().into_scalar() < 1e-4);
    }
}

/// A batch of right-padded sequences gives each sequence the logits it gets alone.
#[test]
fn batched_forward_matches_single() {
    let device = Default::default();
    let (model, tok) = load("tiny-phi");
    let a = tok.encode("my cat sleeps all day").unwrap();
    let b = tok
        .encode("i teach math at a small school near the lake")
        .unwrap();
    let n = a.len().max(b.len());
    let pad = |v: &[u32]| {
        let mut v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
        v.resize(n, tok.eos_token_ids[0] as i64);
        v
    };
    let batch = Tensor::<B, 2, burn::tensor::Int>::from_data(
        TensorData::new([pad(&a), pad(&b)].concat(), [2, n]),
        &device,
    );
    let logits = model.forward(batch);
    for (row, seq) in [(0, &a), (1, &b)] {
        let single = model.forward(ids_tensor::<B>(seq, &device));
        let part = logits.clone().narrow(0, row, 1).narrow(1, 0, seq.len());
        let diff = (part - single).abs().max().into_scalar();
        assert!(diff < 1e-4, "row {row} differs by {diff}");
    }
}

/// `--quant nf4` matches HF run with bitsandbytes-dequantized weights (5e-3 per token), with
/// and without double quantization.
#[test]
fn nf4_nll_matches_hf_with_bitsandbytes_weights() {
    use phitune_model::phi::Quantization;
    let exp = common::expected();
    let device = Default::default();
    let dir = common::fixtures().join("tiny-phi");
    let ckpt = Checkpoint::open(&dir).unwrap();
    let tok = PhiTokenizer::from_dir(&dir, ckpt.config()).unwrap();
    for (key, double_quant) in [("double_quant", true), ("single", false)] {
        let model: Phi<B> =
            Phi::load_with(&ckpt, &device, Some(Quantization { double_quant })).unwrap();
        assert!(model.projections().iter().all(|p| p.2.base.is_quantized()));
        assert!(!model.lm_head.is_quantized(), "lm_head stays float");
        for case in exp["nf4"]["tiny-phi"][key].as_array().unwrap() {
            let tokens = tok.encode(case["text"].as_str().unwrap()).unwrap();
            let nll = model.token_nll(&tokens, &device);
            for (i, (g, w)) in nll.iter().zip(case["nll"].as_array().unwrap()).enumerate() {
                let w = w.as_f64().unwrap();
                assert!((*g as f64 - w).abs() < 5e-3, "{key} token {i}: {g} vs {w}");
            }
        }
    }
}
