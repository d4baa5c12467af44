//! `resnet-train`: train or fine-tune a ResNet on an image folder or CIFAR-10.

use std::process::ExitCode;

use burn::tensor::Device;
use clap::Parser;
use resnet_train::train::{TrainArgs, run};

fn main() -> ExitCode {
    let args = TrainArgs::parse();
    match run(&args, &Device::flex()) {
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
