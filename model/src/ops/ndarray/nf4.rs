//! NF4 products on the CPU. The weight is processed in tiles of rows: a tile is dequantized into
//! a small buffer and multiplied with sgemm, so at most one tile of dense values exists at a
//! time; a few input rows (decoding) decode the codes on the fly instead.

use rayon::prelude::*;

use super::matmul::sgemm;
use super::simd;
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

/// Dequantizes rows `r0..r0 + rows` of an `[out, k]` NF4 weight into `buf` (row-major): whole
/// blocks per row through the vector kernels where the CPU has them, else one value at a time.
fn dequant_rows(words: &Words, absmax: &[f32], k: usize, r0: usize, buf: &mut [f32]) {
    if let (Words::I32(w), true) = (words, k.is_multiple_of(BLOCK)) {
        let (row_words, row_blocks) = (k / 8, k / BLOCK);
        let done = buf.par_chunks_mut(k).enumerate().all(|(r, row)| {
            let j = r0 + r;
            simd::nf4_dequant(
                &w[j * row_words..(j + 1) * row_words],
                &absmax[j * row_blocks..(j + 1) * row_blocks],
                row,
            )
        });
        if done {
            return;
        }
    }
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
/// With AVX2 or AVX-512, the vector kernels of [`simd::nf4_rows`]; otherwise [`gemv_words`].
fn gemv(xs: &[f32], words: &Words, absmax: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    let Some(group) = simd::nf4_group() else {
        return match words {
            Words::I32(w) => gemv_words(xs, w, absmax, m, n, k),
            Words::I64(w) => gemv_words(xs, w, absmax, m, n, k),
        };
    };
    let narrowed: Vec<i32>;
    let words = match words {
        Words::I32(w) => *w,
        Words::I64(w) => {
            narrowed = w.iter().map(|&v| v as i32).collect();
            &narrowed
        }
    };
    let xs = simd::nf4_deinterleave(xs, group);
    let (row_words, row_blocks) = (k / 8, k / BLOCK);
    let mut out_t = vec![0f32; n * m]; // [n, m]: rows of W in parallel
    out_t
        .par_chunks_mut(m * GEMV_TASK_ROWS)
        .enumerate()
        .for_each(|(c, chunk)| {
            let (r0, rows) = (c * GEMV_TASK_ROWS, chunk.len() / m);
            let done = simd::nf4_rows(
                &xs,
                m,
                &words[r0 * row_words..(r0 + rows) * row_words],
                &absmax[r0 * row_blocks..(r0 + rows) * row_blocks],
                k,
                chunk,
            );
            debug_assert!(done);
        });
    transpose(&out_t, m, n)
}

/// `[n, m]` -> `[m, n]`.
fn transpose(t: &[f32], m: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for (j, row) in t.chunks(m).enumerate() {
        for (i, &v) in row.iter().enumerate() {
            out[i * n + j] = v;
        }
    }
    out
}

/// Rows of W per parallel task in [`gemv_words`].
const GEMV_TASK_ROWS: usize = 16;

/// The portable path. Threads over rows of W. Within a 64-value block each input row keeps 8 independent partial
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
    transpose(&out_t, m, n)
}
