//! `resnet bench`: inference latency and throughput of an architecture on a backend.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use resnet_model::ResNetConfig;
use serde::Serialize;

use resnet_train::backend::{Backend, cpu_threads, describe};

/// Arguments of `resnet bench`.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Architecture (weights are random: speed does not depend on them).
    #[arg(long, default_value = "resnet50")]
    arch: String,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// Side of the square input images.
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// Timed iterations.
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Untimed iterations first (kernel compilation, autotuning, allocator warm-up).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Keep the batch norms as separate layers instead of folding them into the convolutions
    /// (`ResNet::fold_batchnorm`, what `resnet classify` runs), to measure what folding saves.
    #[arg(long)]
    no_fold: bool,
    /// Run Burn's own convolutions instead of resnet-rs's fused CPU convolution (which only
    /// the flex backend has), to measure what the latter saves.
    #[arg(long)]
    burn_conv: bool,
    /// Run the 3x3 convolutions that resnet-rs's CPU kernels would compute with Winograd's
    /// algorithm as direct convolutions instead, to measure what Winograd saves.
    #[arg(long)]
    no_winograd: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report {
    arch: String,
    backend: String,
    device: String,
    threads: usize,
    batch_size: usize,
    image_size: usize,
    batchnorm_folded: bool,
    /// Whether resnet-rs's fused CPU convolution was on (it only applies to flex).
    fast_conv: bool,
    /// Whether it ran the large 3x3 convolutions with Winograd's algorithm.
    winograd: bool,
    iters: usize,
    median_ms: f64,
    /// Mean over the timed iterations: on asynchronous GPU backends single iterations can
    /// return early and others absorb queued work, so the mean is the throughput figure.
    mean_ms: f64,
    min_ms: f64,
    p10_ms: f64,
    p90_ms: f64,
    max_ms: f64,
    images_per_second: f64,
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index]
}

/// Time `iters` eval-mode forward passes, each including reading the logits back to the host
/// (which waits for asynchronous GPU backends to finish).
pub fn run(args: &BenchArgs, backend: Backend, device: &Device) -> Result<()> {
    if args.batch_size == 0 || args.iters == 0 {
        bail!("--batch-size and --iters must be at least 1");
    }
    let config = ResNetConfig::from_name(&args.arch)?;
    resnet_model::ops::set_fast_kernels(!args.burn_conv);
    resnet_model::ops::set_winograd(!args.no_winograd);
    let model = config.init(device).valid();
    model.summary(args.image_size, args.image_size)?;
    let model = if args.no_fold {
        model
    } else {
        model.fold_batchnorm()
    };
    let input = Tensor::<4>::random(
        [args.batch_size, 3, args.image_size, args.image_size],
        Distribution::Normal(0.0, 1.0),
        device,
    );
    let run_once = || -> Result<Duration> {
        let start = Instant::now();
        let logits = model.forward(input.clone());
        let data = logits.into_data();
        std::hint::black_box(&data);
        Ok(start.elapsed())
    };

    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((args.warmup + args.iters) as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} {bar:30} {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("warm-up");
    for _ in 0..args.warmup {
        run_once()?;
        bar.inc(1);
    }
    bar.set_message("timing ");
    let mut times = Vec::with_capacity(args.iters);
    for _ in 0..args.iters {
        times.push(run_once()?.as_secs_f64() * 1e3);
        bar.inc(1);
    }
    bar.finish_and_clear();
    times.sort_by(f64::total_cmp);

    let median = percentile(&times, 0.5);
    let fast_conv = resnet_model::ops::fast_kernels() && backend.cli_name() == "flex";
    let report = Report {
        arch: args.arch.clone(),
        backend: backend.cli_name(),
        device: describe(backend, device),
        threads: cpu_threads(),
        batch_size: args.batch_size,
        image_size: args.image_size,
        batchnorm_folded: model.batchnorm_folded,
        fast_conv,
        winograd: fast_conv && resnet_model::ops::winograd(),
        iters: args.iters,
        median_ms: median,
        mean_ms: times.iter().sum::<f64>() / times.len() as f64,
        min_ms: times[0],
        p10_ms: percentile(&times, 0.1),
        p90_ms: percentile(&times, 0.9),
        max_ms: times[times.len() - 1],
        images_per_second: args.batch_size as f64
            / (times.iter().sum::<f64>() / times.len() as f64 / 1e3),
    };
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!(
            "{} batch {} at {}x{}{}{} on {}, {} iterations after {} warm-up",
            report.arch,
            report.batch_size,
            report.image_size,
            report.image_size,
            if report.batchnorm_folded {
                ", batch norms folded"
            } else {
                ""
            },
            match (report.fast_conv, report.winograd) {
                (true, true) => ", fused convolutions (Winograd for large 3x3)",
                (true, false) => ", fused convolutions",
                _ => "",
            },
            report.device,
            report.iters,
            args.warmup
        );
        println!(
            "median {:.1} ms per batch (min {:.1}, p10 {:.1}, p90 {:.1}, max {:.1}); mean {:.1} ms, \
             {:.1} images/s",
            report.median_ms,
            report.min_ms,
            report.p10_ms,
            report.p90_ms,
            report.max_ms,
            report.mean_ms,
            report.images_per_second
        );
    }
    Ok(())
}
