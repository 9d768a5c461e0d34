//! The NF4 format on the host, bit-compatible with bitsandbytes 0.50 (`quantize_4bit(
//! quant_type="nf4", blocksize=64)` with or without `compress_statistics`, i.e. double quant).
//!
//! Layout: the `[out, in]` weight is flattened row-major and cut into blocks of 64 values
//! (blocks run across rows); each block stores `absmax = max |w|` and, per value, a 4-bit
//! code; two codes per byte, the earlier element in the HIGH nibble. Double quantization
//! stores `absmax - mean(absmax)` as 8-bit codes of bitsandbytes' dynamic map, in groups of
//! 256 with one f32 scale per group.
//!
//! The arithmetic follows bitsandbytes' CPU path exactly (all f32, one rounding per operation),
//! as documented in `tests/fixtures/README.md` and checked bit for bit against it in tests.

use std::sync::OnceLock;

use rayon::prelude::*;

/// bitsandbytes' NF4 code table (index = 4-bit code), as f32 bit patterns.
const NF4_BITS: [u32; 16] = [
    0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
    0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000,
];

/// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`), ascending, as f32 bits.
const CODE8_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

pub const NF4_CODE: [f32; 16] = {
    let mut out = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = f32::from_bits(NF4_BITS[i]);
        i += 1;
    }
    out
};

/// The 8-bit map used for the double-quantized absmax values.
pub fn code8() -> [f32; 256] {
    CODE8_BITS.map(f32::from_bits)
}

pub const BLOCK: usize = 64;
/// Block size of the second-level quantization of the absmax values.
pub const DQ_BLOCK: usize = 256;
/// bitsandbytes' floor for the absmax of a partial last block.
const TINY: f32 = 1e-38;

/// The 4-bit code of a normalised value: the number of midpoints between neighbouring codes
/// strictly below it (a value exactly on a midpoint takes the lower code).
pub fn nf4_code_of(s: f32) -> u8 {
    let mut q = 0;
    for j in 0..15 {
        let mid = (NF4_CODE[j] + NF4_CODE[j + 1]) / 2.0;
        if mid < s {
            q += 1;
        }
    }
    q
}

/// Absmax values, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    F32(Vec<f32>),
    /// `absmax[i] = code8[codes[i]] * scales[i / 256] + offset` (two roundings).
    Double {
        codes: Vec<u8>,
        scales: Vec<f32>,
        offset: f32,
    },
}

/// An NF4-quantized `[out, in]` weight in bitsandbytes' byte layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Host {
    pub shape: [usize; 2],
    /// `ceil(numel / 2)` bytes, element 2j in the high nibble of byte j (an odd count is
    /// padded with code 7, a normalised 0).
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

impl Nf4Host {
    pub fn numel(&self) -> usize {
        self.shape[0] * self.shape[1]
    }

    /// Quantizes a row-major `[out, in]` weight.
    pub fn quantize(w: &[f32], shape: [usize; 2], double_quant: bool) -> Self {
        assert_eq!(w.len(), shape[0] * shape[1]);
        // Blocks are independent: 64 values -> 32 bytes (the last block may be shorter).
        let mut packed = vec![0x77u8; w.len().div_ceil(2)];
        let absmax: Vec<f32> = packed
            .par_chunks_mut(BLOCK / 2)
            .zip(w.par_chunks(BLOCK))
            .map(|(bytes, block)| {
                let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let full = block.len() == BLOCK;
                let (stored, r) = if full {
                    (m, 1.0 / m.max(TINY))
                } else {
                    (m.max(TINY), 0.0)
                };
                for (j, &x) in block.iter().enumerate() {
                    // Full blocks multiply by the reciprocal; the partial last block divides.
                    let s = if full { x * r } else { x / stored };
                    let q = nf4_code_of(s.clamp(-1.0, 1.0));
                    let byte = &mut bytes[j / 2];
                    *byte = if j % 2 == 0 {
                        (*byte & 0x0F) | (q << 4)
                    } else {
                        (*byte & 0xF0) | q
                    };
                }
                stored
            })
            .collect();
        let absmax = if double_quant {
            quantize_absmax(&absmax)
        } else {
            Absmax::F32(absmax)
        };
        Self {
            shape,
            packed,
            absmax,
        }
    }

    /// The absmax values as used for dequantization.
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::F32(v) => v.clone(),
            Absmax::Double {
                codes,
                scales,
                offset,
            } => {
                let map = code8();
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| {
                        let scaled = map[q as usize] * scales[i / DQ_BLOCK];
                        scaled + offset
                    })
                    .collect()
            }
        }
    }

    /// The 4-bit code of element `i`.
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0F
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let absmax = self.absmax_f32();
        (0..self.numel())
            .map(|i| NF4_CODE[self.code(i) as usize] * absmax[i / BLOCK])
            .collect()
    }

    /// The codes repacked for our kernels: 8 codes per 32-bit word, element i in bits
    /// `4 * (i % 8)` of word `i / 8` (low nibble first).
    pub fn device_words(&self) -> Vec<i32> {
        let n = self.numel();
        let mut words = vec![0u32; n.div_ceil(8)];
        for i in 0..n {
            words[i / 8] |= (self.code(i) as u32) << (4 * (i % 8));
        }
        words.into_iter().map(|w| w as i32).collect()
    }

    /// Bytes of device memory our layout takes (codes + f32 absmax).
    pub fn device_bytes(&self) -> usize {
        self.numel().div_ceil(8) * 4 + self.numel().div_ceil(BLOCK) * 4
    }
}

