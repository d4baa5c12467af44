//! Project automation, run as `cargo xtask <command>`.

use std::process::ExitCode;

fn main() -> ExitCode {
    eprintln!("error: no xtask commands yet");
    ExitCode::from(2)
}
