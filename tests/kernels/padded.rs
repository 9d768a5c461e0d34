//! Every op the model runs, on tensors whose rows are padded, against the same values laid out
//! contiguously. cubecl-cuda allocates pitched memory (each row of a matmul output, a cast or
//! an upload rounded up to as much as 512 bytes: tiny-phi's hidden 160 in f32 gets a row stride
//! of 256, head_dim 80 one of 128), while wgpu (and lavapipe in CI) allocates contiguously, so
//! without these checks no kernel of ours or Burn's would ever meet a padded tensor before a
//! CUDA user does. Here the padded tensors are built by hand (a backing buffer of wider rows,
//! the padding filled with NaN, viewed with the narrower shape and the wider row stride), so a
//! kernel that reads them as contiguous picks up NaN or shifted rows and fails.
//!
//! The including file defines `Inner` (the CubeCL backend without fusion) and `W` (what
//! `burn::backend::Wgpu`/`Cuda` are: `Fusion<Inner>`). Each check feeds a padded input through
//! the op and the autodiff backward (through fusion, as the model runs), and each backward op of
//! ours gets padded upstream gradients directly.

use burn::backend::Autodiff;
use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{Bool, DType, Int, Shape, Tensor, TensorData, TensorPrimitive};

use burn_fusion::stream::OperationStreams;
use burn_ir::{BackendIr, InitOperationIr, OperationIr, OperationOutput};
use phitune_model::ops::{self, FusedOps, Nf4Backend, Nf4Host};

use super::{Inner, W, common};

type AW = Autodiff<W>;

/// Row stride for a row of `width` f32: a multiple of 128 values (512 bytes, cubecl-cuda's
/// largest pitch, so the backing tensor itself is never pitched again on CUDA), at least one
/// 128 wider than the row.
fn pitch(width: usize) -> usize {
    width.next_multiple_of(128) + if width % 128 == 0 { 128 } else { 0 }
}

/// `values` (row-major, `shape`) as a padded tensor: rows `pitch(width)` apart, NaN between.
fn padded<const D: usize>(values: &[f32], shape: [usize; D]) -> Tensor<W, D> {
    let device = Default::default();
    let width = shape[D - 1];
    let p = pitch(width);
    let rows = values.len() / width;
    let mut host = vec![f32::NAN; rows * p];
    for r in 0..rows {
        host[r * p..r * p + width].copy_from_slice(&values[r * width..(r + 1) * width]);
    }
    let mut backing = shape;
    backing[D - 1] = p;
    let mut t = Inner::float_from_data(TensorData::new(host, backing), &device);
    assert!(t.is_contiguous(), "the backing tensor is laid out as asked");
    t.meta.shape_mut()[D - 1] = width;
    assert!(!t.is_contiguous(), "{shape:?} is padded");
    // Into fusion as an initialised tensor, the way Fusion's own `from_data` registers one.
    let client = burn_fusion::get_client::<Inner>(&device);
    let handle = Inner::float_tensor_handle(t);
    let desc = InitOperationIr::create(Shape::from(shape.to_vec()), DType::F32, || {
        client.register_tensor_handle(handle)
    });
    let out = client
        .register(
            OperationStreams::default(),
            OperationIr::Init(desc),
            burn_fusion::NoOp::<Inner>::new(),
        )
        .output();
    Tensor::from_primitive(TensorPrimitive::Float(out))
}

fn dense<const D: usize>(values: &[f32], shape: [usize; D]) -> Tensor<W, D> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), &Default::default())
}

fn host(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    common::nf4::host_weight(1, n, seed)
        .into_iter()
        .map(|v| v * 10.0 * scale)
        .collect()
}

