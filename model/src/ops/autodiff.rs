//! `Autodiff<B>`: the hand-written backwards of every op.
//!
//! - Products ([`FusedOps::matmul`]) on a backend's own exact path: both operands' gradients,
//!   through the same path; the operands are checkpointed as Burn's own matmul does (otherwise
//!   Burn's matmul and backward are used as they are).
//! - Frozen-weight products: only the input gets a gradient (the weight is frozen); the saved
//!   state is the packed NF4 codes and absmax (or the frozen dense weight, which exists anyway),
//!   never a dequantized copy and never the input.
//! - Cross-entropy: only the nll is tracked; the state is the logits and the per-row
//!   log-sum-exp.
//! - `gelu_new` saves its input; the rotary embedding its tables (the backward is the rotation by
//!   the negated angles); the attention's softmax its output (the probabilities); dropout its
//!   seed (the backward re-derives the mask).

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{BoolTensor, FloatTensor, FloatTensorOps, IntTensor};
use burn::tensor::{DType, Tensor, TensorMetadata, TensorPrimitive};

use super::{CrossEntropy, FusedOps, Nf4Backend};

#[derive(Debug)]
struct Nf4MatmulBackward;

impl<B: Nf4Backend> Backward<B, 1> for Nf4MatmulBackward {
    type State = (IntTensor<B>, FloatTensor<B>, [usize; 2]);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (packed, absmax, shape) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::nf4_matmul_t(grad, packed, absmax, shape));
        }
    }
}

#[derive(Debug)]
struct FrozenMatmulBackward;

impl<B: Nf4Backend> Backward<B, 1> for FrozenMatmulBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::frozen_matmul_t(grad, ops.state));
        }
    }
}

#[derive(Debug)]
struct HeadCrossEntropyBackward;

impl<B: Nf4Backend> Backward<B, 1> for HeadCrossEntropyBackward {
    /// Each row's `d nll / d h` for an upstream gradient of one (`[t, hidden]`), computed in the
    /// forward while its chunk's logits existed: the backward only scales it.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_h] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_h {
            let dh_unit: Tensor<B, 2> = Tensor::from_primitive(TensorPrimitive::Float(ops.state));
            let grad: Tensor<B, 1> = Tensor::from_primitive(TensorPrimitive::Float(grad));
            let dh = dh_unit.clone() * grad.cast(dh_unit.dtype()).unsqueeze_dim::<2>(1);
            grads.register::<B>(node.id, dh.into_primitive().tensor());
        }
    }
}

impl<B: Nf4Backend, C: CheckpointStrategy> Nf4Backend for Autodiff<B, C> {
    fn nf4_dequantize(
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        // A constant: never part of the graph.
        Self::from_inner(B::nf4_dequantize(packed, Self::inner(absmax), shape))
    }

    fn nf4_matmul(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let absmax = Self::inner(absmax);
        match Nf4MatmulBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::nf4_matmul(x.primitive, packed.clone(), absmax.clone(), shape);
                prep.finish((packed, absmax, shape), out)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::nf4_matmul(x.primitive, packed, absmax, shape))
            }
        }
    }

    fn nf4_matmul_t(
        dy: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        Self::from_inner(B::nf4_matmul_t(
            Self::inner(dy),
            packed,
            Self::inner(absmax),
            shape,
        ))
    }

    fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let w = Self::inner(w);
        match FrozenMatmulBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::frozen_matmul(x.primitive, w.clone());
                prep.finish(w, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::frozen_matmul(x.primitive, w)),
        }
    }

    fn head_cross_entropy(
        h: FloatTensor<Self>,
        w: FloatTensor<Self>,
        bias: Option<FloatTensor<Self>>,
        targets: IntTensor<Self>,
        chunk: usize,
    ) -> CrossEntropy<Self> {
        // The head is frozen: its weight and bias are constants of the graph.
        let (w, bias) = (Self::inner(w), bias.map(Self::inner));
        let prep = HeadCrossEntropyBackward
            .prepare::<C>([h.node.clone()])
            .compute_bound()
            .stateful();
        let (inner, nll) = match prep {
            OpsKind::Tracked(prep) => {
                let (inner, dh_unit) =
                    B::head_cross_entropy_with_grad(h.primitive, w, bias, targets, chunk);
                let nll = prep.finish(dh_unit, inner.nll.clone());
                (inner, nll)
            }
            OpsKind::UnTracked(prep) => {
                let inner = B::head_cross_entropy(h.primitive, w, bias, targets, chunk);
                let nll = prep.finish(inner.nll.clone());
                (inner, nll)
            }
        };
        CrossEntropy {
            nll,
            lse: Self::from_inner(inner.lse),
            argmax: inner.argmax,
        }
    }

    fn frozen_matmul_t(dy: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::frozen_matmul_t(Self::inner(dy), Self::inner(w)))
    }
}

// ---------------------------------------------------------------------------------------------
// Fused ops.

#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: FusedOps> Backward<B, 1> for CrossEntropyBackward {
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_logits] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (logits, targets, lse) = ops.state;
        if let Some(node) = node_logits {
            let g = B::cross_entropy_backward(logits, targets, lse, grad);
            grads.register::<B>(node.id, g);
        }
    }
}

#[derive(Debug)]
struct RopeBackward;

impl<B: FusedOps> Backward<B, 1> for RopeBackward {
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (cos, sin) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::rope(grad, cos, sin, true));
        }
    }
}

#[derive(Debug)]
struct DropoutBackward;

impl<B: FusedOps> Backward<B, 1> for DropoutBackward {
    type State = (f64, u64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (p, seed) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::dropout_seeded(grad, p, seed));
        }
    }
}

