//! `resnet-train`: the command-line options and the training run.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};
use burn::data::dataloader::DataLoaderBuilder;
use burn::lr_scheduler::LrSchedulerConfig;
use burn::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::lr_scheduler::linear::LinearLrSchedulerConfig;
use burn::lr_scheduler::sequential::SequentialLrSchedulerConfig;
use burn::module::Module;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamWConfig, SgdConfig};
use burn::store::{BurnpackStore, ModuleSnapshot};
use burn::tensor::Device;
use burn::train::logger::FileMetricLogger;
use burn::train::metric::{AccuracyMetric, LearningRateMetric, LossMetric, TopKAccuracyMetric};
use burn::train::{ExecutionStrategy, Learner, MultiDeviceOptim, SupervisedTraining};
use clap::{Parser, ValueEnum};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use resnet_import::registry::WeightsVersion;
use resnet_import::{
    Preprocessing, RecordMeta, download, find_weights, import_pretrained, load_record, save_record,
};
use resnet_model::{ResNet, ResNetConfig};

use crate::backend::{Backend, describe};
use crate::data::{
    FetchingBatcher, ImageBatcher, ImageDataset, Indices, Split, Transform, cifar10, image_folder,
};
use crate::distributed::TokenArgs;
use crate::logger::{CsvMetricLogger, Rows};
use crate::model::Classifier;
use crate::plots::{EpochMetrics, draw_confusion, write_confusion_csv};
use crate::renderer::PlainRenderer;

/// Input data layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DataFormat {
    /// `DIR/train/<class>/*` and `DIR/val/<class>/*`, or `DIR/<class>/*` with `--val-split`.
    ImageFolder,
    /// CIFAR-10 binary batches (`data_batch_1.bin`..`data_batch_5.bin`, `test_batch.bin`).
    Cifar10,
}

/// Optimizer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Optimizer {
    /// SGD with momentum 0.9 (no dampening, as PyTorch), optional Nesterov.
    Sgd,
    /// AdamW.
    Adamw,
}

