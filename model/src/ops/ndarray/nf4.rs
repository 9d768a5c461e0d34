//! NF4 products on the CPU. The weight is processed in tiles of rows: a tile is dequantized into
//! a small buffer and multiplied with sgemm, so at most one tile of dense values exists at a
//! time; a few input rows (decoding) decode the codes on the fly instead.

use rayon::prelude::*;

use super::matmul::sgemm;
use crate::ops::{BLOCK, NF4_CODE};

/// Rows of W dequantized at a time.
const TILE_ROWS: usize = 256;
/// Up to this many input rows (decoding) take the matrix-vector path.
const GEMV_ROWS: usize = 4;

/// The packed code words, whatever the backend's int width (only the low 32 bits are used).
pub(super) enum Words<'a> {
    I32(&'a [i32]),
    I64(&'a [i64]),
}

impl Words<'_> {
    #[inline]
    fn get(&self, i: usize) -> u32 {
        match self {
            Words::I32(w) => w[i] as u32,
            Words::I64(w) => w[i] as u32,
        }
    }
}

/// Dequantizes rows `r0..r0 + rows` of an `[out, k]` NF4 weight into `buf` (row-major).
fn dequant_rows(words: &Words, absmax: &[f32], k: usize, r0: usize, buf: &mut [f32]) {
    buf.par_chunks_mut(k).enumerate().for_each(|(r, row)| {
        let base = (r0 + r) * k;
        for (j, v) in row.iter_mut().enumerate() {
            let i = base + j;
            let code = (words.get(i / 8) >> (4 * (i % 8))) & 0xF;
            *v = NF4_CODE[code as usize] * absmax[i / BLOCK];
        }
    });
}

/// The whole `[n, k]` weight, dense.
pub(super) fn dequantize(words: &Words, absmax: &[f32], [n, k]: [usize; 2]) -> Vec<f32> {
    let mut out = vec![0f32; n * k];
    dequant_rows(words, absmax, k, 0, &mut out);
    out
}

/// `x [m, k] @ dequant(W)^T -> [m, n]`.
pub(super) fn matmul(xs: &[f32], words: &Words, absmax: &[f32], [n, k]: [usize; 2]) -> Vec<f32> {
    let m = xs.len() / k;
    if m <= GEMV_ROWS && k % BLOCK == 0 {
        return gemv(xs, words, absmax, m, n, k);
    }
    let mut out = vec![0f32; m * n];
    let mut buf = vec![0f32; TILE_ROWS.min(n) * k];
    for r0 in (0..n).step_by(TILE_ROWS) {
        let rows = TILE_ROWS.min(n - r0);
        let tile = &mut buf[..rows * k];
        dequant_rows(words, absmax, k, r0, tile);
        // out[:, r0..r0+rows] = x @ tile^T; tile^T[kk, r] = tile[r * k + kk].
        sgemm(
            m,
            k,
            rows,
            xs,
            tile,
            1,
            k as isize,
            &mut out[r0..],
            n as isize,
            0.0,
        );
    }
    out
}

/// `dy [m, n] @ dequant(W) -> [m, k]`.
pub(super) fn matmul_t(dys: &[f32], words: &Words, absmax: &[f32], [n, k]: [usize; 2]) -> Vec<f32> {
    let m = dys.len() / n;
    let mut out = vec![0f32; m * k];
    let mut buf = vec![0f32; TILE_ROWS.min(n) * k];
    let mut dy_tile = vec![0f32; m * TILE_ROWS.min(n)];
    for r0 in (0..n).step_by(TILE_ROWS) {
        let rows = TILE_ROWS.min(n - r0);
        let tile = &mut buf[..rows * k];
        dequant_rows(words, absmax, k, r0, tile);
        // dy[:, r0..r0+rows] as a contiguous [m, rows] block.
        let dt = &mut dy_tile[..m * rows];
        for (i, row) in dt.chunks_mut(rows).enumerate() {
            row.copy_from_slice(&dys[i * n + r0..i * n + r0 + rows]);
        }
        sgemm(
            m, rows, k, dt, tile, k as isize, 1, &mut out, k as isize, 1.0,
        );
    }
    out
}

