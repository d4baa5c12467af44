//! resnet-rs's CPU kernels (`ops::conv2d_fused` and `ops::max_pool2d` on flex) against Burn's
//! own operations: the convolution on every convolution shape of every torchvision preset
//! (grouped, wide and dilated ones included) at the spatial size each one sees for a 224x224
//! input, then batches, odd sizes, asymmetric padding, thread counts, and NaN inputs.
#![cfg(feature = "flex")]

use burn::module::{Module, Param};
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Tensor};
use resnet_model::ops::{conv2d_fused, max_pool2d, set_winograd};
use resnet_model::{ARCHITECTURES, ResNetConfig};
use std::collections::BTreeMap;

/// Largest difference allowed, relative to the largest output magnitude: both sides sum up
/// to 4608 products in float32, in different orders.
const TOLERANCE: f32 = 2e-6;

/// The same for 3x3 stride-1 convolutions, which may run through Winograd's F(4x4, 3x3):
/// its transform coefficients reach 8, which costs about half a decimal digit (measured up to
/// 6.5e-6 here).
const WINOGRAD_TOLERANCE: f32 = 1e-5;

/// `relu(conv(x) + residual)` with Burn's operations only.
fn reference(
    conv: &Conv2d,
    x: Tensor<4>,
    residual: Option<Tensor<4>>,
    apply_relu: bool,
) -> Tensor<4> {
    let mut out = conv.forward(x);
    if let Some(residual) = residual {
        out = out + residual;
    }
    if apply_relu { relu(out) } else { out }
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().expect("float32 tensor")
}

