//! Padding-free packing: several examples in one row, each with its own positions (the rotary
//! embedding restarting at 0) and its own causal block, computes exactly what each example
//! computes alone: the same per-example losses and, summed, the same LoRA gradients, for the
//! persona template (loss on the reply only) and the seed template (every non-pad token).

mod common;

use burn::backend::{Autodiff, NdArray};
use burn::data::dataloader::batcher::Batcher;
use burn::tensor::Tensor;
use phitune_data::batch::{ExampleDataset, pack};
use phitune_data::load::load_path;
use phitune_data::prompt::Example;
use phitune_data::{LoadOptions, Template};
use phitune_model::{Phi, PhiTokenizer};
use phitune_train::lm::{CausalLm, Head, Item, LmBatch, LmBatcher};

type A = Autodiff<NdArray<f32, i32>>;

/// tiny-phi with a PEFT adapter whose A and B are both non-zero, and every dropout off (its
/// masks depend on where a token lies in the batch, which packing changes).
fn model() -> (Phi<A>, PhiTokenizer) {
    let (mut phi, tok) = common::tiny_with_adapter::<A>();
    phi.embed_dropout.prob = 0.0;
    for l in &mut phi.layers {
        l.resid_dropout.prob = 0.0;
        l.self_attn.attn_dropout.prob = 0.0;
    }
    (phi, tok)
}

fn examples(tok: &PhiTokenizer, template: Template) -> Vec<Example> {
    let sample = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/samples/persona_chat_sample.jsonl");
    let rows = load_path(&sample, LoadOptions::default()).unwrap().rows;
    ExampleDataset::build(&rows[..7], tok, template, 200)
        .unwrap()
        .examples
}

fn batch(tok: &PhiTokenizer, examples: &[Example], pack: Option<usize>) -> LmBatch<A> {
    let items = examples
        .iter()
        .enumerate()
        .map(|(i, e)| Item {
            position: i as u64,
            example: e.clone(),
        })
        .collect();
    LmBatcher {
        pad_id: tok.eos_token_ids[0],
        pack,
        pad_multiple: 1,
    }
    .batch(items, &Default::default())
}

/// Each row's `[start, end)` spans of its examples, from the batch's layout.
fn spans(batch: &LmBatch<A>) -> Vec<Vec<(usize, usize)>> {
    let [b, s] = batch.input_ids.dims();
    match &batch.packing {
        None => vec![vec![(0, s)]; b],
        Some(p) => p
            .rows()
            .iter()
            .map(|lens| {
                let mut start = 0;
                lens.iter()
                    .map(|n| {
                        start += n;
                        (start - n, start)
                    })
                    .collect()
            })
            .collect(),
    }
}

/// Each example's mean target nll (in the batch's row order, then span order), the batch's
/// mean loss, and the gradient of that mean for every LoRA weight.
fn run(phi: &Phi<A>, batch: &LmBatch<A>) -> (Vec<f64>, f64, Vec<Vec<f32>>) {
    let lm = CausalLm::new(phi.clone(), 1.0, 1).with_head(Head::Targets { chunk: 64 });
    let (loss, stats) = lm.objective(batch);
    let grads = loss.backward();
    let lora = phi
        .projections()
        .into_iter()
        .filter_map(|(_, _, p)| p.lora.as_ref().map(|l| (l.a.val(), l.b.val())))
        .flat_map(|(a, b)| [a, b])
        .map(|t| {
            t.grad(&grads)
                .unwrap()
                .into_data()
                .into_vec::<f32>()
                .unwrap()
        })
        .collect();

    // Per-target nll through the same head, assigned to the example each target lies in.
    let [b, s] = batch.input_ids.dims();
    let h = phi.final_hidden(batch.input_ids.clone(), batch.packing.as_ref());
    let d = h.dims()[2];
    let h: Tensor<A, 2> = h.reshape([b * s, d]).select(0, batch.target_rows.clone());
    let (nll, _) = phi.head_cross_entropy(h, batch.target_ids.clone(), 64);
    let nll = nll.into_data().convert::<f64>().into_vec::<f64>().unwrap();
    let rows = batch
        .target_rows
        .clone()
        .into_data()
        .into_vec::<i32>()
        .unwrap();
    let spans = spans(batch);
    let n = spans.iter().map(Vec::len).sum();
    let (mut per_example, mut counts) = (vec![0.0; n], vec![0usize; n]);
    for (&flat, v) in rows.iter().zip(&nll) {
        let (r, p) = (flat as usize / s, flat as usize % s);
        let before: usize = spans[..r].iter().map(Vec::len).sum();
        let e = spans[r].iter().position(|&(a, z)| a <= p && p < z).unwrap();
        // A target at an example's last position would predict the next example's first token.
        assert!(
            p + 1 < spans[r][e].1,
            "row {r}: target at {p} crosses into the next example"
        );
        per_example[before + e] += v;
        counts[before + e] += 1;
    }
    for (l, c) in per_example.iter_mut().zip(&counts) {
        assert!(*c > 0, "an example without targets");
        *l /= *c as f64;
    }
    (per_example, stats.loss(), lora)
}

