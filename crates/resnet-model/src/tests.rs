//! Unit tests on the default pure-Rust CPU device, with tiny configurations except where a
//! full-size preset is only counted (parameters are lazy, so that allocates nothing).

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor, Tolerance};

use crate::*;

fn device() -> Device {
    Device::flex()
}

fn random(shape: [usize; 4], device: &Device) -> Tensor<4> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

/// A two-blocks-per-stage network small enough for a forward pass in milliseconds.
fn tiny(block: BlockKind) -> ResNetConfig {
    ResNetConfig::new(block, [1, 2, 1, 1])
        .with_num_classes(5)
        .with_cifar_stem(true)
}

fn values(tensor: Tensor<2>) -> Vec<f32> {
    tensor.into_data().try_to_vec::<f32>().expect("f32 tensor")
}

/// torchvision's published parameter counts (`torchvision.models` docs, `num_params`).
#[test]
fn parameter_counts_equal_torchvision() {
    let expected = [
        ("resnet18", 11_689_512),
        ("resnet34", 21_797_672),
        ("resnet50", 25_557_032),
        ("resnet101", 44_549_160),
        ("resnet152", 60_192_808),
        ("resnext50_32x4d", 25_028_904),
        ("resnext101_32x8d", 88_791_336),
        ("resnext101_64x4d", 83_455_272),
        ("wide_resnet50_2", 68_883_240),
        ("wide_resnet101_2", 126_886_696),
    ];
    assert_eq!(expected.len(), ARCHITECTURES.len());
    let device = device();
    for (name, count) in expected {
        let model = ResNetConfig::from_name(name).unwrap().init(&device);
        assert_eq!(model.num_parameters(), count, "{name}");
    }
}

/// torchvision's published GFLOPS (multiply-adds of convolutions and the linear layer at 224).
#[test]
fn multiply_adds_equal_torchvision_gflops() {
    let device = device();
    for (name, gflops) in [
        ("resnet18", 1.814),
        ("resnet50", 4.089),
        ("resnet152", 11.514),
    ] {
        let model = ResNetConfig::from_name(name).unwrap().init(&device);
        let summary = model.summary(224, 224).unwrap();
        let measured = summary.multiply_adds() as f64 / 1e9;
        assert!(
            (measured - gflops).abs() < 0.0005,
            "{name}: {measured:.4} GMACs, torchvision publishes {gflops}"
        );
        assert_eq!(summary.parameters(), model.num_parameters());
    }
}

#[test]
fn summary_shapes_follow_the_strides() {
    let model = ResNetConfig::resnet50().init(&device());
    let summary = model.summary(224, 224).unwrap();
    let shapes: Vec<_> = summary.stages.iter().map(|s| s.output_shape).collect();
    assert_eq!(
        shapes,
        [
            [64, 56, 56],
            [256, 56, 56],
            [512, 28, 28],
            [1024, 14, 14],
            [2048, 7, 7],
            [1000, 1, 1]
        ]
    );
    let names: Vec<_> = summary.stages.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    );
    assert_eq!(summary.stages[5].parameters, 2048 * 1000 + 1000);
}

#[test]
fn summary_matches_a_real_forward() {
    let device = device();
    for config in [
        tiny(BlockKind::Basic),
        tiny(BlockKind::Bottleneck).with_groups(2),
        ResNetConfig::new(BlockKind::Bottleneck, [1, 1, 1, 1])
            .with_replace_stride_with_dilation([false, true, true]),
    ] {
        let model = config.init(&device);
        let summary = model.summary(40, 48).unwrap();
        let map = model.forward_feature_map(random([1, 3, 40, 48], &device));
        let [_, c, h, w] = map.dims();
        assert_eq!(summary.stages[4].output_shape, [c, h, w], "{config:?}");
    }
}

