//! Project automation, run as `cargo xtask <command>`.

mod bench_import;
mod bench_train;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use burn::tensor::Device;
use clap::{Parser, Subcommand};
use resnet_import::registry::WeightsVersion;
use resnet_import::{find_weights, import_pretrained, load_record};

/// resnet-rs project tasks.
#[derive(Parser, Debug)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Download (or take --from) torchvision's ImageNet weights and write a Burn record.
    ImportWeights {
        /// Architecture, e.g. resnet50 or resnext101_32x8d.
        #[arg(long)]
        arch: String,
        /// Weights version: v1 or v2 (default: the newest, torchvision's DEFAULT).
        #[arg(long)]
        weights: Option<String>,
        /// Use this local copy of the `.pth` instead of downloading it.
        #[arg(long)]
        from: Option<PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "weights")]
        out: PathBuf,
        /// Re-import even if the record already exists.
        #[arg(long)]
        force: bool,
    },
    /// Benchmark importing a full-size checkpoint: time and peak memory, against reading the
    /// file (needs a Python with torch and torchvision to make the checkpoint).
    BenchImport(bench_import::Args),
    /// Benchmark a CIFAR-stem ResNet-18 training step against PyTorch (bench/train_step.py).
    BenchTrain(bench_train::Args),
    /// (internal) One measured run of bench-import, in a fresh process.
    #[command(hide = true)]
    BenchImportChild(bench_import::ChildArgs),
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::ImportWeights {
            arch,
            weights,
            from,
            out,
            force,
        } => {
            let version = weights
                .map(|v| {
                    WeightsVersion::parse(&v)
                        .with_context(|| format!("unknown weights version `{v}` (use v1 or v2)"))
                })
                .transpose()?;
            let entry = find_weights(&arch, version)?;
            let device = Device::flex();
            let cache = resnet_import::download::cache_dir()?;
            let path = import_pretrained(entry, from.as_deref(), &cache, &out, force, &device)?;
            let (model, _) = load_record(&path, &device)?;
            println!(
                "wrote {} ({}, {} parameters, ImageNet acc@1 {:.3} as published)",
                path.display(),
                entry.weights_name(),
                model.num_parameters(),
                entry.acc1
            );
            Ok(())
        }
        Command::BenchImport(args) => bench_import::run(&args),
        Command::BenchTrain(args) => bench_train::run(&args),
        Command::BenchImportChild(args) => bench_import::child(&args),
    }
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
