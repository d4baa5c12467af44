//! `resnet info`: what an architecture costs, read off the built model.

use anyhow::{Context, Result};
use burn::tensor::Device;
use clap::Args;
use resnet_model::{ModelSummary, ResNetConfig};
use serde::Serialize;

/// Arguments of `resnet info`.
#[derive(Args, Debug)]
pub struct InfoArgs {
    /// Architecture: resnet18/34/50/101/152, resnext50_32x4d, resnext101_32x8d,
    /// resnext101_64x4d, wide_resnet50_2, wide_resnet101_2.
    #[arg(long)]
    arch: String,
    /// Number of output classes of the head.
    #[arg(long, default_value_t = 1000)]
    num_classes: usize,
    /// Use the small-image stem (3x3 stride-1 conv, no max-pool).
    #[arg(long)]
    cifar_stem: bool,
    /// Side of the square input the costs are computed for.
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Report<'a> {
    arch: &'a str,
    num_classes: usize,
    input_shape: [usize; 3],
    parameters: usize,
    multiply_adds: u64,
    gmacs: f64,
    stages: Vec<StageReport<'a>>,
}

#[derive(Serialize)]
struct StageReport<'a> {
    name: &'a str,
    output_shape: [usize; 3],
    parameters: usize,
    multiply_adds: u64,
}

/// Build the architecture (lazily: nothing is allocated) and print its summary.
pub fn run(args: &InfoArgs, device: &Device) -> Result<()> {
    let config = ResNetConfig::from_name(&args.arch)?
        .with_num_classes(args.num_classes)
        .with_cifar_stem(args.cifar_stem);
    config.validate()?;
    let model = config.init(device);
    let summary = model
        .summary(args.image_size, args.image_size)
        .with_context(|| format!("cannot summarize {} at {}px", args.arch, args.image_size))?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report(&args.arch, &config, &summary))?
        );
    } else {
        print_table(&args.arch, &summary);
    }
    Ok(())
}

fn report<'a>(arch: &'a str, config: &ResNetConfig, summary: &'a ModelSummary) -> Report<'a> {
    Report {
        arch,
        num_classes: config.num_classes,
        input_shape: summary.input_shape,
        parameters: summary.parameters(),
        multiply_adds: summary.multiply_adds(),
        gmacs: summary.multiply_adds() as f64 / 1e9,
        stages: summary
            .stages
            .iter()
            .map(|stage| StageReport {
                name: &stage.name,
                output_shape: stage.output_shape,
                parameters: stage.parameters,
                multiply_adds: stage.multiply_adds,
            })
            .collect(),
    }
}

/// `11689512` -> `11,689,512`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn print_table(arch: &str, summary: &ModelSummary) {
    let [c, h, w] = summary.input_shape;
    println!("{arch}: input {c}x{h}x{w}");
    println!("parameters:    {}", thousands(summary.parameters() as u64));
    println!(
        "multiply-adds: {} ({:.3} GMACs; torchvision calls this GFLOPS)",
        thousands(summary.multiply_adds()),
        summary.multiply_adds() as f64 / 1e9
    );
    println!();
    println!(
        "{:<8} {:>16} {:>14} {:>16}",
        "stage", "output", "parameters", "multiply-adds"
    );
    for stage in &summary.stages {
        let [c, h, w] = stage.output_shape;
        println!(
            "{:<8} {:>16} {:>14} {:>16}",
            stage.name,
            format!("{c}x{h}x{w}"),
            thousands(stage.parameters as u64),
            thousands(stage.multiply_adds)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(25_557_032), "25,557,032");
    }
}
