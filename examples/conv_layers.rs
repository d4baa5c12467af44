//! Per-layer speed of the CPU convolution: times `ops::conv2d_fused` (bias + ReLU, as in a
//! folded model) on every distinct convolution of a preset at its 224x224 sizes, and prints
//! each shape's milliseconds, GFLOP/s and share of the network's convolution time.
//!
//! ```text
//! cargo run --release -p resnet-model --example conv_layers -- [ARCH] [BATCH] [--burn-conv] [--no-winograd]
//! ```
//!
//! `--burn-conv` times Burn's own convolution instead (`ops::set_fast_kernels(false)`),
//! `--no-winograd` the direct path for the 3x3 convolutions too (`ops::set_winograd(false)`).

use std::collections::BTreeMap;
use std::time::Instant;

use burn::module::Param;
use burn::nn::conv::Conv2d;
use burn::tensor::{Device, Distribution, Tensor};
use resnet_model::ResNetConfig;
use resnet_model::ops::{conv2d_fused, set_fast_kernels, set_winograd};

/// A distinct convolution shape, how often the network runs it, and its input side.
struct Layer {
    conv: Conv2d,
    size: usize,
    count: usize,
}

fn layers(config: &ResNetConfig, device: &Device) -> BTreeMap<String, Layer> {
    let model = config.init(device);
    let mut into = BTreeMap::new();
    let convolutions = model
        .convolutions(224, 224)
        .expect("224x224 fits every preset");
    for c in convolutions {
        let dims = c.conv.weight.val().dims();
        let size = c.input_shape[1];
        let key = format!(
            "{dims:?} s{} g{} {size}x{size}",
            c.conv.stride[0], c.conv.groups
        );
        into.entry(key)
            .or_insert_with(|| Layer {
                conv: c.conv.clone(),
                size,
                count: 0,
            })
            .count += 1;
    }
    into
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let burn_conv = args.iter().any(|a| a == "--burn-conv");
    let mut positional = args.iter().filter(|a| !a.starts_with("--"));
    let arch = positional.next().map_or("resnet50", String::as_str);
    let batch: usize = positional.next().map_or(8, |b| b.parse().unwrap_or(8));
    let config = match ResNetConfig::from_name(arch) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(2);
        }
    };
    set_fast_kernels(!burn_conv);
    set_winograd(!args.iter().any(|a| a == "--no-winograd"));
    let device = Device::flex();
    let mut rows = Vec::new();
    for (label, mut layer) in layers(&config, &device) {
        let [out_channels, per_group, kh, kw] = layer.conv.weight.val().dims();
        layer.conv.bias = Some(Param::from_tensor(Tensor::random(
            [out_channels],
            Distribution::Normal(0.0, 1.0),
            &device,
        )));
        let x = Tensor::<4>::random(
            [batch, per_group * layer.conv.groups, layer.size, layer.size],
            Distribution::Normal(0.0, 1.0),
            &device,
        );
        let mut times = Vec::new();
        let mut output_pixels = 0;
        for i in 0..6 {
            let start = Instant::now();
            let out = conv2d_fused(&layer.conv, x.clone(), None, true);
            let [_, _, oh, ow] = out.dims();
            output_pixels = oh * ow;
            let _ = out.into_data();
            if i > 0 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        let flops = 2.0 * (batch * out_channels * output_pixels * per_group * kh * kw) as f64;
        times.sort_by(f64::total_cmp);
        let best = times[0];
        rows.push((label, layer.count, best, flops / best / 1e9));
        eprint!(".");
    }
    eprintln!();
    let total: f64 = rows.iter().map(|(_, n, t, _)| *n as f64 * t).sum();
    let kernel = if burn_conv { "Burn's" } else { "resnet-rs's" };
    println!("{arch} batch {batch}, {kernel} convolution, best of 5 per shape");
    println!(
        "{:<40} {:>3} {:>9} {:>8} {:>6}",
        "shape", "n", "ms", "GFLOP/s", "share"
    );
    for (label, count, time, rate) in &rows {
        println!(
            "{label:<40} {count:>3} {:>9.2} {rate:>8.1} {:>5.1}%",
            time * 1e3,
            100.0 * *count as f64 * time / total
        );
    }
    println!("sum over the network: {:.1} ms", total * 1e3);
}
