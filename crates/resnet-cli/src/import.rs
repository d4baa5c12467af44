//! `resnet import` and `resnet forward`: checkpoints to records, and tensors through models.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use clap::Args;
use resnet_import::{ImportOptions, import_checkpoint, load_model, npy, save_record};

/// Arguments of `resnet import`.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// PyTorch checkpoint (`.pth`/`.pt`, zip or legacy format) or `.safetensors` file.
    file: PathBuf,
    /// Architecture to load into (default: inferred from the checkpoint).
    #[arg(long)]
    arch: Option<String>,
    /// Number of classes (default: from the checkpoint's `fc`).
    #[arg(long)]
    num_classes: Option<usize>,
    /// Accept a checkpoint with missing or extra tensors (e.g. a backbone without `fc`).
    #[arg(long)]
    allow_partial: bool,
    /// Output record (default: FILE with the extension `.bpk`).
    #[arg(long, short)]
    out: Option<PathBuf>,
}

/// Import a checkpoint and write it as a Burnpack record.
pub fn import(args: &ImportArgs, device: &Device) -> Result<()> {
    let options = ImportOptions {
        arch: args.arch.clone(),
        num_classes: args.num_classes,
        allow_partial: args.allow_partial,
    };
    let imported = import_checkpoint(&args.file, &options, device)?;
    eprintln!("read {} ({})", args.file.display(), imported.source);
    eprintln!("architecture: {}", imported.inferred.describe());
    if !imported.report.missing.is_empty() || !imported.report.unexpected.is_empty() {
        eprintln!(
            "partial: {} tensors missing (left initialized: {}), {} unexpected (ignored: {})",
            imported.report.missing.len(),
            imported.report.missing.join(", "),
            imported.report.unexpected.len(),
            imported.report.unexpected.join(", ")
        );
    }
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.file.with_extension("bpk"));
    if out == args.file {
        bail!("refusing to overwrite the input {}", out.display());
    }
    save_record(&imported.model, &imported.meta, &out)?;
    println!(
        "wrote {} ({} tensors, {} parameters)",
        out.display(),
        imported.report.applied,
        imported.model.num_parameters()
    );
    Ok(())
}

/// Arguments of `resnet forward`.
#[derive(Args, Debug)]
pub struct ForwardArgs {
    /// Model: a `.bpk` record, or a `.pth`/`.safetensors` checkpoint imported on the fly.
    #[arg(long)]
    weights: PathBuf,
    /// Input: a float32 NCHW `.npy` array, already normalized.
    #[arg(long)]
    input: PathBuf,
    /// Output `.npy`: logits `[N, classes]`, or features `[N, C]` with `--features`.
    #[arg(long)]
    output: PathBuf,
    /// Write the pooled features that feed the classifier instead of the logits.
    #[arg(long)]
    features: bool,
}

/// Run a model in eval mode on a `.npy` batch and write the result as `.npy`. `running_on`
/// (the device line) goes to stderr once the model and input are found usable.
pub fn forward(args: &ForwardArgs, device: &Device, running_on: &str) -> Result<()> {
    let (model, meta) = load_model(&args.weights, &ImportOptions::default(), device)?;
    let (shape, values) = npy::read_f32(&args.input)?;
    let &[n, c, h, w] = shape.as_slice() else {
        bail!(
            "{}: expected an NCHW array (4 dimensions), found shape {shape:?}",
            args.input.display()
        );
    };
    if c != meta.config.in_channels {
        bail!(
            "{}: the input has {c} channels, the model expects {}",
            args.input.display(),
            meta.config.in_channels
        );
    }
    let model = model.valid();
    model
        .summary(h, w)
        .with_context(|| format!("{}: input of {h}x{w} pixels", args.input.display()))?;
    eprintln!("{running_on}");
    let input = Tensor::<4>::from_data(TensorData::new(values, [n, c, h, w]), device);
    let output = if args.features {
        model.forward_features(input)
    } else {
        model.forward(input)
    };
    let dims = output.dims();
    let values: Vec<f32> = output
        .into_data()
        .try_into_vec_as::<f32>()
        .map_err(|err| anyhow::anyhow!("reading the output back: {err:?}"))?;
    npy::write_f32(&args.output, &dims, &values)?;
    println!("wrote {} {dims:?}", args.output.display());
    Ok(())
}