fn values<BB: burn::tensor::backend::Backend, const D: usize>(t: Tensor<BB, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// What went wrong, or None: NaN or infinity where the contiguous run has a number, lengths,
/// or a difference beyond `tol` times the largest magnitude (at least 1).
fn differs(got: &[f32], want: &[f32], tol: f32) -> Option<String> {
    if got.len() != want.len() {
        return Some(format!("{} values, not {}", got.len(), want.len()));
    }
    let scale = want.iter().fold(1f32, |s, v| s.max(v.abs()));
    let mut worst = (0f32, 0usize);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g.is_finite() != w.is_finite() {
            return Some(format!("value {i} is {g}, contiguous {w}"));
        }
        let d = (g - w).abs();
        if d > worst.0 {
            worst = (d, i);
        }
    }
    (worst.0 > tol * scale).then(|| {
        format!(
            "value {} off by {} (tolerance {})",
            worst.1,
            worst.0,
            tol * scale
        )
    })
}

/// Runs `f` on a padded and on a contiguous input of the same values; compares its outputs and
/// the input's gradient through autodiff (`sum(out_i * r_i)` for fixed random `r_i`).
struct Checks {
    failures: Vec<String>,
    run: usize,
}

impl Checks {
    fn new() -> Self {
        Self {
            failures: Vec::new(),
            run: 0,
        }
    }

    fn case<const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        scale: f32,
        tol: f32,
        f: impl Fn(Tensor<AW, D>) -> Vec<Tensor<AW, 1>>,
    ) {
        self.run += 1;
        let numel: usize = shape.iter().product();
        let x = host(numel, 7 + self.run as u64, scale);
        let side = |leaf: Tensor<W, D>| -> (Vec<Vec<f32>>, Vec<f32>) {
            let leaf = Tensor::<AW, D>::from_inner(leaf).require_grad();
            let outs = f(leaf.clone());
            let mut loss: Option<Tensor<AW, 1>> = None;
            let mut vals = Vec::new();
            for (i, o) in outs.into_iter().enumerate() {
                let n = o.dims()[0];
                let r = Tensor::<AW, 1>::from_data(
                    TensorData::new(host(n, 100 + i as u64, 0.1), [n]),
                    &Default::default(),
                );
                let term = (o.clone() * r).sum();
                loss = Some(match loss {
                    Some(l) => l + term,
                    None => term,
                });
                vals.push(values(o));
            }
            let grads = loss.expect("outputs").backward();
            let g = leaf.grad(&grads).map(values).unwrap_or_default();
            (vals, g)
        };
        let (pv, pg) = side(padded(&x, shape));
        let (cv, cg) = side(dense(&x, shape));
        for (i, (p, c)) in pv.iter().zip(&cv).enumerate() {
            if let Some(why) = differs(p, c, tol) {
                self.failures.push(format!("{name}, output {i}: {why}"));
            }
        }
        if let Some(why) = differs(&pg, &cg, tol) {
            self.failures.push(format!("{name}, input gradient: {why}"));
        }
    }

    /// A backward op (no autodiff) on padded arguments against contiguous ones: `f` gets each
    /// argument either padded or not.
    fn direct(&mut self, name: &str, tol: f32, f: impl Fn(bool) -> Vec<f32>) {
        self.run += 1;
        if let Some(why) = differs(&f(true), &f(false), tol) {
            self.failures.push(format!("{name}: {why}"));
        }
    }

    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} of {} checks differ on padded rows:\n  {}",
            self.failures.len(),
            self.run,
            self.failures.join("\n  ")
        );
    }
}

fn flat<const D: usize>(t: Tensor<AW, D>) -> Tensor<AW, 1> {
    let n = t.shape().num_elements();
    t.reshape([n])
}

fn constant<const D: usize>(shape: [usize; D], seed: u64, scale: f32) -> Tensor<AW, D> {
    let n = shape.iter().product();
    Tensor::from_data(
        TensorData::new(host(n, seed, scale), shape),
        &Default::default(),
    )
}

fn nf4(out: usize, inp: usize, seed: u64) -> (Tensor<AW, 1, Int>, Tensor<AW, 1>) {
    let q = Nf4Host::quantize(&common::nf4::host_weight(out, inp, seed), [out, inp], true);
    common::nf4::upload::<AW>(&q, &Default::default())
}

