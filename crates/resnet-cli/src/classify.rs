//! `resnet classify` and `resnet preprocess`: ImageNet inference with torchvision's
//! preprocessing.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;
use resnet_import::preprocess::{Exif, is_image_path, load_rgb, preprocess};
use resnet_import::registry::{IMAGENET_CLASSES, WeightsVersion};
use resnet_import::{
    ImportOptions, Preprocessing, RecordMeta, download, find_weights, import_pretrained,
    load_model, npy,
};
use resnet_model::ResNet;
use serde::Serialize;

/// Where the model comes from, shared by `classify` and `preprocess`.
#[derive(Args, Debug)]
pub struct WeightsArgs {
    /// Architecture (needed with `--weights v1|v2`; checked against a record otherwise).
    #[arg(long)]
    arch: Option<String>,
    /// `v1` or `v2` (torchvision's ImageNet weights: downloaded, imported and cached on first
    /// use), or the path of a `.bpk` record or a `.pth`/`.safetensors` checkpoint. Default:
    /// the newest torchvision weights of `--arch`.
    #[arg(long)]
    weights: Option<String>,
    /// Resize the shorter side to this many pixels (default: what the weights were trained
    /// with: 256 for V1, 232 for most V2).
    #[arg(long)]
    resize: Option<u32>,
    /// Center crop size (default: 224).
    #[arg(long)]
    crop: Option<u32>,
    /// Rotate images by their EXIF orientation. Off by default, as in PIL and torchvision.
    #[arg(long)]
    exif_orientation: bool,
}

impl WeightsArgs {
    fn exif(&self) -> Exif {
        if self.exif_orientation {
            Exif::Apply
        } else {
            Exif::Ignore
        }
    }

    /// The preprocessing: the record's (or ImageNet V1's), with `--resize`/`--crop` applied.
    fn preprocessing(&self, meta: Option<&RecordMeta>) -> Result<Preprocessing> {
        let mut p = meta
            .and_then(|meta| meta.preprocessing.clone())
            .unwrap_or_else(|| Preprocessing::imagenet(256));
        if let Some(resize) = self.resize {
            p.resize_size = resize;
        }
        if let Some(crop) = self.crop {
            p.crop_size = crop;
        }
        if p.resize_size == 0 || p.crop_size == 0 {
            bail!("--resize and --crop must be at least 1");
        }
        Ok(p)
    }

    /// Load the model the arguments name, downloading and importing torchvision's weights on
    /// first use.
    fn load(&self, device: &Device) -> Result<(ResNet, RecordMeta)> {
        let version = match self.weights.as_deref() {
            None => None,
            Some(w) => match WeightsVersion::parse(w) {
                Some(version) => Some(version),
                None => return self.load_path(Path::new(w), device),
            },
        };
        let Some(arch) = self.arch.as_deref() else {
            bail!("--arch is required to use torchvision's weights (e.g. --arch resnet50)");
        };
        let entry = find_weights(arch, version)?;
        let cache = download::cache_dir()?;
        let record = import_pretrained(entry, None, &cache, &cache.join("records"), false, device)
            .with_context(|| format!("getting {}", entry.weights_name()))?;
        let (model, meta) = resnet_import::load_record(&record, device)?;
        if meta.config.preset_name() != Some(arch) {
            bail!(
                "{}: the cached record is not {arch}; delete it to import the weights again",
                record.display()
            );
        }
        Ok((model, meta))
    }

    fn load_path(&self, path: &Path, device: &Device) -> Result<(ResNet, RecordMeta)> {
        let (model, meta) = load_model(path, &ImportOptions::default(), device)?;
        if let Some(arch) = &self.arch {
            let found = meta.config.preset_name().unwrap_or("a custom architecture");
            if found != arch {
                bail!("{}: these weights are {found}, not {arch}", path.display());
            }
        }
        Ok((model, meta))
    }
}

/// Arguments of `resnet classify`.
#[derive(Args, Debug)]
pub struct ClassifyArgs {
    /// Images, or directories to search for images (jpeg, png, webp, bmp, gif, tiff).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    #[command(flatten)]
    weights: WeightsArgs,
    /// Classes to print per image.
    #[arg(long, default_value_t = 5)]
    top_k: usize,
    /// Images per forward pass.
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Print one JSON object per image instead of text.
    #[arg(long)]
    json: bool,
}

