//! The tensor encodings (ggml types F32, F16, BF16, Q8_0, Q4_0): sizes, ids, and encoders and
//! decoders bit-identical to `gguf.quants` of llama.cpp's Python package.

use std::fmt;

use half::f16;

use crate::error::{Error, Result};

/// The tensor encodings this module writes, with their ggml type ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    /// Blocks of 32 values -> 34 bytes: f16 scale `d`, then 32 `i8`; value = q * d.
    Q8_0,
    /// Blocks of 32 values -> 18 bytes: f16 scale `d`, then 16 bytes; byte j holds value j in
    /// its low nibble and value j + 16 in its high nibble; value = (nibble - 8) * d.
    Q4_0,
}

impl GgmlType {
    pub const ALL: [GgmlType; 5] = [Self::F32, Self::F16, Self::BF16, Self::Q8_0, Self::Q4_0];

    /// The type id in ggml's `enum ggml_type` (what a tensor info stores).
    pub const fn id(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q4_0 => 2,
            Self::Q8_0 => 8,
            Self::BF16 => 30,
        }
    }

    /// The type with ggml type id `id`, if it is one of the types this module encodes.
    pub fn from_id(id: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.id() == id)
    }

    /// The lowercase name used on the command line (`f32`, `f16`, `bf16`, `q8_0`, `q4_0`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
        }
    }

    /// Values per block (1 for the float types).
    pub const fn block_size(self) -> usize {
        match self {
            Self::F32 | Self::F16 | Self::BF16 => 1,
            Self::Q8_0 | Self::Q4_0 => 32,
        }
    }

    /// Bytes per block.
    pub const fn type_size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
        }
    }

    /// Parses a name as [`GgmlType::name`] gives it (case-insensitive).
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown GGUF tensor type {name:?}; expected one of f32, f16, bf16, q8_0, q4_0"
                ))
            })
    }

    /// The encoded size of `n` values; an error unless `n` is a whole number of blocks.
    pub fn n_bytes(self, n: usize) -> Result<usize> {
        let block = self.block_size();
        if !n.is_multiple_of(block) {
            return Err(Error::Invalid(format!(
                "{self} encodes blocks of {block} values; a length of {n} is not a multiple of {block}"
            )));
        }
        (n / block)
            .checked_mul(self.type_size())
            .ok_or_else(|| Error::Invalid(format!("{n} {self} values overflow the address space")))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::BF16 => "BF16",
            Self::Q8_0 => "Q8_0",
            Self::Q4_0 => "Q4_0",
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding and decoding
//
// gguf-py computes on float32 numpy arrays; under numpy 2's promotion rules (NEP 50) a Python
// scalar operand such as `/ 127` or `/ -8` stays float32, so every intermediate below is one IEEE
// float32 operation, rounded to nearest even, as Rust's f32 arithmetic is (Rust never fuses a
// multiply and an add into an FMA, and does not flush subnormals to zero).
// ---------------------------------------------------------------------------------------------

/// Encodes `values` as `ty`: the tensor's bytes in the file (little-endian), bit-identical to
/// `gguf.quants.quantize(np.asarray(values, np.float32), ty).tobytes()`.
///
/// Q8_0 and Q4_0 need a whole number of 32-value blocks and finite values (the reference's
/// output for inf/NaN is undefined). Their f16 scale overflows to infinity, exactly as in the
/// reference, for blocks with |x| above 65504 * 127 (Q8_0) or 65504 * 8 (Q4_0); check such
/// tensors with [`dequantize`] when that can happen.
pub fn quantize(values: &[f32], ty: GgmlType) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(ty.n_bytes(values.len())?);
    match ty {
        GgmlType::F32 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        // numpy's `astype(float16)`: round to nearest even, subnormals kept, overflow to inf.
        GgmlType::F16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&f16::from_f32(*v).to_le_bytes())),
        GgmlType::BF16 => values
            .iter()
            .for_each(|v| out.extend_from_slice(&bf16_bits(*v).to_le_bytes())),
        GgmlType::Q8_0 | GgmlType::Q4_0 => {
            if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                return Err(Error::Invalid(format!(
                    "{ty} cannot encode the non-finite value {} at index {i}",
                    values[i]
                )));
            }
            let block = if ty == GgmlType::Q8_0 {
                q8_0_block
            } else {
                q4_0_block
            };
            values.chunks_exact(32).for_each(|b| block(b, &mut out));
        }
    }
    Ok(out)
}