/// tiny-phi's hidden size 160, head_dim 80, 13/29/59 tokens and vocabulary 451, and phi-2's
/// 2560/10240: the ops of our extension (products, NF4 at both row counts, the head's and the
/// plain cross-entropy, `gelu_new`, rotary, attention softmax, dropout) and the Burn ops the
/// model leans on (matmul, softmax, layer norm, gather, select, cat, slice, swap_dims,
/// mask_fill, reductions), forward and backward.
#[test]
fn every_op_is_correct_on_padded_rows() {
    let mut c = Checks::new();
    let device = Default::default();

    // Products.
    c.case(
        "Burn matmul [13, 160] x [160, 80]",
        [13, 160],
        1.0,
        1e-5,
        |x| vec![flat(x.matmul(constant([160, 80], 1, 0.1)))],
    );
    c.case(
        "ops::matmul [13, 160] x [160, 80]",
        [13, 160],
        1.0,
        1e-5,
        |x| vec![flat(ops::matmul(x, constant([160, 80], 1, 0.1)))],
    );
    c.case(
        "ops::matmul, padded rhs [59, 80]",
        [59, 80],
        1.0,
        1e-5,
        |w| vec![flat(ops::matmul(constant([29, 59], 2, 0.1), w))],
    );
    c.case(
        "ops::matmul batched [1, 2, 59, 80] x k^T",
        [1, 2, 59, 80],
        1.0,
        1e-5,
        |q| {
            let k = constant([1, 2, 59, 80], 3, 0.1);
            vec![flat(ops::matmul(q, k.swap_dims(2, 3)))]
        },
    );
    c.case(
        "frozen_linear [29, 160] -> 451",
        [29, 160],
        1.0,
        1e-5,
        |x| vec![flat(ops::frozen_linear(x, constant([451, 160], 4, 0.1)))],
    );
    for (m, out, inp) in [
        (3usize, 80usize, 160usize),
        (59, 80, 160),
        (13, 10240, 2560),
    ] {
        c.case(
            &format!("nf4_linear [{m}, {inp}] -> {out}"),
            [m, inp],
            1.0,
            2e-5,
            |x| {
                let (packed, absmax) = nf4(out, inp, 5);
                vec![flat(ops::nf4_linear(x, packed, absmax, [out, inp]))]
            },
        );
    }
    c.case(
        "lora_add [13, 160] (inference)",
        [13, 160],
        1.0,
        1e-5,
        |x| {
            let y = constant([13, 80], 6, 1.0).inner();
            let (a, b) = (
                constant([160, 4], 7, 0.1).inner(),
                constant([4, 80], 8, 0.1).inner(),
            );
            let out = ops::lora_add(y, x.clone().inner(), a, b, 2.0);
            // Not differentiable: the input's gradient comes from a plain use of it.
            vec![flat(Tensor::<AW, 2>::from_inner(out)), flat(x * 0.5)]
        },
    );

    // The loss.
    c.case("cross_entropy [13, 451]", [13, 451], 3.0, 1e-5, |logits| {
        let targets = Tensor::<AW, 1, Int>::from_data(
            TensorData::new(
                (0..13)
                    .map(|i| (i * 37 % 451) as i32 - (i == 4) as i32 * 500)
                    .collect::<Vec<_>>(),
                [13],
            ),
            &Default::default(),
        );
        let (nll, argmax) = ops::cross_entropy(logits, targets);
        vec![nll, argmax.float()]
    });
    c.case(
        "head_cross_entropy [29, 160] x [451, 160]",
        [29, 160],
        1.0,
        1e-5,
        |h| {
            let targets = Tensor::<AW, 1, Int>::from_data(
                TensorData::new(
                    (0..29).map(|i| (i * 31 % 451) as i32).collect::<Vec<_>>(),
                    [29],
                ),
                &Default::default(),
            );
            let w = constant([451, 160], 9, 0.1);
            let (nll, argmax) =
                ops::head_cross_entropy(h, w, Some(constant([451], 10, 0.1)), targets, 8);
            vec![nll, argmax.float()]
        },
    );

    // Element-wise and per-row ops.
    for shape in [[29usize, 640usize], [13, 10240]] {
        c.case(&format!("gelu {shape:?}"), shape, 3.0, 1e-5, |x| {
            vec![flat(ops::gelu_tanh(x))]
        });
    }
    for (tokens, dim) in [(59usize, 32usize), (13, 80)] {
        c.case(
            &format!("rope [2, {tokens}, 2, 80] on {dim} channels"),
            [2, tokens, 2, 80],
            1.0,
            1e-5,
            |x| {
                let angles = host(tokens * dim, 11, 0.5);
                let cos = padded(
                    &angles.iter().map(|a| a.cos()).collect::<Vec<_>>(),
                    [tokens, dim],
                );
                let sin = padded(
                    &angles.iter().map(|a| a.sin()).collect::<Vec<_>>(),
                    [tokens, dim],
                );
                let (cos, sin) = (
                    Tensor::<AW, 2>::from_inner(cos),
                    Tensor::<AW, 2>::from_inner(sin),
                );
                vec![flat(ops::rope(x, &cos, &sin))]
            },
        );
    }
    for tokens in [13usize, 29, 59] {
        c.case(
            &format!("attention_softmax [1, 2, {tokens}, {tokens}], causal"),
            [1, 2, tokens, tokens],
            8.0,
            1e-5,
            |s| {
                let mask =
                    Tensor::<AW, 2, Bool>::tril_mask([tokens, tokens], 0, &Default::default())
                        .unsqueeze::<3>();
                vec![flat(ops::attention_softmax(s, Some(&mask), 0.125))]
            },
        );
    }
    c.case("dropout [29, 160]", [29, 160], 1.0, 0.0, |x| {
        ops::start_dropout_stream(3);
        vec![flat(ops::dropout(x, 0.25))]
    });

    // Burn's ops the model relies on.
    c.case("softmax [13, 451]", [13, 451], 3.0, 1e-6, |x| {
        vec![flat(burn::tensor::activation::softmax(x, 1))]
    });
    for shape in [[1usize, 29usize, 160usize], [1, 13, 2560]] {
        c.case(&format!("layer norm {shape:?}"), shape, 1.0, 1e-5, |x| {
            let d = shape[2];
            let ln = phitune_model::norm::LayerNorm::new(
                constant([d], 12, 0.1) + 1.0,
                constant([d], 13, 0.1),
                1e-5,
            );
            vec![flat(ln.forward(x + 30.0))]
        });
    }
    c.case("gather / select [29, 160]", [29, 160], 1.0, 0.0, |x| {
        let rows = Tensor::<AW, 1, Int>::from_data(
            TensorData::new(vec![28i32, 0, 5, 5, 17], [5]),
            &Default::default(),
        );
        let idx = Tensor::<AW, 2, Int>::from_data(
            TensorData::new(
                (0..29).map(|i| (i * 13 % 160) as i32).collect::<Vec<_>>(),
                [29, 1],
            ),
            &Default::default(),
        );
        vec![flat(x.clone().select(0, rows)), flat(x.gather(1, idx))]
    });
    c.case(
        "cat / slice / swap_dims [1, 29, 160]",
        [1, 29, 160],
        1.0,
        0.0,
        |x| {
            let other = constant([1, 29, 160], 14, 1.0);
            vec![
                flat(Tensor::cat(vec![x.clone(), other.clone()], 2)),
                flat(Tensor::cat(vec![x.clone(), other], 1)),
                flat(x.clone().slice([0..1, 3..20, 7..150])),
                flat(x.clone().swap_dims(1, 2) * 2.0),
                flat(x.reshape([1, 29, 2, 80]).swap_dims(1, 2) * 3.0),
            ]
        },
    );
    c.case(
        "mask_fill and reductions [13, 451]",
        [13, 451],
        1.0,
        1e-5,
        |x| {
            let mask = Tensor::<AW, 2, Bool>::tril_mask([13, 451], 0, &Default::default());
            vec![
                flat(x.clone().mask_fill(mask, -1e9)),
                flat(x.clone().sum_dim(1)),
                flat(x.clone().max_dim(1)),
                flat(x.mean_dim(1)),
            ]
        },
    );

    // Our backward ops, with padded upstream gradients (on CUDA they arrive as matmul outputs).
    let pick = |pad: bool, v: &[f32], shape: [usize; 2]| {
        if pad {
            padded(v, shape)
        } else {
            dense(v, shape)
        }
    };
    let pick4 = |pad: bool, v: &[f32], shape: [usize; 4]| {
        if pad {
            padded(v, shape)
        } else {
            dense(v, shape)
        }
    };
    let prim = |t: Tensor<W, 2>| t.into_primitive().tensor();
    c.direct("gelu backward [29, 640]", 1e-6, |pad| {
        let x = pick(pad, &host(29 * 640, 20, 3.0), [29, 640]);
        let g = pick(pad, &host(29 * 640, 21, 1.0), [29, 640]);
        values(Tensor::<W, 2>::from_primitive(TensorPrimitive::Float(
            W::gelu_tanh_backward(prim(x), prim(g)),
        )))
    });
    c.direct("rope backward [2, 59, 2, 80]", 1e-6, |pad| {
        let g = pick4(pad, &host(2 * 59 * 2 * 80, 22, 1.0), [2, 59, 2, 80]);
        let angles = host(59 * 32, 23, 0.5);
        let cos = pick(
            pad,
            &angles.iter().map(|a| a.cos()).collect::<Vec<_>>(),
            [59, 32],
        );
        let sin = pick(
            pad,
            &angles.iter().map(|a| a.sin()).collect::<Vec<_>>(),
            [59, 32],
        );
        let out = W::rope(g.into_primitive().tensor(), prim(cos), prim(sin), true);
        values(Tensor::<W, 4>::from_primitive(TensorPrimitive::Float(out)))
    });
    c.direct("cross_entropy backward [13, 451]", 1e-6, |pad| {
        let logits = pick(pad, &host(13 * 451, 24, 3.0), [13, 451]);
        let targets = Tensor::<W, 1, Int>::from_data(
            TensorData::new((0..13).map(|i| i * 29).collect::<Vec<i32>>(), [13]),
            &device,
        );
        let ce = W::cross_entropy(prim(logits.clone()), targets.clone().into_primitive());
        let grad = dense(&host(13, 25, 1.0), [13]).into_primitive().tensor();
        let out = W::cross_entropy_backward(prim(logits), targets.into_primitive(), ce.lse, grad);
        values(Tensor::<W, 2>::from_primitive(TensorPrimitive::Float(out)))
    });
    c.direct("attention_softmax backward [1, 2, 59, 59]", 1e-6, |pad| {
        let p = pick4(
            pad,
            &host(2 * 59 * 59, 26, 0.1)
                .iter()
                .map(|v| v.abs())
                .collect::<Vec<_>>(),
            [1, 2, 59, 59],
        );
        let g = pick4(pad, &host(2 * 59 * 59, 27, 1.0), [1, 2, 59, 59]);
        let out = W::attention_softmax_backward(
            p.into_primitive().tensor(),
            g.into_primitive().tensor(),
            0.125,
        );
        values(Tensor::<W, 4>::from_primitive(TensorPrimitive::Float(out)))
    });
    c.direct("dropout of a gradient [29, 160]", 0.0, |pad| {
        let g = pick(pad, &host(29 * 160, 28, 1.0), [29, 160]);
        values(Tensor::<W, 2>::from_primitive(TensorPrimitive::Float(
            W::dropout_seeded(prim(g), 0.25, 99),
        )))
    });
    for (m, out, inp) in [
        (3usize, 80usize, 160usize),
        (59, 80, 160),
        (13, 10240, 2560),
    ] {
        c.direct(
            &format!("nf4_matmul_t [{m}, {out}] -> {inp}"),
            2e-5,
            |pad| {
                let q = Nf4Host::quantize(&common::nf4::host_weight(out, inp, 5), [out, inp], true);
                let (packed, absmax) = common::nf4::upload::<W>(&q, &device);
                let dy = pick(pad, &host(m * out, 29, 1.0), [m, out]);
                let dx = W::nf4_matmul_t(
                    prim(dy),
                    packed.into_primitive(),
                    absmax.into_primitive().tensor(),
                    [out, inp],
                );
                values(Tensor::<W, 2>::from_primitive(TensorPrimitive::Float(dx)))
            },
        );
    }
    c.direct("frozen_matmul_t [29, 451] x [451, 160]", 1e-5, |pad| {
        let dy = pick(pad, &host(29 * 451, 30, 1.0), [29, 451]);
        let w = dense(&host(451 * 160, 31, 0.1), [451, 160]);
        values(Tensor::<W, 2>::from_primitive(TensorPrimitive::Float(
            W::frozen_matmul_t(prim(dy), prim(w)),
        )))
    });
    c.direct("matmul of two padded [59, 80] x [80, 59]", 1e-5, |pad| {
        let a = pick(pad, &host(59 * 80, 32, 1.0), [59, 80]);
        let b = pick(pad, &host(80 * 59, 33, 1.0), [80, 59]);
        values(Tensor::<W, 2>::from_primitive(TensorPrimitive::Float(
            W::matmul(prim(a), prim(b)),
        )))
    });
    c.finish();
}