/// Train or fine-tune a ResNet on your own images with Burn's Learner.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "resnet-train",
    version,
    about,
    after_help = "Remote workers: `resnet-train serve-devices --help`. With RANK >= 1 in the \
                  environment (torchrun, Kubernetes indexed Jobs), this same command line \
                  serves the devices to rank 0 instead of training."
)]
pub struct TrainArgs {
    /// Data directory (see --format).
    #[arg(long)]
    pub data: PathBuf,
    /// Run directory: checkpoints, records, metrics.csv, curves.png, confusion matrix.
    #[arg(long)]
    pub out: PathBuf,
    /// Data layout.
    #[arg(long, value_enum, default_value = "image-folder")]
    pub format: DataFormat,
    /// With a flat `DIR/<class>/*` folder: the fraction held out for validation (stratified,
    /// seeded).
    #[arg(long)]
    pub val_split: Option<f64>,
    /// Architecture preset (resnet18 ... wide_resnet101_2).
    #[arg(long, default_value = "resnet18")]
    pub arch: String,
    /// Small-image stem (3x3 stride-1 conv, no max-pool), for 32x32 images. Default: on for
    /// CIFAR-10.
    #[arg(long)]
    pub cifar_stem: bool,
    /// Narrow the network: stem and stage widths `w, w, 2w, 4w, 8w` instead of torchvision's 64.
    #[arg(long)]
    pub width: Option<usize>,
    /// Training/evaluation image side. Default: 224 (32 with CIFAR-10 or --cifar-stem).
    #[arg(long)]
    pub image_size: Option<u32>,
    /// Start from torchvision's ImageNet weights, e.g. `resnet50:v2` (new head for your
    /// classes).
    #[arg(long, conflicts_with = "init")]
    pub pretrained: Option<String>,
    /// Start from a record or checkpoint (`.bpk`, `.pth`, `.safetensors`); new head for your
    /// classes if needed.
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// Train only the classifier head (frozen backbone, batch norms in eval mode).
    #[arg(long)]
    pub freeze_backbone: bool,
    /// With --freeze-backbone: train the whole network from this epoch on (the first this
    /// many epochs train only the head).
    #[arg(long, requires = "freeze_backbone")]
    pub unfreeze_after: Option<usize>,
    /// Epochs.
    #[arg(long, default_value_t = 10)]
    pub epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Peak learning rate. Default: 0.1 x batch/128 for SGD, 1e-3 x batch/128 for AdamW.
    #[arg(long)]
    pub lr: Option<f64>,
    /// Optimizer.
    #[arg(long, value_enum, default_value = "sgd")]
    pub optimizer: Optimizer,
    /// Momentum (SGD).
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f64,
    /// Nesterov momentum (SGD).
    #[arg(long)]
    pub nesterov: bool,
    /// Weight decay. Default: 5e-4 for SGD, 0.05 for AdamW.
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Epochs of linear warm-up before the cosine decay.
    #[arg(long, default_value_t = 1)]
    pub warmup_epochs: usize,
    /// Label smoothing of the cross-entropy loss.
    #[arg(long, default_value_t = 0.0)]
    pub label_smoothing: f32,
    /// Seed for initialization, shuffling, splitting and augmentation: same seed, same run.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Data-loading worker threads (decoding and augmentation run there).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Continue from the last checkpoint in `--out`.
    #[arg(long)]
    pub resume: bool,
    /// Continue from the last checkpoint in `--out` if there is one, else start afresh: for
    /// jobs a scheduler may restart.
    #[arg(long, conflicts_with = "resume")]
    pub resume_if_present: bool,
    /// Backend to train on (only those compiled in via cargo features; default: flex, or the
    /// first one compiled in). Read by the binary, which passes the devices to [`run`].
    #[arg(long, value_enum)]
    pub backend: Option<Backend>,
    /// Devices of the backend to train on, e.g. `0,1`: data-parallel over several GPUs, each
    /// step's batch split between them. Default: the backend's default device.
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<usize>,
    /// With several devices: Burn's DistributedDataParallel strategy (a replica and an
    /// optimizer per device, gradients all-reduced; in Burn 0.22 only with `--backend cuda`)
    /// instead of the multi-device strategy (gradients summed and applied on the first device).
    #[arg(long)]
    pub ddp: bool,
    /// Remote workers (`resnet-train serve-devices`) to train on as well, e.g.
    /// `ws://node1:29500,ws://node2:29500`: every device they serve takes a share of each batch.
    #[arg(long, env = "RESNET_REMOTE", value_delimiter = ',')]
    pub remote: Vec<String>,
    /// With `WORLD_SIZE` > 1 and no --remote: the address of rank `{rank}`'s worker, e.g.
    /// `ws://resnet-train-{rank}.resnet-train:29500` (ranks 1 to WORLD_SIZE - 1).
    #[arg(long, env = "RESNET_REMOTE_TEMPLATE")]
    pub remote_template: Option<String>,
    /// The token shared with the workers.
    #[command(flatten)]
    pub auth: TokenArgs,
    /// Seconds to keep retrying remote workers that are not up yet.
    #[arg(long, default_value_t = 300)]
    pub connect_timeout: u64,
    /// With remote workers: fail when no step finishes in this many seconds (0: wait forever).
    #[arg(long, default_value_t = 600)]
    pub step_timeout: u64,
}

/// Everything a finished run produced.
pub struct RunSummary {
    /// Epoch rows of metrics.csv.
    pub metrics: Vec<EpochMetrics>,
    /// The final model's record.
    pub final_record: PathBuf,
    /// The record of the epoch with the best validation top-1 accuracy.
    pub best_record: PathBuf,
    /// Validation top-1 accuracy of the final model, in [0, 1].
    pub final_val_acc1: f64,
}