#[test]
fn convolutions_list_every_convolution_with_its_input() {
    let model = ResNetConfig::resnet50().init(&device());
    let convolutions = model.convolutions(224, 224).unwrap();
    // Stem, 16 bottlenecks of 3, 4 downsamples.
    assert_eq!(convolutions.len(), 1 + 16 * 3 + 4);
    assert_eq!(convolutions[0].input_shape, [3, 224, 224]);
    // layer1's first block: its downsample, then conv1 on the pooled 56x56 stem output.
    assert_eq!(convolutions[1].input_shape, [64, 56, 56]);
    assert_eq!(convolutions[1].conv.kernel_size, [1, 1]);
    // layer4's last 3x3 convolution sees 512 channels at 7x7.
    let last_3x3 = convolutions
        .iter()
        .rev()
        .find(|c| c.conv.kernel_size == [3, 3])
        .unwrap();
    assert_eq!(last_3x3.input_shape, [512, 7, 7]);
    // Each sees the channels its weights expect.
    for c in &convolutions {
        let [_, in_per_group, _, _] = c.conv.weight.lazy_shape().dims::<4>();
        assert_eq!(c.input_shape[0], in_per_group * c.conv.groups);
    }
}

#[test]
fn summary_rejects_an_input_smaller_than_the_stem() {
    let model = ResNetConfig::resnet18().init(&device());
    assert!(matches!(
        model.summary(0, 0),
        Err(ConfigError::InputTooSmall { .. })
    ));
}

#[test]
fn forward_shapes_for_every_block_kind() {
    let device = device();
    // (config, input, expected feature map)
    let cases = [
        (tiny(BlockKind::Basic), [2, 3, 32, 32], [2, 512, 4, 4]),
        (tiny(BlockKind::Bottleneck), [2, 3, 32, 32], [2, 2048, 4, 4]),
        (
            tiny(BlockKind::Bottleneck)
                .with_groups(4)
                .with_width_per_group(4),
            [1, 3, 16, 24],
            [1, 2048, 2, 3],
        ),
        (
            ResNetConfig::new(BlockKind::Basic, [1, 1, 1, 1]).with_in_channels(1),
            [1, 1, 64, 64],
            [1, 512, 2, 2],
        ),
        (
            ResNetConfig::new(BlockKind::Bottleneck, [1, 1, 1, 1])
                .with_replace_stride_with_dilation([false, false, true]),
            [1, 3, 64, 64],
            [1, 2048, 4, 4],
        ),
    ];
    for (config, input, expected) in cases {
        let model = config.init(&device);
        let x = random(input, &device);
        assert_eq!(model.forward_feature_map(x.clone()).dims(), expected);
        assert_eq!(
            model.forward_features(x.clone()).dims(),
            [input[0], expected[1]]
        );
        assert_eq!(model.forward(x).dims(), [input[0], config.num_classes]);
    }
}

#[test]
fn blocks_have_torchvision_shapes_and_shortcuts() {
    let device = device();
    let basic = BlockConfig::new(64, 64).init_basic(&device);
    assert!(basic.downsample.is_none());
    let basic_strided = BlockConfig::new(64, 128).with_stride(2).init_basic(&device);
    let y = basic_strided.forward(random([2, 64, 9, 9], &device));
    assert_eq!(y.dims(), [2, 128, 5, 5]);
    assert!(basic_strided.downsample.is_some());

    // ResNeXt-50 32x4d's first stage block: width = 64 * 4 / 64 * 32 = 128.
    let config = BlockConfig::new(64, 64).with_groups(32).with_base_width(4);
    assert_eq!(config.bottleneck_width(), 128);
    let bottleneck = config.init_bottleneck(&device);
    assert_eq!(bottleneck.conv2.weight.dims(), [128, 4, 3, 3]);
    assert_eq!(bottleneck.conv2.groups, 32);
    // v1.5: the stride sits on the 3x3 convolution.
    let strided = BlockConfig::new(256, 128)
        .with_stride(2)
        .init_bottleneck(&device);
    assert_eq!(
        (strided.conv1.stride, strided.conv2.stride),
        ([1, 1], [2, 2])
    );
    let y = strided.forward(random([1, 256, 8, 8], &device));
    assert_eq!(y.dims(), [1, 512, 4, 4]);
}

