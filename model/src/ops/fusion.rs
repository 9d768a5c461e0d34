//! `Fusion<B>` (what `burn::backend::Cuda`/`Wgpu` are with fusion on): every op of the
//! extension is registered as one custom operation that runs the inner backend's kernel, so
//! fusion never splits it into generic tensor ops (and the NF4 dense weight never becomes a
//! tensor fusion could keep alive).

use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor};
use burn::tensor::{DType, Element, Shape};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use super::{CrossEntropy, FusedOps, Nf4Backend};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Dequantize([usize; 2]),
    Matmul([usize; 2]),
    MatmulT([usize; 2]),
    CrossEntropy,
    CrossEntropyBackward,
    Gelu,
    GeluBackward,
    Rope {
        inverse: bool,
    },
    Dropout {
        p: f64,
        seed: u64,
    },
    /// A product of two float tensors on the backend's exact path (f32 without TF32).
    ExactMatmul,
}

#[derive(Clone, Debug)]
struct ExtensionOp<B> {
    desc: CustomOpIr,
    kind: Kind,
    _b: core::marker::PhantomData<B>,
}

type Handles<B> =
    HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

impl<B: FusionBackend + Nf4Backend> Operation<B::FusionRuntime> for ExtensionOp<B> {
    fn execute(&self, h: &mut Handles<B>) {
        let d = &self.desc;
        let float = |h: &mut Handles<B>, t: &TensorIr| h.get_float_tensor::<B>(t);
        match self.kind {
            Kind::Dequantize(shape) => {
                let ([packed, absmax], [out]) = d.as_fixed();
                let (packed, absmax) = (h.get_int_tensor::<B>(packed), float(h, absmax));
                h.register_float_tensor::<B>(&out.id, B::nf4_dequantize(packed, absmax, shape));
            }
            Kind::Matmul(shape) | Kind::MatmulT(shape) => {
                let ([x, packed, absmax], [out]) = d.as_fixed();
                let x = float(h, x);
                let (packed, absmax) = (h.get_int_tensor::<B>(packed), float(h, absmax));
                let y = match self.kind {
                    Kind::Matmul(_) => B::nf4_matmul(x, packed, absmax, shape),
                    _ => B::nf4_matmul_t(x, packed, absmax, shape),
                };
                h.register_float_tensor::<B>(&out.id, y);
            }
            Kind::CrossEntropy => {
                let ([logits, targets], [nll, lse, argmax]) = d.as_fixed();
                let (logits, targets) = (float(h, logits), h.get_int_tensor::<B>(targets));
                let ce = B::cross_entropy(logits, targets);
                h.register_float_tensor::<B>(&nll.id, ce.nll);
                h.register_float_tensor::<B>(&lse.id, ce.lse);
                h.register_int_tensor::<B>(&argmax.id, ce.argmax);
            }
            Kind::CrossEntropyBackward => {
                let ([logits, targets, lse, grad], [out]) = d.as_fixed();
                let (logits, targets) = (float(h, logits), h.get_int_tensor::<B>(targets));
                let (lse, grad) = (float(h, lse), float(h, grad));
                h.register_float_tensor::<B>(
                    &out.id,
                    B::cross_entropy_backward(logits, targets, lse, grad),
                );
            }
            Kind::Gelu => {
                let ([x], [out]) = d.as_fixed();
                let x = float(h, x);
                h.register_float_tensor::<B>(&out.id, B::gelu_tanh(x));
            }
            Kind::GeluBackward => {
                let ([x, grad], [out]) = d.as_fixed();
                let (x, grad) = (float(h, x), float(h, grad));
                h.register_float_tensor::<B>(&out.id, B::gelu_tanh_backward(x, grad));
            }
            Kind::Rope { inverse } => {
                let ([x, cos, sin], [out]) = d.as_fixed();
                let (x, cos, sin) = (float(h, x), float(h, cos), float(h, sin));
                h.register_float_tensor::<B>(&out.id, B::rope(x, cos, sin, inverse));
            }
            Kind::ExactMatmul => {
                let ([lhs, rhs], [out]) = d.as_fixed();
                let (lhs, rhs) = (float(h, lhs), float(h, rhs));
                h.register_float_tensor::<B>(&out.id, B::matmul(lhs, rhs));
            }
            Kind::Dropout { p, seed } => {
                let ([x], [out]) = d.as_fixed();
                let x = float(h, x);
                h.register_float_tensor::<B>(&out.id, B::dropout_seeded(x, p, seed));
            }
        }
    }
}

type Tensor<B> = FusionTensor<<B as FusionBackend>::FusionRuntime>;

