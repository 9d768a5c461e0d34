//! Hits@1 out of N, ConvAI2's ranking metric for Persona-Chat: for held-out row `i`, the
//! candidates are its own reference and the references of held-out rows `i+1 .. i+N-1` (wrapping
//! around, in the split's order), each scored by the model's mean per-token NLL of the reply
//! (the training template's response tokens and eos) after the row's prompt. A row is a hit when
//! its reference scores strictly best: a tie (a distractor with the same text, or the same
//! score) is a miss.
//!
//! The prompt runs once per row; its KV cache is repeated across a batch of candidates, which
//! run as one forward pass continuing it.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor, TensorData};
use phitune_data::Template;
use phitune_data::prompt::IGNORE;
use phitune_model::ops::Nf4Backend;
use phitune_model::{Phi, PhiTokenizer};
use serde_json::json;

use crate::eval::HeldOut;

/// Candidates run per forward pass.
const CANDIDATE_BATCH: usize = 10;

/// The held-out rows whose references are row `i`'s candidates: `i` first, then the next
/// `n - 1` rows, wrapping (`n` is capped at the number of rows).
pub fn candidate_rows(rows: usize, i: usize, n: usize) -> Vec<usize> {
    (0..n.min(rows)).map(|k| (i + k) % rows).collect()
}

/// The prompt of held-out row `i` as the model saw it in training.
pub fn prompt_ids(
    held: &HeldOut,
    i: usize,
    template: Template,
    tok: &PhiTokenizer,
) -> Result<Vec<u32>> {
    let ex = &held.examples[i];
    Ok(match template {
        // The prompt and the response are tokenized apart: the prompt is what precedes the
        // first target.
        Template::Persona => {
            let first = ex
                .labels
                .iter()
                .position(|&l| l != IGNORE)
                .unwrap_or(ex.len);
            ex.input_ids[..first].to_vec()
        }
        // Trained as one text: the prompt's own tokens.
        Template::Seed => {
            let row = &held.rows[i];
            tok.encode(&template.prompt_text(&row.persona_b, &row.dialogue))?
        }
    })
}

/// A candidate reply's tokens: the template's response text, then eos.
pub fn reply_ids(text: &str, template: Template, tok: &PhiTokenizer) -> Result<Vec<u32>> {
    let mut ids = tok.encode(&template.response_text(text))?;
    ids.push(tok.eos_token_ids[0]);
    Ok(ids)
}

/// The mean per-token NLL of each reply after `prompt`: the prompt runs once, the replies in
/// batches continuing its KV cache.
pub fn mean_nll<B: Nf4Backend>(
    phi: &Phi<B>,
    device: &B::Device,
    prompt: &[u32],
    replies: &[Vec<u32>],
) -> Vec<f64> {
    let mut cache = phi.new_cache();
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(
            prompt.iter().map(|&t| t as i64).collect(),
            [1, prompt.len()],
        ),
        device,
    );
    // The prompt's last position predicts each reply's first token.
    let first: Vec<f32> = log_softmax(phi.forward_cached(ids, &mut cache), 1)
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 log-probabilities");
    let mut out = Vec::with_capacity(replies.len());
    for chunk in replies.chunks(CANDIDATE_BATCH) {
        let k = chunk.len();
        // Each reply's tokens but its last as inputs (right-padded: padding comes after every
        // position that is read); position j predicts token j + 1.
        let width = chunk.iter().map(|r| r.len() - 1).max().unwrap_or(0);
        if width == 0 {
            out.extend(chunk.iter().map(|r| -first[r[0] as usize] as f64));
            continue;
        }
        let mut inputs = vec![0i64; k * width];
        let mut targets = vec![0i64; k * width];
        for (c, r) in chunk.iter().enumerate() {
            for j in 0..r.len() - 1 {
                inputs[c * width + j] = r[j] as i64;
                targets[c * width + j] = r[j + 1] as i64;
            }
        }
        let mut batch_cache = cache.repeat(k);
        let logits = phi.forward_cached_all(
            Tensor::from_data(TensorData::new(inputs, [k, width]), device),
            &mut batch_cache,
        );
        let picked: Vec<f32> = log_softmax(logits, 2)
            .gather(
                2,
                Tensor::<B, 2, Int>::from_data(TensorData::new(targets, [k, width]), device)
                    .unsqueeze_dim(2),
            )
            .into_data()
            .convert::<f32>()
            .into_vec()
            .expect("f32 log-probabilities");
        for (c, r) in chunk.iter().enumerate() {
            let mut nll = -(first[r[0] as usize] as f64);
            for j in 0..r.len() - 1 {
                nll -= picked[c * width + j] as f64;
            }
            out.push(nll / r.len() as f64);
        }
    }
    out
}

