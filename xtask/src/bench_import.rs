//! `cargo xtask bench-import`: how long importing a full-size checkpoint takes and how much
//! memory it needs, next to simply reading the file.
//!
//! Each measurement runs in a fresh child process (this binary, hidden subcommand
//! `bench-import-child`) so that its peak resident memory (`VmHWM`) is its own.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use resnet_import::{ImportOptions, import_checkpoint, save_record};

/// Arguments of `cargo xtask bench-import`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Architecture of the checkpoint to import.
    #[arg(long, default_value = "resnet50")]
    arch: String,
    /// Python with torch and torchvision (default: $RESNET_PYTHON, .venv/bin/python, python3).
    #[arg(long)]
    python: Option<String>,
    /// Measured runs of each kind (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
}

/// Arguments of the hidden child command.
#[derive(clap::Args, Debug)]
pub struct ChildArgs {
    /// `read` (read the whole file) or `import` (import and write the record).
    mode: String,
    /// The checkpoint.
    file: PathBuf,
    /// Where `import` writes its record.
    out: PathBuf,
}

/// A Python that imports torch and torchvision: `explicit`, `$RESNET_PYTHON`,
/// `.venv/bin/python` or `python3`.
pub fn python(explicit: Option<&str>) -> Result<String> {
    let candidates = explicit
        .map(str::to_string)
        .into_iter()
        .chain(std::env::var("RESNET_PYTHON").ok())
        .chain([".venv/bin/python".to_string(), "python3".to_string()]);
    for candidate in candidates {
        let ok = Command::new(&candidate)
            .args(["-c", "import torch, torchvision"])
            .output()
            .is_ok_and(|out| out.status.success());
        if ok {
            return Ok(candidate);
        }
    }
    bail!("no Python with torch and torchvision found (pass --python or set RESNET_PYTHON)")
}

/// Peak resident set size of this process, in bytes (Linux `VmHWM`).
fn peak_rss() -> Result<u64> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let line = status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .context("no VmHWM in /proc/self/status")?;
    let kib: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmHWM")?
        .parse()
        .context("malformed VmHWM")?;
    Ok(kib * 1024)
}

/// One measurement: prints `seconds_to_model seconds_total peak_bytes`.
pub fn child(args: &ChildArgs) -> Result<()> {
    let start = Instant::now();
    let loaded = match args.mode.as_str() {
        "read" => {
            std::hint::black_box(std::fs::read(&args.file)?);
            start.elapsed()
        }
        "import" => {
            let device = Device::flex();
            let imported = import_checkpoint(&args.file, &ImportOptions::default(), &device)?;
            let loaded = start.elapsed();
            save_record(&imported.model, &imported.meta, &args.out)?;
            loaded
        }
        other => bail!("unknown mode {other}"),
    };
    println!(
        "{} {} {}",
        loaded.as_secs_f64(),
        start.elapsed().as_secs_f64(),
        peak_rss()?
    );
    Ok(())
}

/// `(seconds until the model is loaded, seconds in all, peak RSS bytes)`.
fn measure(mode: &str, file: &Path, out: &Path) -> Result<(f64, f64, u64)> {
    let output = Command::new(std::env::current_exe()?)
        .args(["bench-import-child", mode])
        .arg(file)
        .arg(out)
        .output()?;
    if !output.status.success() {
        bail!(
            "{mode} run failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let text = String::from_utf8(output.stdout)?;
    let mut fields = text.split_whitespace();
    let loaded = fields.next().context("no time")?.parse()?;
    let total = fields.next().context("no time")?.parse()?;
    let peak = fields.next().context("no peak")?.parse()?;
    Ok((loaded, total, peak))
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Make the checkpoint, then alternate read and import runs and print the medians.
pub fn run(args: &Args) -> Result<()> {
    let python = python(args.python.as_deref())?;
    let dir = tempfile::tempdir()?;
    let script = Path::new("crates/resnet-import/tests/fixtures/full_size.py");
    eprintln!("making a {} checkpoint with {python} ...", args.arch);
    let status = Command::new(&python)
        .arg(script)
        .arg(dir.path())
        .arg(&args.arch)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!("{} failed", script.display());
    }
    let file = dir.path().join(format!("{}.pth", args.arch));
    let out = dir.path().join("record.bpk");
    let size = std::fs::metadata(&file)?.len();

    let (mut read_times, mut load_times, mut total_times) = (Vec::new(), Vec::new(), Vec::new());
    let (mut read_peak, mut import_peak) = (0, 0);
    let runs = args.runs.max(1);
    for run in 1..=runs {
        let (read, _, peak) = measure("read", &file, &out)?;
        read_times.push(read);
        read_peak = read_peak.max(peak);
        let (load, total, peak) = measure("import", &file, &out)?;
        load_times.push(load);
        total_times.push(total);
        import_peak = import_peak.max(peak);
        eprintln!(
            "run {run}/{runs}: read {read:.3} s, import {load:.3} s, with write {total:.3} s"
        );
    }
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let read = median(&mut read_times);
    let load = median(&mut load_times);
    let total = median(&mut total_times);
    println!("checkpoint:       {} ({:.1} MiB)", args.arch, mib(size));
    println!(
        "read the file:    {read:.3} s median, peak RSS {:.1} MiB",
        mib(read_peak)
    );
    println!(
        "import to model:  {load:.3} s median ({:.2}x reading)",
        load / read
    );
    println!(
        "+ write .bpk:     {total:.3} s median ({:.2}x reading), peak RSS {:.1} MiB ({:.2}x the file)",
        total / read,
        mib(import_peak),
        import_peak as f64 / size as f64
    );
    Ok(())
}
