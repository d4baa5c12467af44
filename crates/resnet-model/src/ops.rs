//! Fused operations the blocks are built from: a convolution with its bias, an optional
//! residual and an optional ReLU in one call.
//!
//! On the flex backend (float32) [`conv2d_fused`] and [`max_pool2d`] run resnet-rs's own CPU
//! kernels, plugged into Burn through its backend-extension mechanism ([`ResNetKernels`]):
//! im2col plus a single-threaded GEMM per work unit, the bias, residual and ReLU applied while
//! the block is in cache; the large 3x3 stride-1 convolutions through Winograd's F(4x4, 3x3)
//! or F(2x2, 3x3) (see [`set_winograd`]). Under autodiff (training) a plain convolution runs
//! them forward and backward (input and weight gradients); a convolution with bias, residual
//! or ReLU is composed from Burn's differentiable operations. On every other backend both are
//! exactly Burn's `relu(conv.forward(x) + residual)` and `pool.forward(x)`. In training on flex,
//! [`batch_norm`] runs resnet-rs's own batch norm (forward and backward, running statistics as
//! Burn's); elsewhere it is `bn.forward(x)`. The choice follows the tensors' device: the model
//! code is the same for every backend.

use burn::nn::BatchNorm;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::nn::pool::MaxPool2d;
use burn::tensor::Tensor;
use burn::tensor::activation::relu;
use burn::tensor::ops::ConvOptions;
use std::sync::atomic::{AtomicBool, Ordering};

static FAST_KERNELS: AtomicBool = AtomicBool::new(true);
static WINOGRAD: AtomicBool = AtomicBool::new(true);

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

