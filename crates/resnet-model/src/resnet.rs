//! The network: [`ResNetConfig`] (with torchvision's presets) and [`ResNet`].

use burn::config::Config;
use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{BatchNorm, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor};

use crate::block::{BlockKind, ResidualBlock, batch_norm, conv, conv_bn_act, fold_into_conv};
use crate::error::ConfigError;
use crate::layer::{LayerBuilder, make_layer};
use crate::ops;

/// Everything that defines a ResNet-family architecture; torchvision's `ResNet.__init__`
/// arguments plus a CIFAR stem. Serializable: it is saved next to every model record.
///
/// `ResNetConfig::new(BlockKind::Bottleneck, [3, 8, 36, 3])` is torchvision's
/// `ResNet(Bottleneck, [3, 8, 36, 3])`, i.e. ResNet-152; the named presets ([`resnet50`] and
/// friends) cover every torchvision model.
///
/// [`resnet50`]: ResNetConfig::resnet50
#[derive(Config, Debug, PartialEq, Eq)]
pub struct ResNetConfig {
    /// Residual block of every stage.
    pub block: BlockKind,
    /// Number of blocks in each of the four stages.
    pub layers: [usize; 4],
    /// Output classes of the final linear layer.
    #[config(default = 1000)]
    pub num_classes: usize,
    /// Channels of the input images.
    #[config(default = 3)]
    pub in_channels: usize,
    /// Groups of each bottleneck's 3x3 convolution (ResNeXt's cardinality).
    #[config(default = 1)]
    pub groups: usize,
    /// Bottleneck width per group, per 64 planes (128 for the Wide ResNets).
    #[config(default = 64)]
    pub width_per_group: usize,
    /// Start every block as the identity by zeroing its last batch norm's weight.
    #[config(default = false)]
    pub zero_init_residual: bool,
    /// For stages 2, 3 and 4: replace the stage's stride 2 by a dilation (for dense outputs,
    /// e.g. segmentation backbones). Bottleneck only.
    #[config(default = "[false, false, false]")]
    pub replace_stride_with_dilation: [bool; 3],
    /// Small-image stem (as in the widely used pytorch-cifar code): a 3x3 stride-1 `conv1` and
    /// no max-pool, instead of the 7x7 stride-2 convolution and 3x3 stride-2 max-pool.
    #[config(default = false)]
    pub cifar_stem: bool,
    /// Output channels of the stem convolution (torchvision: 64).
    #[config(default = 64)]
    pub stem_channels: usize,
    /// Base planes of the four stages (torchvision: 64, 128, 256, 512); a stage outputs
    /// `planes * expansion` channels. Smaller values make narrow variants (tests, tiny devices).
    #[config(default = "[64, 128, 256, 512]")]
    pub stage_planes: [usize; 4],
}

/// Names of the presets, in torchvision's order.
pub const ARCHITECTURES: [&str; 10] = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
];

impl ResNetConfig {
    /// ResNet-18 (11.7M parameters).
    pub fn resnet18() -> Self {
        Self::new(BlockKind::Basic, [2, 2, 2, 2])
    }

    /// ResNet-34 (21.8M parameters).
    pub fn resnet34() -> Self {
        Self::new(BlockKind::Basic, [3, 4, 6, 3])
    }

    /// ResNet-50 (25.6M parameters).
    pub fn resnet50() -> Self {
        Self::new(BlockKind::Bottleneck, [3, 4, 6, 3])
    }

    /// ResNet-101 (44.5M parameters).
    pub fn resnet101() -> Self {
        Self::new(BlockKind::Bottleneck, [3, 4, 23, 3])
    }

    /// ResNet-152 (60.2M parameters).
    pub fn resnet152() -> Self {
        Self::new(BlockKind::Bottleneck, [3, 8, 36, 3])
    }

    /// ResNeXt-50 32x4d (25.0M parameters).
    pub fn resnext50_32x4d() -> Self {
        Self::resnet50().with_groups(32).with_width_per_group(4)
    }

    /// ResNeXt-101 32x8d (88.8M parameters).
    pub fn resnext101_32x8d() -> Self {
        Self::resnet101().with_groups(32).with_width_per_group(8)
    }

