//! The language-model head with its cross-entropy on the CPU, fused: per chunk of rows, the
//! logits `h W^T` go into one buffer (sgemm), one task per row adds the bias, takes the loss and,
//! for training, turns the row into its own gradient in place
//! ([`row_in_place`](super::cross_entropy::row_in_place)), and `dh = dlogits W` follows
//! (sgemm). One `[chunk, vocab]` buffer is the only logits memory, reused across chunks; no
//! other pass over it is made (no separate bias add, copy or gradient buffer).

use rayon::prelude::*;

use super::cross_entropy::row_in_place;
use super::math::vectorized;
use super::matmul::sgemm;

/// `(nll, lse, argmax)` per row, as [`forward`](super::cross_entropy::forward) gives them, and
/// `d nll_i / d h_i` (`[rows, hidden]`) when asked for.
pub(super) struct Head {
    pub rows: Vec<(f32, f32, usize)>,
    pub dh: Option<Vec<f32>>,
}

/// The head over `h [rows, hidden]` with the frozen `w [vocab, hidden]` and `bias [vocab]`,
/// `chunk` rows of logits at a time.
pub(super) fn head(
    h: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    targets: &[i64],
    chunk: usize,
    grad: bool,
) -> Head {
    let rows = targets.len();
    let hidden = h.len() / rows.max(1);
    let vocab = w.len() / hidden.max(1);
    assert!(h.len() == rows * hidden && w.len() == vocab * hidden);
    assert!(bias.is_none_or(|b| b.len() == vocab));
    let chunk = chunk.clamp(1, rows.max(1));
    let mut out = Head {
        rows: Vec::with_capacity(rows),
        dh: grad.then(|| vec![0f32; rows * hidden]),
    };
    if rows == 0 || hidden == 0 || vocab == 0 {
        out.rows.resize(rows, (0.0, f32::NAN, 0));
        return out;
    }
    let mut logits = vec![0f32; chunk * vocab];
    for start in (0..rows).step_by(chunk) {
        let len = chunk.min(rows - start);
        let buf = &mut logits[..len * vocab];
        let hs = &h[start * hidden..(start + len) * hidden];
        sgemm(
            len,
            hidden,
            vocab,
            hs,
            w,
            1,
            hidden as isize,
            buf,
            vocab as isize,
            0.0,
        );
        out.rows.par_extend(
            buf.par_chunks_mut(vocab)
                .zip(targets[start..start + len].par_iter())
                .map(|(row, &t)| vectorized(|| row_in_place(row, bias, t, grad))),
        );
        if let Some(dh) = &mut out.dh {
            let dh = &mut dh[start * hidden..(start + len) * hidden];
            sgemm(
                len,
                vocab,
                hidden,
                buf,
                w,
                hidden as isize,
                1,
                dh,
                hidden as isize,
                0.0,
            );
        }
    }
    out
}