#[test]
fn make_layer_tracks_channels_and_dilation_like_torchvision() {
    let device = device();
    let mut builder = LayerBuilder::new(BlockKind::Bottleneck, 64);
    let layer1 = make_layer(&mut builder, 64, 3, 1, false, &device);
    assert_eq!(builder.inplanes, 256);
    // 64 -> 256 channels: the first block needs a projection even at stride 1.
    assert!(matches!(&layer1[0], ResidualBlock::Bottleneck(b) if b.downsample.is_some()));
    assert!(matches!(&layer1[1], ResidualBlock::Bottleneck(b) if b.downsample.is_none()));

    let dilated = make_layer(&mut builder, 128, 2, 2, true, &device);
    assert_eq!((builder.inplanes, builder.dilation), (512, 2));
    let ResidualBlock::Bottleneck(first) = &dilated[0] else {
        panic!("bottleneck expected")
    };
    let ResidualBlock::Bottleneck(second) = &dilated[1] else {
        panic!("bottleneck expected")
    };
    // The first block keeps the previous dilation; the stride became dilation.
    assert_eq!((first.conv2.stride, first.conv2.dilation), ([1, 1], [1, 1]));
    assert_eq!(
        (second.conv2.stride, second.conv2.dilation),
        ([1, 1], [2, 2])
    );
}