#[test]
fn a_packed_row_computes_what_each_of_its_examples_computes_alone() {
    let (phi, tok) = model();
    for template in [Template::Persona, Template::Seed] {
        let ex = examples(&tok, template);
        assert!(ex.len() >= 5, "{template}: {} examples", ex.len());
        let capacity = 560;
        let layout = pack(&ex, tok.eos_token_ids[0], capacity);
        assert!(
            layout.rows.iter().any(|r| r.len() >= 3) && layout.rows.len() < ex.len(),
            "{template}: rows {:?} should hold several examples each",
            layout.rows
        );
        let packed = batch(&tok, &ex, Some(capacity));
        assert_eq!(packed.sequences, ex.len());
        assert_eq!(packed.tokens, ex.iter().map(|e| e.len).sum::<usize>());
        let (losses, loss, grads) = run(&phi, &packed);

        // Each example alone: its own nll, and the gradient of the mean over all examples'
        // targets as the sum of theirs.
        let total_targets = packed.targets as f32;
        let mut alone_targets = 0;
        let mut summed: Vec<Vec<f32>> = grads.iter().map(|g| vec![0.0; g.len()]).collect();
        for (i, &e) in layout.members.iter().flatten().enumerate() {
            let one = batch(&tok, std::slice::from_ref(&ex[e]), None);
            alone_targets += one.targets;
            let (alone, _, g) = run(&phi, &one);
            assert!(
                (alone[0] - losses[i]).abs() < 1e-5,
                "{template}: example {e}: loss {} alone, {} packed",
                alone[0],
                losses[i]
            );
            for (acc, g) in summed.iter_mut().zip(&g) {
                for (a, v) in acc.iter_mut().zip(g) {
                    *a += v * one.targets as f32 / total_targets;
                }
            }
        }
        assert_eq!(
            alone_targets, packed.targets,
            "{template}: the same targets"
        );
        // The batch's loss is the target-weighted mean of the examples' losses.
        let counts: Vec<usize> = layout
            .members
            .iter()
            .flatten()
            .map(|&e| batch(&tok, std::slice::from_ref(&ex[e]), None).targets)
            .collect();
        let weighted: f64 = losses
            .iter()
            .zip(&counts)
            .map(|(l, &c)| l * c as f64)
            .sum::<f64>()
            / packed.targets as f64;
        assert!(
            (weighted - loss).abs() < 1e-5,
            "{template}: {weighted} vs {loss}"
        );
        for (i, (g, h)) in summed.iter().zip(&grads).enumerate() {
            let worst = g
                .iter()
                .zip(h)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            let scale = g.iter().map(|a| a.abs()).fold(0f32, f32::max);
            assert!(scale > 0.0, "{template}: gradient {i} is zero");
            assert!(
                worst < 1e-5,
                "{template}: gradient {i} differs by {worst} (scale {scale})"
            );
        }

        // And the padded micro-batch of the same examples: the same loss and gradients.
        let padded = batch(&tok, &ex, None);
        let (_, padded_loss, padded_grads) = run(&phi, &padded);
        assert!(
            (padded_loss - loss).abs() < 1e-5,
            "{template}: loss {padded_loss} padded, {loss} packed"
        );
        for (g, h) in padded_grads.iter().zip(&grads) {
            let worst = g
                .iter()
                .zip(h)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(
                worst < 1e-5,
                "{template}: packed vs padded gradient differs by {worst}"
            );
        }
    }
}
