//! `resnet`: inspect, import and run torchvision ResNets on any compiled-in Burn backend.

mod bench;
mod classify;
mod import;
mod info;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use resnet_train::backend::{Backend, describe};

/// mimalloc rather than glibc's malloc: a forward pass frees and allocates activations of tens
/// of MB, which glibc hands back to the kernel and then takes again, page-faulting every page
/// (4-7% of a ResNet-50 batch-8 forward on the CPU). Not in `resnet-train`: training measured
/// slower with it. See [`keep_freed_memory`] for mimalloc's own purging.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (its position in `mi_option_e`, the same in mimalloc 2
/// and 3; the Rust bindings leave it unnamed).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory mapped rather than letting mimalloc purge it (hand it back to the kernel)
/// a while after a free (1 s, mimalloc 3's default): it did, and a later pass page-faulted it
/// back, the kernel zeroing every page again (about 1,500 faults per ResNet-50 batch-8
/// forward, ~5% of its profile; 435 in a whole 13-pass `resnet bench` run without purging, at
/// the same peak memory). `MIMALLOC_PURGE_DELAY` in the environment still decides where set.
#[allow(unsafe_code)] // mimalloc's C option setter
fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: called first thing in `main`, before any other thread exists (the option
        // setter is not thread-safe); -1 is mimalloc's documented "never purge".
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// Run torchvision's ResNets (18 to 152 layers, ResNeXt, Wide ResNet) with Burn.
#[derive(Parser, Debug)]
#[command(name = "resnet", version, about)]
struct Cli {
    /// Backend to run on (only those compiled in via cargo features are available;
    /// default: flex, or the first one compiled in).
    #[arg(long, global = true, value_enum)]
    backend: Option<Backend>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Classify images with ImageNet weights (or your own record), on any compiled-in backend.
    Classify(classify::ClassifyArgs),
    /// Write the exact float32 NCHW tensor `classify` feeds the network, as `.npy`.
    Preprocess(classify::PreprocessArgs),
    /// Measure inference latency and throughput of an architecture.
    Bench(bench::BenchArgs),
    /// Print an architecture's parameter count, multiply-adds and per-stage shapes.
    Info(info::InfoArgs),
    /// Import a PyTorch checkpoint (`.pth`, `.safetensors`) as a Burn record (`.bpk`).
    Import(import::ImportArgs),
    /// Run a model on a float32 NCHW `.npy` tensor and write logits (or features) as `.npy`.
    Forward(import::ForwardArgs),
    /// List the backends compiled into this binary.
    Backends,
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Command::Backends => {
            for backend in Backend::compiled() {
                println!("{}", backend.cli_name());
            }
            return Ok(());
        }
        Command::Preprocess(args) => return classify::preprocess_command(args),
        _ => {}
    }
    let backend = match cli.backend {
        Some(backend) => backend,
        None => Backend::default_compiled()?,
    };
    let device = backend.device()?;
    // Printed by the commands that run a model, once their inputs are validated (bad input
    // stays a one-line error); `bench` names the device in its report.
    let running_on = || format!("running on {}", describe(backend, &device));
    match cli.command {
        Command::Classify(args) => classify::classify(&args, &device, &running_on()),
        Command::Bench(args) => bench::run(&args, backend, &device),
        Command::Info(args) => info::run(&args, &device),
        Command::Import(args) => import::import(&args, &device),
        Command::Forward(args) => import::forward(&args, &device, &running_on()),
        Command::Backends | Command::Preprocess(_) => Ok(()),
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MI_OPTION_PURGE_DELAY;

    /// The option index names the purge delay: it reads as the delay's default in mimalloc 3,
    /// 1000 ms, in a process that did not set it (were the index another option's, e.g. after
    /// a mimalloc update, this is where it shows).
    #[test]
    #[allow(unsafe_code)] // mimalloc's C option getter
    fn purge_delay_option_index() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            eprintln!("skipped: MIMALLOC_PURGE_DELAY is set");
            return;
        }
        // SAFETY: reads one option; nothing in the test binary sets options.
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
            1000
        );
    }
}