    /// ResNeXt-101 64x4d (83.5M parameters).
    pub fn resnext101_64x4d() -> Self {
        Self::resnet101().with_groups(64).with_width_per_group(4)
    }

    /// Wide ResNet-50-2 (68.9M parameters): bottlenecks twice as wide.
    pub fn wide_resnet50_2() -> Self {
        Self::resnet50().with_width_per_group(128)
    }

    /// Wide ResNet-101-2 (126.9M parameters).
    pub fn wide_resnet101_2() -> Self {
        Self::resnet101().with_width_per_group(128)
    }

    /// The preset of a torchvision name (one of [`ARCHITECTURES`]).
    pub fn from_name(name: &str) -> Result<Self, ConfigError> {
        Ok(match name {
            "resnet18" => Self::resnet18(),
            "resnet34" => Self::resnet34(),
            "resnet50" => Self::resnet50(),
            "resnet101" => Self::resnet101(),
            "resnet152" => Self::resnet152(),
            "resnext50_32x4d" => Self::resnext50_32x4d(),
            "resnext101_32x8d" => Self::resnext101_32x8d(),
            "resnext101_64x4d" => Self::resnext101_64x4d(),
            "wide_resnet50_2" => Self::wide_resnet50_2(),
            "wide_resnet101_2" => Self::wide_resnet101_2(),
            _ => return Err(ConfigError::UnknownArchitecture(name.to_string())),
        })
    }