/// One image's result in `--json` output.
#[derive(Serialize)]
struct Prediction<'a> {
    path: String,
    indices: Vec<usize>,
    labels: Vec<&'a str>,
    probabilities: Vec<f32>,
}

/// Files to classify: explicit files as given, directories walked for image extensions.
/// Missing paths and directories without images come back as problems.
fn collect_inputs(inputs: &[PathBuf]) -> (Vec<PathBuf>, Vec<String>) {
    let mut files = Vec::new();
    let mut problems = Vec::new();
    for input in inputs {
        if input.is_dir() {
            let mut found: Vec<PathBuf> = walkdir::WalkDir::new(input)
                .follow_links(true)
                .into_iter()
                .filter_map(|entry| match entry {
                    Ok(entry) => Some(entry),
                    Err(err) => {
                        problems.push(err.to_string());
                        None
                    }
                })
                .filter(|entry| entry.file_type().is_file() && is_image_path(entry.path()))
                .map(walkdir::DirEntry::into_path)
                .collect();
            if found.is_empty() {
                problems.push(format!("{}: no images found", input.display()));
            }
            found.sort();
            files.extend(found);
        } else if input.exists() {
            files.push(input.clone());
        } else {
            problems.push(format!("{}: no such file or directory", input.display()));
        }
    }
    (files, problems)
}

fn class_names(meta: &RecordMeta, classes: usize) -> Vec<String> {
    match &meta.classes {
        Some(names) if names.len() == classes => names.clone(),
        _ if classes == IMAGENET_CLASSES.len() => {
            IMAGENET_CLASSES.iter().map(|c| c.to_string()).collect()
        }
        _ => (0..classes).map(|i| format!("class {i}")).collect(),
    }
}

/// Indices of the `k` largest values, largest first.
fn top_k(values: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].total_cmp(&values[a]).then(a.cmp(&b)));
    order.truncate(k);
    order
}

/// Run a batch of preprocessed images (each `3 * crop * crop` values) through the model and
/// return softmax probabilities per image.
fn probabilities(
    model: &ResNet,
    images: &[Vec<f32>],
    crop: usize,
    device: &Device,
) -> Result<Vec<Vec<f32>>> {
    let n = images.len();
    let data: Vec<f32> = images.concat();
    let input = Tensor::<4>::from_data(TensorData::new(data, [n, 3, crop, crop]), device);
    let probs = softmax(model.forward(input), 1);
    let [_, classes] = probs.dims();
    let values: Vec<f32> = probs
        .into_data()
        .try_into_vec_as::<f32>()
        .map_err(|err| anyhow::anyhow!("reading the output back: {err:?}"))?;
    Ok(values.chunks(classes).map(<[f32]>::to_vec).collect())
}

