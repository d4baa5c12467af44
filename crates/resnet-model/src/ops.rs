//! Fused operations the blocks are built from: a convolution with its bias, an optional
//! residual and an optional ReLU in one call.
//!
//! On the flex backend (float32, no autodiff) [`conv2d_fused`] runs resnet-rs's own CPU
//! convolution, plugged into Burn through its backend-extension mechanism
//! ([`FusedConvBackend`]); everywhere else, and for training, it is exactly
//! `relu(conv.forward(x) + residual)` with Burn's operations. The choice follows the tensors'
//! device: the model code is the same for every backend.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;
use burn::tensor::activation::relu;
use burn::tensor::ops::ConvOptions;
use std::sync::atomic::{AtomicBool, Ordering};

static FAST_KERNELS: AtomicBool = AtomicBool::new(true);

/// Turn resnet-rs's own CPU kernels on or off for the whole process (on by default).
///
/// Off, every backend runs Burn's operations; meant for benchmarks and for checking results
/// against Burn.
pub fn set_fast_kernels(enabled: bool) {
    FAST_KERNELS.store(enabled, Ordering::Relaxed);
}

/// Whether [`conv2d_fused`] may use resnet-rs's own kernels (see [`set_fast_kernels`]).
pub fn fast_kernels() -> bool {
    FAST_KERNELS.load(Ordering::Relaxed)
}

/// `act(conv(input) + residual)`, with `act` the ReLU when `apply_relu`, else the identity.
///
/// # Shapes
/// - `input`: `[batch, in_channels, h, w]`
/// - `residual`: the output's shape, `[batch, out_channels, out_h, out_w]`
/// - output: `[batch, out_channels, out_h, out_w]`
pub fn conv2d_fused(
    conv: &Conv2d,
    input: Tensor<4>,
    residual: Option<Tensor<4>>,
    apply_relu: bool,
) -> Tensor<4> {
    #[cfg(feature = "flex")]
    let (input, residual) = match flex::try_conv2d(conv, input, residual, apply_relu) {
        Ok(out) => return out,
        Err(unchanged) => unchanged,
    };
    let mut out = conv.forward(input);
    if let Some(residual) = residual {
        out = out + residual;
    }
    if apply_relu { relu(out) } else { out }
}

/// The options `Conv2d::forward` would use, when its padding does not depend on the input.
fn conv_options(conv: &Conv2d) -> Option<ConvOptions<2>> {
    let padding = match conv.padding {
        PaddingConfig2d::Valid => [(0, 0), (0, 0)],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [(top, bottom), (left, right)],
        PaddingConfig2d::Same => return None,
    };
    Some(ConvOptions::new_with_padding(
        conv.stride,
        padding,
        conv.dilation,
        conv.groups,
    ))
}

#[cfg(feature = "flex")]
pub use flex::{FusedConvBackend, OptionalTensor};

#[cfg(feature = "flex")]
mod flex {
    use super::{conv_options, fast_kernels};
    use crate::cpu_conv::{self, Conv2dGeometry};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{
        Backend, Dispatch, DispatchDevice, ExtensionType, Flex, backend_extension,
    };
    use burn::nn::conv::Conv2d;
    use burn::tensor::ops::ConvOptions;
    use burn::tensor::{DType, Shape, Tensor};
    use burn_flex::{FlexTensor, Layout};

    /// A tensor argument that may be absent.
    #[derive(ExtensionType)]
    pub enum OptionalTensor<B: Backend> {
        /// The tensor.
        Some(FloatTensor<B>),
        /// No tensor.
        None,
    }

    impl<B: Backend> OptionalTensor<B> {
        fn into_option(self) -> Option<FloatTensor<B>> {
            match self {
                Self::Some(tensor) => Some(tensor),
                Self::None => None,
            }
        }
    }

