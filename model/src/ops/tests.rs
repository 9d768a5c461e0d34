//! The CPU kernels and the hand-written backwards against the tensor-op forms (and Burn's own
//! ops where it has them).

use burn::backend::{Autodiff, NdArray};
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Int, Tensor, TensorData, TensorPrimitive, Tolerance};

use super::{FusedOps, cross_entropy, dropout, gelu_tanh, reference, rope};

type B = NdArray<f32>;
type AB = Autodiff<B>;

fn case(n: usize, v: usize) -> (Tensor<B, 2>, Tensor<B, 1, Int>) {
    let dev = Default::default();
    <B as Backend>::seed(&dev, 7);
    let logits = Tensor::<B, 2>::random([n, v], Distribution::Normal(0.0, 3.0), &dev);
    let t: Vec<i64> = (0..n as i64)
        .map(|i| {
            if i % 5 == 3 {
                -100
            } else {
                (i * 7919) % v as i64
            }
        })
        .collect();
    (logits, Tensor::from_data(TensorData::new(t, [n]), &dev))
}

#[test]
fn fused_forward_and_backward_match_the_tensor_op_form() {
    let (logits, targets) = case(37, 1003);
    let fused = B::cross_entropy(
        logits.clone().into_primitive().tensor(),
        targets.clone().into_primitive(),
    );
    let refr = reference::cross_entropy::<B>(
        logits.clone().into_primitive().tensor(),
        targets.clone().into_primitive(),
    );
    let f = |t| Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(t)).into_data();
    f(fused.nll).assert_approx_eq::<f32>(&f(refr.nll), Tolerance::absolute(2e-5));
    f(fused.lse.clone()).assert_approx_eq::<f32>(&f(refr.lse.clone()), Tolerance::absolute(2e-5));
    Tensor::<B, 1, Int>::from_primitive(fused.argmax)
        .into_data()
        .assert_eq(
            &Tensor::<B, 1, Int>::from_primitive(refr.argmax).into_data(),
            true,
        );
    let g: Tensor<B, 1> =
        Tensor::random([37], Distribution::Uniform(-1.0, 1.0), &Default::default());
    let args = || {
        (
            logits.clone().into_primitive().tensor(),
            targets.clone().into_primitive(),
            refr.lse.clone(),
            g.clone().into_primitive().tensor(),
        )
    };
    let (a, b, c, d) = args();
    let fused = B::cross_entropy_backward(a, b, c, d);
    let (a, b, c, d) = args();
    let refr = reference::cross_entropy_backward::<B>(a, b, c, d);
    let f = |t| Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t)).into_data();
    f(fused).assert_approx_eq::<f32>(&f(refr), Tolerance::absolute(1e-6));
}

#[test]
fn autodiff_gradient_matches_log_softmax() {
    let (logits, targets) = case(12, 257);
    let dev = Default::default();
    let x = Tensor::<AB, 2>::from_data(logits.into_data(), &dev).require_grad();
    let t = Tensor::<AB, 1, Int>::from_data(targets.clone().into_data(), &dev);
    let (nll, _) = cross_entropy(x.clone(), t);
    let w: Tensor<AB, 1> = Tensor::arange(1..13, &dev).float();
    let grads = (nll.clone() * w.clone()).sum().backward();
    let fused = x.grad(&grads).unwrap();

    let y = Tensor::<AB, 2>::from_data(x.clone().into_data(), &dev).require_grad();
    let logp = burn::tensor::activation::log_softmax(y.clone(), 1);
    let keep = t_keep(&targets);
    let picked = logp
        .gather(
            1,
            Tensor::<AB, 1, Int>::from_data(targets.clone().clamp_min(0).into_data(), &dev)
                .reshape([12, 1]),
        )
        .reshape([12]);
    let expected_nll = picked.neg() * Tensor::<AB, 1>::from_data(keep.into_data(), &dev);
    nll.into_data()
        .assert_approx_eq::<f32>(&expected_nll.clone().into_data(), Tolerance::absolute(2e-5));
    let grads = (expected_nll * w).sum().backward();
    fused.into_data().assert_approx_eq::<f32>(
        &y.grad(&grads).unwrap().into_data(),
        // f32 rounding of values up to ~12 (the weights): a few ulps.
        Tolerance::rel_abs(2e-6, 1e-6),
    );
}

fn t_keep(t: &Tensor<B, 1, Int>) -> Tensor<B, 1> {
    t.clone().greater_equal_elem(0).float()
}

