//! The target-only head (the vocabulary projection and the cross-entropy over the positions
//! whose label counts, in chunks of rows) against the full-logits path: the same loss, token
//! accuracy and LoRA gradients, for the persona template (loss on the reply only) and the seed
//! template (every non-pad token).

mod common;

use burn::backend::{Autodiff, NdArray};
use phitune_data::Template;
use phitune_model::{Phi, PhiTokenizer};
use phitune_train::lm::{CausalLm, Head, LmBatch};

type A = Autodiff<NdArray<f32, i32>>;

fn model() -> (Phi<A>, PhiTokenizer) {
    common::tiny_with_adapter()
}

fn batch(tok: &PhiTokenizer, template: Template) -> LmBatch<A> {
    common::sample_batch(tok, template, 6, 160, &Default::default())
}

/// `(loss, correct, every LoRA gradient flattened)` of one objective.
fn run(lm: &CausalLm<A>, batch: &LmBatch<A>) -> (f64, usize, Vec<Vec<f32>>) {
    phitune_model::ops::start_dropout_stream(5);
    let (loss, stats) = lm.objective(batch);
    let grads = loss.backward();
    let lora = common::lora_grads(&lm.phi, &grads);
    (stats.loss(), stats.correct, lora)
}

#[test]
fn the_target_only_head_equals_the_full_logits() {
    let (phi, tok) = model();
    for template in [Template::Persona, Template::Seed] {
        let batch = batch(&tok, template);
        let [b, s] = batch.input_ids.dims();
        assert!(
            batch.targets > 40 && batch.targets < b * s,
            "{template}: {} targets",
            batch.targets
        );
        let full = run(
            &CausalLm::new(phi.clone(), 1.0, 1).with_head(Head::Full),
            &batch,
        );
        // 7 rows per chunk: many chunks, and a last one that is not full.
        let chunked = CausalLm::new(phi.clone(), 1.0, 1).with_head(Head::Targets { chunk: 7 });
        assert_ne!(batch.targets % 7, 0);
        let targets = run(&chunked, &batch);
        assert!(
            (full.0 - targets.0).abs() < 1e-5,
            "{template}: loss {} vs {}",
            full.0,
            targets.0
        );
        assert_eq!(full.1, targets.1, "{template}: correct predictions");
        assert!(full.1 > 0);
        assert_eq!(full.2.len(), targets.2.len());
        for (i, (g, h)) in full.2.iter().zip(&targets.2).enumerate() {
            let worst = g
                .iter()
                .zip(h)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let scale = g.iter().map(|a| a.abs()).fold(0f32, f32::max);
            assert!(scale > 0.0, "{template}: gradient {i} is zero");
            assert!(worst < 1e-5, "{template}: gradient {i} differs by {worst}");
        }
    }
}