/// Registers `kind` over `inputs`, with outputs of the given shapes and dtypes.
fn register<B: FusionBackend + Nf4Backend, const N: usize>(
    kind: Kind,
    name: &'static str,
    inputs: &[&Tensor<B>],
    outputs: [(Shape, DType); N],
) -> [Tensor<B>; N] {
    let client = inputs[0].client.clone();
    let streams = OperationStreams::with_inputs(inputs.iter().copied());
    let outs: Vec<TensorIr> = outputs
        .into_iter()
        .map(|(shape, dtype)| TensorIr::uninit(client.create_empty_handle(), shape, dtype))
        .collect();
    let ins: Vec<TensorIr> = inputs.iter().map(|t| (*t).clone().into_ir()).collect();
    let desc = CustomOpIr::new(name, &ins, &outs);
    let op = ExtensionOp::<B> {
        desc: desc.clone(),
        kind,
        _b: core::marker::PhantomData,
    };
    client
        .register(streams, OperationIr::Custom(desc), op)
        .outputs()
}

fn like<B: FusionBackend>(t: &Tensor<B>) -> (Shape, DType) {
    (t.shape.clone(), t.dtype)
}

impl<B: FusionBackend + Nf4Backend> Nf4Backend for Fusion<B> {
    fn nf4_dequantize(
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let out = (Shape::from(shape.to_vec()), B::FloatElem::dtype());
        let [w] = register::<B, 1>(
            Kind::Dequantize(shape),
            "nf4_dequantize",
            &[&packed, &absmax],
            [out],
        );
        w
    }

    fn nf4_matmul(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let m = x.shape.num_elements() / shape[1];
        let out = (Shape::from(vec![m, shape[0]]), x.dtype);
        let [y] = register::<B, 1>(
            Kind::Matmul(shape),
            "nf4_matmul",
            &[&x, &packed, &absmax],
            [out],
        );
        y
    }

    fn nf4_matmul_t(
        dy: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let m = dy.shape.num_elements() / shape[0];
        let out = (Shape::from(vec![m, shape[1]]), dy.dtype);
        let [y] = register::<B, 1>(
            Kind::MatmulT(shape),
            "nf4_matmul_t",
            &[&dy, &packed, &absmax],
            [out],
        );
        y
    }
}

impl<B: FusionBackend + Nf4Backend> FusedOps for Fusion<B> {
    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        if !B::exact_matmul(lhs.dtype) {
            // Burn's matmul, which fusion may merge with the element-wise work around it.
            return <Self as FloatTensorOps<Self>>::float_matmul(lhs, rhs);
        }
        let mut dims = lhs.shape.to_vec();
        let n = rhs.shape[rhs.shape.num_dims() - 1];
        *dims.last_mut().expect("a matrix") = n;
        let out = (Shape::from(dims), lhs.dtype);
        let [y] = register::<B, 1>(Kind::ExactMatmul, "exact_matmul", &[&lhs, &rhs], [out]);
        y
    }

    fn exact_matmul(dtype: DType) -> bool {
        B::exact_matmul(dtype)
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> CrossEntropy<Self> {
        let rows = Shape::from(vec![logits.shape[0]]);
        let [nll, lse, argmax] = register::<B, 3>(
            Kind::CrossEntropy,
            "cross_entropy",
            &[&logits, &targets],
            [
                (rows.clone(), logits.dtype),
                (rows.clone(), logits.dtype),
                (rows, targets.dtype),
            ],
        );
        CrossEntropy { nll, lse, argmax }
    }

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let out = like::<B>(&logits);
        let [d] = register::<B, 1>(
            Kind::CrossEntropyBackward,
            "cross_entropy_backward",
            &[&logits, &targets, &lse, &grad],
            [out],
        );
        d
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = like::<B>(&x);
        let [y] = register::<B, 1>(Kind::Gelu, "gelu_tanh", &[&x], [out]);
        y
    }

    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = like::<B>(&x);
        let [d] = register::<B, 1>(
            Kind::GeluBackward,
            "gelu_tanh_backward",
            &[&x, &grad],
            [out],
        );
        d
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        let out = like::<B>(&x);
        let [y] = register::<B, 1>(Kind::Rope { inverse }, "rope", &[&x, &cos, &sin], [out]);
        y
    }

    fn has_seeded_dropout() -> bool {
        B::has_seeded_dropout()
    }

    fn dropout_seeded(x: FloatTensor<Self>, p: f64, seed: u64) -> FloatTensor<Self> {
        let out = like::<B>(&x);
        let [y] = register::<B, 1>(Kind::Dropout { p, seed }, "dropout_seeded", &[&x], [out]);
        y
    }
}
