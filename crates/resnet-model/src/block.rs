//! The two residual blocks of the ResNet family, as in torchvision's `models/resnet.py`.
//!
//! Field names are the PyTorch `state_dict` names (`conv1`, `bn1`, ..., `downsample`), so a
//! torchvision checkpoint maps onto these modules with only the `downsample.0`/`downsample.1`
//! renaming that Rust field names force (see [`Downsample`]).

use burn::config::Config;
use burn::module::{Module, Param, RunningState};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

use crate::ops;
use serde::{Deserialize, Serialize};

/// Which residual block a network is built from; torchvision's `block` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlockKind {
    /// Two 3x3 convolutions (ResNet-18/34). Expansion 1.
    Basic,
    /// 1x1 reduce, 3x3 (possibly grouped), 1x1 expand (ResNet-50 and deeper, ResNeXt, Wide
    /// ResNet). Expansion 4.
    Bottleneck,
}

impl BlockKind {
    /// Ratio of a block's output channels to its `planes`.
    pub const fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => BasicBlock::EXPANSION,
            BlockKind::Bottleneck => Bottleneck::EXPANSION,
        }
    }

    /// The name torchvision gives the block class.
    pub const fn name(self) -> &'static str {
        match self {
            BlockKind::Basic => "BasicBlock",
            BlockKind::Bottleneck => "Bottleneck",
        }
    }
}

/// Standard deviation of torchvision's `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
///
/// PyTorch's fan-out of a conv weight `[out, in/groups, kh, kw]` is `out * kh * kw`, whatever the
/// groups; Burn's built-in Kaiming initializer divides by the groups, so we compute it here.
fn kaiming_fan_out_std(out_channels: usize, kernel: usize) -> f64 {
    (2.0 / (out_channels * kernel * kernel) as f64).sqrt()
}