fn latest_checkpoint(dir: &Path) -> Option<usize> {
    std::fs::read_dir(dir.join("checkpoint"))
        .ok()?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name().into_string().ok()?;
            name.strip_prefix("model-")?
                .strip_suffix(".bpk")?
                .parse()
                .ok()
        })
        .max()
}

fn narrowed(config: ResNetConfig, width: Option<usize>) -> ResNetConfig {
    match width {
        Some(w) => config
            .with_stem_channels(w)
            .with_stage_planes([w, 2 * w, 4 * w, 8 * w]),
        None => config,
    }
}

/// The starting network: pretrained, from a record, or freshly initialized.
fn initial_model(
    args: &TrainArgs,
    num_classes: usize,
    cifar_stem: bool,
    device: &Device,
) -> Result<(ResNet, ResNetConfig)> {
    if let Some(spec) = &args.pretrained {
        let (arch, version) = spec.split_once(':').unwrap_or((spec.as_str(), ""));
        if arch != args.arch {
            bail!("--pretrained {spec} does not match --arch {}", args.arch);
        }
        let version = match version {
            "" => None,
            v => Some(
                WeightsVersion::parse(v)
                    .with_context(|| format!("unknown weights version `{v}` (use v1 or v2)"))?,
            ),
        };
        let entry = find_weights(arch, version)?;
        let cache = download::cache_dir()?;
        let record = import_pretrained(entry, None, &cache, &cache.join("records"), false, device)?;
        let (model, meta) = load_record(&record, device)?;
        let config = meta.config.with_num_classes(num_classes);
        return Ok((model.with_num_classes(num_classes, device), config));
    }
    if let Some(path) = &args.init {
        let options = resnet_import::ImportOptions {
            allow_partial: true,
            ..Default::default()
        };
        let (model, meta) = resnet_import::load_model(path, &options, device)?;
        let config = meta.config.clone().with_num_classes(num_classes);
        let model = if model.num_classes() == num_classes {
            model
        } else {
            model.with_num_classes(num_classes, device)
        };
        return Ok((model, config));
    }
    let config = narrowed(ResNetConfig::from_name(&args.arch)?, args.width)
        .with_num_classes(num_classes)
        .with_cifar_stem(cifar_stem);
    config.validate()?;
    Ok((config.init(device), config))
}

/// Run a training as the arguments say, on `devices` of `--backend` (autodiff devices are
/// derived from them; the first one also evaluates). Several devices train data-parallel.
pub fn run(args: &TrainArgs, devices: &[Device]) -> Result<RunSummary> {
    let backend = args.backend.or_else(|| Backend::default_compiled().ok());
    let labelled: Vec<(String, Device)> = devices
        .iter()
        .map(|device| {
            let label = backend.map_or_else(|| "?".to_string(), |b| describe(b, device));
            (label, device.clone())
        })
        .collect();
    run_on(args, &labelled, &[])
}

