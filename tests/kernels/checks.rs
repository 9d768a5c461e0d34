//! The kernel checks shared by `wgpu_kernels.rs` (Vulkan, lavapipe in CI) and
//! `cuda_kernels.rs` (NVIDIA, built here and run where a GPU is: `benches/gpu.sh`): every
//! CubeCL kernel of the backend extension, and the Burn ops the model leans on, against the
//! dense computation or the CPU backend. The including file defines `W` (the device backend,
//! f32) and `H` (the same in f16).

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Int, Tensor, TensorData};
use phitune_model::ops::{self, Nf4Host};

use super::{H, W, common};

type AW = Autodiff<W>;
type C = NdArray<f32, i32>;
type AC = Autodiff<C>;

fn host(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    common::nf4::host_weight(1, n, seed)
        .into_iter()
        .map(|v| v * 10.0 * scale)
        .collect()
}

fn values<BB: Backend, const D: usize>(t: Tensor<BB, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

fn assert_close(a: &[f32], b: &[f32], tol: f32, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst <= tol, "{what}: max |difference| {worst} > {tol}");
}

/// Both NF4 paths (the decode GEMV below `NF4_GEMV_MAX_ROWS` rows, dequantize + matmul at or
/// above it), forward and input gradient, against dequantize + dense matmul: `m` = 1, 3 and
/// 300, widths that are not multiples of 64 (blocks straddle rows) or of 8 (words straddle
/// rows), and feature counts that are not multiples of the GEMV's 8 per cube.
#[test]
fn nf4_gemv_and_dequantize_matmul_match_dense() {
    let limit = ops::nf4_gemv_max_rows();
    assert!(3 < limit && 300 >= limit, "both paths are exercised");
    common::nf4::check_fused::<AW>(
        &Default::default(),
        &[
            (1, 300, 128),
            (3, 70, 96),
            (1, 13, 37),
            (300, 40, 200),
            (300, 33, 37),
        ],
    );
}

/// f16 where the device has it (lavapipe: when the CPU has F16C): both NF4 paths in
/// half precision against the f32 dense computation on the CPU.
#[test]
fn nf4_in_f16_where_the_driver_has_it() {
    let device = Default::default();
    if !<H as Backend>::supports_dtype(&device, DType::F16) {
        eprintln!("skipped: this device has no f16");
        return;
    }
    for (m, out, inp) in [(1usize, 70usize, 128usize), (3, 33, 96), (64, 40, 200)] {
        let w = common::nf4::host_weight(out, inp, 5);
        let q = Nf4Host::quantize(&w, [out, inp], true);
        let x = host(m * inp, 9, 1.0);
        let dense = Tensor::<C, 2>::from_data(
            TensorData::new(q.dequantize(), [out, inp]),
            &Default::default(),
        );
        let want = values(
            Tensor::<C, 2>::from_data(TensorData::new(x.clone(), [m, inp]), &Default::default())
                .matmul(dense.transpose()),
        );
        let (packed, absmax) = common::nf4::upload::<H>(&q, &device);
        let xh = Tensor::<H, 2>::from_data(TensorData::new(x, [m, inp]), &device);
        let got = values(ops::nf4_linear(xh, packed, absmax, [out, inp]));
        assert_close(
            &got,
            &want,
            5e-3 * (inp as f32).sqrt(),
            &format!("f16 {m}x{out}x{inp}"),
        );
    }
}