#[test]
fn fused_gelu_matches_burns_gelu_approximate_and_its_gradient() {
    let dev = Default::default();
    <B as Backend>::seed(&dev, 3);
    let x = Tensor::<B, 3>::random([3, 5, 701], Distribution::Normal(0.0, 3.0), &dev);
    let w = Tensor::<B, 3>::random([3, 5, 701], Distribution::Uniform(-1.0, 1.0), &dev);
    let ours = |x: Tensor<B, 3>| {
        let x = Tensor::<AB, 3>::from_data(x.into_data(), &dev).require_grad();
        let y = gelu_tanh(x.clone());
        let g = (y.clone() * Tensor::from_data(w.clone().into_data(), &dev))
            .sum()
            .backward();
        (y.into_data(), x.grad(&g).unwrap().into_data())
    };
    let burns = |x: Tensor<B, 3>| {
        let x = Tensor::<AB, 3>::from_data(x.into_data(), &dev).require_grad();
        let y = burn::tensor::activation::gelu_approximate(x.clone());
        let g = (y.clone() * Tensor::from_data(w.clone().into_data(), &dev))
            .sum()
            .backward();
        (y.into_data(), x.grad(&g).unwrap().into_data())
    };
    let (y1, g1) = ours(x.clone());
    let (y2, g2) = burns(x.clone());
    let tol = Tolerance::rel_abs(1e-5, 1e-6);
    y1.assert_approx_eq::<f32>(&y2, tol);
    g1.assert_approx_eq::<f32>(&g2, tol);
    // The tensor-op backward (what the CubeCL backends run) agrees too.
    let refr = reference::gelu_tanh_backward::<B>(
        x.into_primitive().tensor(),
        w.into_primitive().tensor(),
    );
    Tensor::<B, 3>::from_primitive(TensorPrimitive::Float(refr))
        .into_data()
        .assert_approx_eq::<f32>(&g1, tol);
}

#[test]
fn fused_rope_and_its_gradient_match_the_tensor_op_form() {
    let dev = Default::default();
    <B as Backend>::seed(&dev, 9);
    let rot = crate::rotary::RotaryEmbedding::new(8, 10000.0);
    // A row per position, and a row per token (packed rows: positions restart).
    let per_token_positions = [0, 1, 2, 0, 1, 4, 0, 1, 2, 3];
    for (head_dim, per_token) in [(8, false), (12, false), (8, true), (12, true)] {
        let (cos, sin) = if per_token {
            rot.tables_at::<AB>(&per_token_positions, &dev)
        } else {
            rot.tables::<AB>(3, 5, &dev)
        };
        let x = Tensor::<AB, 4>::random([2, 5, 3, head_dim], Distribution::Normal(0.0, 1.0), &dev)
            .require_grad();
        let w = Tensor::<AB, 4>::random([2, 5, 3, head_dim], Distribution::Normal(0.0, 1.0), &dev);
        let y = rope(x.clone(), &cos, &sin);
        let g = x.grad(&(y.clone() * w.clone()).sum().backward()).unwrap();
        let x2 = x.clone().detach().require_grad();
        let y2: Tensor<AB, 4> =
            Tensor::from_primitive(TensorPrimitive::Float(reference::rope::<AB>(
                x2.clone().into_primitive().tensor(),
                cos.clone().into_primitive().tensor(),
                sin.clone().into_primitive().tensor(),
                false,
            )));
        let g2 = x2.grad(&(y2.clone() * w).sum().backward()).unwrap();
        let tol = Tolerance::absolute(1e-5);
        y.into_data().assert_approx_eq::<f32>(&y2.into_data(), tol);
        g.into_data().assert_approx_eq::<f32>(&g2.into_data(), tol);
    }
}

#[test]
fn seeded_dropout_keeps_1_minus_p_scales_and_backpropagates_its_own_mask() {
    let dev = Default::default();
    let x = Tensor::<AB, 2>::ones([64, 1000], &dev).require_grad();
    <AB as Backend>::seed(&dev, 11);
    let y = dropout(x.clone(), 0.1);
    let ys = y.clone().into_data().into_vec::<f32>().unwrap();
    let kept = ys.iter().filter(|&&v| v != 0.0).count() as f64 / ys.len() as f64;
    assert!((kept - 0.9).abs() < 0.005, "kept {kept}");
    assert!(ys.iter().all(|&v| v == 0.0 || (v - 1.0 / 0.9).abs() < 1e-6));
    // d(sum(y * w))/dx = w * mask / (1 - p): zero exactly where y is.
    let w = Tensor::<AB, 2>::random([64, 1000], Distribution::Uniform(1.0, 2.0), &dev);
    let g = x.grad(&(y * w.clone()).sum().backward()).unwrap();
    let (gs, ws) = (
        g.into_data().into_vec::<f32>().unwrap(),
        w.into_data().into_vec::<f32>().unwrap(),
    );
    for ((g, y), w) in gs.iter().zip(&ys).zip(&ws) {
        assert!((g - y * w).abs() < 1e-5, "{g} vs {}", y * w);
    }
    // The backend's seed reproduces the mask; another seed changes it.
    <AB as Backend>::seed(&dev, 11);
    assert_eq!(
        dropout(x.clone(), 0.1)
            .into_data()
            .into_vec::<f32>()
            .unwrap(),
        ys
    );
    <AB as Backend>::seed(&dev, 12);
    assert_ne!(
        dropout(x.clone(), 0.1)
            .into_data()
            .into_vec::<f32>()
            .unwrap(),
        ys
    );
    // Identity without autodiff, and for p = 0.
    let plain = Tensor::<B, 2>::ones([4, 4], &dev);
    assert_eq!(dropout(plain.clone(), 0.5).into_data(), plain.into_data());
    let z = dropout(x.clone(), 0.0);
    assert_eq!(z.into_data(), x.into_data());
}