/// [`run`] on local devices and remote ones (see [`crate::distributed`]), each labelled for
/// the "training on" line. The first local device holds the model, evaluates and steps the
/// optimizer.
pub fn run_on(
    args: &TrainArgs,
    local: &[(String, Device)],
    remote: &[(String, Device)],
) -> Result<RunSummary> {
    let labelled: Vec<&(String, Device)> = local.iter().chain(remote).collect();
    let devices: Vec<Device> = labelled.iter().map(|(_, d)| d.clone()).collect();
    let Some(device) = devices.first() else {
        bail!("no device to train on");
    };
    if args.ddp && devices.len() < 2 {
        bail!("--ddp needs at least two --devices");
    }
    if args.ddp && args.backend != Some(Backend::Cuda) {
        // burn-train's DistributedDataParallel all-reduces through the backend's collective
        // operations; in Burn 0.22 only CUDA (NCCL) has them, the others panic.
        bail!("--ddp needs --backend cuda: Burn 0.22 all-reduces gradients only on CUDA");
    }
    let replicas = devices.len();
    if !args.batch_size.is_multiple_of(replicas) {
        bail!(
            "--batch-size {} must be divisible by the number of devices ({replicas})",
            args.batch_size
        );
    }
    if args.epochs == 0 || args.batch_size == 0 {
        bail!("--epochs and --batch-size must be at least 1");
    }
    if !(0.0..1.0).contains(&args.label_smoothing) {
        bail!("--label-smoothing must be in [0, 1)");
    }
    let resume_from = if args.resume {
        match latest_checkpoint(&args.out) {
            Some(epoch) => Some(epoch),
            None => bail!(
                "--resume: no checkpoint in {}",
                args.out.join("checkpoint").display()
            ),
        }
    } else if args.resume_if_present {
        latest_checkpoint(&args.out)
    } else {
        None
    };
    let cifar = args.format == DataFormat::Cifar10;
    let (train, val) = match args.format {
        DataFormat::ImageFolder => image_folder(&args.data, args.val_split, args.seed)?,
        DataFormat::Cifar10 => cifar10(&args.data)?,
    };
    let classes = train.classes.clone();
    let cifar_stem = args.cifar_stem || cifar;
    let size = args.image_size.unwrap_or(if cifar_stem { 32 } else { 224 });
    if size == 0 {
        bail!("--image-size must be at least 1");
    }

    for device in &devices {
        device.seed(args.seed);
    }
    let train_device = device.clone().autodiff();
    let train_devices: Vec<Device> = devices.iter().map(|d| d.clone().autodiff()).collect();
    let (net, config) = initial_model(args, classes.len(), cifar_stem, &train_device)?;
    if let Some(k) = args.unfreeze_after
        && (k == 0 || k >= args.epochs)
    {
        bail!("--unfreeze-after must be between 1 and --epochs - 1");
    }
    // Epochs trained with the backbone frozen (the first phase), if any.
    let frozen_epochs = match (args.freeze_backbone, args.unfreeze_after) {
        (false, _) => 0,
        (true, None) => args.epochs,
        (true, Some(k)) => k,
    };
    let model = Classifier {
        net,
        label_smoothing: args.label_smoothing,
        // The multi-device strategy sums the replicas' gradients; DDP averages them itself.
        gradient_scale: if replicas > 1 && !args.ddp {
            1.0 / replicas as f32
        } else {
            1.0
        },
        sync_steps: !remote.is_empty(),
    };

    // Evaluation: resize to size * 8/7 (256 for 224, as torchvision) and center crop; at CIFAR
    // sizes the images are used as they are.
    let eval = if cifar_stem {
        Preprocessing {
            resize_size: size,
            crop_size: size,
            ..Preprocessing::imagenet(size)
        }
    } else {
        Preprocessing {
            resize_size: size * 8 / 7,
            crop_size: size,
            ..Preprocessing::imagenet(size * 8 / 7)
        }
    };
    let train_transform = if cifar_stem {
        Transform::PadCrop { size, padding: 4 }
    } else {
        Transform::RandomResizedCrop { size }
    };
    let (mean, std) = (eval.mean, eval.std);
    // Several devices each train on a contiguous slice of the dataset (Burn splits it in
    // order), so the samples, grouped by class on disk, are mixed once first.
    let mut train = train;
    train
        .samples
        .shuffle(&mut StdRng::seed_from_u64(args.seed ^ 0x5eed_5a3e));
    if !remote.is_empty() {
        // Every replica must take part in every step (see `distributed::step_gate`): drop the
        // last partial batch, so that each device's slice holds the same number of batches.
        let whole = train.samples.len() - train.samples.len() % args.batch_size;
        if whole == 0 {
            bail!(
                "with remote workers, the training set needs at least --batch-size ({}) images",
                args.batch_size
            );
        }
        train.samples.truncate(whole);
    }
    crate::distributed::set_step_gate((!remote.is_empty()).then_some(replicas));
    let train_data = ImageDataset::new(train.clone(), train_transform, mean, std, args.seed);
    let val_data = ImageDataset::new(
        val.clone(),
        Transform::Eval(eval.clone()),
        mean,
        std,
        args.seed,
    );
    let train_len = train.samples.len();
    let val_len = val.samples.len();
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .max(1);
    let batcher = ImageBatcher::new(size as usize);
    // One loader thread per device prefetches batches in order (same seed, same run); the
    // `--workers` threads decode and augment the items of each batch.
    let train_batcher = FetchingBatcher {
        dataset: Arc::new(train_data),
        batcher: ImageBatcher {
            staging: (!remote.is_empty()).then(|| device.clone()),
            ..batcher.clone()
        },
        threads: workers,
    };
    // `--batch-size` is the batch of one step over all devices; each device takes its share.
    let train_loader = DataLoaderBuilder::new(train_batcher)
        .batch_size(args.batch_size / replicas)
        .shuffle(args.seed)
        .num_workers(1)
        .build(Indices(train_len));
    let val_batcher = FetchingBatcher {
        dataset: Arc::new(val_data),
        batcher: batcher.clone(),
        threads: workers,
    };
    let val_loader = DataLoaderBuilder::new(val_batcher)
        .batch_size(args.batch_size)
        .num_workers(1)
        .build(Indices(val_len));

    // Optimizer and schedule: linear warm-up from 1% of the peak, then cosine to 0, per step.
    let scale = args.batch_size as f64 / 128.0;
    let make_optim = || match args.optimizer {
        Optimizer::Sgd => SgdConfig::new()
            .with_momentum(Some(
                MomentumConfig::new()
                    .with_momentum(args.momentum)
                    .with_dampening(0.0)
                    .with_nesterov(args.nesterov),
            ))
            .with_weight_decay(Some(WeightDecayConfig::new(
                args.weight_decay.unwrap_or(5e-4),
            )))
            .init(),
        Optimizer::Adamw => AdamWConfig::new()
            .with_weight_decay(args.weight_decay.unwrap_or(0.05))
            .init(),
    };
    let lr = args.lr.unwrap_or(match args.optimizer {
        Optimizer::Sgd => 0.1 * scale,
        Optimizer::Adamw => 1e-3 * scale,
    });
    if !(lr > 0.0 && lr <= 1.0) {
        bail!("the learning rate must be in (0, 1], got {lr}");
    }
    let steps_per_epoch = train_len.div_ceil(args.batch_size).max(1);
    let total = steps_per_epoch * args.epochs;
    let warmup = (steps_per_epoch * args.warmup_epochs).min(total.saturating_sub(1));
    let make_scheduler = || {
        let cosine = CosineAnnealingLrSchedulerConfig::new(lr, total - warmup);
        if warmup > 0 {
            SequentialLrSchedulerConfig::new(
                vec![
                    LrSchedulerConfig::Linear(LinearLrSchedulerConfig::new(lr * 0.01, lr, warmup)),
                    LrSchedulerConfig::Cosine(cosine),
                ],
                vec![warmup],
            )
            .init()
        } else {
            cosine.init()
        }
        .map_err(|err| anyhow::anyhow!("learning-rate schedule: {err}"))
    };
    make_scheduler()?;

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let rows: Rows = Arc::new(Mutex::new(match resume_from {
        Some(epoch) => read_metrics(&args.out, epoch),
        None => Vec::new(),
    }));
    let make_training = |num_epochs: usize, checkpoint: Option<usize>| {
        let mut training =
            SupervisedTraining::new(&args.out, train_loader.clone(), val_loader.clone())
                .metrics((AccuracyMetric::new(), LossMetric::new()))
                .metric_train_numeric(LearningRateMetric::new())
                .with_default_checkpointers()
                .with_training_strategy(strategy(&train_devices, args.ddp).into())
                // Burn's own file logger first: it answers the checkpointing strategy's queries
                // (also about epochs before a resume); ours writes metrics.csv and curves.png.
                .with_metric_logger(FileMetricLogger::new(&args.out))
                .with_metric_logger(CsvMetricLogger::new(args.out.clone(), rows.clone()))
                .num_epochs(num_epochs)
                .summary();
        if !std::io::stdout().is_terminal() {
            training = training.renderer(Box::new(PlainRenderer::new()));
        }
        if classes.len() > 5 {
            training = training
                .metric_train_numeric(TopKAccuracyMetric::new(5))
                .metric_valid_numeric(TopKAccuracyMetric::new(5));
        }
        if let Some(epoch) = checkpoint {
            training = training.checkpoint(epoch);
        }
        training
    };
    let names: Vec<&str> = labelled.iter().map(|(label, _)| label.as_str()).collect();
    eprintln!("training on {}", names.join(", "));
    if let Some(epoch) = resume_from {
        eprintln!("resuming after epoch {epoch}");
    }
    let mut model = model;
    let mut checkpoint = resume_from;
    // Phase 1: the head alone (when the backbone is frozen and we are not past that phase).
    if frozen_epochs > 0 && checkpoint.unwrap_or(0) < frozen_epochs {
        let learner = Learner::new(freeze_backbone(model), make_optim(), make_scheduler()?);
        let trained = launch(make_training(frozen_epochs, checkpoint), learner)?;
        if frozen_epochs == args.epochs {
            model = trained;
        } else {
            eprintln!("unfreezing the backbone after epoch {frozen_epochs}");
            model = trained.train();
            checkpoint = Some(frozen_epochs);
        }
    }
    let final_model = if frozen_epochs == args.epochs {
        model
    } else {
        // Phase 2 (or the only one): the whole network. A fresh module is loaded from the
        // last checkpoint by the Learner, so its parameters are trainable again.
        let learner = Learner::new(model.unfreeze(), make_optim(), make_scheduler()?);
        launch(make_training(args.epochs, checkpoint), learner)?
    };

    let meta = RecordMeta {
        config: config.clone(),
        weights: Some(format!("resnet-train run {}", args.out.display())),
        classes: Some(classes.clone()),
        preprocessing: Some(eval.clone()),
    };
    let final_record = args.out.join("final.bpk");
    save_record(&final_model.net, &meta, &final_record)?;

    let metrics = rows.lock().map(|rows| rows.clone()).unwrap_or_default();
    let best_epoch = metrics
        .iter()
        .filter(|row| row.split == "val" && row.acc1.is_finite())
        .max_by(|a, b| a.acc1.total_cmp(&b.acc1).then(b.epoch.cmp(&a.epoch)))
        .map(|row| row.epoch);
    let best_record = args.out.join("best.bpk");
    let best_checkpoint = best_epoch.map(|e| args.out.join(format!("checkpoint/model-{e}.bpk")));
    match best_checkpoint.filter(|p| p.exists()) {
        Some(path) if best_epoch != Some(args.epochs) => {
            let mut best = Classifier {
                net: config.init(device),
                label_smoothing: args.label_smoothing,
                gradient_scale: 1.0,
                sync_steps: false,
            };
            best.load_from(&mut BurnpackStore::from_file(&path))
                .map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
            save_record(&best.net, &meta, &best_record)?;
        }
        _ => std::fs::copy(&final_record, &best_record)
            .map(|_| ())
            .with_context(|| format!("writing {}", best_record.display()))?,
    }

    // Confusion matrix of the final model on the validation split.
    let matrix = confusion(&final_model.net, &val, &eval, &batcher, args, device)?;
    write_confusion_csv(&args.out.join("confusion.csv"), &classes, &matrix)
        .context("writing confusion.csv")?;
    if classes.len() <= 20 {
        draw_confusion(&args.out.join("confusion.png"), &classes, &matrix)?;
    }
    let correct: u64 = (0..classes.len()).map(|i| matrix[i][i]).sum();
    let total_val: u64 = matrix.iter().flatten().sum();
    Ok(RunSummary {
        metrics,
        final_record,
        best_record,
        final_val_acc1: correct as f64 / total_val.max(1) as f64,
    })
}

