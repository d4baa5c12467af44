//! The import pipeline shared by `resnet import`, `cargo xtask import-weights` and
//! `resnet classify --weights v2`: checkpoint in, loaded model and record metadata out.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use resnet_model::{ResNet, ResNetConfig};

use crate::download::{DownloadOptions, fetch};
use crate::error::ImportError;
use crate::record::{Preprocessing, RecordMeta, record_path, save_record};
use crate::registry::{self, IMAGENET_CLASSES, WeightsEntry, WeightsVersion};
use crate::{Checkpoint, Inferred, LoadReport};

/// What to import a checkpoint as.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Preset name to load into; inferred from the checkpoint when `None`.
    pub arch: Option<String>,
    /// Number of classes of the head; taken from the checkpoint's `fc` when `None`.
    pub num_classes: Option<usize>,
    /// Accept missing and unexpected tensors (e.g. a backbone without `fc`).
    pub allow_partial: bool,
}

/// A checkpoint loaded into a model, with what was learned on the way.
pub struct Imported {
    /// The model, with the checkpoint's weights.
    pub model: ResNet,
    /// Its configuration and provenance, ready for [`save_record`].
    pub meta: RecordMeta,
    /// The architecture read off the checkpoint.
    pub inferred: Inferred,
    /// What was applied, and what was missing or unexpected (with `allow_partial`).
    pub report: LoadReport,
    /// The checkpoint's key prefix, stored float dtypes and ignored tensor count, on one line.
    pub source: String,
}

/// Import a checkpoint file onto `device`.
///
/// With `options.arch`, the preset is used (keeping the checkpoint's input channels and stem)
/// and a checkpoint of another architecture is an error that says what the checkpoint is.
pub fn import_checkpoint(
    path: &Path,
    options: &ImportOptions,
    device: &Device,
) -> Result<Imported, ImportError> {
    let checkpoint = Checkpoint::open(path)?;
    let inferred = checkpoint.infer()?;
    let mut config = match &options.arch {
        Some(arch) => ResNetConfig::from_name(arch)?
            .with_num_classes(inferred.config.num_classes)
            .with_in_channels(inferred.config.in_channels)
            .with_cifar_stem(inferred.config.cifar_stem),
        None => inferred.config.clone(),
    };
    if let Some(num_classes) = options.num_classes {
        config.num_classes = num_classes;
    }
    let source = format!(
        "{:?} checkpoint, prefix `{}`, stored as {:?}{}",
        checkpoint.format(),
        checkpoint.prefix(),
        checkpoint.float_dtypes(),
        match checkpoint.ignored() {
            0 => String::new(),
            n => format!(", {n} tensors outside the model ignored"),
        }
    );
    let (model, report) = checkpoint
        .load_into(&config, device, options.allow_partial)
        .map_err(|err| match err {
            ImportError::Mismatch {
                path,
                target,
                details,
            } => ImportError::Mismatch {
                path,
                target,
                details: format!(
                    "{details}; the checkpoint looks like {}",
                    inferred.describe()
                ),
            },
            other => other,
        })?;
    let mut meta = RecordMeta::new(config);
    meta.weights = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned());
    Ok(Imported {
        model,
        meta,
        inferred,
        report,
        source,
    })
}

/// Load a model from a `.bpk` record, or import a `.pth`/`.safetensors` checkpoint on the fly
/// (architecture inferred; `options` as for [`import_checkpoint`]).
pub fn load_model(
    path: &Path,
    options: &ImportOptions,
    device: &Device,
) -> Result<(ResNet, RecordMeta), ImportError> {
    let is_record = path
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("bpk"));
    if is_record {
        crate::record::load_record(path, device)
    } else {
        let imported = import_checkpoint(path, options, device)?;
        Ok((imported.model, imported.meta))
    }
}

/// Look up torchvision's weights for `arch` (`version` `None`: the newest, torchvision's
/// `DEFAULT`).
pub fn find_weights(
    arch: &str,
    version: Option<WeightsVersion>,
) -> Result<&'static WeightsEntry, ImportError> {
    ResNetConfig::from_name(arch)?;
    let entry = match version {
        Some(version) => registry::find(arch, version),
        None => registry::default_for(arch),
    };
    entry.ok_or_else(|| ImportError::UnknownWeights {
        arch: arch.to_string(),
        version: version.map_or("default", WeightsVersion::name).to_string(),
        available: registry::for_arch(arch)
            .map(|e| e.version.name())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Import torchvision's ImageNet weights `entry` into `out_dir/<arch>-<VERSION>.bpk`, and
/// return that path.
///
/// The checkpoint is `from` when given (an offline copy of the `.pth`), else downloaded into
/// `cache` (usually [`cache_dir`](crate::download::cache_dir)) and verified. An existing
/// record is reused unless `force`.
/// The record carries the ImageNet class names and the entry's preprocessing.
pub fn import_pretrained(
    entry: &WeightsEntry,
    from: Option<&Path>,
    cache: &Path,
    out_dir: &Path,
    force: bool,
    device: &Device,
) -> Result<PathBuf, ImportError> {
    let out = record_path(out_dir, &entry.weights_name());
    if out.exists() && !force {
        return Ok(out);
    }
    let checkpoint = match from {
        Some(path) => path.to_path_buf(),
        None => fetch(
            entry.url,
            entry.file_name,
            entry.sha256_prefix,
            cache,
            &DownloadOptions::default(),
        )?,
    };
    let options = ImportOptions {
        arch: Some(entry.arch.to_string()),
        num_classes: Some(IMAGENET_CLASSES.len()),
        allow_partial: false,
    };
    let imported = import_checkpoint(&checkpoint, &options, device)?;
    let mut meta = imported.meta;
    meta.weights = Some(entry.weights_name());
    meta.classes = Some(IMAGENET_CLASSES.iter().map(|c| c.to_string()).collect());
    meta.preprocessing = Some(Preprocessing {
        crop_size: entry.crop_size,
        mean: entry.mean,
        std: entry.std,
        ..Preprocessing::imagenet(entry.resize_size)
    });
    save_record(&imported.model, &meta, &out)?;
    Ok(out)
}