/// The dropout seed stream: each call takes the next seed, a restarted stream repeats them, and
/// the mask is exactly the host definition (`dropout_keep`) every backend's kernel computes.
#[test]
fn the_dropout_stream_gives_backend_independent_masks() {
    let dev = Default::default();
    let x = Tensor::<AB, 2>::ones([8, 300], &dev).require_grad();
    let values = |t: Tensor<AB, 2>| t.into_data().into_vec::<f32>().unwrap();
    super::start_dropout_stream(42);
    let (a, b) = (
        values(dropout(x.clone(), 0.25)),
        values(dropout(x.clone(), 0.25)),
    );
    assert_ne!(a, b, "each call draws a new seed");
    // Another generator state changes nothing: the stream, not the backend, decides.
    <AB as Backend>::seed(&dev, 99);
    super::start_dropout_stream(42);
    assert_eq!(values(dropout(x.clone(), 0.25)), a);
    assert_eq!(values(dropout(x.clone(), 0.25)), b);
    let keys = super::dropout_keys(super::splitmix64(42));
    let threshold = super::dropout_threshold(0.25);
    for (i, v) in a.iter().enumerate() {
        let keep = super::dropout_keep(keys, i as u32, threshold);
        assert_eq!(*v, if keep { 1.0 / 0.75 } else { 0.0 }, "element {i}");
    }
}

#[test]
fn nan_logits_give_nan_loss() {
    let (logits, targets) = case(4, 64);
    let logits = logits.slice_assign(
        [1..2, 5..6],
        Tensor::from_data([[f32::NAN]], &Default::default()),
    );
    let out = B::cross_entropy(logits.into_primitive().tensor(), targets.into_primitive());
    let nll = Tensor::<B, 1>::from_primitive(TensorPrimitive::Float(out.nll))
        .into_data()
        .into_vec::<f32>()
        .unwrap();
    assert!(nll[1].is_nan() && nll[0].is_finite(), "{nll:?}");
}

#[test]
fn fused_attention_softmax_and_its_gradient_match_burns_softmax() {
    use burn::tensor::Bool;
    let dev = Default::default();
    <B as Backend>::seed(&dev, 21);
    let [b, h, q, k] = [2, 3, 5, 7];
    let causal = Tensor::<AB, 2, Bool>::tril_mask([q, k], 2, &dev).unsqueeze::<3>();
    // Per batch row: a block-diagonal causal mask (two examples in the first row).
    let packed = crate::packing::Packing::new(vec![vec![3, 2], vec![5]], 5).unwrap();
    let per_row = packed.mask::<AB>(&dev);
    let cases = [
        (None, [b, h, q, k]),
        (Some(causal), [b, h, q, k]),
        (Some(per_row), [b, h, q, q]),
    ];
    for (mask, dims) in cases {
        let x = Tensor::<AB, 4>::random(dims, Distribution::Normal(0.0, 3.0), &dev).require_grad();
        let w = Tensor::<AB, 4>::random(dims, Distribution::Normal(0.0, 1.0), &dev);
        let y = super::attention_softmax(x.clone(), mask.as_ref(), 0.37);
        let g = x.grad(&(y.clone() * w.clone()).sum().backward()).unwrap();
        // The same through Burn's ops (scale, mask_fill with -inf, softmax) and its autodiff.
        let x2 = x.clone().detach().require_grad();
        let s = x2.clone().mul_scalar(0.37);
        let s = match &mask {
            Some(m) => s.mask_fill(
                m.clone().unsqueeze_dim::<4>(1).expand(dims),
                f32::NEG_INFINITY,
            ),
            None => s,
        };
        let y2 = burn::tensor::activation::softmax(s, 3);
        let g2 = x2.grad(&(y2.clone() * w).sum().backward()).unwrap();
        let tol = Tolerance::absolute(1e-6);
        y.into_data().assert_approx_eq::<f32>(&y2.into_data(), tol);
        g.into_data().assert_approx_eq::<f32>(&g2.into_data(), tol);
    }
}

#[test]
fn fused_lora_add_matches_the_tensor_op_form() {
    let device = Default::default();
    for (m, k, r, n) in [
        (1usize, 64usize, 4usize, 48usize),
        (3, 37, 2, 5),
        (5, 128, 8, 130),
    ] {
        let rand =
            |s: [usize; 2]| Tensor::<B, 2>::random(s, Distribution::Normal(0.0, 1.0), &device);
        let (y, x, a, b) = (rand([m, n]), rand([m, k]), rand([k, r]), rand([r, n]));
        let prim = |t: &Tensor<B, 2>| t.clone().into_primitive().tensor();
        let fused: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(B::lora_add(
            prim(&y),
            prim(&x),
            prim(&a),
            prim(&b),
            2.5,
        )));
        let want = y + x.matmul(a).matmul(b).mul_scalar(2.5);
        fused
            .into_data()
            .assert_approx_eq::<f32>(&want.into_data(), Tolerance::absolute(1e-4));
    }
}
