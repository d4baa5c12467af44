//! Fused operations the blocks are built from: a convolution with its bias, an optional
//! residual and an optional ReLU in one call.
//!
//! On the flex backend (float32, no autodiff) [`conv2d_fused`] runs resnet-rs's own CPU
//! convolution, plugged into Burn through its backend-extension mechanism
//! ([`ResNetKernels`]); everywhere else, and for training, it is exactly
//! `relu(conv.forward(x) + residual)` with Burn's operations. The choice follows the tensors'
//! device: the model code is the same for every backend.

use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
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

/// `pool.forward(input)`: on flex (float32, no autodiff) resnet-rs's own max pooling, which
/// skips the argmax indices Burn's computes; elsewhere Burn's.
///
/// # Shapes
/// - `input`: `[batch, channels, h, w]`
/// - output: `[batch, channels, out_h, out_w]`
pub fn max_pool2d(pool: &MaxPool2d, input: Tensor<4>) -> Tensor<4> {
    #[cfg(feature = "flex")]
    let input = match flex::try_max_pool2d(pool, input) {
        Ok(out) => return out,
        Err(unchanged) => unchanged,
    };
    pool.forward(input)
}

/// Per-side padding `[(top, bottom), (left, right)]` of a padding that does not depend on
/// the input.
fn explicit_padding(padding: &PaddingConfig2d) -> Option<[(usize, usize); 2]> {
    match *padding {
        PaddingConfig2d::Valid => Some([(0, 0), (0, 0)]),
        PaddingConfig2d::Explicit(top, left, bottom, right) => Some([(top, bottom), (left, right)]),
        PaddingConfig2d::Same => None,
    }
}

/// The options `Conv2d::forward` would use, when its padding does not depend on the input.
fn conv_options(conv: &Conv2d) -> Option<ConvOptions<2>> {
    Some(ConvOptions::new_with_padding(
        conv.stride,
        explicit_padding(&conv.padding)?,
        conv.dilation,
        conv.groups,
    ))
}

#[cfg(feature = "flex")]
pub use flex::{OptionalTensor, ResNetKernels};

#[cfg(feature = "flex")]
mod flex {
    use super::{conv_options, explicit_padding, fast_kernels};
    use crate::cpu_conv::{self, Conv2dGeometry, Pool2dGeometry};
    use burn::backend::tensor::FloatTensor;
    use burn::backend::{
        Backend, Dispatch, DispatchDevice, ExtensionType, Flex, backend_extension,
    };
    use burn::nn::conv::Conv2d;
    use burn::nn::pool::MaxPool2d;
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

    /// Backends with resnet-rs's own kernels.
    ///
    /// Implemented for flex (resnet-rs's CPU kernels). Call them through
    /// [`conv2d_fused`](super::conv2d_fused) and [`max_pool2d`](super::max_pool2d), which route
    /// other backends and autodiff to Burn's operations.
    #[backend_extension(Flex)]
    pub trait ResNetKernels: Backend {
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

        /// Max pooling of `x: [batch, channels, h, w]` (floor mode), padding
        /// `[(top, bottom), (left, right)]` ignored, NaN propagated.
        fn max_pool2d(
            x: FloatTensor<Self>,
            kernel: [usize; 2],
            stride: [usize; 2],
            padding: [(usize, usize); 2],
            dilation: [usize; 2],
        ) -> FloatTensor<Self>;
    }

    impl ResNetKernels for Flex {
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
            float32(out, geo.output_shape())
        }

        fn max_pool2d(
            x: FlexTensor,
            kernel: [usize; 2],
            stride: [usize; 2],
            padding: [(usize, usize); 2],
            dilation: [usize; 2],
        ) -> FlexTensor {
            let x = x.to_contiguous();
            let [batch, channels, h, w] = dims4(&x);
            let geo =
                Pool2dGeometry::new([batch, channels, h, w], kernel, stride, padding, dilation)
                    .expect("max_pool2d: options checked by the caller");
            float32(
                cpu_conv::max_pool2d(&geo, x.storage::<f32>()),
                [batch, channels, geo.out_h, geo.out_w],
            )
        }
    }

    fn dims4(t: &FlexTensor) -> [usize; 4] {
        let shape = t.layout().shape();
        [shape[0], shape[1], shape[2], shape[3]]
    }

    fn float32(values: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
        FlexTensor::new(
            burn::tensor::Bytes::from_elems(values),
            Layout::contiguous(Shape::from(shape.to_vec())),
            DType::F32,
        )
    }

    /// Whether `t` is a plain (non-autodiff) float32 flex tensor and the kernels are on.
    fn on_plain_flex<const D: usize>(t: &Tensor<D>) -> bool {
        fast_kernels()
            && t.dtype() == DType::F32
            && matches!(t.device().as_dispatch(), DispatchDevice::Flex(_))
    }

    /// Run the max pooling on flex when `input` is a plain float32 flex tensor and the options
    /// are supported (no ceil mode, input-independent padding); otherwise hand `input` back.
    pub(super) fn try_max_pool2d(
        pool: &MaxPool2d,
        input: Tensor<4>,
    ) -> Result<Tensor<4>, Tensor<4>> {
        let Some(padding) = explicit_padding(&pool.padding) else {
            return Err(input);
        };
        let fits = Pool2dGeometry::new(
            input.dims(),
            pool.kernel_size,
            pool.stride,
            padding,
            pool.dilation,
        )
        .is_some();
        if !on_plain_flex(&input) || pool.ceil_mode || !fits {
            return Err(input);
        }
        let out = <Dispatch as ResNetKernels>::max_pool2d(
            input.into_dispatch(),
            pool.kernel_size,
            pool.stride,
            padding,
            pool.dilation,
        );
        Ok(Tensor::from_dispatch(out))
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
        if !on_plain_flex(&input) {
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
        let all_f32 = weight.dtype() == DType::F32
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
        let out = <Dispatch as ResNetKernels>::conv2d_fused(
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
