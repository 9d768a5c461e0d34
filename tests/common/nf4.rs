//! Shared checks of the frozen-weight ops, run on several backends.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, ElementConversion, Int, Tensor, TensorData, backend::Backend};
use phitune_model::ops::{self, Nf4Backend, Nf4Host};

pub fn host_weight(out: usize, inp: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e3779b97f4a7c15) | 1;
    (0..out * inp)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * 0.1
        })
        .collect()
}

pub fn upload<BB: Backend>(
    q: &Nf4Host,
    device: &BB::Device,
) -> (Tensor<BB, 1, Int>, Tensor<BB, 1>) {
    let w = q.device_words();
    let n = w.len();
    let a = q.absmax_f32();
    let m = a.len();
    (
        Tensor::from_data(TensorData::new(w, [n]), device),
        Tensor::from_data(TensorData::new(a, [m]), device),
    )
}

pub fn max_diff<BB: Backend, const D: usize>(a: Tensor<BB, D>, b: Tensor<BB, D>) -> f32 {
    (a - b).abs().max().into_scalar().elem()
}

/// Forward and input gradient of the fused op equal dequantize + dense matmul.
pub fn check_fused<AD: AutodiffBackend + Nf4Backend>(
    device: &AD::Device,
    shapes: &[(usize, usize, usize)],
) {
    for &(m, out, inp) in shapes {
        let w = host_weight(out, inp, (m * out + inp) as u64);
        let q = Nf4Host::quantize(&w, [out, inp], true);
        let dense = Tensor::<AD, 2>::from_data(TensorData::new(q.dequantize(), [out, inp]), device);
        let (packed, absmax) = upload::<AD>(&q, device);

        // dequantize op
        let deq = ops::nf4_dequantize(packed.clone(), absmax.clone(), [out, inp]);
        assert!(
            max_diff(deq, dense.clone()) == 0.0,
            "dequantize differs for {out}x{inp}"
        );

        let x = Tensor::<AD, 3>::random([1, m, inp], Distribution::Normal(0.0, 1.0), device)
            .require_grad();
        let r = Tensor::<AD, 3>::random([1, m, out], Distribution::Normal(0.0, 1.0), device);
        let y = ops::nf4_linear(x.clone(), packed, absmax, [out, inp]);
        let y_ref = x.clone().matmul(dense.clone().transpose().unsqueeze());
        let tol = 1e-4 * (inp as f32).sqrt();
        assert!(
            max_diff(y.clone(), y_ref.clone()) < tol,
            "forward {m}x{out}x{inp}"
        );
        let gx = x.grad(&(y * r.clone()).sum().backward()).unwrap();
        let x2 = x.detach().require_grad();
        let gx_ref = x2
            .grad(
                &(x2.clone().matmul(dense.transpose().unsqueeze()) * r)
                    .sum()
                    .backward(),
            )
            .unwrap();
        assert!(
            max_diff(gx, gx_ref) < 1e-4 * (out as f32).sqrt(),
            "backward {m}x{out}x{inp}"
        );
    }
}
