//! `resnet-train`: train or fine-tune a ResNet on an image folder or CIFAR-10.

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;
use resnet_train::backend::Backend;
use resnet_train::train::{RunSummary, TrainArgs, run};

fn train(args: &TrainArgs) -> Result<RunSummary> {
    let backend = match args.backend {
        Some(backend) => backend,
        None => Backend::default_compiled()?,
    };
    run(args, &backend.devices(&args.devices)?)
}

fn main() -> ExitCode {
    let args = TrainArgs::parse();
    match train(&args) {
        Ok(summary) => {
            println!(
                "final validation top-1 {:.2}%; records {} and {}",
                summary.final_val_acc1 * 100.0,
                summary.final_record.display(),
                summary.best_record.display()
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