/// A kernel whose float inputs arrive in another dtype casts them, and the cast must come before
/// the input is made contiguous: on CUDA a cast's output is itself pitched. The rotary tables
/// and an upstream gradient in f16 (where the device has it), padded, against f32 ones.
#[test]
fn mixed_dtype_inputs_are_cast_then_made_contiguous() {
    let device = Default::default();
    if !<Inner as burn::tensor::backend::Backend>::supports_dtype(&device, DType::F16) {
        eprintln!("skipped: this device has no f16");
        return;
    }
    let prim = |t: Tensor<W, 2>| t.into_primitive().tensor();
    let half = |t: Tensor<W, 2>| t.cast(burn::tensor::FloatDType::F16);
    let angles = host(13 * 32, 40, 0.5);
    let cos: Vec<f32> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f32> = angles.iter().map(|a| a.sin()).collect();
    let x = dense(&host(13 * 2 * 80, 41, 1.0), [1, 13, 2, 80]);
    let rope = |cos: Tensor<W, 2>, sin: Tensor<W, 2>| {
        values(Tensor::<W, 4>::from_primitive(TensorPrimitive::Float(
            W::rope(
                x.clone().into_primitive().tensor(),
                prim(cos),
                prim(sin),
                false,
            ),
        )))
    };
    // f16 tables: round the f32 ones the same way for the comparison.
    let want = rope(
        half(dense(&cos, [13, 32])).cast(burn::tensor::FloatDType::F32),
        half(dense(&sin, [13, 32])).cast(burn::tensor::FloatDType::F32),
    );
    let got = rope(half(padded(&cos, [13, 32])), half(padded(&sin, [13, 32])));
    assert_eq!(
        differs(&got, &want, 1e-6),
        None,
        "rope with padded f16 tables"
    );

    let xv = host(29 * 160, 42, 3.0);
    let g = host(29 * 160, 43, 1.0);
    let gelu = |grad: Tensor<W, 2>| {
        values(Tensor::<W, 2>::from_primitive(TensorPrimitive::Float(
            W::gelu_tanh_backward(prim(dense(&xv, [29, 160])), prim(grad)),
        )))
    };
    let want = gelu(half(dense(&g, [29, 160])).cast(burn::tensor::FloatDType::F32));
    let got = gelu(half(padded(&g, [29, 160])));
    assert_eq!(
        differs(&got, &want, 1e-6),
        None,
        "gelu backward with a padded f16 gradient"
    );
}