/// Compares the fused convolution with Burn's for `conv` on a `[batch, in, h, w]` input, with
/// and without a residual and ReLU. Returns the worst relative difference.
fn check(conv: &Conv2d, batch: usize, h: usize, w: usize, label: &str) -> f32 {
    let device = Device::flex();
    let [_, in_per_group, _, _] = conv.weight.val().dims();
    let x = Tensor::<4>::random(
        [batch, in_per_group * conv.groups, h, w],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let plain = reference(conv, x.clone(), None, false);
    let residual = Tensor::random(plain.dims(), Distribution::Normal(0.0, 1.0), &device);
    let mut worst = 0.0f32;
    for (residual, apply_relu) in [(None, false), (Some(residual.clone()), true), (None, true)] {
        let expected = values(reference(conv, x.clone(), residual.clone(), apply_relu));
        let got = values(conv2d_fused(conv, x.clone(), residual.clone(), apply_relu));
        assert_eq!(got.len(), expected.len(), "{label}: output size");
        let scale = expected.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(&expected)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        let relative = diff / scale;
        let tolerance = if conv.kernel_size == [3, 3] && conv.stride == [1, 1] {
            WINOGRAD_TOLERANCE
        } else {
            TOLERANCE
        };
        assert!(
            relative <= tolerance,
            "{label} (residual {}, relu {apply_relu}): differs from Burn's conv by {diff} \
             (largest output {scale})",
            residual.is_some()
        );
        worst = worst.max(relative);
    }
    worst
}

/// Gives `conv` a random bias (the fused kernel adds it; folded models always have one).
fn with_bias(mut conv: Conv2d) -> Conv2d {
    let [out_channels, ..] = conv.weight.val().dims();
    conv.bias = Some(Param::from_tensor(Tensor::random(
        [out_channels],
        Distribution::Normal(0.0, 1.0),
        &Device::flex(),
    )));
    conv
}

/// Every distinct convolution of `config`'s network, with the square input size it sees for
/// a 224x224 image, keyed by its shape.
fn convolutions(config: &ResNetConfig, into: &mut BTreeMap<String, (Conv2d, usize)>) {
    let model = config.init(&Device::flex());
    let convolutions = model
        .convolutions(224, 224)
        .expect("224x224 fits every preset");
    for c in convolutions {
        let dims = c.conv.weight.val().dims();
        let size = c.input_shape[1];
        let key = format!(
            "weight {dims:?} stride {:?} dilation {:?} groups {} input {size}x{size}",
            c.conv.stride, c.conv.dilation, c.conv.groups
        );
        into.entry(key).or_insert_with(|| (c.conv.clone(), size));
    }
}

#[test]
fn matches_burn_on_every_resnet_convolution() {
    let mut shapes = BTreeMap::new();
    for name in ARCHITECTURES {
        convolutions(&ResNetConfig::from_name(name).expect("preset"), &mut shapes);
    }
    // Dilated stages (segmentation backbones): 3x3 convolutions with dilation 2 and 4.
    convolutions(
        &ResNetConfig::resnet50().with_replace_stride_with_dilation([false, true, true]),
        &mut shapes,
    );
    let grouped = shapes.values().filter(|(c, _)| c.groups > 1).count();
    let dilated = shapes.values().filter(|(c, _)| c.dilation[0] > 1).count();
    assert!(
        shapes.len() >= 75 && grouped >= 12 && dilated >= 2,
        "{} shapes, {grouped} grouped, {dilated} dilated",
        shapes.len()
    );
    let mut worst = 0.0f32;
    for (label, (conv, size)) in &shapes {
        worst = worst.max(check(&with_bias(conv.clone()), 1, *size, *size, label));
    }
    println!(
        "{} convolution shapes, worst relative difference {worst:.2e}",
        shapes.len()
    );
}

#[test]
fn matches_burn_on_batches_odd_sizes_and_thread_counts() {
    let device = Device::flex();
    let conv = |channels: [usize; 2], kernel: usize, stride: usize, padding: [usize; 4]| {
        let [top, left, bottom, right] = padding;
        Conv2dConfig::new(channels, [kernel, kernel])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
            .init(&device)
    };
    let cases = [
        (
            conv([3, 16], 7, 2, [3, 3, 3, 3]),
            3,
            37,
            29,
            "stem, batch 3, 37x29",
        ),
        (
            conv([16, 32], 3, 1, [1, 1, 1, 1]),
            2,
            31,
            33,
            "3x3, batch 2, 31x33",
        ),
        (
            conv([16, 32], 3, 2, [1, 1, 1, 1]),
            5,
            9,
            8,
            "3x3 stride 2, batch 5",
        ),
        // Small images with the whole batch in one GEMM per block of output channels: two
        // blocks (151 + 150 channels) and the patches gathered by tasks of 2 input channels,
        // the last with 1.
        (
            conv([17, 301], 3, 2, [1, 1, 1, 1]),
            6,
            9,
            9,
            "3x3 stride 2, batch 6, channel blocks",
        ),
        (
            conv([40, 260], 1, 1, [0, 0, 0, 0]),
            8,
            7,
            7,
            "1x1, batch 8, 7x7, channel blocks",
        ),
        (
            conv([16, 32], 3, 1, [0, 2, 1, 0]),
            1,
            12,
            10,
            "asymmetric padding",
        ),
        (
            conv([32, 64], 1, 1, [0, 0, 0, 0]),
            4,
            7,
            7,
            "1x1, batch 4, 7x7",
        ),
        (
            conv([32, 64], 1, 2, [0, 0, 0, 0]),
            2,
            15,
            15,
            "1x1 stride 2, odd size",
        ),
        (
            conv([64, 96], 1, 1, [0, 0, 0, 0]),
            1,
            45,
            45,
            "1x1 with pixel blocks",
        ),
        (
            conv([8, 8], 3, 1, [1, 1, 1, 1]),
            1,
            1,
            1,
            "1x1 image, all padding",
        ),
    ];
    for threads in [1, 3, 8] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        pool.install(|| {
            for (conv, batch, h, w, label) in &cases {
                check(
                    &with_bias(conv.clone()),
                    *batch,
                    *h,
                    *w,
                    &format!("{label}, {threads} threads"),
                );
                check(
                    conv,
                    *batch,
                    *h,
                    *w,
                    &format!("{label}, no bias, {threads} threads"),
                );
            }
        });
    }
}