    /// The torchvision name of this architecture, if it is one of the presets (whatever its
    /// `num_classes`, `in_channels`, stem or initialization options).
    pub fn preset_name(&self) -> Option<&'static str> {
        ARCHITECTURES.into_iter().find(|name| {
            Self::from_name(name).is_ok_and(|preset| {
                preset.block == self.block
                    && preset.layers == self.layers
                    && preset.groups == self.groups
                    && preset.width_per_group == self.width_per_group
                    && preset.stem_channels == self.stem_channels
                    && preset.stage_planes == self.stage_planes
            })
        })
    }

    /// Channels of the pooled feature vector: `stage_planes[3] * expansion` (2048 for
    /// ResNet-50).
    pub fn feature_dim(&self) -> usize {
        self.stage_planes[3] * self.block.expansion()
    }

    /// Check the settings that would make [`init`](Self::init) panic, as torchvision's
    /// constructor does with its `ValueError`s.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.num_classes == 0 {
            return Err(ConfigError::Invalid(
                "num_classes must be at least 1".into(),
            ));
        }
        if self.in_channels == 0 {
            return Err(ConfigError::Invalid(
                "in_channels must be at least 1".into(),
            ));
        }
        if let Some(stage) = self.layers.iter().position(|&blocks| blocks == 0) {
            return Err(ConfigError::Invalid(format!(
                "stage {} has no blocks; every stage needs at least one",
                stage + 1
            )));
        }
        if self.groups == 0 || self.width_per_group == 0 {
            return Err(ConfigError::Invalid(
                "groups and width_per_group must be at least 1".into(),
            ));
        }
        if self.block == BlockKind::Basic {
            if self.groups != 1 || self.width_per_group != 64 {
                return Err(ConfigError::Invalid(
                    "BasicBlock only supports groups=1 and width_per_group=64".into(),
                ));
            }
            if self.replace_stride_with_dilation.contains(&true) {
                return Err(ConfigError::Invalid(
                    "BasicBlock does not support replace_stride_with_dilation".into(),
                ));
            }
        } else if self.stage_planes[0] * self.width_per_group / 64 == 0 {
            return Err(ConfigError::Invalid(
                "width_per_group is too small: the first stage's bottleneck would have no \
                 channels"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Build the network with torchvision's initialization: Kaiming-normal (fan-out, ReLU)
    /// convolutions, batch norms at weight 1 and bias 0 (weight 0 for the last of each block
    /// with `zero_init_residual`), and PyTorch's default uniform initialization for `fc`.
    ///
    /// Parameters are allocated lazily, on first use: building even the largest preset only to
    /// count its parameters is cheap.
    ///
    /// # Panics
    /// If [`validate`](Self::validate) fails; call it first on configurations from users.
    pub fn init(&self, device: &Device) -> ResNet {
        if let Err(err) = self.validate() {
            panic!("invalid ResNetConfig: {err}");
        }
        let (conv1, maxpool) = if self.cifar_stem {
            (
                conv(
                    [self.in_channels, self.stem_channels],
                    3,
                    1,
                    1,
                    1,
                    1,
                    device,
                ),
                None,
            )
        } else {
            let maxpool = MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init();
            (
                conv(
                    [self.in_channels, self.stem_channels],
                    7,
                    2,
                    3,
                    1,
                    1,
                    device,
                ),
                Some(maxpool),
            )
        };

        let mut builder = LayerBuilder::new(self.block, self.stem_channels)
            .with_groups(self.groups)
            .with_base_width(self.width_per_group)
            .with_zero_init_residual(self.zero_init_residual);
        let [dilate2, dilate3, dilate4] = self.replace_stride_with_dilation;
        let mut stage = |index: usize, stride: usize, dilate: bool| {
            make_layer(
                &mut builder,
                self.stage_planes[index],
                self.layers[index],
                stride,
                dilate,
                device,
            )
        };
        let layer1 = stage(0, 1, false);
        let layer2 = stage(1, 2, dilate2);
        let layer3 = stage(2, 2, dilate3);
        let layer4 = stage(3, 2, dilate4);

        ResNet {
            conv1,
            bn1: batch_norm(self.stem_channels, false, device),
            maxpool,
            layer1,
            layer2,
            layer3,
            layer4,
            avgpool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(self.feature_dim(), self.num_classes).init(device),
            batchnorm_folded: false,
        }
    }
}

/// A ResNet, ResNeXt or Wide ResNet, laid out as torchvision's `ResNet` module so that
/// `state_dict` keys map one to one (`conv1`, `bn1`, `layer1.0.conv1`, ..., `fc`).
///
/// Runs on whatever backend its parameters' `Device` belongs to.
#[derive(Module, Debug)]
pub struct ResNet {
    /// Stem convolution (7x7 stride 2, or 3x3 stride 1 with the CIFAR stem).
    pub conv1: Conv2d,
    /// Stem batch norm.
    pub bn1: BatchNorm,
    /// Stem 3x3 stride-2 max-pool; absent with the CIFAR stem.
    pub maxpool: Option<MaxPool2d>,
    /// Stage 1: stride 1.
    pub layer1: Vec<ResidualBlock>,
    /// Stage 2: stride 2 (or dilation).
    pub layer2: Vec<ResidualBlock>,
    /// Stage 3: stride 2 (or dilation).
    pub layer3: Vec<ResidualBlock>,
    /// Stage 4: stride 2 (or dilation).
    pub layer4: Vec<ResidualBlock>,
    /// Global average pool.
    pub avgpool: AdaptiveAvgPool2d,
    /// Classifier head.
    pub fc: Linear,
    /// Whether [`fold_batchnorm`](Self::fold_batchnorm) has folded the stem's batch norm into
    /// `conv1` (the forward pass then skips it; the blocks carry their own flag). Not part of
    /// the record.
    pub batchnorm_folded: bool,
}

impl ResNet {
    /// Logits for a batch of normalized images.
    ///
    /// # Shapes
    /// - `input`: `[batch, in_channels, height, width]`
    /// - `output`: `[batch, num_classes]`
    pub fn forward(&self, input: Tensor<4>) -> Tensor<2> {
        self.fc.forward(self.forward_features(input))
    }

    /// The pooled embedding that feeds the classifier (for retrieval, transfer learning or
    /// feature export).
    ///
    /// # Shapes
    /// - `input`: `[batch, in_channels, height, width]`
    /// - `output`: `[batch, 512 * expansion]`
    pub fn forward_features(&self, input: Tensor<4>) -> Tensor<2> {
        let x = self.forward_feature_map(input);
        self.avgpool.forward(x).flatten(1, 3)
    }

    /// The last stage's feature map, before pooling (for detection or segmentation heads).
    ///
    /// # Shapes
    /// - `input`: `[batch, in_channels, height, width]`
    /// - `output`: `[batch, 512 * expansion, height / 32, width / 32]` (less downsampling with
    ///   the CIFAR stem or dilation)
    pub fn forward_feature_map(&self, input: Tensor<4>) -> Tensor<4> {
        ops::in_kernel_pool(input, |input| self.feature_map(input))
    }

    /// [`Self::forward_feature_map`]'s layers.
    fn feature_map(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = conv_bn_act(
            &self.conv1,
            &self.bn1,
            self.batchnorm_folded,
            input,
            None,
            true,
        );
        if let Some(maxpool) = &self.maxpool {
            x = ops::max_pool2d(maxpool, x);
        }
        for block in self.stages().into_iter().flatten() {
            x = block.forward(x);
        }
        x
    }

    /// Fold every batch norm into the convolution before it, for inference: the network then
    /// computes the same logits as the eval-mode network (up to float rounding) without any
    /// batch-norm work, as ONNX exporters and inference engines do.
    ///
    /// Each convolution gets a bias; each batch norm is skipped by the forward pass and reset
    /// to the identity (weight 1, bias 0, mean 0, variance `1 - epsilon`), so the folded
    /// parameters describe the same function whether or not a batch norm is applied. Uses the
    /// running statistics, so call it on a trained or imported model, typically right after
    /// [`valid`](Module::valid), and do not train the result: it has no batch normalization
    /// left. Records of a folded model carry the conv biases, which an unfolded model has no
    /// place for; save the model before folding. Does nothing if already folded.
    ///
    /// ```
    /// use burn::module::Module;
    /// use burn::tensor::{Device, Tensor};
    /// use resnet_model::{BlockKind, ResNetConfig};
    ///
    /// let device = Device::flex();
    /// let config = ResNetConfig::new(BlockKind::Basic, [1, 1, 1, 1]).with_cifar_stem(true);
    /// let model = config.init(&device).valid().fold_batchnorm();
    /// let logits = model.forward(Tensor::zeros([1, 3, 32, 32], &device));
    /// assert_eq!(logits.dims(), [1, 1000]);
    /// ```
    pub fn fold_batchnorm(mut self) -> Self {
        if !self.batchnorm_folded {
            (self.conv1, self.bn1) = fold_into_conv(self.conv1, self.bn1);
            self.batchnorm_folded = true;
        }
        for layer in [
            &mut self.layer1,
            &mut self.layer2,
            &mut self.layer3,
            &mut self.layer4,
        ] {
            *layer = std::mem::take(layer)
                .into_iter()
                .map(ResidualBlock::fold_batchnorm)
                .collect();
        }
        self
    }

    /// The four stages, in order.
    pub fn stages(&self) -> [&[ResidualBlock]; 4] {
        [&self.layer1, &self.layer2, &self.layer3, &self.layer4]
    }

    /// Number of classes the head predicts.
    pub fn num_classes(&self) -> usize {
        self.fc.weight.lazy_shape().dims::<2>()[1]
    }

    /// Replace the classifier with a freshly initialized one for `num_classes` classes, keeping
    /// the backbone (transfer learning). Remember to update the saved config's `num_classes`.
    pub fn with_num_classes(mut self, num_classes: usize, device: &Device) -> Self {
        let features = self.fc.weight.lazy_shape().dims::<2>()[0];
        self.fc = LinearConfig::new(features, num_classes).init(device);
        self
    }

    /// Trainable parameters, counted as PyTorch's `sum(p.numel() for p in model.parameters())`
    /// counts them: batch-norm running statistics are buffers, not parameters. Does not
    /// allocate lazily initialized parameters.
    pub fn num_parameters(&self) -> usize {
        crate::summary::parameter_counts(self).total()
    }
}

/// Output size of a convolution or pooling window along one axis.
pub(crate) fn window_output(
    size: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    dilation: usize,
) -> usize {
    (size + 2 * padding - dilation * (kernel - 1) - 1) / stride + 1
}

/// Geometry of a convolution, for counting its work.
pub(crate) fn conv_geometry(conv: &Conv2d) -> ([usize; 4], usize) {
    let padding = match conv.padding {
        PaddingConfig2d::Explicit(top, _, _, _) => top,
        _ => 0,
    };
    (conv.weight.lazy_shape().dims::<4>(), padding)
}