/// A bias-free convolution initialized as torchvision initializes ResNet convolutions.
///
/// `padding` is `dilation` for 3x3 kernels (torchvision's `conv3x3`) and 0 for 1x1 kernels.
pub(crate) fn conv(
    channels: [usize; 2],
    kernel: usize,
    stride: usize,
    padding: usize,
    groups: usize,
    dilation: usize,
    device: &Device,
) -> Conv2d {
    Conv2dConfig::new(channels, [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(
            padding, padding, padding, padding,
        ))
        .with_groups(groups)
        .with_dilation([dilation, dilation])
        .with_bias(false)
        .with_initializer(Initializer::Normal {
            mean: 0.0,
            std: kaiming_fan_out_std(channels[1], kernel),
        })
        .init(device)
}

/// torchvision's `conv3x3`: 3x3 convolution with padding equal to the dilation.
fn conv3x3(
    in_planes: usize,
    out_planes: usize,
    stride: usize,
    groups: usize,
    dilation: usize,
    device: &Device,
) -> Conv2d {
    conv(
        [in_planes, out_planes],
        3,
        stride,
        dilation,
        groups,
        dilation,
        device,
    )
}

/// torchvision's `conv1x1`.
fn conv1x1(in_planes: usize, out_planes: usize, stride: usize, device: &Device) -> Conv2d {
    conv([in_planes, out_planes], 1, stride, 0, 1, 1, device)
}

/// Batch norm with weight 1 and bias 0, or weight 0 when `zero_gamma` (torchvision's
/// `zero_init_residual` for the last BN of each block).
pub(crate) fn batch_norm(num_features: usize, zero_gamma: bool, device: &Device) -> BatchNorm {
    let mut bn = BatchNormConfig::new(num_features).init(device);
    if zero_gamma {
        bn.gamma = Initializer::Zeros.init([num_features], device);
    }
    bn
}

/// Fold an eval-mode batch norm into the convolution that feeds it, for inference.
///
/// With `s = gamma / sqrt(running_var + epsilon)`, `bn(conv(x)) = conv'(x)` where `conv'` has
/// weight `W * s` (per output channel) and bias `beta - running_mean * s` (plus `b * s` if `conv`
/// had a bias `b`). The batch norm that comes back is the identity up to rounding (weight 1,
/// bias 0, mean 0, variance `1 - epsilon`), so a folded model computes the same function whether
/// or not the batch norm is still applied; the forward passes skip it.
///
/// Uses the running statistics whatever the batch norm's training state: the folded pair is for
/// inference only. The new values are detached from any autodiff graph.
pub(crate) fn fold_into_conv(mut conv: Conv2d, mut bn: BatchNorm) -> (Conv2d, BatchNorm) {
    let gamma = bn.gamma.val().detach();
    let [channels] = gamma.dims();
    let scale = gamma
        / bn.running_var
            .value()
            .detach()
            .add_scalar(bn.epsilon)
            .sqrt();
    let shift = bn.beta.val().detach() - bn.running_mean.value().detach() * scale.clone();
    let bias = match &conv.bias {
        Some(bias) => bias.val().detach() * scale.clone() + shift,
        None => shift,
    };
    conv.weight = conv
        .weight
        .map(|weight| weight.detach() * scale.reshape([channels, 1, 1, 1]));
    conv.bias = Some(Param::from_tensor(bias));

    let device = bn.gamma.device();
    bn.gamma = bn.gamma.map(|gamma| gamma.ones_like());
    bn.beta = bn.beta.map(|beta| beta.zeros_like());
    bn.running_mean = RunningState::new(Tensor::zeros([channels], &device));
    bn.running_var = RunningState::new(Tensor::full([channels], 1.0 - bn.epsilon, &device));
    (conv, bn)
}

/// `act(bn(conv(x)) + residual)`, `act` being the ReLU when `apply_relu`; once the batch norm is
/// folded into the convolution, a single fused convolution ([`ops::conv2d_fused`]).
pub(crate) fn conv_bn_act(
    conv: &Conv2d,
    bn: &BatchNorm,
    folded: bool,
    input: Tensor<4>,
    residual: Option<Tensor<4>>,
    apply_relu: bool,
) -> Tensor<4> {
    if folded {
        return ops::conv2d_fused(conv, input, residual, apply_relu);
    }
    let mut out = ops::batch_norm(bn, ops::conv2d_fused(conv, input, None, false));
    if let Some(residual) = residual {
        out = out + residual;
    }
    if apply_relu { relu(out) } else { out }
}

/// The projection shortcut: a strided 1x1 convolution and a batch norm.
///
/// torchvision stores it as `nn.Sequential(conv1x1, BatchNorm2d)`, i.e. under the keys
/// `downsample.0.*` and `downsample.1.*`; here they are `downsample.conv.*` and
/// `downsample.bn.*`.
#[derive(Module, Debug)]
pub struct Downsample {
    /// 1x1 convolution carrying the block's stride.
    pub conv: Conv2d,
    /// Batch norm after the convolution.
    pub bn: BatchNorm,
    /// Whether [`fold_batchnorm`](Self::fold_batchnorm) has folded `bn` into `conv` (the
    /// forward pass then skips `bn`). Not part of the record.
    pub batchnorm_folded: bool,
}

impl Downsample {
    fn new(in_channels: usize, out_channels: usize, stride: usize, device: &Device) -> Self {
        Self {
            conv: conv1x1(in_channels, out_channels, stride, device),
            bn: batch_norm(out_channels, false, device),
            batchnorm_folded: false,
        }
    }

    /// # Shapes
    /// - `input`: `[batch, in_channels, h, w]`
    /// - `output`: `[batch, out_channels, ceil(h / stride), ceil(w / stride)]`
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        conv_bn_act(
            &self.conv,
            &self.bn,
            self.batchnorm_folded,
            input,
            None,
            false,
        )
    }

    /// Fold the batch norm's running statistics and affine parameters into the convolution,
    /// for inference (see [`ResNet::fold_batchnorm`](crate::ResNet::fold_batchnorm)). Does
    /// nothing if already folded.
    pub fn fold_batchnorm(mut self) -> Self {
        if !self.batchnorm_folded {
            (self.conv, self.bn) = fold_into_conv(self.conv, self.bn);
            self.batchnorm_folded = true;
        }
        self
    }
}

/// Hyper-parameters shared by both block kinds: one entry of torchvision's
/// `block(inplanes, planes, stride, downsample, groups, base_width, dilation)`.
#[derive(Config, Debug)]
pub struct BlockConfig {
    /// Channels entering the block.
    pub inplanes: usize,
    /// Base width of the block; it outputs `planes * expansion` channels.
    pub planes: usize,
    /// Stride of the block (on the 3x3 convolution, and on the shortcut).
    #[config(default = 1)]
    pub stride: usize,
    /// Number of groups of the 3x3 convolution (ResNeXt's cardinality). Bottleneck only.
    #[config(default = 1)]
    pub groups: usize,
    /// Width of each group per 64 planes (64 for ResNet, 128 for Wide ResNet-50-2). Bottleneck
    /// only.
    #[config(default = 64)]
    pub base_width: usize,
    /// Dilation of the 3x3 convolution. Bottleneck only.
    #[config(default = 1)]
    pub dilation: usize,
    /// Initialize the last batch norm's weight to zero, so the block starts as the identity.
    #[config(default = false)]
    pub zero_init_residual: bool,
}