/// Train, turning a failed run (a step's error, or a panic such as a lost remote device)
/// into an error.
fn launch(
    training: SupervisedTraining<Classifier>,
    learner: Learner<Classifier>,
) -> Result<Classifier> {
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| training.launch(learner)))
            .map_err(|panic| {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown cause");
                anyhow::anyhow!("training failed: {}", one_line(message))
            })?;
    if let Some(error) = result.error {
        bail!("training failed: {}", one_line(&error.to_string()));
    }
    Ok(result.model)
}

/// A multi-line error report (causes, a captured backtrace) as one line, without the backtrace.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .take_while(|line| !line.starts_with("stack backtrace:"))
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// How the Learner spreads the work over `devices` (autodiff devices, at least one).
fn strategy(devices: &[Device], ddp: bool) -> ExecutionStrategy {
    match devices {
        [device] => ExecutionStrategy::SingleDevice(device.clone()),
        _ if ddp => ExecutionStrategy::ddp(
            devices.to_vec(),
            burn::tensor::distributed::DistributedConfig {
                all_reduce_op: burn::tensor::distributed::ReduceOperation::Mean,
            },
        ),
        _ => ExecutionStrategy::MultiDevice(devices.to_vec(), MultiDeviceOptim::OptimMainDevice),
    }
}

