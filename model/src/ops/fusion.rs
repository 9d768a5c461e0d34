//! `Fusion<B>` (what `burn::backend::Cuda`/`Wgpu` are with fusion on): each NF4 op is
//! registered as a custom operation that runs the inner backend's implementation. The fused
//! element-wise ops take their tensor-op defaults, which Burn's fusion compiles itself.

use burn::tensor::Element;
use burn::tensor::Shape;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use super::{FusedOps, Nf4Backend};

#[derive(Clone, Copy, Debug)]
enum Kind {
    Dequantize,
    Matmul,
    MatmulT,
}

#[derive(Clone, Debug)]
struct Nf4Op<B> {
    desc: CustomOpIr,
    kind: Kind,
    shape: [usize; 2],
    _b: core::marker::PhantomData<B>,
}

impl<B: FusionBackend + Nf4Backend> Operation<B::FusionRuntime> for Nf4Op<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let out = match self.kind {
            Kind::Dequantize => {
                let ([packed, absmax], [out]) = self.desc.as_fixed();
                let packed = handles.get_int_tensor::<B>(packed);
                let absmax = handles.get_float_tensor::<B>(absmax);
                handles.register_float_tensor::<B>(
                    &out.id,
                    B::nf4_dequantize(packed, absmax, self.shape),
                );
                return;
            }
            Kind::Matmul | Kind::MatmulT => {
                let ([x, packed, absmax], [out]) = self.desc.as_fixed();
                let x = handles.get_float_tensor::<B>(x);
                let packed = handles.get_int_tensor::<B>(packed);
                let absmax = handles.get_float_tensor::<B>(absmax);
                let y = match self.kind {
                    Kind::Matmul => B::nf4_matmul(x, packed, absmax, self.shape),
                    _ => B::nf4_matmul_t(x, packed, absmax, self.shape),
                };
                (out, y)
            }
        };
        handles.register_float_tensor::<B>(&out.0.id, out.1);
    }
}

impl<B: FusionBackend + Nf4Backend> Nf4Backend for Fusion<B> {
    fn nf4_dequantize(
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let client = packed.client.clone();
        let streams = OperationStreams::with_inputs([&packed, &absmax]);
        let out = TensorIr::uninit(
            client.create_empty_handle(),
            Shape::from(shape.to_vec()),
            B::FloatElem::dtype(),
        );
        let desc = CustomOpIr::new(
            "nf4_dequantize",
            &[packed.into_ir(), absmax.into_ir()],
            &[out],
        );
        let op = Nf4Op::<B> {
            desc: desc.clone(),
            kind: Kind::Dequantize,
            shape,
            _b: core::marker::PhantomData,
        };
        client
            .register(streams, OperationIr::Custom(desc), op)
            .output()
    }

    fn nf4_matmul(
        x: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let m = x.shape.num_elements() / shape[1];
        register::<B>(
            Kind::Matmul,
            "nf4_matmul",
            x,
            packed,
            absmax,
            shape,
            [m, shape[0]],
        )
    }

    fn nf4_matmul_t(
        dy: FloatTensor<Self>,
        packed: IntTensor<Self>,
        absmax: FloatTensor<Self>,
        shape: [usize; 2],
    ) -> FloatTensor<Self> {
        let m = dy.shape.num_elements() / shape[0];
        register::<B>(
            Kind::MatmulT,
            "nf4_matmul_t",
            dy,
            packed,
            absmax,
            shape,
            [m, shape[1]],
        )
    }
}

fn register<B: FusionBackend + Nf4Backend>(
    kind: Kind,
    name: &'static str,
    x: FloatTensor<Fusion<B>>,
    packed: IntTensor<Fusion<B>>,
    absmax: FloatTensor<Fusion<B>>,
    shape: [usize; 2],
    out_shape: [usize; 2],
) -> FloatTensor<Fusion<B>> {
    let client = x.client.clone();
    let streams = OperationStreams::with_inputs([&x, &packed, &absmax]);
    let out = TensorIr::uninit(
        client.create_empty_handle(),
        Shape::from(out_shape.to_vec()),
        B::FloatElem::dtype(),
    );
    let desc = CustomOpIr::new(
        name,
        &[x.into_ir(), packed.into_ir(), absmax.into_ir()],
        &[out],
    );
    let op = Nf4Op::<B> {
        desc: desc.clone(),
        kind,
        shape,
        _b: core::marker::PhantomData,
    };
    client
        .register(streams, OperationIr::Custom(desc), op)
        .output()
}

impl<B: FusionBackend + FusedOps> FusedOps for Fusion<B> {}
