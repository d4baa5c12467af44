//! Build ResNets of your own from `Bottleneck` and `make_layer`.
//!
//! `cargo run --release --example custom_resnet`
//!
//! torchvision writes ResNet-152 as `ResNet(Bottleneck, [3, 8, 36, 3])`; here it is
//! `ResNetConfig::new(BlockKind::Bottleneck, [3, 8, 36, 3])`. Below that, a network that is not
//! a preset at all: a three-stage, 26-layer bottleneck net for 64x64 images, assembled by hand
//! from `make_layer`, the same builder the presets use.

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Tensor};
use resnet_model::{BlockKind, LayerBuilder, ResNetConfig, ResidualBlock, make_layer};

/// A custom network: a 3x3 stem, then three bottleneck stages of [2, 3, 3] blocks
/// (3 * 8 + 2 = 26 layers with weights), then a linear head.
#[derive(Module, Debug)]
struct ResNet26 {
    conv1: Conv2d,
    bn1: BatchNorm,
    stages: Vec<Vec<ResidualBlock>>,
    pool: AdaptiveAvgPool2d,
    fc: Linear,
}

impl ResNet26 {
    fn new(num_classes: usize, device: &Device) -> Self {
        let conv1 = Conv2dConfig::new([3, 32], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .with_bias(false)
            .init(device);
        let mut builder = LayerBuilder::new(BlockKind::Bottleneck, 32);
        let stages = vec![
            make_layer(&mut builder, 32, 2, 1, false, device),
            make_layer(&mut builder, 64, 3, 2, false, device),
            make_layer(&mut builder, 128, 3, 2, false, device),
        ];
        Self {
            conv1,
            bn1: BatchNormConfig::new(32).init(device),
            stages,
            pool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(builder.inplanes, num_classes).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let mut x = relu(self.bn1.forward(self.conv1.forward(x)));
        for block in self.stages.iter().flatten() {
            x = block.forward(x);
        }
        self.fc.forward(self.pool.forward(x).flatten(1, 3))
    }
}

fn main() {
    // The default pure-Rust CPU backend. With other features compiled in, pass another
    // device here (e.g. `Device::wgpu(DeviceKind::DefaultDevice)`): nothing else changes.
    let device = Device::flex();

    // torchvision: ResNet152 = ResNet(Bottleneck, [3, 8, 36, 3])
    let resnet152 = ResNetConfig::new(BlockKind::Bottleneck, [3, 8, 36, 3]).init(&device);
    println!(
        "ResNet(Bottleneck, [3, 8, 36, 3]): {} parameters",
        resnet152.num_parameters()
    );

    // A non-standard depth from the config: ResNet-26 with the torchvision stem.
    let resnet26 = ResNetConfig::new(BlockKind::Bottleneck, [2, 2, 2, 2]).with_num_classes(10);
    let model = resnet26.init(&device);
    println!(
        "ResNet(Bottleneck, [2, 2, 2, 2]), 10 classes: {} parameters",
        model.num_parameters()
    );
    let images = Tensor::random([2, 3, 64, 64], Distribution::Normal(0.0, 1.0), &device);
    let logits = model.valid().forward(images.clone());
    println!(
        "  forward on {:?} -> logits {:?}",
        images.dims(),
        logits.dims()
    );

    // A hand-assembled network from the same building blocks.
    let custom = ResNet26::new(10, &device);
    println!(
        "hand-built 3-stage bottleneck net: {} parameters",
        resnet_model::parameter_counts(&custom).total()
    );
    let logits = custom.valid().forward(images);
    let first: Vec<f32> = logits
        .clone()
        .narrow(0, 0, 1)
        .into_data()
        .try_to_vec()
        .unwrap_or_default();
    println!(
        "  forward -> logits {:?}, first row {first:.3?}",
        logits.dims()
    );
}