/// Freeze everything but the classifier head: its parameters get no gradients and its batch
/// norms use their running statistics.
fn freeze_backbone(model: Classifier) -> Classifier {
    let head = model.net.fc.clone();
    let mut frozen = model.freeze();
    frozen.net.fc = head;
    frozen
}

/// Rows of an existing metrics.csv up to `epoch` (when resuming).
fn read_metrics(dir: &Path, epoch: usize) -> Vec<EpochMetrics> {
    let Ok(text) = std::fs::read_to_string(dir.join("metrics.csv")) else {
        return Vec::new();
    };
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').collect();
            let row = EpochMetrics {
                epoch: f.first()?.parse().ok()?,
                split: f.get(1)?.to_string(),
                loss: f.get(2)?.parse().ok()?,
                acc1: f.get(3)?.parse().ok()?,
                acc5: f.get(4).and_then(|v| v.parse().ok()),
                lr: f.get(5)?.parse().ok()?,
                seconds: f.get(6)?.parse().ok()?,
            };
            (row.epoch <= epoch).then_some(row)
        })
        .collect()
}

/// Counts `[true][predicted]` over the validation split.
fn confusion(
    net: &ResNet,
    val: &Split,
    eval: &Preprocessing,
    batcher: &ImageBatcher,
    args: &TrainArgs,
    device: &Device,
) -> Result<Vec<Vec<u64>>> {
    let n = val.classes.len();
    let mut matrix = vec![vec![0u64; n]; n];
    let net = net.valid().to_device(device);
    let data = ImageDataset::new(
        val.clone(),
        Transform::Eval(eval.clone()),
        eval.mean,
        eval.std,
        args.seed,
    );
    let loader = DataLoaderBuilder::new(batcher.clone())
        .batch_size(args.batch_size)
        .set_device(device.clone())
        .build(data);
    for batch in loader.iter() {
        let batch = batch.map_err(|err| anyhow::anyhow!("validation data: {err}"))?;
        let predicted = net.forward(batch.images).argmax(1).flatten::<1>(0, 1);
        crate::distributed::note_progress();
        let predicted: Vec<i64> = predicted
            .into_data()
            .try_into_vec_as::<i64>()
            .map_err(|err| anyhow::anyhow!("reading predictions: {err:?}"))?;
        let targets: Vec<i64> = batch
            .targets
            .into_data()
            .try_into_vec_as::<i64>()
            .map_err(|err| anyhow::anyhow!("reading targets: {err:?}"))?;
        for (t, p) in targets.iter().zip(&predicted) {
            if let (Ok(t), Ok(p)) = (usize::try_from(*t), usize::try_from(*p))
                && t < n
                && p < n
            {
                matrix[t][p] += 1;
            }
        }
    }
    Ok(matrix)
}