#[derive(Debug)]
struct AttentionSoftmaxBackward;

impl<B: FusedOps> Backward<B, 1> for AttentionSoftmaxBackward {
    type State = (FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_scores] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (probs, scale) = ops.state;
        if let Some(node) = node_scores {
            grads.register::<B>(node.id, B::attention_softmax_backward(probs, grad, scale));
        }
    }
}

#[derive(Debug)]
struct MatmulBackward;

impl<B: FusedOps> Backward<B, 2> for MatmulBackward {
    /// The operands, checkpointed (recomputed under activation checkpointing where they are
    /// cheap), each kept only when the other one needs a gradient.
    type State = (Option<NodeId>, Option<NodeId>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, ck: &mut Checkpointer) {
        let [node_lhs, node_rhs] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        let (lhs, rhs) = ops.state;
        let lhs: Option<FloatTensor<B>> = lhs.map(|id| ck.retrieve_node_output(id));
        let rhs: Option<FloatTensor<B>> = rhs.map(|id| ck.retrieve_node_output(id));
        let last_two = |t: FloatTensor<B>| {
            let rank = t.shape().num_dims();
            B::float_swap_dims(t, rank - 2, rank - 1)
        };
        if let (Some(node), Some(rhs)) = (node_lhs, rhs) {
            grads.register::<B>(node.id, B::matmul(grad.clone(), last_two(rhs)));
        }
        if let (Some(node), Some(lhs)) = (node_rhs, lhs) {
            grads.register::<B>(node.id, B::matmul(last_two(lhs), grad));
        }
    }
}

#[derive(Debug)]
struct GeluTanhBackward;

impl<B: FusedOps> Backward<B, 1> for GeluTanhBackward {
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::gelu_tanh_backward(ops.state, grad));
        }
    }
}

impl<B: FusedOps, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn matmul(lhs: FloatTensor<Self>, rhs: FloatTensor<Self>) -> FloatTensor<Self> {
        if !B::exact_matmul(lhs.primitive.dtype()) {
            // Burn's own matmul and backward.
            return <Self as FloatTensorOps<Self>>::float_matmul(lhs, rhs);
        }
        let (lhs_tracked, rhs_tracked) = (lhs.is_tracked(), rhs.is_tracked());
        match MatmulBackward
            .prepare::<C>([lhs.node.clone(), rhs.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let lhs_state = rhs_tracked.then(|| prep.checkpoint(&lhs));
                let rhs_state = lhs_tracked.then(|| prep.checkpoint(&rhs));
                prep.finish(
                    (lhs_state, rhs_state),
                    B::matmul(lhs.primitive, rhs.primitive),
                )
            }
            OpsKind::UnTracked(prep) => prep.finish(B::matmul(lhs.primitive, rhs.primitive)),
        }
    }

    fn exact_matmul(dtype: DType) -> bool {
        B::exact_matmul(dtype)
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> CrossEntropy<Self> {
        let inner = B::cross_entropy(logits.primitive.clone(), targets.clone());
        let lse = Self::from_inner(inner.lse.clone());
        let nll = match CrossEntropyBackward
            .prepare::<C>([logits.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                prep.finish((logits.primitive, targets, inner.lse), inner.nll)
            }
            OpsKind::UnTracked(prep) => prep.finish(inner.nll),
        };
        CrossEntropy {
            nll,
            lse,
            argmax: inner.argmax,
        }
    }

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::cross_entropy_backward(
            Self::inner(logits),
            targets,
            Self::inner(lse),
            Self::inner(grad),
        ))
    }

    fn attention_softmax(
        scores: FloatTensor<Self>,
        mask: Option<BoolTensor<Self>>,
        scale: f64,
    ) -> FloatTensor<Self> {
        match AttentionSoftmaxBackward
            .prepare::<C>([scores.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let probs = B::attention_softmax(scores.primitive, mask, scale);
                prep.finish((probs.clone(), scale), probs)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::attention_softmax(scores.primitive, mask, scale))
            }
        }
    }

    fn attention_softmax_backward(
        probs: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        scale: f64,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::attention_softmax_backward(
            Self::inner(probs),
            Self::inner(grad),
            scale,
        ))
    }

    fn gelu_tanh(x: FloatTensor<Self>) -> FloatTensor<Self> {
        match GeluTanhBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::gelu_tanh(x.primitive.clone());
                prep.finish(x.primitive, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::gelu_tanh(x.primitive)),
        }
    }

    fn gelu_tanh_backward(x: FloatTensor<Self>, grad: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::gelu_tanh_backward(Self::inner(x), Self::inner(grad)))
    }

    fn rope(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
        inverse: bool,
    ) -> FloatTensor<Self> {
        let (cos, sin) = (Self::inner(cos), Self::inner(sin));
        match RopeBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::rope(x.primitive, cos.clone(), sin.clone(), inverse);
                // The inverse of a rotation by `inverse` is one by `!inverse`.
                if inverse {
                    let neg = B::float_neg(sin);
                    prep.finish((cos, neg), out)
                } else {
                    prep.finish((cos, sin), out)
                }
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rope(x.primitive, cos, sin, inverse)),
        }
    }

    fn has_seeded_dropout() -> bool {
        B::has_seeded_dropout()
    }

    fn dropout_seeded(x: FloatTensor<Self>, p: f64, seed: u64) -> FloatTensor<Self> {
        match DropoutBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::dropout_seeded(x.primitive, p, seed);
                prep.finish((p, seed), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::dropout_seeded(x.primitive, p, seed)),
        }
    }
}