impl BlockConfig {
    /// Whether the block needs a projection shortcut: torchvision's
    /// `stride != 1 or inplanes != planes * expansion`.
    pub fn needs_downsample(&self, kind: BlockKind) -> bool {
        self.stride != 1 || self.inplanes != self.planes * kind.expansion()
    }

    fn downsample(&self, kind: BlockKind, device: &Device) -> Option<Downsample> {
        self.needs_downsample(kind).then(|| {
            Downsample::new(
                self.inplanes,
                self.planes * kind.expansion(),
                self.stride,
                device,
            )
        })
    }

    /// Width of a bottleneck's 3x3 convolution: `int(planes * base_width / 64) * groups`.
    pub fn bottleneck_width(&self) -> usize {
        self.planes * self.base_width / 64 * self.groups
    }

    /// Build a [`BasicBlock`].
    ///
    /// # Panics
    /// If `groups != 1`, `base_width != 64` or `dilation > 1`, which torchvision's BasicBlock
    /// rejects too. [`ResNetConfig::validate`](crate::ResNetConfig::validate) reports these as
    /// errors before any block is built.
    pub fn init_basic(&self, device: &Device) -> BasicBlock {
        assert!(
            self.groups == 1 && self.base_width == 64,
            "BasicBlock only supports groups=1 and base_width=64"
        );
        assert!(
            self.dilation == 1,
            "Dilation > 1 not supported in BasicBlock"
        );
        BasicBlock {
            conv1: conv3x3(self.inplanes, self.planes, self.stride, 1, 1, device),
            bn1: batch_norm(self.planes, false, device),
            conv2: conv3x3(self.planes, self.planes, 1, 1, 1, device),
            bn2: batch_norm(self.planes, self.zero_init_residual, device),
            downsample: self.downsample(BlockKind::Basic, device),
            batchnorm_folded: false,
        }
    }

    /// Build a [`Bottleneck`].
    ///
    /// # Panics
    /// If `groups`, `base_width` or `dilation` is zero.
    pub fn init_bottleneck(&self, device: &Device) -> Bottleneck {
        assert!(
            self.groups > 0 && self.base_width > 0 && self.dilation > 0,
            "groups, base_width and dilation must be positive"
        );
        let width = self.bottleneck_width();
        let out = self.planes * Bottleneck::EXPANSION;
        Bottleneck {
            conv1: conv1x1(self.inplanes, width, 1, device),
            bn1: batch_norm(width, false, device),
            conv2: conv3x3(
                width,
                width,
                self.stride,
                self.groups,
                self.dilation,
                device,
            ),
            bn2: batch_norm(width, false, device),
            conv3: conv1x1(width, out, 1, device),
            bn3: batch_norm(out, self.zero_init_residual, device),
            downsample: self.downsample(BlockKind::Bottleneck, device),
            batchnorm_folded: false,
        }
    }

    /// Build a block of the given kind.
    pub fn init(&self, kind: BlockKind, device: &Device) -> ResidualBlock {
        match kind {
            BlockKind::Basic => ResidualBlock::Basic(self.init_basic(device)),
            BlockKind::Bottleneck => ResidualBlock::Bottleneck(self.init_bottleneck(device)),
        }
    }
}

/// Two 3x3 convolutions with an identity (or projection) shortcut.
#[derive(Module, Debug)]
pub struct BasicBlock {
    /// First 3x3 convolution; carries the stride.
    pub conv1: Conv2d,
    /// Batch norm after `conv1`.
    pub bn1: BatchNorm,
    /// Second 3x3 convolution.
    pub conv2: Conv2d,
    /// Batch norm after `conv2` (zero-initialized with `zero_init_residual`).
    pub bn2: BatchNorm,
    /// Projection shortcut, present when the block changes resolution or width.
    pub downsample: Option<Downsample>,
    /// Whether [`fold_batchnorm`](Self::fold_batchnorm) has folded the batch norms into the
    /// convolutions before them (the forward pass then skips them). Not part of the record.
    pub batchnorm_folded: bool,
}

impl BasicBlock {
    /// Output channels per `planes`.
    pub const EXPANSION: usize = 1;

    /// # Shapes
    /// - `input`: `[batch, inplanes, h, w]`
    /// - `output`: `[batch, planes, ceil(h / stride), ceil(w / stride)]`
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let identity = match &self.downsample {
            Some(downsample) => downsample.forward(input.clone()),
            None => input.clone(),
        };
        let folded = self.batchnorm_folded;
        let out = conv_bn_act(&self.conv1, &self.bn1, folded, input, None, true);
        conv_bn_act(&self.conv2, &self.bn2, folded, out, Some(identity), true)
    }

    /// Fold each batch norm into the convolution before it, for inference (see
    /// [`ResNet::fold_batchnorm`](crate::ResNet::fold_batchnorm)). Does nothing if already
    /// folded.
    pub fn fold_batchnorm(mut self) -> Self {
        if !self.batchnorm_folded {
            (self.conv1, self.bn1) = fold_into_conv(self.conv1, self.bn1);
            (self.conv2, self.bn2) = fold_into_conv(self.conv2, self.bn2);
            self.downsample = self.downsample.map(Downsample::fold_batchnorm);
            self.batchnorm_folded = true;
        }
        self
    }
}

