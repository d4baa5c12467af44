//! Training-mode batch normalization on flex for NCHW float32, forward and backward, without the
//! transposes of Burn's default `batch_norm_train` (which swaps the batch and channel axes, and
//! copies the tensor, for each per-channel reduction: 7% of a CIFAR ResNet-18 training step).
//!
//! `x` is `[batch, channels, plane]` flattened; statistics are per channel over `batch * plane`
//! values (float32 partial sums per image, added up in f64), variance biased (as PyTorch and
//! Burn normalize with).

use rayon::prelude::*;

/// Shape of a batch-norm input: `[batch, channels, plane]` (plane = height * width).
#[derive(Debug, Clone, Copy)]
pub(crate) struct NormShape {
    pub batch: usize,
    pub channels: usize,
    pub plane: usize,
}

impl NormShape {
    fn len(&self) -> usize {
        self.batch * self.channels * self.plane
    }

    /// Values per channel.
    fn count(&self) -> f64 {
        (self.batch * self.plane) as f64
    }

    /// The rows (one per image) of channel `c`.
    fn rows<'a>(&self, x: &'a [f32], c: usize) -> impl Iterator<Item = &'a [f32]> {
        let (channels, plane) = (self.channels, self.plane);
        (0..self.batch).map(move |n| &x[(n * channels + c) * plane..][..plane])
    }
}

/// Lanes of the partial sums: independent accumulators, so that the sums vectorize.
const LANES: usize = 8;

/// `sum(f(a[i], b[i]))`, in LANES float32 partial sums per call (one image's plane of a
/// channel: 1,024 values at 32x32, 12,544 at ResNet's 112x112 stem) added up in f64.
#[inline]
fn row_sum(a: &[f32], b: &[f32], f: impl Fn(f32, f32) -> f32) -> f64 {
    let mut lanes = [0.0f32; LANES];
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = a_chunks
        .remainder()
        .iter()
        .zip(b_chunks.remainder())
        .map(|(&a, &b)| f(a, b))
        .sum();
    for (a, b) in a_chunks.zip(b_chunks) {
        for lane in 0..LANES {
            lanes[lane] += f(a[lane], b[lane]);
        }
    }
    lanes.iter().map(|&v| f64::from(v)).sum::<f64>() + f64::from(tail)
}

/// `[a..., b...]` (2 * channels values) for `(a, b) = f(c)` of every channel `c`, channels in
/// parallel.
fn per_channel_pairs(shape: &NormShape, f: impl Fn(usize) -> (f32, f32) + Sync + Send) -> Vec<f32> {
    let pairs: Vec<(f32, f32)> = (0..shape.channels).into_par_iter().map(f).collect();
    let (a, b): (Vec<f32>, Vec<f32>) = pairs.into_iter().unzip();
    [a, b].concat()
}

/// Per-channel `[mean..., biased variance...]` (2 * channels values) of `x`.
pub(crate) fn stats(shape: &NormShape, x: &[f32]) -> Vec<f32> {
    assert_eq!(x.len(), shape.len(), "batch norm input length");
    per_channel_pairs(shape, |c| {
        let sum: f64 = shape
            .rows(x, c)
            .map(|row| row_sum(row, row, |v, _| v))
            .sum();
        let mean = (sum / shape.count()) as f32;
        let squares: f64 = shape
            .rows(x, c)
            .map(|row| row_sum(row, row, |v, _| (v - mean) * (v - mean)))
            .sum();
        (mean, (squares / shape.count()) as f32)
    })
}

/// `1 / sqrt(var + epsilon)` per channel, from [`stats`]' output.
fn inv_std(shape: &NormShape, stats: &[f32], epsilon: f64) -> Vec<f32> {
    stats[shape.channels..]
        .iter()
        .map(|&v| (1.0 / (f64::from(v) + epsilon).sqrt()) as f32)
        .collect()
}

/// `(x - mean) / sqrt(var + epsilon) * gamma + beta`, with `stats` from [`stats`].
pub(crate) fn apply(
    shape: &NormShape,
    x: &[f32],
    stats: &[f32],
    gamma: &[f32],
    beta: &[f32],
    epsilon: f64,
) -> Vec<f32> {
    assert_eq!(x.len(), shape.len(), "batch norm input length");
    let inv = inv_std(shape, stats, epsilon);
    let mut out = vec![0.0f32; x.len()];
    out.par_chunks_mut(shape.plane)
        .zip(x.par_chunks(shape.plane))
        .enumerate()
        .for_each(|(row, (out, x))| {
            let c = row % shape.channels;
            let scale = gamma[c] * inv[c];
            let shift = beta[c] - stats[c] * scale;
            out.iter_mut()
                .zip(x)
                .for_each(|(o, &v)| *o = v * scale + shift);
        });
    out
}

/// Per-channel `[sum(grad * x_hat)..., sum(grad)...]`: the gradients of gamma and beta.
pub(crate) fn backward_params(
    shape: &NormShape,
    x: &[f32],
    grad: &[f32],
    stats: &[f32],
    epsilon: f64,
) -> Vec<f32> {
    assert_eq!(grad.len(), shape.len(), "batch norm gradient length");
    let inv = inv_std(shape, stats, epsilon);
    per_channel_pairs(shape, |c| {
        let mean = stats[c];
        let (mut dot, mut sum) = (0.0f64, 0.0f64);
        for (x, g) in shape.rows(x, c).zip(shape.rows(grad, c)) {
            dot += row_sum(x, g, |x, g| g * (x - mean));
            sum += row_sum(g, g, |g, _| g);
        }
        ((dot * f64::from(inv[c])) as f32, sum as f32)
    })
}

/// Gradient of the input: `gamma * inv_std * (grad - mean(grad) - x_hat * mean(grad * x_hat))`,
/// with `params` from [`backward_params`].
pub(crate) fn backward_input(
    shape: &NormShape,
    x: &[f32],
    grad: &[f32],
    stats: &[f32],
    gamma: &[f32],
    params: &[f32],
    epsilon: f64,
) -> Vec<f32> {
    assert_eq!(grad.len(), shape.len(), "batch norm gradient length");
    let inv = inv_std(shape, stats, epsilon);
    let count = shape.count() as f32;
    let mut dx = vec![0.0f32; x.len()];
    dx.par_chunks_mut(shape.plane)
        .zip(x.par_chunks(shape.plane).zip(grad.par_chunks(shape.plane)))
        .enumerate()
        .for_each(|(row, (dx, (x, g)))| {
            let c = row % shape.channels;
            let (mean, inv) = (stats[c], inv[c]);
            let mean_grad = params[shape.channels + c] / count;
            // mean(grad * x_hat) = sum(grad * x_hat) / count, x_hat = (x - mean) * inv.
            let projection = params[c] / count * inv;
            let scale = gamma[c] * inv;
            dx.iter_mut()
                .zip(x.iter().zip(g))
                .for_each(|(d, (&x, &g))| *d = scale * (g - mean_grad - (x - mean) * projection));
        });
    dx
}
