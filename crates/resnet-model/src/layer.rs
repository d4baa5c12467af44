//! `make_layer`: torchvision's `ResNet._make_layer`, the builder of each stage.

use burn::tensor::Device;

use crate::block::{BlockConfig, BlockKind, ResidualBlock};

/// The running state `_make_layer` keeps between stages: the channel count entering the next
/// stage and the current dilation, plus the block settings every stage shares.
///
/// Start it with [`LayerBuilder::new`] after the stem (64 channels for torchvision's stem) and
/// call [`make_layer`] once per stage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerBuilder {
    /// Block kind of every stage.
    pub block: BlockKind,
    /// Channels entering the next stage (torchvision's `self.inplanes`).
    pub inplanes: usize,
    /// Dilation reached so far (torchvision's `self.dilation`).
    pub dilation: usize,
    /// Groups of each bottleneck's 3x3 convolution.
    pub groups: usize,
    /// Width per group of each bottleneck (torchvision's `base_width`).
    pub base_width: usize,
    /// Zero-initialize the last batch norm of every block.
    pub zero_init_residual: bool,
}

impl LayerBuilder {
    /// A builder for plain ResNets (groups 1, width 64) after a stem of `inplanes` channels.
    pub fn new(block: BlockKind, inplanes: usize) -> Self {
        Self {
            block,
            inplanes,
            dilation: 1,
            groups: 1,
            base_width: 64,
            zero_init_residual: false,
        }
    }

    /// Set the bottleneck groups (ResNeXt cardinality).
    pub fn with_groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }

    /// Set the bottleneck width per group.
    pub fn with_base_width(mut self, base_width: usize) -> Self {
        self.base_width = base_width;
        self
    }

    /// Zero-initialize the last batch norm of every block.
    pub fn with_zero_init_residual(mut self, zero_init_residual: bool) -> Self {
        self.zero_init_residual = zero_init_residual;
        self
    }
}

/// Build one stage of `blocks` residual blocks of `planes` base channels, exactly as
/// torchvision's `_make_layer(block, planes, blocks, stride, dilate)`.
///
/// The first block takes the stride (or, when `dilate`, keeps stride 1 and multiplies the
/// dilation by it instead) and gets a projection shortcut when
/// `stride != 1 || inplanes != planes * expansion`; the others keep the shape. Advances
/// `builder.inplanes` to `planes * expansion` and `builder.dilation` as torchvision does.
///
/// # Panics
/// If `blocks` is zero, or the builder's settings are invalid for its block kind (see
/// [`BlockConfig::init_basic`]).
pub fn make_layer(
    builder: &mut LayerBuilder,
    planes: usize,
    blocks: usize,
    stride: usize,
    dilate: bool,
    device: &Device,
) -> Vec<ResidualBlock> {
    assert!(blocks > 0, "a stage needs at least one block");
    let previous_dilation = builder.dilation;
    let mut stride = stride;
    if dilate {
        builder.dilation *= stride;
        stride = 1;
    }
    let block = |inplanes: usize, stride: usize, dilation: usize| {
        BlockConfig::new(inplanes, planes)
            .with_stride(stride)
            .with_groups(builder.groups)
            .with_base_width(builder.base_width)
            .with_dilation(dilation)
            .with_zero_init_residual(builder.zero_init_residual)
    };

    let mut layers = Vec::with_capacity(blocks);
    layers.push(block(builder.inplanes, stride, previous_dilation).init(builder.block, device));
    let inplanes = planes * builder.block.expansion();
    for _ in 1..blocks {
        layers.push(block(inplanes, 1, builder.dilation).init(builder.block, device));
    }
    builder.inplanes = inplanes;
    layers
}