/// `LUT[i]` = the 8-bit code of the grid value `2 i / 65535 - 1` (bitsandbytes' CPU quantizer
/// snaps normalised values to this 65536-point grid, then looks the code up).
fn lut8() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let map = code8();
        let mids: Vec<f32> = map.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        (0..65536u32)
            .map(|i| {
                let v = (2.0f32 * i as f32) / 65535.0 - 1.0;
                mids.partition_point(|&m| m < v) as u8
            })
            .collect()
    })
}

/// Double quantization of the absmax values, as bitsandbytes' CPU path computes it.
fn quantize_absmax(absmax: &[f32]) -> Absmax {
    let offset = torch_sum_f32(absmax) / absmax.len() as f32;
    let lut = lut8();
    let mut codes = Vec::with_capacity(absmax.len());
    let mut scales = Vec::new();
    for group in absmax.chunks(DQ_BLOCK) {
        let centred: Vec<f32> = group.iter().map(|a| a - offset).collect();
        let scale = centred.iter().fold(0f32, |m, v| m.max(v.abs()));
        scales.push(scale);
        if scale == 0.0 {
            codes.extend(std::iter::repeat_n(0u8, group.len()));
            continue;
        }
        let r = 1.0 / scale;
        for c in centred {
            let v = (c * r).clamp(-1.0, 1.0);
            let t = (v + 1.0) * 0.5;
            let idx = t.mul_add(65535.0, 0.5).trunc() as usize;
            codes.push(lut[idx.min(65535)]);
        }
    }
    Absmax::Double {
        codes,
        scales,
        offset,
    }
}

/// The f32 sum of a contiguous vector in exactly the order of PyTorch's CPU `cascade_sum`
/// (8 lanes, 4 rows per lane group, multi-level accumulators), so that the double-quant offset
/// `mean(absmax)` rounds exactly as it does in bitsandbytes.
pub fn torch_sum_f32(x: &[f32]) -> f32 {
    const L: usize = 8;
    if x.len() < L {
        return row_sum(x.iter().map(|&v| [v]).collect::<Vec<_>>().as_slice())[0];
    }
    let nv = x.len() / L;
    let lanes: Vec<[f32; L]> = x[..nv * L]
        .chunks_exact(L)
        .map(|c| c.try_into().unwrap())
        .collect();
    let v = row_sum(&lanes);
    let mut total = 0f32;
    for &t in &x[nv * L..] {
        total += t;
    }
    for l in v {
        total += l;
    }
    total
}

/// `row_sum` over items that are vectors of `W` lanes (lane-wise).
fn row_sum<const W: usize>(items: &[[f32; W]]) -> [f32; W] {
    let s4 = items.len() / 4;
    let mut p = multi_row_sum(&items[..s4 * 4]);
    for it in &items[s4 * 4..] {
        for k in 0..W {
            p[0][k] += it[k];
        }
    }
    let mut out = p[0];
    for q in &p[1..] {
        for k in 0..W {
            out[k] += q[k];
        }
    }
    out
}

/// `items` viewed as rows of 4 items; returns the 4 partial sums (each lane-wise).
// The lane and level indices mirror torch's reduction layout, kept explicit on purpose.
#[allow(clippy::needless_range_loop)]
fn multi_row_sum<const W: usize>(items: &[[f32; W]]) -> [[f32; W]; 4] {
    let size = items.len() / 4;
    let ceil_log2 = |x: usize| {
        if x <= 2 {
            1
        } else {
            (usize::BITS - (x - 1).leading_zeros()) as usize
        }
    };
    let p = 4.max(ceil_log2(size) / 4);
    let step = 1usize << p;
    let mask = step - 1;
    let mut acc = [[[0f32; W]; 4]; 4]; // [level][row slot][lane]
    let row = |i: usize| &items[i * 4..i * 4 + 4];
    let mut i = 0;
    while i + step <= size {
        for _ in 0..step {
            for (k, it) in row(i).iter().enumerate() {
                for l in 0..W {
                    acc[0][k][l] += it[l];
                }
            }
            i += 1;
        }
        for lvl in 1..4 {
            for k in 0..4 {
                for l in 0..W {
                    acc[lvl][k][l] += acc[lvl - 1][k][l];
                    acc[lvl - 1][k][l] = 0.0;
                }
            }
            if i & (mask << (lvl * p)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for (k, it) in row(i).iter().enumerate() {
            for l in 0..W {
                acc[0][k][l] += it[l];
            }
        }
        i += 1;
    }
    for lvl in 1..4 {
        for k in 0..4 {
            for l in 0..W {
                acc[0][k][l] += acc[lvl][k][l];
            }
        }
    }
    acc[0]
}
