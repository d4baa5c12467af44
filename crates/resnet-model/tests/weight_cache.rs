//! The Winograd weight cache (`ops::weight_cache_usage`, `ops::clear_weight_cache`): a
//! convolution's transformed weights are kept across calls, give the same outputs as a fresh
//! transform, follow weights that change, leave with the weights, and stay out of training.
//! One test function: the cache is process-wide, and tests of one binary run in parallel.
#![cfg(all(feature = "flex", feature = "autodiff"))]

use burn::module::Param;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::tensor::{Device, Distribution, Tensor};
use resnet_model::ops::{clear_weight_cache, conv2d_fused, set_winograd, weight_cache_usage};

/// A 64-channel 3x3 convolution without bias (under autodiff, only a plain convolution runs
/// resnet-rs's kernels; a bias would also break the doubling check below).
fn conv(device: &Device) -> Conv2d {
    Conv2dConfig::new([64, 64], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .with_bias(false)
        .init(device)
}

fn values(t: Tensor<4>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().expect("float32 tensor")
}

/// `cached` is `layer`'s output for `x` through Winograd; checks it against the direct
/// convolution (no Winograd, so nothing cached).
fn assert_direct(cached: &[f32], layer: &Conv2d, x: &Tensor<4>) {
    set_winograd(false);
    let direct = values(conv2d_fused(layer, x.clone(), None, false));
    set_winograd(true);
    let scale = direct.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = cached
        .iter()
        .zip(&direct)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(
        worst <= 1e-5 * scale,
        "cached Winograd off by {worst} (scale {scale})"
    );
}

/// Bytes of one F(2x2, 3x3) and one F(4x4, 3x3) transform of 64x64 3x3 weights.
const F2_BYTES: usize = 16 * 64 * 64 * 4;
const F4_BYTES: usize = 36 * 64 * 64 * 4;

#[test]
fn winograd_weight_cache() {
    let device = Device::flex();
    clear_weight_cache();
    assert_eq!(weight_cache_usage(), (0, 0));

    // 28x28 outputs at batch 1: F(2x2, 3x3) (too few tiles for F(4x4, 3x3)).
    let mut layer = conv(&device);
    let x = Tensor::<4>::random([1, 64, 28, 28], Distribution::Normal(0.0, 1.0), &device);
    let first = values(conv2d_fused(&layer, x.clone(), None, false));
    assert_eq!(weight_cache_usage(), (1, F2_BYTES));
    let again = values(conv2d_fused(&layer, x.clone(), None, false));
    assert_eq!(first, again, "the cached transform gives other outputs");
    assert_eq!(weight_cache_usage(), (1, F2_BYTES));

    assert_direct(&first, &layer, &x);

    // New weights (doubled: exact in float32, and the output is linear in them) must not be
    // served the old transform; the old weights, now held by the cache alone, leave it.
    layer.weight = layer.weight.map(|w| w.mul_scalar(2.0));
    let doubled = values(conv2d_fused(&layer, x.clone(), None, false));
    let expected: Vec<f32> = first.iter().map(|v| 2.0 * v).collect();
    assert_eq!(
        doubled, expected,
        "stale transform after the weights changed"
    );
    assert_eq!(weight_cache_usage(), (1, F2_BYTES));

    // The same weights at batch 2, 56x56 (392 tiles): F(4x4, 3x3), kept beside F(2x2, 3x3).
    let big = Tensor::<4>::random([2, 64, 56, 56], Distribution::Normal(0.0, 1.0), &device);
    let out = conv2d_fused(&layer, big.clone(), None, false);
    assert_eq!(out.dims(), [2, 64, 56, 56]);
    assert_eq!(weight_cache_usage(), (1, F2_BYTES + F4_BYTES));

    // Other weights of the same shape, both alive: each convolution gets its own transform.
    let other = conv(&device);
    let out = values(conv2d_fused(&other, x.clone(), None, false));
    assert_direct(&out, &other, &x);
    assert_eq!(weight_cache_usage(), (2, 2 * F2_BYTES + F4_BYTES));

    // Weights nobody holds any more leave at the next Winograd call.
    drop(layer);
    conv2d_fused(&other, x.clone(), None, false);
    assert_eq!(weight_cache_usage(), (1, F2_BYTES));

    // A weight tensor given to two convolutions (shared storage) is transformed once.
    let mut twin = conv(&device);
    twin.weight = Param::from_tensor(other.weight.val());
    conv2d_fused(&twin, x.clone(), None, false);
    assert_eq!(weight_cache_usage(), (1, F2_BYTES));

    // Training (autodiff) leaves the cache alone.
    let train_device = Device::flex().autodiff();
    let trained = conv(&train_device);
    let input = Tensor::<4>::random(
        [1, 64, 28, 28],
        Distribution::Normal(0.0, 1.0),
        &train_device,
    )
    .require_grad();
    let out = conv2d_fused(&trained, input, None, false);
    out.sum().backward();
    assert_eq!(weight_cache_usage(), (1, F2_BYTES));

    clear_weight_cache();
    assert_eq!(weight_cache_usage(), (0, 0));
}