/// The reference's rank among the candidates (1 = best): one more than the number of
/// distractors that score better or equal (a tie is not a win).
pub fn reference_rank(nll: &[f64]) -> usize {
    1 + nll[1..].iter().filter(|&&d| d <= nll[0]).count()
}

/// Hits@1 of each model over `held` (N candidates per row), and `out` as JSON lines: per row
/// its prompt, each candidate (held-out row, text, mean NLL per model) and the reference's rank.
#[allow(clippy::too_many_arguments)]
pub fn hits_at_1<B: Nf4Backend>(
    models: &[(&str, &Phi<B>)],
    device: &B::Device,
    tok: &PhiTokenizer,
    held: &HeldOut,
    template: Template,
    n: usize,
    out: &Path,
    mut progress: impl FnMut(&str),
) -> Result<(usize, Vec<f64>)> {
    let rows = held.rows.len();
    let n = n.min(rows);
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?,
    );
    let replies: Vec<Vec<u32>> = held
        .rows
        .iter()
        .map(|r| reply_ids(&r.reference, template, tok))
        .collect::<Result<_>>()?;
    let mut hits = vec![0usize; models.len()];
    for i in 0..rows {
        let prompt = prompt_ids(held, i, template, tok)?;
        let cands = candidate_rows(rows, i, n);
        let texts: Vec<Vec<u32>> = cands.iter().map(|&j| replies[j].clone()).collect();
        let mut line = json!({
            "row": i,
            "conv_id": held.rows[i].conv_id,
            "prompt": tok.decode(&prompt)?,
            "candidates": cands.iter().map(|&j| json!({
                "row": j,
                "text": held.rows[j].reference,
            })).collect::<Vec<_>>(),
        });
        for (m, (name, phi)) in models.iter().enumerate() {
            let nll = mean_nll(phi, device, &prompt, &texts);
            let rank = reference_rank(&nll);
            hits[m] += usize::from(rank == 1);
            let key = |k: &str| {
                if m == 0 {
                    k.to_string()
                } else {
                    format!("{name}_{k}")
                }
            };
            for (c, v) in nll.iter().enumerate() {
                line["candidates"][c][key("mean_nll")] = json!(v);
            }
            line[key("reference_rank")] = json!(rank);
        }
        writeln!(file, "{line}").with_context(|| format!("writing {}", out.display()))?;
        if (i + 1) % 10 == 0 || i + 1 == rows {
            progress(&format!(
                "hits@1 of {n}: {}/{rows} rows, {:.4}",
                i + 1,
                hits[0] as f64 / (i + 1) as f64
            ));
        }
    }
    file.flush()
        .with_context(|| format!("writing {}", out.display()))?;
    Ok((n, hits.iter().map(|&h| h as f64 / rows as f64).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn candidates_wrap_in_the_splits_order() {
        assert_eq!(candidate_rows(5, 3, 4), [3, 4, 0, 1]);
        assert_eq!(
            candidate_rows(3, 1, 20),
            [1, 2, 0],
            "N is capped at the rows"
        );
    }

    #[test]
    fn a_tie_is_a_miss() {
        assert_eq!(reference_rank(&[1.0, 2.0, 3.0]), 1);
        assert_eq!(reference_rank(&[2.0, 1.0, 3.0]), 2);
        assert_eq!(reference_rank(&[1.0, 1.0, 3.0]), 2);
        assert_eq!(reference_rank(&[1.0]), 1);
    }
}