#[test]
fn initialization_matches_torchvision() {
    let device = device();
    let model = ResNetConfig::resnet18()
        .with_zero_init_residual(true)
        .init(&device);
    // kaiming_normal_(mode="fan_out", nonlinearity="relu"): std = sqrt(2 / (64 * 7 * 7)).
    let weights = model
        .conv1
        .weight
        .val()
        .into_data()
        .try_to_vec::<f32>()
        .unwrap();
    let n = weights.len() as f64;
    let mean = weights.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (weights
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    let expected = (2.0f64 / (64.0 * 49.0)).sqrt();
    assert!(
        (std / expected - 1.0).abs() < 0.05,
        "std {std}, expected {expected}"
    );
    assert!(mean.abs() < 0.1 * expected);

    let ResidualBlock::Basic(block) = &model.layer1[0] else {
        panic!("basic block expected")
    };
    let zeros = Tensor::<1>::zeros([64], &device).into_data();
    let ones = Tensor::<1>::ones([64], &device).into_data();
    block.bn2.gamma.val().into_data().assert_eq(&zeros, false);
    block.bn1.gamma.val().into_data().assert_eq(&ones, false);
    block.bn1.beta.val().into_data().assert_eq(&zeros, false);
}

#[test]
fn eval_uses_running_statistics_and_train_uses_the_batch() {
    let device = device().autodiff();
    device.seed(7);
    let model = tiny(BlockKind::Bottleneck).init(&device);
    let batch = random([4, 3, 16, 16], &device);
    let first = batch.clone().narrow(0, 0, 1);

    // Training mode: sample 0's output depends on the other samples of its batch, and the
    // running statistics move.
    let before = model.bn1.running_mean.value().into_data();
    let train_batch = values(model.forward(batch.clone()).narrow(0, 0, 1));
    let train_alone = values(model.forward(first.clone()));
    assert!(max_abs_diff(&train_batch, &train_alone) > 1e-3);
    let after = model.bn1.running_mean.value().into_data();
    assert_ne!(before, after, "running mean did not move in training mode");

    // Eval mode: each sample is normalized with the running statistics only.
    let eval = model.valid();
    let eval_batch = values(eval.forward(batch.clone()).narrow(0, 0, 1));
    let eval_alone = values(eval.forward(first));
    assert!(max_abs_diff(&eval_batch, &eval_alone) < 1e-5);
    let frozen = eval.bn1.running_mean.value().into_data();
    eval.forward(batch);
    assert_eq!(frozen, eval.bn1.running_mean.value().into_data());
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn gradients_reach_the_stem_through_the_shortcuts() {
    let device = device().autodiff();
    // With zero-initialized residual branches, every block's output is relu(shortcut): the stem
    // can only receive gradients through the identity and projection shortcuts.
    let model = tiny(BlockKind::Basic)
        .with_zero_init_residual(true)
        .init(&device);
    let x = random([2, 3, 16, 16], &device);
    let loss = model.forward(x).sum();
    let grads = loss.backward();
    let grad = model
        .conv1
        .weight
        .grad(&grads)
        .expect("conv1 has a gradient");
    assert_eq!(grad.dims(), [64, 3, 3, 3]);
    let norm: f32 = grad.abs().sum().into_scalar();
    assert!(norm > 0.0, "conv1 gradient is zero");
    let ResidualBlock::Basic(block) = &model.layer1[0] else {
        panic!("basic block expected")
    };
    // The zeroed BN weight itself still learns: its gradient is not zero.
    let gamma = block.bn2.gamma.grad(&grads).expect("bn2 has a gradient");
    assert!(gamma.abs().sum().into_scalar::<f32>() > 0.0);
}

#[test]
fn config_round_trips_through_json_and_files() {
    let config = ResNetConfig::resnext50_32x4d()
        .with_num_classes(10)
        .with_cifar_stem(true)
        .with_replace_stride_with_dilation([false, true, true]);
    let json = serde_json::to_string(&config).unwrap();
    let back: ResNetConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, config);

    let path = std::env::temp_dir().join(format!("resnet-config-{}.json", std::process::id()));
    burn::config::Config::save(&config, &path).unwrap();
    let loaded = <ResNetConfig as burn::config::Config>::load(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(loaded, config);
    assert_eq!(loaded.preset_name(), Some("resnext50_32x4d"));
}

#[test]
fn presets_are_named_like_torchvision() {
    for name in ARCHITECTURES {
        let config = ResNetConfig::from_name(name).unwrap();
        assert_eq!(config.preset_name(), Some(name));
        config.validate().unwrap();
    }
    assert_eq!(
        ResNetConfig::new(BlockKind::Bottleneck, [2, 2, 2, 2]).preset_name(),
        None
    );
    let err = ResNetConfig::from_name("resnet51").unwrap_err().to_string();
    assert!(
        err.contains("resnet51") && err.contains("wide_resnet101_2"),
        "{err}"
    );
}

#[test]
fn validate_reports_what_torchvision_rejects() {
    let cases = [
        ResNetConfig::resnet18().with_groups(2),
        ResNetConfig::resnet18().with_width_per_group(128),
        ResNetConfig::resnet18().with_replace_stride_with_dilation([false, true, false]),
        ResNetConfig::resnet50().with_num_classes(0),
        ResNetConfig::resnet50().with_in_channels(0),
        ResNetConfig::new(BlockKind::Basic, [2, 0, 2, 2]),
        ResNetConfig::resnet50().with_width_per_group(0),
    ];
    for config in cases {
        assert!(
            matches!(config.validate(), Err(ConfigError::Invalid(_))),
            "{config:?}"
        );
    }
}

#[test]
fn replacing_the_head_keeps_the_backbone() {
    let device = device();
    let model = tiny(BlockKind::Basic).init(&device);
    let x = random([2, 3, 16, 16], &device);
    let features = model.forward_features(x.clone()).into_data();
    let model = model.with_num_classes(3, &device);
    assert_eq!(model.num_classes(), 3);
    assert_eq!(model.forward(x.clone()).dims(), [2, 3]);
    model
        .forward_features(x)
        .into_data()
        .assert_approx_eq::<f32>(&features, Tolerance::absolute(1e-6));
}

#[test]
fn module_records_round_trip() {
    let device = device();
    let model = tiny(BlockKind::Bottleneck).init(&device);
    let x = random([1, 3, 16, 16], &device);
    let expected = model.forward(x.clone()).into_data();
    let path = std::env::temp_dir().join(format!("resnet-record-{}.bpk", std::process::id()));
    model.save_file(&path).unwrap();
    let loaded = tiny(BlockKind::Bottleneck)
        .init(&device)
        .try_load_file(&path)
        .unwrap();
    // Burnpack loads lazily: the file must outlive the first use of the parameters.
    let output = loaded.forward(x).into_data();
    std::fs::remove_file(&path).unwrap();
    output.assert_approx_eq::<f32>(&expected, Tolerance::absolute(0.0));
}

#[test]
#[should_panic(expected = "BasicBlock only supports groups=1")]
fn grouped_basic_block_panics() {
    BlockConfig::new(64, 64)
        .with_groups(2)
        .init_basic(&device());
}

#[test]
#[should_panic(expected = "Dilation > 1 not supported in BasicBlock")]
fn dilated_basic_block_panics() {
    BlockConfig::new(64, 64)
        .with_dilation(2)
        .init_basic(&device());
}

#[test]
#[should_panic(expected = "at least one block")]
fn empty_stage_panics() {
    make_layer(
        &mut LayerBuilder::new(BlockKind::Basic, 64),
        64,
        0,
        1,
        false,
        &device(),
    );
}

#[test]
#[should_panic(expected = "invalid ResNetConfig")]
fn init_of_an_invalid_config_panics() {
    ResNetConfig::resnet18().with_groups(32).init(&device());
}

/// Give a batch norm statistics and affine parameters far from the identity (as a trained
/// network has), so that folding it has something to fold.
fn randomize(bn: &mut burn::nn::BatchNorm, device: &Device) {
    use burn::module::{Param, RunningState};
    let [channels] = bn.gamma.dims();
    let uniform =
        |low, high| Tensor::<1>::random([channels], Distribution::Uniform(low, high), device);
    let normal = |std| Tensor::<1>::random([channels], Distribution::Normal(0.0, std), device);
    bn.gamma = Param::from_tensor(uniform(0.5, 1.5));
    bn.beta = Param::from_tensor(normal(0.5));
    bn.running_mean = RunningState::new(normal(0.5));
    bn.running_var = RunningState::new(uniform(0.25, 2.0));
}

fn randomize_batch_norms(model: &mut ResNet, device: &Device) {
    randomize(&mut model.bn1, device);
    for block in [
        &mut model.layer1,
        &mut model.layer2,
        &mut model.layer3,
        &mut model.layer4,
    ]
    .into_iter()
    .flatten()
    {
        let (bns, downsample) = match block {
            ResidualBlock::Basic(b) => (vec![&mut b.bn1, &mut b.bn2], &mut b.downsample),
            ResidualBlock::Bottleneck(b) => {
                (vec![&mut b.bn1, &mut b.bn2, &mut b.bn3], &mut b.downsample)
            }
        };
        for bn in bns {
            randomize(bn, device);
        }
        if let Some(downsample) = downsample {
            randomize(&mut downsample.bn, device);
        }
    }
}

/// Folding the batch norms into the convolutions changes only the rounding: the logits of the
/// folded network equal the eval-mode network's within 1e-4 of the largest logit, for
/// BasicBlocks and for grouped bottlenecks (ResNeXt) with projection shortcuts.
#[test]
fn folded_batchnorm_gives_the_eval_logits() {
    let device = device();
    device.seed(11);
    for config in [
        tiny(BlockKind::Basic),
        tiny(BlockKind::Bottleneck)
            .with_groups(4)
            .with_width_per_group(8),
    ] {
        let mut model = config.init(&device);
        randomize_batch_norms(&mut model, &device);
        let model = model.valid();
        let x = random([2, 3, 16, 16], &device);
        let expected = values(model.forward(x.clone()));
        let folded = model.fold_batchnorm();
        assert!(folded.batchnorm_folded);
        assert!(folded.conv1.bias.is_some());
        let logits = values(folded.forward(x.clone()));
        let scale = expected.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&expected, &logits);
        assert!(
            diff <= 1e-4 * scale,
            "{config:?}: folded logits differ by {diff} (largest logit {scale})"
        );
        // Folding twice is folding once.
        let again = values(folded.fold_batchnorm().forward(x));
        assert_eq!(again, logits);
    }
}

/// The batch norms of a folded block are the identity, so running them anyway (as a model that
/// lost its `batchnorm_folded` flags would) gives the folded output up to rounding.
#[test]
fn folded_batch_norms_are_the_identity() {
    let device = device();
    let config = BlockConfig::new(8, 4).with_stride(2).with_groups(2);
    let mut block = config.init_bottleneck(&device);
    for bn in [&mut block.bn1, &mut block.bn2, &mut block.bn3] {
        randomize(bn, &device);
    }
    let x = random([1, 8, 6, 6], &device);
    let expected = block.forward(x.clone()).into_data();
    let mut folded = block.fold_batchnorm();
    folded
        .forward(x.clone())
        .into_data()
        .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-5));
    folded.batchnorm_folded = false;
    if let Some(downsample) = &mut folded.downsample {
        downsample.batchnorm_folded = false;
    }
    folded
        .forward(x)
        .into_data()
        .assert_approx_eq::<f32>(&expected, Tolerance::absolute(1e-4));
}
