//! The NF4 format on the host, bit-compatible with bitsandbytes (`quantize_4bit(quant_type="nf4",
//! blocksize=64)`), with optional double quantization of the absmax values.
//!
//! bitsandbytes' layout: the `[out, in]` weight is flattened row-major and cut into blocks of
//! 64 values; each block stores `absmax = max |w|` and, per value, the index of the nearest
//! NF4 code to `w / absmax`; two codes per byte, the earlier element in the high nibble.

/// bitsandbytes' NF4 code table (index = 4-bit code).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

pub const BLOCK: usize = 64;
/// Block size of the second-level quantization of the absmax values.
pub const DQ_BLOCK: usize = 256;

/// Index of the NF4 code nearest to `x` (ties go to the lower index, like `argmin`).
pub fn nearest_nf4(x: f32) -> u8 {
    let mut best = 0usize;
    let mut best_d = f32::INFINITY;
    for (i, &c) in NF4_CODE.iter().enumerate() {
        let d = (x - c).abs();
        if d < best_d {
            best = i;
            best_d = d;
        }
    }
    best as u8
}

/// bitsandbytes' signed 8-bit "dynamic" code map used for double quantization
/// (`create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`), ascending.
pub fn dynamic_map() -> [f32; 256] {
    let max_exponent_bits = 7i32;
    let total_bits = 8i32;
    let non_sign_bits = total_bits - 1; // signed
    let additional_items = 2i32.pow((non_sign_bits - max_exponent_bits) as u32) - 1;
    let mut data: Vec<f64> = Vec::with_capacity(256);
    for i in 0..max_exponent_bits {
        let fraction_items = if i == max_exponent_bits - 1 {
            2i32.pow(additional_items as u32) + 1
        } else {
            2i32.pow((i + non_sign_bits - max_exponent_bits) as u32) + 1
        };
        // boundaries = linspace(0.1, 1, fraction_items); means = (b[:-1] + b[1:]) / 2
        let n = fraction_items as usize;
        let boundaries: Vec<f64> = (0..n)
            .map(|j| 0.1 + 0.9 * j as f64 / (n - 1) as f64)
            .collect();
        let scale = 10f64.powi(-(max_exponent_bits - 1) + i);
        for w in boundaries.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    if additional_items > 0 {
        let n = (additional_items + 1) as usize;
        let boundaries: Vec<f64> = (0..n)
            .map(|j| 0.1 + 0.9 * j as f64 / (n - 1) as f64)
            .collect();
        let scale = 10f64.powi(-(max_exponent_bits - 1) + max_exponent_bits - 1);
        for w in boundaries.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    // bitsandbytes pads to 256 entries with zeros, then sorts.
    while data.len() < 256 {
        data.push(0.0);
    }
    let mut v: Vec<f32> = data.into_iter().map(|x| x as f32).collect();
    v.sort_by(f32::total_cmp);
    v.try_into().expect("256 entries")
}

/// Absmax values, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    F32(Vec<f32>),
    /// `absmax[i] = code[codes[i]] * scales[i / 256] + offset`.
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
    /// `ceil(numel / 2)` bytes, element 2j in the high nibble of byte j.
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
        let blocks = w.len().div_ceil(BLOCK);
        let mut absmax = Vec::with_capacity(blocks);
        let mut packed = vec![0u8; w.len().div_ceil(2)];
        for (b, block) in w.chunks(BLOCK).enumerate() {
            let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
            absmax.push(am);
            for (j, &v) in block.iter().enumerate() {
                let x = if am > 0.0 { v / am } else { 0.0 };
                let code = nearest_nf4(x);
                let i = b * BLOCK + j;
                packed[i / 2] |= if i % 2 == 0 { code << 4 } else { code };
            }
        }
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
                let map = dynamic_map();
                codes
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| map[q as usize] * scales[i / DQ_BLOCK] + offset)
                    .collect()
            }
        }
    }

    /// The 4-bit code of element `i`.
    pub fn code(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i % 2 == 0 { byte >> 4 } else { byte & 0x0F }
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

/// Double quantization: subtract the mean, then 8-bit blockwise quantization (blocks of 256)
/// with the dynamic map.
fn quantize_absmax(absmax: &[f32]) -> Absmax {
    let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
    let map = dynamic_map();
    let mut codes = Vec::with_capacity(absmax.len());
    let mut scales = Vec::new();
    for block in absmax.chunks(DQ_BLOCK) {
        let centered: Vec<f32> = block.iter().map(|a| a - offset).collect();
        let s = centered.iter().fold(0f32, |m, v| m.max(v.abs()));
        scales.push(s);
        for &c in &centered {
            let x = if s > 0.0 { c / s } else { 0.0 };
            codes.push(nearest_in(&map, x));
        }
    }
    Absmax::Double {
        codes,
        scales,
        offset,
    }
}

/// Index of the entry of the ascending `map` nearest to `x` (ties to the lower index).
fn nearest_in(map: &[f32; 256], x: f32) -> u8 {
    let pos = map.partition_point(|&m| m < x);
    if pos == 0 {
        return 0;
    }
    if pos == map.len() {
        return 255;
    }
    let (lo, hi) = (map[pos - 1], map[pos]);
    if (x - lo).abs() <= (hi - x).abs() {
        (pos - 1) as u8
    } else {
        pos as u8
    }
}
