//! `resnet`: inspect, import and run torchvision ResNets on any compiled-in Burn backend.

mod backend;
mod info;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::backend::Backend;

/// Run torchvision's ResNets (18 to 152 layers, ResNeXt, Wide ResNet) with Burn.
#[derive(Parser, Debug)]
#[command(name = "resnet", version, about)]
struct Cli {
    /// Backend to run on (only those compiled in via cargo features are available).
    #[arg(long, global = true, value_enum, default_value = "flex")]
    backend: Backend,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print an architecture's parameter count, multiply-adds and per-stage shapes.
    Info(info::InfoArgs),
    /// List the backends compiled into this binary.
    Backends,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Info(args) => cli
            .backend
            .device()
            .and_then(|device| info::run(&args, &device)),
        Command::Backends => {
            for backend in Backend::compiled() {
                println!("{}", backend.cli_name());
            }
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