/// Held by the tests that flip `set_winograd` (a process-wide switch), so that they do not
/// flip it under each other. Other tests may run either path: both are checked against Burn.
static WINOGRAD_SWITCH: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn winograd_matches_burn_and_does_not_depend_on_threads() {
    let _switch = WINOGRAD_SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    // 3x3 stride-1 convolutions with >= 64 channels and >= 7x7 outputs take the Winograd
    // path (at batch 1 the smaller ones stay direct): F(4x4, 3x3) for ResNet-50's layer2 at
    // batch 8 and the 30x26 case, F(2x2, 3x3) for the others; partial tiles, valid and
    // asymmetric padding included.
    let device = Device::flex();
    let conv = |channels: [usize; 2], padding: [usize; 4]| {
        let [top, left, bottom, right] = padding;
        with_bias(
            Conv2dConfig::new(channels, [3, 3])
                .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
                .init(&device),
        )
    };
    let cases = [
        (
            conv([64, 64], [1; 4]),
            1,
            56,
            56,
            "ResNet-18 layer1, batch 1",
        ),
        (
            conv([128, 128], [1; 4]),
            8,
            28,
            28,
            "ResNet-50 layer2, batch 8",
        ),
        (
            conv([256, 256], [1; 4]),
            8,
            14,
            14,
            "ResNet-50 layer3, batch 8",
        ),
        (
            conv([512, 512], [1; 4]),
            8,
            7,
            7,
            "ResNet-50 layer4, batch 8",
        ),
        (
            conv([128, 160], [1; 4]),
            3,
            17,
            15,
            "odd sizes, partial tiles",
        ),
        (conv([128, 128], [0; 4]), 2, 16, 20, "no padding"),
        (
            conv([128, 128], [2, 0, 1, 1]),
            8,
            30,
            26,
            "F(4x4, 3x3) partial tiles, asymmetric padding",
        ),
        (
            conv([144, 128], [2, 0, 1, 1]),
            2,
            20,
            20,
            "asymmetric padding",
        ),
    ];
    for (conv, batch, h, w, label) in &cases {
        let x = Tensor::<4>::random(
            [*batch, conv.weight.val().dims()[1], *h, *w],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let run = |threads: usize, winograd: bool| {
            set_winograd(winograd);
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("thread pool");
            let out = pool.install(|| values(conv2d_fused(conv, x.clone(), None, true)));
            set_winograd(true);
            out
        };
        let one = run(1, true);
        assert_eq!(one, run(3, true), "{label}: depends on the thread count");
        assert_ne!(one, run(1, false), "{label}: the Winograd path did not run");
        check(conv, *batch, *h, *w, label);
    }
}

#[test]
fn winograd_resnet50_matches_the_direct_path() {
    let _switch = WINOGRAD_SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    // End to end, BatchNorms folded as `resnet bench` and `classify` run it: at batch 8 and
    // 224x224 every stride-1 3x3 convolution of ResNet-50 takes the Winograd path, F(4x4, 3x3)
    // at 56x56 and 28x28, F(2x2, 3x3) at 14x14 and 7x7.
    let device = Device::flex();
    device.seed(5);
    let model = ResNetConfig::resnet50()
        .init(&device)
        .valid()
        .fold_batchnorm();
    let x = Tensor::<4>::random([8, 3, 224, 224], Distribution::Normal(0.0, 1.0), &device);
    let logits = |winograd: bool| {
        set_winograd(winograd);
        let out: Vec<f32> = model
            .forward(x.clone())
            .into_data()
            .try_to_vec()
            .expect("float32 logits");
        set_winograd(true);
        out
    };
    let (direct, winograd) = (logits(false), logits(true));
    assert_ne!(direct, winograd, "the Winograd path did not run");
    let scale = direct.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    let diff = direct
        .iter()
        .zip(&winograd)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    println!(
        "ResNet-50 logits, Winograd vs direct: relative difference {:.2e}",
        diff / scale
    );
    assert!(
        diff <= 1e-5 * scale,
        "Winograd logits differ by {diff} (largest logit {scale})"
    );
}

#[test]
fn fused_calls_with_bias_and_relu_differentiate() {
    // Under autodiff a convolution with bias and ReLU is composed from Burn's operations:
    // gradients must flow through it.
    let device = Device::flex().autodiff();
    let conv = Conv2dConfig::new([4, 6], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init(&device);
    let x =
        Tensor::<4>::random([2, 4, 5, 5], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let out = conv2d_fused(&conv, x.clone(), None, true);
    let grads = out.sum().backward();
    let grad = x.grad(&grads).expect("input gradient");
    assert_eq!(grad.dims(), [2, 4, 5, 5]);
    assert!(grad.abs().sum().into_scalar::<f32>() > 0.0);
}

/// Values equal, NaN where the other has NaN.
fn assert_same(got: &[f32], expected: &[f32], label: &str) {
    assert_eq!(got.len(), expected.len(), "{label}: output size");
    for (i, (a, b)) in got.iter().zip(expected).enumerate() {
        assert!(
            a == b || (a.is_nan() && b.is_nan()),
            "{label}: element {i} is {a}, Burn says {b}"
        );
    }
}

#[test]
fn max_pool_matches_burn() {
    let device = Device::flex();
    let pool = |kernel: usize, stride: usize, padding: [usize; 4], dilation: usize| {
        let [top, left, bottom, right] = padding;
        MaxPool2dConfig::new([kernel, kernel])
            .with_strides([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(top, left, bottom, right))
            .with_dilation([dilation, dilation])
            .init()
    };
    let cases: [(MaxPool2d, [usize; 4], &str); 8] = [
        (
            pool(3, 2, [1, 1, 1, 1], 1),
            [2, 64, 112, 112],
            "ResNet stem pool",
        ),
        (pool(3, 2, [1, 1, 1, 1], 1), [1, 3, 17, 10], "odd sizes"),
        // The last window overhangs the right edge; and rows too narrow for an inner window.
        (pool(3, 2, [1, 1, 1, 1], 1), [1, 3, 9, 11], "odd width"),
        (pool(3, 2, [1, 1, 1, 1], 1), [2, 2, 3, 2], "2 columns"),
        (pool(3, 1, [1, 1, 1, 1], 1), [3, 4, 9, 9], "stride 1"),
        (pool(2, 2, [0, 0, 0, 0], 1), [1, 5, 8, 7], "2x2 no padding"),
        (
            pool(3, 2, [1, 0, 0, 1], 1),
            [1, 2, 8, 8],
            "asymmetric padding",
        ),
        (pool(3, 1, [2, 2, 2, 2], 2), [1, 2, 7, 6], "dilation 2"),
    ];
    for (pool, shape, label) in &cases {
        let x = Tensor::<4>::random(*shape, Distribution::Normal(0.0, 1.0), &device);
        let expected = values(pool.forward(x.clone()));
        assert_same(&values(max_pool2d(pool, x)), &expected, label);
    }
}

#[test]
fn nan_inputs_give_nan_outputs() {
    let device = Device::flex();
    let mut input = vec![1.0f32; 2 * 8 * 8];
    input[8 * 8 + 3 * 8 + 4] = f32::NAN; // second channel, row 3, column 4
    let x = Tensor::<1>::from_floats(input.as_slice(), &device).reshape([1, 2, 8, 8]);

    let pool = MaxPool2dConfig::new([3, 3])
        .with_strides([2, 2])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init();
    let pooled = values(max_pool2d(&pool, x.clone()));
    assert_same(
        &pooled,
        &values(pool.forward(x.clone())),
        "max pool with a NaN",
    );
    assert!(
        pooled.iter().any(|v| v.is_nan()),
        "max pooling dropped the NaN"
    );

    // A NaN reaching a fused convolution with ReLU stays NaN, as with Burn's ReLU.
    let conv = with_bias(
        Conv2dConfig::new([2, 3], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device),
    );
    let fused = values(conv2d_fused(&conv, x.clone(), None, true));
    assert_same(
        &fused,
        &values(reference(&conv, x, None, true)),
        "conv + ReLU with a NaN",
    );
    assert!(
        fused.iter().any(|v| v.is_nan()),
        "the fused ReLU dropped the NaN"
    );
}

#[test]
fn winograd_gives_nan_and_infinity_exactly_where_direct_convolution_does() {
    // The transforms mix a tile's inputs (a NaN would reach outputs outside its 3x3 window, an
    // infinity could come out as NaN), so where an output comes out NaN or infinite the
    // convolution is recomputed directly: the result is then the direct path's, bit for bit.
    let _switch = WINOGRAD_SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let device = Device::flex();
    let conv = with_bias(
        Conv2dConfig::new([64, 64], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device),
    );
    let run = |input: &[f32], winograd: bool| {
        let x = Tensor::<1>::from_floats(input, &device).reshape([4, 64, 14, 14]);
        set_winograd(winograd);
        let out = values(conv2d_fused(&conv, x.clone(), None, false));
        set_winograd(true);
        (out, values(reference(&conv, x, None, false)))
    };
    let bits = |v: &[f32]| v.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let mut input: Vec<f32> = (0..4 * 64 * 14 * 14)
        .map(|i| (i % 7) as f32 - 3.0)
        .collect();
    let (finite, _) = run(&input, true);
    let (direct, _) = run(&input, false);
    assert_ne!(finite, direct, "the Winograd path did not run");
    for special in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        // Image 1, channel 5, row 6, column 9; and a tile corner: image 2, channel 0, (3, 3).
        input[(64 + 5) * 14 * 14 + 6 * 14 + 9] = special;
        input[(2 * 64) * 14 * 14 + 3 * 14 + 3] = special;
        let (ours, expected) = run(&input, true);
        let (direct, _) = run(&input, false);
        assert_eq!(
            bits(&ours),
            bits(&direct),
            "{special}: not the direct result"
        );
        let special_outputs = expected.iter().filter(|v| !v.is_finite()).count();
        assert_eq!(special_outputs, 2 * 9 * 64, "{special}: Burn's convolution");
        for (i, (a, b)) in ours.iter().zip(&expected).enumerate() {
            assert_eq!(a.is_nan(), b.is_nan(), "{special}: output {i}: {a} vs {b}");
            assert_eq!(
                a.is_finite(),
                b.is_finite(),
                "{special}: output {i}: {a} vs {b}"
            );
        }
    }
}

#[cfg(feature = "autodiff")]
/// Input and weight gradients of `sum(conv(x) * upstream)`: through `conv2d_fused` (resnet-rs's
/// forward and backward kernels on an autodiff flex device) and through `conv.forward`
/// (Burn's). Returns the worst relative difference.
fn check_gradients(conv: &Conv2d, batch: usize, h: usize, w: usize, label: &str) -> f32 {
    let device = Device::flex().autodiff();
    let [_, in_per_group, _, _] = conv.weight.val().dims();
    let x = Tensor::<4>::random(
        [batch, in_per_group * conv.groups, h, w],
        Distribution::Normal(0.0, 1.0),
        &device,
    )
    .into_data();
    let upstream = Tensor::<4>::random(
        conv.forward(Tensor::from_data(x.clone(), &device)).dims(),
        Distribution::Normal(0.0, 1.0),
        &device,
    )
    .into_data();
    let gradients = |fused: bool| {
        let x = Tensor::<4>::from_data(x.clone(), &device).require_grad();
        let out = if fused {
            conv2d_fused(conv, x.clone(), None, false)
        } else {
            conv.forward(x.clone())
        };
        let grads = (out * Tensor::from_data(upstream.clone(), &device))
            .sum()
            .backward();
        let dx = x.grad(&grads).expect("input gradient");
        let dw = conv.weight.grad(&grads).expect("weight gradient");
        (values(dx), values(dw))
    };
    let (ours, burn) = (gradients(true), gradients(false));
    let mut worst = 0.0f32;
    for (name, got, expected) in [("input", &ours.0, &burn.0), ("weight", &ours.1, &burn.1)] {
        assert_eq!(got.len(), expected.len(), "{label}: {name} gradient size");
        let scale = expected.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let diff = got
            .iter()
            .zip(expected)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        assert!(
            diff / scale <= 1e-5,
            "{label}: {name} gradient differs from Burn's by {diff} (largest {scale})"
        );
        worst = worst.max(diff / scale);
    }
    worst
}

#[cfg(feature = "autodiff")]
#[test]
fn training_gradients_match_burn() {
    let device = Device::flex().autodiff();
    let conv = |channels: [usize; 2],
                kernel: usize,
                stride: usize,
                pad: usize,
                groups: usize,
                dilation: usize| {
        Conv2dConfig::new(channels, [kernel, kernel])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
            .with_groups(groups)
            .with_dilation([dilation, dilation])
            .with_bias(false)
            .init(&device)
    };
    // The convolutions of a CIFAR-stem ResNet-18 and of the ImageNet stem and bottlenecks, at
    // training batch sizes (several images per column block at 4x4), plus grouped, dilated and
    // odd-sized ones.
    let cases = [
        (conv([3, 64], 3, 1, 1, 1, 1), 8, 32, 32, "CIFAR stem"),
        (conv([64, 64], 3, 1, 1, 1, 1), 4, 32, 32, "layer1 3x3"),
        (
            conv([64, 128], 3, 2, 1, 1, 1),
            4,
            32,
            32,
            "layer2 3x3 stride 2",
        ),
        (
            conv([64, 128], 1, 2, 0, 1, 1),
            4,
            32,
            32,
            "layer2 downsample",
        ),
        (
            conv([256, 512], 3, 2, 1, 1, 1),
            16,
            8,
            8,
            "layer4 3x3 stride 2",
        ),
        (
            conv([512, 512], 3, 1, 1, 1, 1),
            16,
            4,
            4,
            "layer4 3x3, 4x4 images",
        ),
        (
            conv([3, 16], 7, 2, 3, 1, 1),
            2,
            35,
            29,
            "ImageNet stem, odd size",
        ),
        (conv([64, 256], 1, 1, 0, 1, 1), 3, 14, 14, "bottleneck 1x1"),
        (
            conv([128, 128], 3, 2, 1, 32, 1),
            2,
            14,
            14,
            "ResNeXt grouped 3x3",
        ),
        (conv([32, 32], 3, 1, 2, 1, 2), 2, 13, 11, "dilation 2"),
    ];
    let mut worst = 0.0f32;
    for threads in [1, 2, 5] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("thread pool");
        pool.install(|| {
            for (conv, batch, h, w, label) in &cases {
                let label = format!("{label}, {threads} threads");
                worst = worst.max(check_gradients(conv, *batch, *h, *w, &label));
            }
        });
    }
    println!("worst relative gradient difference {worst:.2e}");
    // Bit-identical gradients everywhere would mean Burn's convolution ran on both sides.
    assert!(
        worst > 0.0,
        "conv2d_fused did not run resnet-rs's kernels under autodiff"
    );
}

#[cfg(feature = "autodiff")]
/// Largest difference between `got` and `expected`, relative to the largest `expected`.
fn relative_difference(got: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(got.len(), expected.len(), "sizes");
    let scale = expected.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    got.iter()
        .zip(expected)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale
}

/// `len` values drawn from N(mean, std), the same for the same `seed` (Box-Muller on a
/// SplitMix64 stream): inputs that depend neither on the shared random generator nor on the
/// tests running beside this one.
#[cfg(feature = "autodiff")]
fn normal(len: usize, seed: u64, mean: f64, std: f64) -> Vec<f32> {
    let mut state = seed;
    let mut uniform = || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        // In (0, 1): never 0, whose logarithm Box-Muller would take.
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    (0..len)
        .map(|_| {
            let (u1, u2) = (uniform(), uniform());
            let n = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            (mean + std * n) as f32
        })
        .collect()
}

#[cfg(feature = "autodiff")]
#[test]
fn training_batch_norm_matches_burn() {
    use burn::nn::{BatchNorm, BatchNormConfig};
    use burn::tensor::TensorData;
    use resnet_model::ops::batch_norm;

    let flat = |t: Tensor<1>| t.into_data().try_to_vec::<f32>().expect("float32 tensor");
    let plain = Device::flex().autodiff();
    let checkpointed = Device::flex().autodiff().gradient_checkpointing();
    // Fixed inputs: with random ones the 1x1 case (3 values per channel, where the input
    // gradient's terms nearly cancel) differed from Burn's by more than 2e-5 about once in 30
    // draws, both sides within 1.1e-5 and 1.8e-5 of a float64 reference (4000 draws).
    for (seed, (shape, label, device)) in [
        ([4, 8, 5, 7], "odd plane", &plain),
        ([2, 16, 32, 32], "32x32", &plain),
        ([3, 5, 1, 1], "1x1", &plain),
        ([64, 3, 4, 4], "batch 64", &plain),
        ([4, 8, 5, 7], "gradient checkpointing", &checkpointed),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 100 * seed as u64;
        let channels = shape[1];
        let len = shape.iter().product::<usize>();
        let vector =
            |values: Vec<f32>| Tensor::<1>::from_data(TensorData::new(values, [channels]), device);
        let gamma = vector(normal(channels, seed, 1.0, 0.5));
        let beta = vector(normal(channels, seed + 1, 0.0, 0.5));
        let make = || {
            let mut bn: BatchNorm = BatchNormConfig::new(channels).init(device);
            bn.gamma = Param::from_tensor(gamma.clone());
            bn.beta = Param::from_tensor(beta.clone());
            bn
        };
        let (ours, burn) = (make(), make());
        // Two steps, so that the running statistics accumulate.
        for step in 0..2 {
            let step_seed = seed + 10 * (step + 1);
            let x = TensorData::new(normal(len, step_seed, 0.5, 2.0), shape);
            let upstream = Tensor::<4>::from_data(
                TensorData::new(normal(len, step_seed + 1, 0.0, 1.0), shape),
                device,
            );
            let run = |bn: &BatchNorm, fused: bool| {
                let x = Tensor::<4>::from_data(x.clone(), device).require_grad();
                let out = if fused {
                    batch_norm(bn, x.clone())
                } else {
                    bn.forward(x.clone())
                };
                let grads = (out.clone() * upstream.clone()).sum().backward();
                (
                    values(out),
                    values(x.grad(&grads).expect("input gradient")),
                    flat(bn.gamma.grad(&grads).expect("gamma gradient")),
                    flat(bn.beta.grad(&grads).expect("beta gradient")),
                )
            };
            let (got, expected) = (run(&ours, true), run(&burn, false));
            // Bit-identical results would mean Burn's batch norm ran on both sides.
            assert!(
                got.0 != expected.0 || got.1 != expected.1,
                "{label}: ops::batch_norm fell back to Burn's"
            );
            for (name, got, expected, tolerance) in [
                ("output", &got.0, &expected.0, 1e-5),
                ("input gradient", &got.1, &expected.1, 2e-5),
                ("gamma gradient", &got.2, &expected.2, 1e-5),
                ("beta gradient", &got.3, &expected.3, 1e-5),
            ] {
                let diff = relative_difference(got, expected);
                assert!(
                    diff <= tolerance,
                    "{label}, step {step}: {name} off by {diff}"
                );
            }
            for (name, got, expected) in [
                ("running mean", &ours.running_mean, &burn.running_mean),
                ("running variance", &ours.running_var, &burn.running_var),
            ] {
                let diff = relative_difference(&flat(got.value()), &flat(expected.value()));
                assert!(diff <= 1e-5, "{label}, step {step}: {name} off by {diff}");
            }
        }
    }
}

#[cfg(feature = "autodiff")]
#[test]
fn training_convolution_under_gradient_checkpointing() {
    // resnet-rs's training convolution on a checkpointed autodiff device: the same gradients
    // as Burn's convolution there.
    let device = Device::flex().autodiff().gradient_checkpointing();
    let conv = Conv2dConfig::new([8, 16], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(false)
        .init(&device);
    let x =
        Tensor::<4>::random([2, 8, 20, 20], Distribution::Normal(0.0, 1.0), &device).into_data();
    let upstream = Tensor::<4>::random([2, 16, 20, 20], Distribution::Normal(0.0, 1.0), &device);
    let run = |fused: bool| {
        let x = Tensor::<4>::from_data(x.clone(), &device).require_grad();
        let out = if fused {
            conv2d_fused(&conv, x.clone(), None, false)
        } else {
            conv.forward(x.clone())
        };
        let grads = (relu(out) * upstream.clone()).sum().backward();
        (
            values(x.grad(&grads).expect("input gradient")),
            values(conv.weight.grad(&grads).expect("weight gradient")),
        )
    };
    let (ours, burn) = (run(true), run(false));
    let (dx, dw) = (
        relative_difference(&ours.0, &burn.0),
        relative_difference(&ours.1, &burn.1),
    );
    assert!(dx <= 1e-5 && dw <= 1e-5, "gradients off by {dx} and {dw}");
    // Bit-identical gradients would mean Burn's convolution ran on both sides.
    assert!(
        dx + dw > 0.0,
        "conv2d_fused fell back to Burn's convolution"
    );
}

/// `in_kernel_pool` runs a flex inference pass on a thread of rayon's pool (its convolutions
/// then share their work from inside it), a training pass (autodiff) on the caller's thread,
/// and a pass started inside a pool where it is; `forward_feature_map` gives the same map from
/// outside the pool as from inside.
#[test]
fn inference_passes_run_inside_the_kernel_pool() {
    use resnet_model::ops::in_kernel_pool;
    let device = Device::flex();
    let x = Tensor::<4>::random([1, 3, 32, 32], Distribution::Default, &device);
    let outside = std::thread::current().id();
    let (index, thread) = in_kernel_pool(x.clone(), |_| {
        (rayon::current_thread_index(), std::thread::current().id())
    });
    assert!(index.is_some(), "a flex pass runs on a pool thread");
    assert_ne!(thread, outside);
    let trained = Tensor::<4>::random(
        [1, 3, 32, 32],
        Distribution::Default,
        &device.clone().autodiff(),
    );
    let index = in_kernel_pool(trained, |_| rayon::current_thread_index());
    assert_eq!(index, None, "an autodiff pass stays on the caller's thread");
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .expect("a thread pool");
    let (before, after) = pool.install(|| {
        let before = rayon::current_thread_index();
        (
            before,
            in_kernel_pool(x.clone(), |_| rayon::current_thread_index()),
        )
    });
    assert_eq!(before, after, "inside a pool the pass stays on its thread");

    let model = ResNetConfig::resnet18().init(&device);
    let outside = values(model.forward_feature_map(x.clone()));
    let inside = values(pool.install(|| model.forward_feature_map(x.clone())));
    assert_eq!(outside, inside);
}