/// Let [`conv2d_fused`] run the large 3x3 stride-1 convolutions on flex (at least 64 input
/// and output channels, outputs of 7x7 and more, ungrouped) through Winograd's algorithm:
/// on by default. F(4x4, 3x3) (4x fewer multiplications; rounding errors up to about 7e-6 of
/// the largest output, against about 1e-6 direct) where the batch has enough 4x4 tiles and
/// they cover the output closely (ResNet-50's 56x56 and 28x28 stages at batch 8), F(2x2, 3x3)
/// (2.25x fewer, rounding at the direct convolution's level) elsewhere. Off, they take the
/// direct im2col path. Where an output comes out NaN or infinite, the convolution is
/// recomputed directly, so NaN and infinity come out exactly as there.
pub fn set_winograd(enabled: bool) {
    WINOGRAD.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_winograd`] has the Winograd path on.
pub fn winograd() -> bool {
    WINOGRAD.load(Ordering::Relaxed)
}

/// Drop the Winograd weight transforms kept from earlier calls, and the weights they hold.
///
/// Outside training, the Winograd path transforms a convolution's weights at its first call
/// and keeps the result (keyed by the weight tensor's storage, which the cache holds, so the
/// weights cannot change under it: flex copies shared storage before writing) for later
/// calls: at most 256 MiB, least recently used dropped first; an entry whose weights nothing
/// else holds goes at the next Winograd call. Call this to free that memory at once, e.g.
/// after dropping a model. Does nothing without the `flex` feature.
pub fn clear_weight_cache() {
    #[cfg(feature = "flex")]
    crate::cpu_winograd::clear_weight_cache();
}

/// Number of weight tensors with cached Winograd transforms (see [`clear_weight_cache`]), and
/// the bytes of those transforms. `(0, 0)` without the `flex` feature.
pub fn weight_cache_usage() -> (usize, usize) {
    #[cfg(feature = "flex")]
    return crate::cpu_winograd::weight_cache_usage();
    #[cfg(not(feature = "flex"))]
    (0, 0)
}

/// `f(input)`, a pass of the network over `input`, run on a thread of rayon's pool (the one the
/// CPU kernels' work units run on) when `input` lives on flex without autodiff: each
/// convolution then shares its work units out from inside the pool, instead of handing them
/// over from a thread outside it and sleeping until the last one is done (a wake-up per
/// convolution: about 2% of ResNet-18's and ResNet-50's batch-1 latency). Elsewhere, and on a
/// thread of a rayon pool already, `f(input)` as it is.
pub fn in_kernel_pool<T: Send>(input: Tensor<4>, f: impl FnOnce(Tensor<4>) -> T + Send) -> T {
    #[cfg(feature = "flex")]
    if flex::on_flex(&input, false) && rayon::current_thread_index().is_none() {
        return rayon::scope(move |_| f(input));
    }
    f(input)
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

/// `bn.forward(input)`. In training (an autodiff flex device, float32, the batch norm not
/// frozen) resnet-rs's own batch norm runs forward and backward, on the batch's statistics,
/// and updates the running mean and variance as Burn's does; Burn's default training batch
/// norm copies the activation (batch and channel axes swapped) for every per-channel sum, 7% of
/// a CIFAR ResNet-18 training step. Everywhere else (inference, other backends) it is Burn's.
///
/// # Shapes
/// - `input`: `[batch, channels, h, w]`
/// - output: the input's shape
pub fn batch_norm(bn: &BatchNorm, input: Tensor<4>) -> Tensor<4> {
    #[cfg(all(feature = "flex", feature = "autodiff"))]
    let input = match flex::try_batch_norm(bn, input) {
        Ok(out) => return out,
        Err(unchanged) => unchanged,
    };
    bn.forward(input)
}

/// Per-side padding `[(top, bottom), (left, right)]` of a padding that does not depend on
/// the input.
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
fn explicit_padding(padding: &PaddingConfig2d) -> Option<[(usize, usize); 2]> {
    match *padding {
        PaddingConfig2d::Valid => Some([(0, 0), (0, 0)]),
        PaddingConfig2d::Explicit(top, left, bottom, right) => Some([(top, bottom), (left, right)]),
        PaddingConfig2d::Same => None,
    }
}

/// The options `Conv2d::forward` would use, when its padding does not depend on the input.
#[cfg_attr(not(feature = "flex"), allow(dead_code))]
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
    use crate::cpu_batchnorm;
    use crate::cpu_conv::{self, Conv2dGeometry, Pool2dGeometry};
    #[cfg(feature = "autodiff")]
    use burn::backend::autodiff::{
        Autodiff, NodeId,
        checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
        grads::Gradients,
        ops::{Backward, Ops, OpsKind},
    };
    #[cfg(feature = "autodiff")]
    use burn::backend::ops::{ActivationOps, FloatTensorOps, ModuleOps};
    use burn::backend::tensor::FloatTensor;
    #[cfg(feature = "autodiff")]
    use burn::backend::{AutodiffBackend, TensorMetadata};
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
    #[backend_extension(Flex, Autodiff: cfg(feature = "autodiff"))]
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

        /// Per-channel `[mean..., biased variance...]` (`[2 * channels]`) of `x: [batch,
        /// channels, h, w]`. Not differentiable (training uses it for the running statistics
        /// and, through [`batch_norm_apply`](Self::batch_norm_apply), the batch's own).
        fn batch_norm_stats(x: FloatTensor<Self>) -> FloatTensor<Self>;

        /// Training-mode batch norm: `(x - mean) / sqrt(var + epsilon) * gamma + beta` with
        /// `stats` = [`batch_norm_stats`](Self::batch_norm_stats)`(x)`, the batch's own. Under
        /// autodiff its backward pass is the full batch-norm gradient (through the statistics
        /// too), so `stats` must be `x`'s.
        fn batch_norm_apply(
            x: FloatTensor<Self>,
            stats: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            beta: FloatTensor<Self>,
            epsilon: f64,
        ) -> FloatTensor<Self>;

        /// Gradients of gamma and beta of [`batch_norm_apply`](Self::batch_norm_apply), as
        /// `[d_gamma..., d_beta...]`, given the gradient `grad` of its output.
        fn batch_norm_backward_params(
            x: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            stats: FloatTensor<Self>,
            epsilon: f64,
        ) -> FloatTensor<Self>;

        /// Gradient of [`batch_norm_apply`](Self::batch_norm_apply) with respect to `x`, given
        /// `params` from [`batch_norm_backward_params`](Self::batch_norm_backward_params).
        fn batch_norm_backward_input(
            x: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            stats: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            params: FloatTensor<Self>,
            epsilon: f64,
        ) -> FloatTensor<Self>;

        /// Gradient of `conv2d(x, weight)` (no bias) with respect to `x`, given the gradient
        /// `grad` of its output.
        fn conv2d_backward_input(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            options: ConvOptions<2>,
        ) -> FloatTensor<Self>;

        /// Gradient of `conv2d(x, weight)` (no bias) with respect to `weight`, given the
        /// gradient `grad` of its output.
        fn conv2d_backward_weight(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            options: ConvOptions<2>,
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
            // The weights' own storage names them for the Winograd weight cache, unless making
            // them contiguous copied them (a fresh buffer at every call).
            let storage = weight.data_arc();
            let weight = weight.to_contiguous();
            let owner = std::sync::Arc::ptr_eq(&storage, &weight.data_arc()).then_some(storage);
            let bias = bias.into_option().map(|b| b.to_contiguous());
            let residual = residual.into_option().map(|r| r.to_contiguous());
            let geo = Conv2dGeometry::new(dims4(&x), dims4(&weight), &options)
                .expect("conv2d_fused: shapes checked by the caller");
            let out = cpu_conv::conv2d(
                &geo,
                x.storage::<f32>(),
                weight.storage::<f32>(),
                owner.as_ref(),
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

        fn batch_norm_stats(x: FlexTensor) -> FlexTensor {
            let x = x.to_contiguous();
            let shape = norm_shape(&x);
            let stats = cpu_batchnorm::stats(&shape, x.storage());
            float32_shaped(stats, vec![2 * shape.channels])
        }

        fn batch_norm_apply(
            x: FlexTensor,
            stats: FlexTensor,
            gamma: FlexTensor,
            beta: FlexTensor,
            epsilon: f64,
        ) -> FlexTensor {
            let x = x.to_contiguous();
            let [stats, gamma, beta] = [stats, gamma, beta].map(|t| t.to_contiguous());
            let shape = norm_shape(&x);
            let out = cpu_batchnorm::apply(
                &shape,
                x.storage(),
                stats.storage(),
                gamma.storage(),
                beta.storage(),
                epsilon,
            );
            float32_shaped(out, x.layout().shape().to_vec())
        }

        fn batch_norm_backward_params(
            x: FlexTensor,
            grad: FlexTensor,
            stats: FlexTensor,
            epsilon: f64,
        ) -> FlexTensor {
            let [x, grad, stats] = [x, grad, stats].map(|t| t.to_contiguous());
            let shape = norm_shape(&x);
            let params = cpu_batchnorm::backward_params(
                &shape,
                x.storage(),
                grad.storage(),
                stats.storage(),
                epsilon,
            );
            float32_shaped(params, vec![2 * shape.channels])
        }

        fn batch_norm_backward_input(
            x: FlexTensor,
            grad: FlexTensor,
            stats: FlexTensor,
            gamma: FlexTensor,
            params: FlexTensor,
            epsilon: f64,
        ) -> FlexTensor {
            let [x, grad, stats, gamma, params] =
                [x, grad, stats, gamma, params].map(|t| t.to_contiguous());
            let shape = norm_shape(&x);
            let dx = cpu_batchnorm::backward_input(
                &shape,
                x.storage(),
                grad.storage(),
                stats.storage(),
                gamma.storage(),
                params.storage(),
                epsilon,
            );
            float32_shaped(dx, x.layout().shape().to_vec())
        }

        fn conv2d_backward_input(
            x: FlexTensor,
            weight: FlexTensor,
            grad: FlexTensor,
            options: ConvOptions<2>,
        ) -> FlexTensor {
            let (weight, grad) = (weight.to_contiguous(), grad.to_contiguous());
            let x_shape = dims4(&x);
            let geo = Conv2dGeometry::new(x_shape, dims4(&weight), &options)
                .expect("conv2d_backward_input: shapes checked by the forward pass");
            let dx = cpu_conv::conv2d_backward_input(&geo, weight.storage(), grad.storage());
            float32(dx, x_shape)
        }

        fn conv2d_backward_weight(
            x: FlexTensor,
            weight: FlexTensor,
            grad: FlexTensor,
            options: ConvOptions<2>,
        ) -> FlexTensor {
            let (x, grad) = (x.to_contiguous(), grad.to_contiguous());
            let w_shape = dims4(&weight);
            let geo = Conv2dGeometry::new(dims4(&x), w_shape, &options)
                .expect("conv2d_backward_weight: shapes checked by the forward pass");
            let dw = cpu_conv::conv2d_backward_weight(&geo, x.storage(), grad.storage());
            float32(dw, w_shape)
        }
    }

    /// Training: a plain convolution (no bias, residual or ReLU) runs resnet-rs's kernels
    /// forward and backward; anything else is composed from Burn's differentiable operations.
    #[cfg(feature = "autodiff")]
    impl<B: Backend + ResNetKernels, C: CheckpointStrategy> ResNetKernels for Autodiff<B, C> {
        fn conv2d_fused(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            bias: OptionalTensor<Self>,
            residual: OptionalTensor<Self>,
            options: ConvOptions<2>,
            relu: bool,
        ) -> FloatTensor<Self> {
            let (bias, residual) = (bias.into_option(), residual.into_option());
            if bias.is_some() || residual.is_some() || relu {
                let mut out = Self::conv2d(x, weight, bias, options);
                if let Some(residual) = residual {
                    out = Self::float_add(out, residual);
                }
                return if relu { Self::relu(out) } else { out };
            }

            #[derive(Debug)]
            struct PlainConv2d;

            impl<B: Backend + ResNetKernels> Backward<B, 2> for PlainConv2d {
                type State = (NodeId, NodeId, ConvOptions<2>);

                fn backward(
                    self,
                    ops: Ops<Self::State, 2>,
                    grads: &mut Gradients,
                    checkpointer: &mut Checkpointer,
                ) {
                    let [node_x, node_weight] = ops.parents;
                    let grad = grads.consume::<B>(&ops.node);
                    let (x_state, weight_state, options) = ops.state;
                    let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_state);
                    let weight = checkpointer.retrieve_node_output::<FloatTensor<B>>(weight_state);
                    if let Some(node) = node_x {
                        let dx = B::conv2d_backward_input(
                            x.clone(),
                            weight.clone(),
                            grad.clone(),
                            options.clone(),
                        );
                        grads.register::<B>(node.id, dx);
                    }
                    if let Some(node) = node_weight {
                        let dw = B::conv2d_backward_weight(x, weight, grad, options);
                        grads.register::<B>(node.id, dw);
                    }
                }
            }

            // Training changes the weights at every step: no Winograd weight cache.
            let forward = |x: FloatTensor<B>, weight: FloatTensor<B>, options: ConvOptions<2>| {
                crate::cpu_winograd::without_weight_cache(|| {
                    B::conv2d_fused(
                        x,
                        weight,
                        OptionalTensor::None,
                        OptionalTensor::None,
                        options,
                        false,
                    )
                })
            };
            match PlainConv2d
                .prepare::<C>([x.node(), weight.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let x_state = prep.checkpoint(&x);
                    let weight_state = prep.checkpoint(&weight);
                    let out = forward(x.into_primitive(), weight.into_primitive(), options.clone());
                    prep.finish((x_state, weight_state, options), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(forward(
                    x.into_primitive(),
                    weight.into_primitive(),
                    options,
                )),
            }
        }

        fn max_pool2d(
            x: FloatTensor<Self>,
            kernel: [usize; 2],
            stride: [usize; 2],
            padding: [(usize, usize); 2],
            dilation: [usize; 2],
        ) -> FloatTensor<Self> {
            // Never routed here by `ops::max_pool2d` (Burn's pooling has its backward pass);
            // Burn's autodiff pooling takes symmetric padding only.
            let [(top, bottom), (left, right)] = padding;
            assert!(
                top == bottom && left == right,
                "ResNetKernels::max_pool2d with autodiff: asymmetric padding {padding:?}"
            );
            <Self as ModuleOps<Self>>::max_pool2d(x, kernel, stride, [top, left], dilation, false)
        }

        fn batch_norm_stats(x: FloatTensor<Self>) -> FloatTensor<Self> {
            Self::from_inner(B::batch_norm_stats(Self::inner(x)))
        }

        fn batch_norm_apply(
            x: FloatTensor<Self>,
            stats: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            beta: FloatTensor<Self>,
            epsilon: f64,
        ) -> FloatTensor<Self> {
            #[derive(Debug)]
            struct BatchNormTrain;

            impl<B: Backend + ResNetKernels> Backward<B, 3> for BatchNormTrain {
                type State = (NodeId, NodeId, FloatTensor<B>, f64);

                fn backward(
                    self,
                    ops: Ops<Self::State, 3>,
                    grads: &mut Gradients,
                    checkpointer: &mut Checkpointer,
                ) {
                    let [node_x, node_gamma, node_beta] = ops.parents;
                    let grad = grads.consume::<B>(&ops.node);
                    let (x_state, gamma_state, stats, epsilon) = ops.state;
                    let x = checkpointer.retrieve_node_output::<FloatTensor<B>>(x_state);
                    let gamma = checkpointer.retrieve_node_output::<FloatTensor<B>>(gamma_state);
                    let params = B::batch_norm_backward_params(
                        x.clone(),
                        grad.clone(),
                        stats.clone(),
                        epsilon,
                    );
                    let channels = params.shape()[0] / 2;
                    let half = |range: std::ops::Range<usize>| {
                        B::float_slice(params.clone(), &[burn::tensor::Slice::from(range)])
                    };
                    if let Some(node) = node_gamma {
                        grads.register::<B>(node.id, half(0..channels));
                    }
                    if let Some(node) = node_beta {
                        grads.register::<B>(node.id, half(channels..2 * channels));
                    }
                    if let Some(node) = node_x {
                        let dx = B::batch_norm_backward_input(
                            x,
                            grad,
                            stats,
                            gamma,
                            params.clone(),
                            epsilon,
                        );
                        grads.register::<B>(node.id, dx);
                    }
                }
            }

            let stats = Self::inner(stats);
            match BatchNormTrain
                .prepare::<C>([x.node(), gamma.node(), beta.node()])
                .compute_bound()
                .stateful()
            {
                OpsKind::Tracked(mut prep) => {
                    let x_state = prep.checkpoint(&x);
                    let gamma_state = prep.checkpoint(&gamma);
                    let out = B::batch_norm_apply(
                        x.into_primitive(),
                        stats.clone(),
                        gamma.into_primitive(),
                        beta.into_primitive(),
                        epsilon,
                    );
                    prep.finish((x_state, gamma_state, stats, epsilon), out)
                }
                OpsKind::UnTracked(prep) => prep.finish(B::batch_norm_apply(
                    x.into_primitive(),
                    stats,
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                )),
            }
        }

        fn batch_norm_backward_params(
            x: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            stats: FloatTensor<Self>,
            epsilon: f64,
        ) -> FloatTensor<Self> {
            let [x, grad, stats] = [x, grad, stats].map(Self::inner);
            Self::from_inner(B::batch_norm_backward_params(x, grad, stats, epsilon))
        }

        fn batch_norm_backward_input(
            x: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            stats: FloatTensor<Self>,
            gamma: FloatTensor<Self>,
            params: FloatTensor<Self>,
            epsilon: f64,
        ) -> FloatTensor<Self> {
            let [x, grad, stats, gamma, params] = [x, grad, stats, gamma, params].map(Self::inner);
            Self::from_inner(B::batch_norm_backward_input(
                x, grad, stats, gamma, params, epsilon,
            ))
        }

        fn conv2d_backward_input(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            options: ConvOptions<2>,
        ) -> FloatTensor<Self> {
            <Self as ModuleOps<Self>>::conv2d_x_backward(x, weight, grad, options)
        }

        fn conv2d_backward_weight(
            x: FloatTensor<Self>,
            weight: FloatTensor<Self>,
            grad: FloatTensor<Self>,
            options: ConvOptions<2>,
        ) -> FloatTensor<Self> {
            <Self as ModuleOps<Self>>::conv2d_weight_backward(x, weight, grad, options)
        }
    }

    fn dims4(t: &FlexTensor) -> [usize; 4] {
        let shape = t.layout().shape();
        [shape[0], shape[1], shape[2], shape[3]]
    }

    /// `[batch, channels, plane]` of a batch-norm input (rank 2 to 4: `[batch, channels, ...]`).
    fn norm_shape(x: &FlexTensor) -> cpu_batchnorm::NormShape {
        let shape = x.layout().shape();
        cpu_batchnorm::NormShape {
            batch: shape[0],
            channels: shape[1],
            plane: shape.iter().skip(2).product(),
        }
    }

    fn float32_shaped(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
        FlexTensor::new(
            burn::tensor::Bytes::from_elems(values),
            Layout::contiguous(Shape::from(shape)),
            DType::F32,
        )
    }

    fn float32(values: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
        float32_shaped(values, shape.to_vec())
    }

    /// Whether `t` is a float32 flex tensor (an autodiff one too if `autodiff`) and the
    /// kernels are on.
    #[cfg_attr(not(feature = "autodiff"), allow(unused_variables))]
    pub(super) fn on_flex<const D: usize>(t: &Tensor<D>, autodiff: bool) -> bool {
        if !fast_kernels() || t.dtype() != DType::F32 {
            return false;
        }
        match t.device().as_dispatch() {
            DispatchDevice::Flex(_) => true,
            #[cfg(feature = "autodiff")]
            DispatchDevice::Autodiff(device) => {
                autodiff && matches!(device.clone().inner(), DispatchDevice::Flex(_))
            }
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// Training-mode batch norm on flex (see [`super::batch_norm`]), or `input` back where it
    /// does not apply.
    #[cfg(feature = "autodiff")]
    #[allow(clippy::result_large_err)] // hands the caller's own tensor back, moved
    pub(super) fn try_batch_norm(
        bn: &burn::nn::BatchNorm,
        input: Tensor<4>,
    ) -> Result<Tensor<4>, Tensor<4>> {
        let [channels] = bn.gamma.shape().dims();
        let training = input.device().is_autodiff() && bn.training.is_enabled();
        let (gamma, beta) = (bn.gamma.val(), bn.beta.val());
        let fits = input.dims()[1] == channels
            && gamma.dtype() == DType::F32
            && beta.dtype() == DType::F32;
        if !training || !fits || !on_flex(&input, true) {
            return Err(input);
        }
        let device = input.device();
        // The batch's statistics, as constants (the backward pass accounts for them), back on
        // autodiff with the input's checkpointing strategy (operands must share one).
        let strategy = input.gradient_checkpointing_strategy();
        let like_input = |t: Tensor<1>| match strategy {
            Some(strategy) => t.autodiff().with_gradient_checkpointing_strategy(strategy),
            None => t.autodiff(),
        };
        let stats = Tensor::<1>::from_dispatch(<Dispatch as ResNetKernels>::batch_norm_stats(
            input.clone().inner().into_dispatch(),
        ));
        let out = <Dispatch as ResNetKernels>::batch_norm_apply(
            input.into_dispatch(),
            like_input(stats.clone()).into_dispatch(),
            gamma.into_dispatch(),
            beta.into_dispatch(),
            bn.epsilon,
        );
        // Running statistics as Burn's `BatchNorm` keeps them (the biased variance).
        let batch = |range| like_input(stats.clone().slice(range)).to_device(&device);
        for (running, value) in [
            (&bn.running_mean, batch(0..channels)),
            (&bn.running_var, batch(channels..2 * channels)),
        ] {
            let updated = running
                .value_sync()
                .to_device(&device)
                .mul_scalar(1.0 - bn.momentum)
                .add(value.mul_scalar(bn.momentum));
            running.update(updated.detach());
        }
        Ok(Tensor::from_dispatch(out))
    }

    /// Run the max pooling on flex when `input` is a plain float32 flex tensor and the options
    /// are supported (no ceil mode, input-independent padding); otherwise hand `input` back.
    #[allow(clippy::result_large_err)] // hands the caller's own tensor back, moved
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
        if !on_flex(&input, false) || pool.ceil_mode || !fits {
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
    #[allow(clippy::type_complexity, clippy::result_large_err)] // hands the caller's tensors back
    pub(super) fn try_conv2d(
        conv: &Conv2d,
        input: Tensor<4>,
        residual: Option<Tensor<4>>,
        relu: bool,
    ) -> Result<Tensor<4>, (Tensor<4>, Option<Tensor<4>>)> {
        // With autodiff, only plain convolutions (what training runs: conv, then batch norm)
        // have resnet-rs's backward pass; the rest is better left to Burn in one piece.
        let plain = conv.bias.is_none() && residual.is_none() && !relu;
        if !on_flex(&input, plain) {
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