/// Cross-entropy forward (nll, log-sum-exp, argmax) and backward on the device equal the CPU's, with
/// ignored targets, a vocabulary that is not a multiple of the cube size, and ties for the
/// argmax (the first index wins).
#[test]
fn cross_entropy_matches_the_cpu() {
    let (n, v) = (37usize, 1003usize);
    let mut logits = host(n * v, 3, 3.0);
    logits[5 * v + 17] = 50.0;
    logits[5 * v + 900] = 50.0;
    let targets: Vec<i32> = (0..n as i32)
        .map(|i| {
            if i % 5 == 3 {
                -100
            } else {
                (i * 7919) % v as i32
            }
        })
        .collect();
    let weights = host(n, 4, 1.0);
    fn side<BB: burn::tensor::backend::AutodiffBackend + ops::FusedOps>(
        logits: &[f32],
        targets: &[i32],
        weights: &[f32],
        [n, v]: [usize; 2],
    ) -> (Vec<f32>, Vec<i64>, Vec<f32>) {
        let device = Default::default();
        let x = Tensor::<BB, 2>::from_data(TensorData::new(logits.to_vec(), [n, v]), &device)
            .require_grad();
        let t = Tensor::<BB, 1, Int>::from_data(TensorData::new(targets.to_vec(), [n]), &device);
        let w = Tensor::<BB, 1>::from_data(TensorData::new(weights.to_vec(), [n]), &device);
        let (nll, argmax) = ops::cross_entropy(x.clone(), t);
        let grads = (nll.clone() * w).sum().backward();
        let g = x.grad(&grads).unwrap();
        let arg = argmax
            .into_data()
            .convert::<i64>()
            .into_vec::<i64>()
            .unwrap();
        (values(nll), arg, values(g))
    }
    let (nll_w, arg_w, g_w) = side::<AW>(&logits, &targets, &weights, [n, v]);
    let (nll_c, arg_c, g_c) = side::<AC>(&logits, &targets, &weights, [n, v]);
    assert_close(&nll_w, &nll_c, 1e-4, "nll");
    assert_eq!(arg_w, arg_c, "argmax");
    assert_eq!(arg_w[5], 17, "ties go to the first index");
    assert_close(&g_w, &g_c, 1e-6, "d nll / d logits");
    assert!(
        nll_w[3] == 0.0 && g_w[3 * v..4 * v].iter().all(|&g| g == 0.0),
        "ignored row"
    );
}

/// `gelu_new`, the rotary embedding (partial: 6 of 10 channels) and their backwards on wgpu
/// equal the CPU's, with a table row per position and (packed rows) per token.
#[test]
fn gelu_and_rope_match_the_cpu() {
    fn side<BB: burn::tensor::backend::AutodiffBackend + ops::FusedOps>(
        x: &[f32],
        r: &[f32],
        tables: (&[f32], &[f32]),
        dims: [usize; 4],
    ) -> [Vec<f32>; 4] {
        let device = Default::default();
        let n = tables.0.len() / 6;
        let xt =
            Tensor::<BB, 4>::from_data(TensorData::new(x.to_vec(), dims), &device).require_grad();
        let rt = Tensor::<BB, 4>::from_data(TensorData::new(r.to_vec(), dims), &device);
        let cos = Tensor::<BB, 2>::from_data(TensorData::new(tables.0.to_vec(), [n, 6]), &device);
        let sin = Tensor::<BB, 2>::from_data(TensorData::new(tables.1.to_vec(), [n, 6]), &device);
        let g = ops::gelu_tanh(xt.clone());
        let gx = xt.grad(&(g.clone() * rt.clone()).sum().backward()).unwrap();
        let x2 = xt.detach().require_grad();
        let y = ops::rope(x2.clone(), &cos, &sin);
        let yx = x2.grad(&(y.clone() * rt).sum().backward()).unwrap();
        [values(g), values(gx), values(y), values(yx)]
    }
    let dims = [2usize, 7, 3, 10];
    let n: usize = dims.iter().product();
    let x = host(n, 11, 4.0);
    let r = host(n, 12, 1.0);
    // 7 positions, or 14 tokens whose positions restart (two examples per row).
    for positions in [
        (0..7).collect::<Vec<usize>>(),
        vec![0, 1, 2, 0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 4],
    ] {
        let angles: Vec<f32> = (0..positions.len() * 6)
            .map(|i| positions[i / 6] as f32 * 0.3 * (1 + i % 3) as f32)
            .collect();
        let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
        let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
        let w = side::<AW>(&x, &r, (&cos, &sin), dims);
        let c = side::<AC>(&x, &r, (&cos, &sin), dims);
        for (i, what) in ["gelu", "gelu backward", "rope", "rope backward"]
            .iter()
            .enumerate()
        {
            assert_close(
                &w[i],
                &c[i],
                2e-5,
                &format!("{what} ({} table rows)", positions.len()),
            );
        }
    }
}

/// The same dropout stream draws exactly the same mask on the device as on the CPU, forward and
/// backward (the gradient is masked the same way).
#[test]
fn dropout_masks_are_the_cpus() {
    fn side<BB: burn::tensor::backend::AutodiffBackend + ops::FusedOps>(
        x: &[f32],
    ) -> [Vec<f32>; 3] {
        let device = Default::default();
        let xt = Tensor::<BB, 2>::from_data(TensorData::new(x.to_vec(), [40, 77]), &device)
            .require_grad();
        ops::start_dropout_stream(2024);
        let a = ops::dropout(xt.clone(), 0.3);
        let b = ops::dropout(xt.clone(), 0.05);
        let g = xt.grad(&(a.clone() * 2.0).sum().backward()).unwrap();
        [values(a), values(b), values(g)]
    }
    let x = host(40 * 77, 21, 1.0);
    let w = side::<AW>(&x);
    let c = side::<AC>(&x);
    for i in 0..3 {
        assert_eq!(w[i], c[i], "output {i}");
    }
    let dropped = w[0].iter().filter(|&&v| v == 0.0).count() as f64 / w[0].len() as f64;
    assert!((dropped - 0.3).abs() < 0.03, "dropped {dropped}");
}

