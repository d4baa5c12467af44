//! `cargo xtask bench-train`: images/s of one SGD training step of a CIFAR-stem ResNet-18
//! (32x32, batch 64) on the default CPU backend, side by side with PyTorch
//! (`bench/train_step.py`), alternating runs A B A B on the same machine.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Distribution, Int, Tensor};
use resnet_model::ResNetConfig;
use resnet_train::model::Classifier;

/// Which side(s) `cargo xtask bench-train` runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    /// Ours and PyTorch, alternating.
    Both,
    /// Only resnet-rs on flex, in this process (so a caller can measure its peak memory alone).
    Ours,
    /// Only PyTorch (bench/train_step.py).
    Pytorch,
}

/// Arguments of `cargo xtask bench-train`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Timed steps per run.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Runs of each side, alternating.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Python with torch and torchvision (default: $RESNET_PYTHON, .venv/bin/python, python3).
    #[arg(long)]
    python: Option<String>,
    /// Run only one side (`bench/side_by_side.py` times each side in its own process).
    #[arg(long, value_enum, default_value_t = Side::Both)]
    only: Side,
    /// Print one JSON object (`median_ms` per side, `ratio` when both ran) instead of text.
    #[arg(long)]
    json: bool,
    /// Train with Burn's own convolutions instead of resnet-rs's CPU kernels, to measure what
    /// the latter save.
    #[arg(long)]
    burn_conv: bool,
    /// Run the forward 3x3 convolutions directly instead of with Winograd's algorithm.
    #[arg(long)]
    no_winograd: bool,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Our side: median seconds per step.
fn ours(args: &Args) -> Result<f64> {
    resnet_model::ops::set_fast_kernels(!args.burn_conv);
    resnet_model::ops::set_winograd(!args.no_winograd);
    let device = Device::flex().autodiff();
    device.seed(0);
    let config = ResNetConfig::resnet18()
        .with_cifar_stem(true)
        .with_num_classes(10);
    let mut model = Classifier {
        net: config.init(&device),
        label_smoothing: 0.0,
        gradient_scale: 1.0,
        sync_steps: false,
    };
    let mut optim = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_dampening(0.0)))
        .with_weight_decay(Some(WeightDecayConfig::new(5e-4)))
        .init();
    let x = Tensor::<4>::random(
        [args.batch_size, 3, 32, 32],
        Distribution::Normal(0.0, 1.0),
        &device,
    );
    let y = Tensor::<1, Int>::random([args.batch_size], Distribution::Uniform(0.0, 10.0), &device);
    let mut times = Vec::with_capacity(args.steps);
    for i in 0..args.warmup + args.steps {
        let start = Instant::now();
        let output = model.forward_classification(x.clone(), y.clone());
        let grads = GradientsParams::from_grads(output.loss.backward(), &model);
        model = optim.step(0.05f64, model, grads);
        let loss: f32 = output.loss.into_scalar();
        std::hint::black_box(loss);
        if i >= args.warmup {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(median(times))
}

fn pytorch(args: &Args, python: &str) -> Result<f64> {
    let output = Command::new(python)
        .arg("bench/train_step.py")
        .args(["--steps", &args.steps.to_string()])
        .args(["--warmup", &args.warmup.to_string()])
        .args(["--batch-size", &args.batch_size.to_string()])
        .args(["--threads", "2"])
        .output()
        .context("running bench/train_step.py")?;
    if !output.status.success() {
        bail!(
            "bench/train_step.py failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let ms = json["median_ms"].as_f64().context("no median_ms")?;
    Ok(ms / 1e3)
}

/// Alternate our step and PyTorch's, then print medians and the ratio.
pub fn run(args: &Args) -> Result<()> {
    if args.steps == 0 || args.batch_size == 0 || args.rounds == 0 {
        bail!("--steps, --batch-size and --rounds must be at least 1");
    }
    let python = match args.only {
        Side::Ours => None,
        Side::Both | Side::Pytorch => Some(crate::bench_import::python(args.python.as_deref())?),
    };
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        let mut line = format!("round {round}/{}:", args.rounds);
        if args.only != Side::Pytorch {
            let ours = ours(args)?;
            line += &format!(" resnet-rs (flex) {:.0} ms/step", ours * 1e3);
            a.push(ours);
        }
        if let Some(python) = &python {
            let torch = pytorch(args, python)?;
            line += &format!(" PyTorch {:.0} ms/step", torch * 1e3);
            b.push(torch);
        }
        if !args.json {
            eprintln!("{line}");
        }
    }
    let ours = (!a.is_empty()).then(|| median(a));
    let torch = (!b.is_empty()).then(|| median(b));
    if args.json {
        let ms = |s: Option<f64>| s.map(|s| s * 1e3);
        let ratio = ours.zip(torch).map(|(o, t)| o / t);
        let json = serde_json::json!({
            "batch_size": args.batch_size,
            "ours_median_ms": ms(ours),
            "pytorch_median_ms": ms(torch),
            "ratio": ratio,
        });
        println!("{json}");
        return Ok(());
    }
    let images = args.batch_size as f64;
    println!(
        "CIFAR-stem ResNet-18 training step, 32x32, batch {}, SGD, 2 threads:",
        args.batch_size
    );
    if let Some(ours) = ours {
        println!(
            "  resnet-rs (flex): {:.0} ms/step, {:.1} images/s",
            ours * 1e3,
            images / ours
        );
    }
    if let Some(torch) = torch {
        println!(
            "  PyTorch:          {:.0} ms/step, {:.1} images/s",
            torch * 1e3,
            images / torch
        );
    }
    if let (Some(ours), Some(torch)) = (ours, torch) {
        println!("  ratio (ours / PyTorch time): {:.2}", ours / torch);
    }
    Ok(())
}