/// Decodes `n` values of type `ty` (the inverse of [`quantize`] up to its rounding), computed as
/// gguf-py's `dequantize` does.
pub fn dequantize(bytes: &[u8], ty: GgmlType, n: usize) -> Result<Vec<f32>> {
    let expected = ty.n_bytes(n)?;
    if bytes.len() != expected {
        return Err(Error::Invalid(format!(
            "{n} {ty} values take {expected} bytes, got {}",
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)),
        ),
        GgmlType::Q8_0 => {
            for b in bytes.chunks_exact(34) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                out.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d));
            }
        }
        GgmlType::Q4_0 => {
            for b in bytes.chunks_exact(18) {
                let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
                let qs = &b[2..];
                let lo = qs.iter().map(|q| q & 0x0f);
                let hi = qs.iter().map(|q| q >> 4);
                out.extend(lo.chain(hi).map(|q| f32::from(q as i8 - 8) * d));
            }
        }
    }
    Ok(out)
}

/// f32 -> bf16 bits as gguf-py (and ggml's `ggml_compute_fp32_to_bf16`) do it: a NaN keeps its
/// sign and top 7 mantissa bits with the quiet bit set; everything else rounds to nearest even
/// (so values past bf16's largest finite number round to infinity).
fn bf16_bits(v: f32) -> u16 {
    let mut n = v.to_bits();
    if n & 0x7fff_ffff > 0x7f80_0000 {
        n = (n & 0xffff_0000) | 0x0040_0000;
    }
    let round = 0x7fff + u64::from((n >> 16) & 1);
    ((u64::from(n) + round) >> 16) as u16
}

/// One Q8_0 block: `d = max|x| / 127`, `q = round(x * (1/d))` rounding halves away from zero
/// (gguf-py's `np_roundf`, C's `roundf`: NOT numpy's half-to-even `np.round`), `d` stored as f16.
/// The quotients use the f32 `d`, not its f16 rounding.
fn q8_0_block(x: &[f32], out: &mut Vec<u8>) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    for &v in x {
        let p = v * id;
        // |p| <= 127 (+ a few ulps), so the cast is exact. p is not finite only when 1/d
        // overflowed (max|x| < ~3.7e-37, whose f16 scale is 0 anyway): undefined in the
        // reference; numpy on x86-64 gives 0, and so do we.
        let q = if p.is_finite() { p.round() as i8 } else { 0 };
        out.push(q as u8);
    }
}

/// One Q4_0 block: `m` = the value of largest magnitude WITH its sign (the first one on a tie),
/// `d = m / -8`, `q = min(15, trunc(x * (1/d) + 8.5))`, `d` stored as f16. So `m` itself encodes
/// as 0 (-8 * d = m) and the other sign reaches at most +7 * d.
/// The sum `x * id + 8.5` is rounded to f32 before the truncation, which matters: a product just
/// below k + 0.5 can round up to the next integer.
fn q4_0_block(x: &[f32], out: &mut Vec<u8>) {
    let m = x[1..]
        .iter()
        .fold(x[0], |m, &v| if v.abs() > m.abs() { v } else { m });
    let d = m / -8.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    // The sign of zero carries over: a block of +0.0 stores d = -0.0 (f16 0x8000), as gguf-py.
    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
    let q = |v: f32| -> u8 {
        let t = (v * id + 8.5).trunc();
        // t is in [0, 16]; it is not finite only when 1/d overflowed (undefined in the
        // reference; numpy on x86-64 gives 0, and so do we).
        if t.is_finite() { (t as u8).min(15) } else { 0 }
    };
    for j in 0..16 {
        out.push(q(x[j]) | (q(x[j + 16]) << 4));
    }
}