/// An f32 product of the model's (`ops::matmul`, which every product of the model goes
/// through: frozen and dequantized NF4 weights, LoRA, attention) is computed in f32, forward and
/// backward: within f32 rounding of the CPU's, where a TF32 or f16 tensor-core path would be off
/// by about 1e-3 of the magnitude. Shapes of phi-2's (a projection, the attention's batched
/// q k^T with a transposed operand) and ragged ones.
#[test]
fn f32_products_keep_f32_precision() {
    fn side<BB: burn::tensor::backend::AutodiffBackend + ops::FusedOps, const D: usize>(
        a: &[f32],
        b: &[f32],
        r: &[f32],
        [sa, sb, so]: [[usize; D]; 3],
        transpose_b: bool,
    ) -> [Vec<f32>; 3] {
        let d = Default::default();
        let at = Tensor::<BB, D>::from_data(TensorData::new(a.to_vec(), sa), &d).require_grad();
        let bt = Tensor::<BB, D>::from_data(TensorData::new(b.to_vec(), sb), &d).require_grad();
        let rt = Tensor::<BB, D>::from_data(TensorData::new(r.to_vec(), so), &d);
        let rhs = if transpose_b {
            bt.clone().swap_dims(D - 2, D - 1)
        } else {
            bt.clone()
        };
        let y = ops::matmul(at.clone(), rhs);
        let grads = (y.clone() * rt).sum().backward();
        [
            values(y),
            values(at.grad(&grads).unwrap()),
            values(bt.grad(&grads).unwrap()),
        ]
    }
    fn check<const D: usize>(shapes: [[usize; D]; 3], transpose_b: bool) {
        let n = |s: &[usize; D]| s.iter().product::<usize>();
        let a = host(n(&shapes[0]), 31, 1.0);
        let b = host(n(&shapes[1]), 32, 1.0);
        let r = host(n(&shapes[2]), 33, 1.0);
        let w = side::<AW, D>(&a, &b, &r, shapes, transpose_b);
        let c = side::<AC, D>(&a, &b, &r, shapes, transpose_b);
        for (i, what) in ["product", "lhs gradient", "rhs gradient"]
            .iter()
            .enumerate()
        {
            let scale = c[i].iter().fold(0f32, |s, v| s.max(v.abs()));
            assert_close(
                &w[i],
                &c[i],
                2e-5 * scale,
                &format!("{what} of {shapes:?} (largest |value| {scale})"),
            );
        }
    }
    check([[96, 2560], [2560, 80], [96, 80]], false);
    check([[7, 333], [333, 65], [7, 65]], false);
    check([[2, 4, 59, 80], [2, 4, 59, 80], [2, 4, 59, 59]], true);
}

