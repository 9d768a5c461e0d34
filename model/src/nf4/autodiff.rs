//! `Autodiff<B>`: hand-written backwards for the frozen-weight ops. Only the input gets a
//! gradient (the weight is frozen); the saved state is the packed NF4 codes and absmax (or the
//! frozen dense weight, which exists anyway), never a dequantized copy and never the input.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::{FloatTensor, IntTensor};

use super::Nf4Backend;

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

    fn frozen_matmul_t(dy: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::from_inner(B::frozen_matmul_t(Self::inner(dy), Self::inner(w)))
    }
}
