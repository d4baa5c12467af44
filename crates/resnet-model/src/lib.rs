//! torchvision's ResNet family for [Burn](https://burn.dev): ResNet-18 to 152, ResNeXt and Wide
//! ResNet, as one model definition that runs on every Burn backend.
//!
//! The architecture is torchvision's ResNet v1.5 (He et al., [Deep Residual Learning for Image
//! Recognition](https://arxiv.org/abs/1512.03385); Xie et al., [ResNeXt](https://arxiv.org/abs/1611.05431);
//! Zagoruyko and Komodakis, [Wide Residual Networks](https://arxiv.org/abs/1605.07146)), with the
//! same module names as its `state_dict` so that PyTorch checkpoints load with a few renaming
//! rules (see the `resnet-import` crate).
//!
//! This crate never names a backend. Modules are built on a [`Device`](burn::tensor::Device)
//! the caller passes in; the cargo features (`flex` and `autodiff` by default, `ndarray`,
//! `wgpu`, `vulkan`, `metal`, `tch`, `cuda`) only decide which backends' devices can exist.
//! The blocks are built from [`ops::conv2d_fused`] and [`ops::max_pool2d`]: on the flex CPU
//! backend these run resnet-rs's own kernels (forward and, for training, backward), plugged in
//! through Burn's backend-extension mechanism; on every other backend they are Burn's
//! operations.
//!
//! ```no_run
//! use burn::tensor::{Device, Tensor};
//! use resnet_model::{BlockKind, ResNetConfig};
//!
//! let device = Device::flex();
//! // torchvision's `ResNet(Bottleneck, [3, 8, 36, 3])`, i.e. resnet152():
//! let model = ResNetConfig::new(BlockKind::Bottleneck, [3, 8, 36, 3]).init(&device);
//! let logits = model.forward(Tensor::zeros([1, 3, 224, 224], &device));
//! assert_eq!(logits.dims(), [1, 1000]);
//! ```

mod block;
#[cfg(feature = "flex")]
mod cpu_batchnorm;
#[cfg(feature = "flex")]
#[allow(unsafe_code)] // raw output pointer shared by work units, and the gemm call
mod cpu_conv;
#[cfg(feature = "flex")]
#[allow(unsafe_code)] // AVX-512 intrinsics on raw matrix pointers
mod cpu_gemm512;
#[cfg(feature = "flex")]
#[allow(unsafe_code)] // output rows shared by work units, and the gemm call
mod cpu_winograd;
mod error;
mod layer;
pub mod ops;
mod resnet;
mod summary;

pub use block::{BasicBlock, BlockConfig, BlockKind, Bottleneck, Downsample, ResidualBlock};
pub use error::ConfigError;
pub use layer::{LayerBuilder, make_layer};
pub use resnet::{ARCHITECTURES, ResNet, ResNetConfig};
pub use summary::{
    ConvolutionInput, ModelSummary, ParameterCounts, StageSummary, parameter_counts,
};

#[cfg(test)]
mod tests;
