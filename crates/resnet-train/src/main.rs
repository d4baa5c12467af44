//! `resnet-train`: train a ResNet on an image folder (not implemented yet).

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("error: resnet-train is not implemented yet");
    ExitCode::from(2)
}
