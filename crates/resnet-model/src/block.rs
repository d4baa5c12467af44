//! The two residual blocks of the ResNet family, as in torchvision's `models/resnet.py`.
//!
//! Field names are the PyTorch `state_dict` names (`conv1`, `bn1`, ..., `downsample`), so a
//! torchvision checkpoint maps onto these modules with only the `downsample.0`/`downsample.1`
//! renaming that Rust field names force (see [`Downsample`]).

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};
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
}

impl Downsample {
    fn new(in_channels: usize, out_channels: usize, stride: usize, device: &Device) -> Self {
        Self {
            conv: conv1x1(in_channels, out_channels, stride, device),
            bn: batch_norm(out_channels, false, device),
        }
    }

    /// # Shapes
    /// - `input`: `[batch, in_channels, h, w]`
    /// - `output`: `[batch, out_channels, ceil(h / stride), ceil(w / stride)]`
    pub fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        self.bn.forward(self.conv.forward(input))
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
        let out = relu(self.bn1.forward(self.conv1.forward(input)));
        let out = self.bn2.forward(self.conv2.forward(out));
        relu(out + identity)
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
        let out = relu(self.bn1.forward(self.conv1.forward(input)));
        let out = relu(self.bn2.forward(self.conv2.forward(out)));
        let out = self.bn3.forward(self.conv3.forward(out));
        relu(out + identity)
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

    /// The kind of this block.
    pub fn kind(&self) -> BlockKind {
        match self {
            ResidualBlock::Basic(_) => BlockKind::Basic,
            ResidualBlock::Bottleneck(_) => BlockKind::Bottleneck,
        }
    }
}