    /// Backends with a fused convolution: `act(conv2d(x, weight) + bias + residual)`.
    ///
    /// Implemented for flex (resnet-rs's CPU kernel). Call it through
    /// [`conv2d_fused`](super::conv2d_fused), which routes other backends to Burn's operations.
    #[backend_extension(Flex)]
    pub trait FusedConvBackend: Backend {
        /// `x: [batch, in, h, w]`, `weight: [out, in / groups, kh, kw]`, `bias: [out]`,
        /// `residual`: the output's shape. Float32, contiguous or not.
        fn conv2d_fused(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            #[extension_type] bias: OptionalTensor<Self>,
            #[extension_type] residual: OptionalTensor<Self>,
            options: ConvOptions<2>,
            relu: bool,
        ) -> FloatTensor<Self>;
    }

    impl FusedConvBackend for Flex {
        fn conv2d_fused(
            x: FlexTensor,
            weight: FlexTensor,
            bias: OptionalTensor<Self>,
            residual: OptionalTensor<Self>,
            options: ConvOptions<2>,
            relu: bool,
        ) -> FlexTensor {
            let x = x.to_contiguous();
            let weight = weight.to_contiguous();
            let bias = bias.into_option().map(|b| b.to_contiguous());
            let residual = residual.into_option().map(|r| r.to_contiguous());
            let dims4 = |t: &FlexTensor| -> [usize; 4] {
                let shape = t.layout().shape();
                [shape[0], shape[1], shape[2], shape[3]]
            };
            let geo = Conv2dGeometry::new(dims4(&x), dims4(&weight), &options)
                .expect("conv2d_fused: shapes checked by the caller");
            let out = cpu_conv::conv2d(
                &geo,
                x.storage::<f32>(),
                weight.storage::<f32>(),
                bias.as_ref().map(|b| b.storage::<f32>()),
                residual.as_ref().map(|r| r.storage::<f32>()),
                relu,
            );
            FlexTensor::new(
                burn::tensor::Bytes::from_elems(out),
                Layout::contiguous(Shape::from(geo.output_shape().to_vec())),
                DType::F32,
            )
        }
    }

    /// Run the fused convolution on flex when every tensor is a plain (non-autodiff) float32
    /// flex tensor with shapes that fit; otherwise hand the arguments back untouched.
    #[allow(clippy::type_complexity)]
    pub(super) fn try_conv2d(
        conv: &Conv2d,
        input: Tensor<4>,
        residual: Option<Tensor<4>>,
        relu: bool,
    ) -> Result<Tensor<4>, (Tensor<4>, Option<Tensor<4>>)> {
        if !fast_kernels() || !matches!(input.device().as_dispatch(), DispatchDevice::Flex(_)) {
            return Err((input, residual));
        }
        let weight = conv.weight.val();
        let options = conv_options(conv);
        let geometry = options
            .as_ref()
            .and_then(|o| Conv2dGeometry::new(input.dims(), weight.dims(), o));
        let fits = geometry.is_some_and(|geo| {
            residual
                .as_ref()
                .is_none_or(|r| r.dims() == geo.output_shape())
        });
        let all_f32 = input.dtype() == DType::F32
            && weight.dtype() == DType::F32
            && residual.as_ref().is_none_or(|r| r.dtype() == DType::F32)
            && conv
                .bias
                .as_ref()
                .is_none_or(|b| b.val().dtype() == DType::F32);
        let (Some(options), true, true) = (options, fits, all_f32) else {
            return Err((input, residual));
        };
        let optional = |t: Option<FloatTensor<Dispatch>>| match t {
            Some(t) => OptionalTensor::Some(t),
            None => OptionalTensor::None,
        };
        let out = <Dispatch as FusedConvBackend>::conv2d_fused(
            input.into_dispatch(),
            weight.into_dispatch(),
            optional(conv.bias.as_ref().map(|b| b.val().into_dispatch())),
            optional(residual.map(Tensor::into_dispatch)),
            options,
            relu,
        );
        Ok(Tensor::from_dispatch(out))
    }
}