/// Two NF4 values per byte of a code word: `PAIRS[b] = [code(b & 0xF), code(b >> 4)]`, so a
/// 32-bit word (8 codes) decodes with 4 lookups into a 2 KiB table that stays in L1.
static PAIRS: [[f32; 2]; 256] = {
    let mut t = [[0f32; 2]; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = [NF4_CODE[b & 0xF], NF4_CODE[b >> 4]];
        b += 1;
    }
    t
};

/// The 8 values of a code word, lowest nibble first.
#[inline(always)]
fn decode8(word: u32) -> [f32; 8] {
    let mut v = [0f32; 8];
    for p in 0..4 {
        let [lo, hi] = PAIRS[((word >> (8 * p)) & 0xFF) as usize];
        v[2 * p] = lo;
        v[2 * p + 1] = hi;
    }
    v
}

/// A code word of either int width (the codes sit in the low 32 bits).
trait Word: Copy + Sync {
    fn low32(self) -> u32;
}
impl Word for i32 {
    #[inline(always)]
    fn low32(self) -> u32 {
        self as u32
    }
}
impl Word for i64 {
    #[inline(always)]
    fn low32(self) -> u32 {
        self as u32
    }
}

/// `x [m, k] @ dequant(W)^T` for a few rows, decoding the codes on the fly (nothing dense is
/// written; each weight is read once as 4 bits). Needs `k % 64 == 0` (blocks within rows).
fn gemv(xs: &[f32], words: &Words, absmax: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    match words {
        Words::I32(w) => gemv_words(xs, w, absmax, m, n, k),
        Words::I64(w) => gemv_words(xs, w, absmax, m, n, k),
    }
}

/// Rows of W per parallel task in [`gemv_words`].
const GEMV_TASK_ROWS: usize = 16;

/// Threads over rows of W. Within a 64-value block each input row keeps 8 independent partial
/// sums (one per code position, so the products vectorise and no add waits on the one before),
/// folded and scaled by the block's absmax once.
fn gemv_words<W: Word>(
    xs: &[f32],
    words: &[W],
    absmax: &[f32],
    m: usize,
    n: usize,
    k: usize,
) -> Vec<f32> {
    let (row_words, row_blocks) = (k / 8, k / BLOCK);
    let mut out_t = vec![0f32; n * m]; // [n, m]: rows of W in parallel
    out_t
        .par_chunks_mut(m * GEMV_TASK_ROWS)
        .enumerate()
        .for_each(|(c, chunk)| {
            for (r, o) in chunk.chunks_mut(m).enumerate() {
                let j = c * GEMV_TASK_ROWS + r;
                let w_row = &words[j * row_words..(j + 1) * row_words];
                let scales = &absmax[j * row_blocks..(j + 1) * row_blocks];
                for (b, (block, &scale)) in w_row.chunks_exact(BLOCK / 8).zip(scales).enumerate() {
                    let mut acc = [[0f32; 8]; GEMV_ROWS];
                    for (w, &word) in block.iter().enumerate() {
                        let v = decode8(word.low32());
                        let kk = b * BLOCK + w * 8;
                        for (i, a) in acc.iter_mut().enumerate().take(m) {
                            let x: &[f32; 8] = xs[i * k + kk..i * k + kk + 8].try_into().unwrap();
                            for ((a, x), v) in a.iter_mut().zip(x).zip(&v) {
                                *a += x * v;
                            }
                        }
                    }
                    for (o, a) in o.iter_mut().zip(&acc) {
                        let s = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
                        *o += s * scale;
                    }
                }
            }
        });
    // [n, m] -> [m, n]
    let mut out = vec![0f32; m * n];
    for (j, row) in out_t.chunks(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}