/// The layer norm (Burn's `var_mean_bias`, in f32) and the attention's softmax with a causal
/// mask (and its backward) equal the CPU's, on rows long enough for a multi-plane reduction.
#[test]
fn layer_norm_and_attention_softmax_match_the_cpu() {
    fn side<BB: burn::tensor::backend::AutodiffBackend + ops::FusedOps>(
        x: &[f32],
        s: &[f32],
        r: &[f32],
        [b, h, t, d]: [usize; 4],
    ) -> [Vec<f32>; 3] {
        let device = Default::default();
        let xt = Tensor::<BB, 3>::from_data(TensorData::new(x.to_vec(), [b, t, d]), &device);
        let w = Tensor::<BB, 1>::from_data(TensorData::new(host(d, 41, 0.2), [d]), &device) + 1.0;
        let bias = Tensor::<BB, 1>::from_data(TensorData::new(host(d, 42, 0.2), [d]), &device);
        let norm = phitune_model::norm::LayerNorm::new(w, bias, 1e-5).forward(xt);
        let st = Tensor::<BB, 4>::from_data(TensorData::new(s.to_vec(), [b, h, t, t]), &device)
            .require_grad();
        let rt = Tensor::<BB, 4>::from_data(TensorData::new(r.to_vec(), [b, h, t, t]), &device);
        let mask = Tensor::<BB, 2, burn::tensor::Bool>::tril_mask([t, t], 0, &device)
            .unsqueeze::<3>()
            .repeat_dim(0, b);
        let p = ops::attention_softmax(st.clone(), Some(&mask), 0.125);
        let g = st.grad(&(p.clone() * rt).sum().backward()).unwrap();
        [values(norm), values(p), values(g)]
    }
    let dims = [2usize, 3, 45, 2560];
    let [b, h, t, d] = dims;
    // Mean far from zero: a variance from E[x^2] - E[x]^2 in low precision goes wrong here.
    let x: Vec<f32> = host(b * t * d, 43, 1.0).iter().map(|v| v + 30.0).collect();
    let s = host(b * h * t * t, 44, 8.0);
    let r = host(b * h * t * t, 45, 1.0);
    let w = side::<AW>(&x, &s, &r, dims);
    let c = side::<AC>(&x, &s, &r, dims);
    for (i, (what, tol)) in [
        ("layer norm", 1e-4),
        ("softmax", 1e-6),
        ("softmax backward", 1e-5),
    ]
    .into_iter()
    .enumerate()
    {
        assert_close(&w[i], &c[i], tol, what);
        assert!(w[i].iter().all(|v| v.is_finite()), "{what}: not finite");
    }
}

/// tiny-phi's per-token NLL on the device (float base, f32) equals HF's (expected.json); the
/// NF4 base is checked through the QLoRA training step below.
#[test]
fn tiny_phi_scores_as_hf() {
    let dir = common::fixtures().join("tiny-phi");
    let ckpt = phitune_model::Checkpoint::open(&dir).unwrap();
    let expected = common::expected();
    let device = Default::default();
    let float = phitune_model::Phi::<W>::load(&ckpt, &device).unwrap();
    for case in expected["tiny-phi"]["score"].as_array().unwrap() {
        let tokens: Vec<u32> = case["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        let want: Vec<f32> = case["nll"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect();
        let got = float.token_nll(&tokens, &device);
        assert!(got.iter().all(|v| v.is_finite()), "not finite: {got:?}");
        assert_close(&got, &want, 1e-4, &format!("{} tokens", tokens.len()));
    }
}

/// One QLoRA training step of tiny-phi (NF4 base, the PEFT adapter, dropout) on the sample's
/// rows: the loss, the token accuracy and every LoRA gradient equal the CPU's.
#[test]
fn a_qlora_training_step_matches_the_cpu() {
    use phitune_train::lm::CausalLm;

    fn step<BB: burn::tensor::backend::AutodiffBackend + phitune_model::Nf4Backend>()
    -> (f64, usize, Vec<Vec<f32>>)
    where
        BB::InnerBackend: phitune_model::Nf4Backend,
    {
        let device = Default::default();
        let dir = common::fixtures().join("tiny-phi");
        let ckpt = phitune_model::Checkpoint::open(&dir).unwrap();
        let tok = phitune_model::PhiTokenizer::from_dir(&dir, ckpt.config()).unwrap();
        let adapter = phitune_model::io::adapter::Adapter::read(
            &common::fixtures().join("adapters/peft-all-r8"),
        )
        .unwrap();
        let quant = Some(phitune_model::phi::Quantization { double_quant: true });
        let phi = phitune_model::Phi::<BB>::load_with(&ckpt, &device, quant)
            .unwrap()
            .with_adapter(&adapter, &device)
            .unwrap();
        let batch = common::sample_batch(&tok, phitune_data::Template::Persona, 4, 160, &device);
        let lm = CausalLm::new(phi, 0.1, 3);
        ops::start_dropout_stream(5);
        let (loss, stats) = lm.objective(&batch);
        let grads = loss.backward();
        let lora = common::lora_grads(&lm.phi, &grads);
        (stats.loss(), stats.correct, lora)
    }
    let (lw, cw, gw) = step::<AW>();
    let (lc, cc, gc) = step::<AC>();
    assert!((lw - lc).abs() < 1e-4, "loss {lw} against the CPU's {lc}");
    assert_eq!(cw, cc, "correct tokens");
    assert_eq!(gw.len(), gc.len());
    for (i, (w, c)) in gw.iter().zip(&gc).enumerate() {
        assert_close(w, c, 1e-4, &format!("LoRA gradient {i}"));
    }
}