/// The names of ggml's other tensor types, for error messages (ggml.h's `enum ggml_type`).
pub(super) fn ggml_type_name(id: u32) -> Option<&'static str> {
    Some(match id {
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::test_util::*;
    /// A fixture case: name, inputs, [(type, expected bytes)].
    type Case = (String, Vec<f32>, Vec<(GgmlType, Vec<u8>)>);

    fn cases() -> Vec<Case> {
        let doc = fixture_json();
        let cases = doc["cases"].as_array().unwrap();
        assert!(cases.len() >= 10);
        cases
            .iter()
            .map(|c| {
                let name = c["name"].as_str().unwrap().to_owned();
                let x = f32s(c["input_f32_le"].as_str().unwrap());
                assert_eq!(x.len() as u64, c["n"].as_u64().unwrap(), "{name}");
                let expected = c["expected"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(t, hex)| {
                        (
                            GgmlType::from_name(t).unwrap(),
                            unhex(hex.as_str().unwrap()),
                        )
                    })
                    .collect();
                (name, x, expected)
            })
            .collect()
    }

    #[test]
    fn gguf_type_table() {
        let table = [
            (GgmlType::F32, 0, 1, 4),
            (GgmlType::F16, 1, 1, 2),
            (GgmlType::Q4_0, 2, 32, 18),
            (GgmlType::Q8_0, 8, 32, 34),
            (GgmlType::BF16, 30, 1, 2),
        ];
        for (ty, id, block, size) in table {
            assert_eq!(
                (ty.id(), ty.block_size(), ty.type_size()),
                (id, block, size),
                "{ty}"
            );
            assert_eq!(GgmlType::from_name(ty.name()).unwrap(), ty);
            assert_eq!(GgmlType::from_name(&ty.to_string()).unwrap(), ty);
        }
        let err = GgmlType::from_name("q5_k").unwrap_err().to_string();
        assert!(err.contains("q5_k") && err.contains("q8_0"), "{err}");
        assert_eq!(GgmlType::Q8_0.n_bytes(64).unwrap(), 68);
        assert_eq!(GgmlType::Q4_0.n_bytes(64).unwrap(), 36);
        assert_eq!(GgmlType::BF16.n_bytes(3).unwrap(), 6);
    }

    #[test]
    fn gguf_quantize_matches_gguf_py_fixture() {
        let mut checked = 0;
        for (case, x, expected) in cases() {
            for (ty, want) in expected {
                let got = quantize(&x, ty).unwrap();
                if let Some(i) = first_difference(&got, &want) {
                    let block = i / ty.type_size();
                    panic!(
                        "case {case}, {ty}: first differing byte {i} (block {block}): ours {:?}, \
                         gguf-py {:?}; ({} vs {} bytes)",
                        got.get(i),
                        want.get(i),
                        got.len(),
                        want.len()
                    );
                }
                checked += 1;
            }
        }
        // 10 cases x 4 types + the bf16-only case.
        assert_eq!(checked, 41);
    }

    /// dequantize(quantize(x)) stays within each format's own rounding bound:
    /// - F16: half an ulp of f16: |err| <= |x| * 2^-11 for normal results, <= 2^-25 in the
    ///   subnormal range; |x| >= 65520 becomes an infinity of the same sign.
    /// - BF16: |err| <= |x| * 2^-8 (normal), <= 2^-134 (subnormal), or infinity past bf16's max.
    /// - Q8_0, per block with `d = max|x| / 127` and `d16` its f16 rounding:
    ///   |err| <= d/2 (rounding x/d to an integer), plus 127 * |d - d16| (the stored scale's
    ///   error), plus max|x| * 2^-20 (the f32 rounding of 1/d and x * (1/d)). Blocks whose
    ///   scale overflows f16 (max|x| > 65504 * 127) are skipped: their decoding is inf / NaN.
    /// - Q4_0, per block with `m` the signed largest value, `d = m / -8`: the codes reach -8 d
    ///   (i.e. m) but only +7 d on the other side, so |err| <= |d|/2 for a value with m's sign or
    ///   |x| <= 7.5 |d|, and <= |d| for a value of the other sign beyond 7.5 |d| (clipped to
    ///   7 d; x = -m gives exactly |d|); plus 8 * |d - d16| and |m| * 2^-20 as above.
    #[test]
    fn gguf_dequantize_within_bounds() {
        let mut inputs: Vec<(String, Vec<f32>)> = cases()
            .into_iter()
            .filter(|(_, x, _)| x.iter().all(|v| v.is_finite()))
            .map(|(name, x, _)| (name, x))
            .collect();
        inputs.push(("signal".into(), signal(32 * 44, 7)));
        let half_f16_ulp = |x: f32| {
            if x.abs() >= 2f32.powi(-14) {
                x.abs() * 2f32.powi(-11)
            } else {
                2f32.powi(-25)
            }
        };
        for (case, x) in &inputs {
            let n = x.len();
            let y = dequantize(&quantize(x, GgmlType::F32).unwrap(), GgmlType::F32, n).unwrap();
            assert_eq!(&y, x, "{case}: F32");

            let y = dequantize(&quantize(x, GgmlType::F16).unwrap(), GgmlType::F16, n).unwrap();
            for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
                if a.abs() >= 65520.0 {
                    assert!(
                        b.is_infinite() && b.signum() == a.signum(),
                        "{case} F16 [{i}]"
                    );
                } else {
                    assert!(
                        (a - b).abs() <= half_f16_ulp(a),
                        "{case} F16 [{i}]: {a} -> {b}"
                    );
                }
            }

            let y = dequantize(&quantize(x, GgmlType::BF16).unwrap(), GgmlType::BF16, n).unwrap();
            for (i, (&a, &b)) in x.iter().zip(&y).enumerate() {
                let bound = if a.abs() >= f32::MIN_POSITIVE {
                    a.abs() * 2f32.powi(-8)
                } else {
                    2f32.powi(-134)
                };
                let overflow = b.is_infinite() && a.abs() > 3.38e38 && b.signum() == a.signum();
                assert!(
                    overflow || (a - b).abs() <= bound,
                    "{case} BF16 [{i}]: {a} -> {b}"
                );
            }

            let y = dequantize(&quantize(x, GgmlType::Q8_0).unwrap(), GgmlType::Q8_0, n).unwrap();
            for (k, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let d16 = f16::from_f32(d).to_f32();
                if d16.is_infinite() {
                    assert!(d > 65504.0, "{case} Q8_0 block {k}");
                    continue;
                }
                let bound = d / 2.0 + 127.0 * (d - d16).abs() + amax * 2f32.powi(-20);
                for (i, (&a, &b)) in xb.iter().zip(yb).enumerate() {
                    let err = (a - b).abs();
                    assert!(
                        err <= bound,
                        "{case} Q8_0 block {k} [{i}]: {a} -> {b}, bound {bound}"
                    );
                }
            }

            let y = dequantize(&quantize(x, GgmlType::Q4_0).unwrap(), GgmlType::Q4_0, n).unwrap();
            for (k, (xb, yb)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let m = xb[1..]
                    .iter()
                    .fold(xb[0], |m, &v| if v.abs() > m.abs() { v } else { m });
                let d = (m / -8.0).abs();
                let d16 = f16::from_f32(m / -8.0).to_f32().abs();
                if d16.is_infinite() {
                    assert!(d > 65504.0, "{case} Q4_0 block {k}");
                    continue;
                }
                let extra = 8.0 * (d - d16).abs() + m.abs() * 2f32.powi(-20);
                for (i, (&a, &b)) in xb.iter().zip(yb).enumerate() {
                    let clipped = a.signum() != m.signum() && a.abs() > 7.5 * d;
                    let bound = if clipped { d } else { d / 2.0 } + extra;
                    let err = (a - b).abs();
                    assert!(
                        err <= bound,
                        "{case} Q4_0 block {k} [{i}]: {a} -> {b}, bound {bound}"
                    );
                }
            }
        }
    }
}
