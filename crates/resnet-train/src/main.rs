//! `resnet-train`: train or fine-tune a ResNet on an image folder or CIFAR-10, alone or with
//! remote workers (`resnet-train serve-devices`).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use resnet_train::backend::{Backend, describe};
use resnet_train::distributed::{Scheduler, ServeArgs, Watchdog, connect, remote_urls, serve};
use resnet_train::train::{RunSummary, TrainArgs, run_on};

fn train(args: &TrainArgs, scheduler: Option<Scheduler>) -> Result<RunSummary> {
    let backend = match args.backend {
        Some(backend) => backend,
        None => Backend::default_compiled()?,
    };
    let devices: Vec<_> = backend
        .devices(&args.devices)?
        .into_iter()
        .map(|device| (describe(backend, &device), device))
        .collect();
    let urls = remote_urls(&args.remote, args.remote_template.as_deref(), scheduler)?;
    if urls.is_empty() {
        return run_on(args, &devices, &[]);
    }
    if args.ddp {
        anyhow::bail!(
            "--ddp works on the devices of one process only: drop it with remote workers"
        );
    }
    let token = args.auth.token()?;
    let workers = urls.join(", ");
    eprintln!("connecting to {workers}");
    let remote = connect(
        &urls,
        token.as_deref(),
        Duration::from_secs(args.connect_timeout),
    )?;
    let _watchdog = (args.step_timeout > 0)
        .then(|| Watchdog::start(Duration::from_secs(args.step_timeout), workers.clone()));
    run_on(args, &devices, &remote)
        .with_context(|| format!("training with the workers at {workers}"))
}

/// A worker started with the trainer's command line (`RANK` >= 1): serve the same backend's
/// devices on `0.0.0.0:$MASTER_PORT` until the trainer leaves.
fn worker_of(args: &TrainArgs) -> ServeArgs {
    ServeArgs {
        listen: None,
        backend: args.backend,
        devices: args.devices.clone(),
        auth: args.auth.clone(),
        once: true,
    }
}

/// Panics that Burn catches and reports as errors (a failed step, a lost remote device) print
/// one line instead of a report and backtrace, unless `RUST_BACKTRACE` asks for them.
fn compact_panic_reports() {
    if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
        return;
    }
    std::panic::set_hook(Box::new(|info| {
        let message = info.payload_as_str().unwrap_or("panic");
        let first = message.lines().next().unwrap_or_default();
        let thread = std::thread::current();
        eprintln!(
            "note: thread '{}' panicked: {first}",
            thread.name().unwrap_or("unnamed")
        );
    }));
}

fn main() -> ExitCode {
    compact_panic_reports();
    let mut argv: Vec<_> = std::env::args_os().collect();
    let result = if argv.get(1).is_some_and(|arg| arg == "serve-devices") {
        argv.remove(0);
        serve(&ServeArgs::parse_from(argv))
    } else {
        let args = TrainArgs::parse();
        match Scheduler::from_env() {
            Err(err) => Err(err),
            Ok(Some(group)) if group.rank > 0 => {
                eprintln!(
                    "rank {} of {}: serving this machine's devices to rank 0",
                    group.rank, group.world_size
                );
                serve(&worker_of(&args))
            }
            Ok(scheduler) => train(&args, scheduler).map(|summary| {
                println!(
                    "final validation top-1 {:.2}%; records {} and {}",
                    summary.final_val_acc1 * 100.0,
                    summary.final_record.display(),
                    summary.best_record.display()
                );
            }),
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