/// Classify every image; a file that cannot be read is reported and skipped, and makes the
/// command fail at the end. `running_on` (the device line) goes to stderr once the inputs and
/// weights are found usable.
pub fn classify(args: &ClassifyArgs, device: &Device, running_on: &str) -> Result<()> {
    if args.top_k == 0 || args.batch_size == 0 {
        bail!("--top-k and --batch-size must be at least 1");
    }
    let (files, problems) = collect_inputs(&args.inputs);
    if files.is_empty() {
        bail!("no images to classify: {}", problems.join("; "));
    }
    for problem in &problems {
        eprintln!("warning: skipped {problem}");
    }
    let mut failures = problems.len();
    let (model, meta) = args.weights.load(device)?;
    if meta.config.in_channels != 3 {
        bail!(
            "the model expects {} input channels; images are RGB",
            meta.config.in_channels
        );
    }
    // Inference only: fold each batch norm into its convolution (same logits up to rounding,
    // no batch-norm work per image).
    let model = model.valid().fold_batchnorm();
    let prep = args.weights.preprocessing(Some(&meta))?;
    let crop = prep.crop_size as usize;
    let names = class_names(&meta, meta.config.num_classes);
    let exif = args.weights.exif();
    eprintln!("{running_on}");

    let progress = if !args.json && std::io::stdout().is_terminal() && files.len() > args.batch_size
    {
        let bar = ProgressBar::new(files.len() as u64);
        bar.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} images ({per_sec}, {eta} left)")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar
    } else {
        ProgressBar::hidden()
    };

    for batch in files.chunks(args.batch_size) {
        // Decoding and resizing run on all cores, off the thread that drives the model.
        let prepared: Vec<(&PathBuf, Result<Vec<f32>, String>)> = batch
            .par_iter()
            .map(|path| {
                let result = load_rgb(path, exif)
                    .map(|img| preprocess(&img, &prep))
                    .map_err(|err| err.to_string());
                (path, result)
            })
            .collect();
        let mut ok_paths = Vec::new();
        let mut images = Vec::new();
        for (path, result) in prepared {
            match result {
                Ok(values) => {
                    ok_paths.push(path);
                    images.push(values);
                }
                Err(message) => {
                    progress.suspend(|| eprintln!("warning: skipped {message}"));
                    failures += 1;
                }
            }
        }
        if !images.is_empty() {
            let probs = probabilities(&model, &images, crop, device)?;
            progress.suspend(|| print_predictions(&ok_paths, &probs, &names, args));
        }
        progress.inc(batch.len() as u64);
    }
    progress.finish_and_clear();
    if failures > 0 {
        bail!("{failures} input(s) could not be classified (see the warnings above)");
    }
    Ok(())
}

fn print_predictions(
    paths: &[&PathBuf],
    probs: &[Vec<f32>],
    names: &[String],
    args: &ClassifyArgs,
) {
    for (path, p) in paths.iter().zip(probs) {
        let best = top_k(p, args.top_k);
        if args.json {
            let prediction = Prediction {
                path: path.display().to_string(),
                labels: best.iter().map(|&i| names[i].as_str()).collect(),
                probabilities: best.iter().map(|&i| p[i]).collect(),
                indices: best,
            };
            match serde_json::to_string(&prediction) {
                Ok(line) => println!("{line}"),
                Err(err) => eprintln!("warning: {}: {err}", path.display()),
            }
        } else {
            println!("{}", path.display());
            for i in best {
                println!("  {:>6.2}%  {} ({i})", p[i] * 100.0, names[i]);
            }
        }
    }
}

/// Arguments of `resnet preprocess`.
#[derive(Args, Debug)]
pub struct PreprocessArgs {
    /// The image.
    image: PathBuf,
    /// Where to write the `[1, 3, crop, crop]` float32 tensor.
    #[arg(long, short)]
    output: PathBuf,
    /// Resize the shorter side to this many pixels.
    #[arg(long, default_value_t = 256)]
    resize: u32,
    /// Center crop size.
    #[arg(long, default_value_t = 224)]
    crop: u32,
    /// Rotate by the EXIF orientation (PIL and torchvision do not).
    #[arg(long)]
    exif_orientation: bool,
}

/// Write exactly the tensor `classify` feeds the network, for comparison with torchvision.
pub fn preprocess_command(args: &PreprocessArgs) -> Result<()> {
    if args.resize == 0 || args.crop == 0 {
        bail!("--resize and --crop must be at least 1");
    }
    let exif = if args.exif_orientation {
        Exif::Apply
    } else {
        Exif::Ignore
    };
    let prep = Preprocessing {
        resize_size: args.resize,
        crop_size: args.crop,
        ..Preprocessing::imagenet(args.resize)
    };
    let image = load_rgb(&args.image, exif)?;
    let values = preprocess(&image, &prep);
    let crop = args.crop as usize;
    npy::write_f32(&args.output, &[1, 3, crop, crop], &values)?;
    println!("wrote {} [1, 3, {crop}, {crop}]", args.output.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::top_k;

    #[test]
    fn top_k_orders_by_value_then_index() {
        assert_eq!(top_k(&[0.1, 0.5, 0.2, 0.5], 3), [1, 3, 2]);
        assert_eq!(top_k(&[0.3], 5), [0]);
    }
}