/// 1x1 reduce, 3x3, 1x1 expand, with an identity (or projection) shortcut.
///
/// This is ResNet v1.5: the stride sits on the 3x3 convolution (`conv2`), not on the first 1x1
/// as in the original paper. torchvision made that choice because it is more accurate (about
/// +0.5% top-1 on ImageNet) for slightly more compute; its checkpoints need it.
#[derive(Module, Debug)]
pub struct Bottleneck {
    /// 1x1 convolution reducing to the bottleneck width.
    pub conv1: Conv2d,
    /// Batch norm after `conv1`.
    pub bn1: BatchNorm,
    /// 3x3 (grouped, dilated) convolution; carries the stride.
    pub conv2: Conv2d,
    /// Batch norm after `conv2`.
    pub bn2: BatchNorm,
    /// 1x1 convolution expanding to `planes * 4`.
    pub conv3: Conv2d,
    /// Batch norm after `conv3` (zero-initialized with `zero_init_residual`).
    pub bn3: BatchNorm,
    /// Projection shortcut, present when the block changes resolution or width.
    pub downsample: Option<Downsample>,
    /// Whether [`fold_batchnorm`](Self::fold_batchnorm) has folded the batch norms into the
    /// convolutions before them (the forward pass then skips them). Not part of the record.
    pub batchnorm_folded: bool,
}

impl Bottleneck {
    /// Output channels per `planes`.
    pub const EXPANSION: usize = 4;

    /// # Shapes
    /// - `input`: `[batch, inplanes, h, w]`
    /// - `output`: `[batch, planes * 4, ceil(h / stride), ceil(w / stride)]`
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let identity = match &self.downsample {
            Some(downsample) => downsample.forward(input.clone()),
            None => input.clone(),
        };
        let folded = self.batchnorm_folded;
        let out = conv_bn_act(&self.conv1, &self.bn1, folded, input, None, true);
        let out = conv_bn_act(&self.conv2, &self.bn2, folded, out, None, true);
        conv_bn_act(&self.conv3, &self.bn3, folded, out, Some(identity), true)
    }

    /// Fold each batch norm into the convolution before it, for inference (see
    /// [`ResNet::fold_batchnorm`](crate::ResNet::fold_batchnorm)). Does nothing if already
    /// folded.
    pub fn fold_batchnorm(mut self) -> Self {
        if !self.batchnorm_folded {
            (self.conv1, self.bn1) = fold_into_conv(self.conv1, self.bn1);
            (self.conv2, self.bn2) = fold_into_conv(self.conv2, self.bn2);
            (self.conv3, self.bn3) = fold_into_conv(self.conv3, self.bn3);
            self.downsample = self.downsample.map(Downsample::fold_batchnorm);
            self.batchnorm_folded = true;
        }
        self
    }
}

/// Either kind of block, so one network type holds both. PyTorch key paths carry no variant
/// name; burn-store's PyTorch reader skips it when matching.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)] // Both variants are large; each block is stored once.
pub enum ResidualBlock {
    /// A [`BasicBlock`].
    Basic(BasicBlock),
    /// A [`Bottleneck`].
    Bottleneck(Bottleneck),
}

impl ResidualBlock {
    /// # Shapes
    /// - `input`: `[batch, inplanes, h, w]`
    /// - `output`: `[batch, planes * expansion, ceil(h / stride), ceil(w / stride)]`
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        match self {
            ResidualBlock::Basic(block) => block.forward(input),
            ResidualBlock::Bottleneck(block) => block.forward(input),
        }
    }

    /// Fold each batch norm into the convolution before it, for inference (see
    /// [`ResNet::fold_batchnorm`](crate::ResNet::fold_batchnorm)).
    pub fn fold_batchnorm(self) -> Self {
        match self {
            ResidualBlock::Basic(block) => ResidualBlock::Basic(block.fold_batchnorm()),
            ResidualBlock::Bottleneck(block) => ResidualBlock::Bottleneck(block.fold_batchnorm()),
        }
    }

    /// The kind of this block.
    pub fn kind(&self) -> BlockKind {
        match self {
            ResidualBlock::Basic(_) => BlockKind::Basic,
            ResidualBlock::Bottleneck(_) => BlockKind::Bottleneck,
        }
    }
}
