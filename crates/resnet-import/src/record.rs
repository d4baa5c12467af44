//! Model records: Burnpack (`.bpk`) files that carry their own `ResNetConfig`.
//!
//! The configuration, the weights' name and the preprocessing they expect are stored as JSON
//! in the Burnpack metadata under [`METADATA_KEY`], so one file is enough to rebuild and run the
//! model. Writing is atomic (Burnpack writes a sibling temp file and renames it).

use std::path::{Path, PathBuf};

use burn::store::burn_pack::{Bytes, Reader};
use burn::store::{BurnpackStore, ModuleSnapshot};
use burn::tensor::Device;
use resnet_model::{ResNet, ResNetConfig};
use serde::{Deserialize, Serialize};

use crate::error::{ImportError, io_error, one_line};

/// Burnpack metadata key holding the [`RecordMeta`] JSON.
pub const METADATA_KEY: &str = "resnet-rs";

/// How images must be prepared for a model: torchvision's `ImageClassification` transform.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// The shorter side is resized to this many pixels (bilinear, antialiased).
    pub resize_size: u32,
    /// Then the center `crop_size` x `crop_size` square is taken.
    pub crop_size: u32,
    /// Per-channel mean subtracted after scaling to [0, 1].
    pub mean: [f32; 3],
    /// Per-channel standard deviation divided by.
    pub std: [f32; 3],
}

impl Preprocessing {
    /// torchvision's ImageNet transform with the given resize (256 for V1, 232 for most V2).
    pub fn imagenet(resize_size: u32) -> Self {
        Self {
            resize_size,
            crop_size: 224,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
        }
    }
}

/// Everything besides the tensors that a record carries.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordMeta {
    /// The architecture.
    pub config: ResNetConfig,
    /// Where the weights came from (e.g. `resnet50-IMAGENET1K_V2`, or a file name).
    #[serde(default)]
    pub weights: Option<String>,
    /// Class names, one per output, when known.
    #[serde(default)]
    pub classes: Option<Vec<String>>,
    /// The input transform the weights were trained with, when known.
    #[serde(default)]
    pub preprocessing: Option<Preprocessing>,
}

impl RecordMeta {
    /// Metadata with only the configuration.
    pub fn new(config: ResNetConfig) -> Self {
        Self {
            config,
            weights: None,
            classes: None,
            preprocessing: None,
        }
    }
}

fn record_error(path: &Path, message: impl std::fmt::Display) -> ImportError {
    ImportError::Record {
        path: path.into(),
        message: one_line(message),
    }
}

/// Write `model` and `meta` to `path` (a `.bpk` file), replacing any file there atomically.
pub fn save_record(model: &ResNet, meta: &RecordMeta, path: &Path) -> Result<(), ImportError> {
    let json = serde_json::to_string(meta).map_err(|err| record_error(path, err))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| ImportError::Io {
            path: parent.into(),
            source,
        })?;
    }
    let mut store = BurnpackStore::from_file(path)
        .auto_extension(false)
        .overwrite(true)
        .metadata(METADATA_KEY, json);
    model
        .save_into(&mut store)
        .map_err(|err| record_error(path, format!("cannot write record: {err}")))
}

/// Read a record written by [`save_record`] (or by `resnet-train`) onto `device`.
///
/// The whole file is read into memory first, so the returned model does not depend on the
/// file staying in place (Burnpack's file store otherwise reads tensors lazily by path).
pub fn load_record(path: &Path, device: &Device) -> Result<(ResNet, RecordMeta), ImportError> {
    let bytes = std::fs::read(path).map_err(|source| io_error(path, source))?;
    if bytes.is_empty() {
        return Err(ImportError::Empty(path.into()));
    }
    let bytes = Bytes::from_bytes_vec(bytes);
    let reader = Reader::from_bytes(bytes.clone())
        .map_err(|err| record_error(path, format!("not a Burnpack record ({err})")))?;
    let json = reader.metadata().get(METADATA_KEY).ok_or_else(|| {
        record_error(
            path,
            format!("Burnpack file without `{METADATA_KEY}` metadata: not written by resnet-rs"),
        )
    })?;
    let meta: RecordMeta = serde_json::from_str(json)
        .map_err(|err| record_error(path, format!("unreadable configuration ({err})")))?;
    meta.config.validate()?;
    let mut model = meta.config.init(device);
    let mut store = BurnpackStore::from_bytes(Some(bytes));
    let result = model
        .load_from(&mut store)
        .map_err(|err| record_error(path, format!("does not match its configuration ({err})")))?;
    if !result.errors.is_empty() || !result.unused.is_empty() {
        return Err(record_error(
            path,
            format!(
                "does not match its configuration ({} errors, {} unused tensors)",
                result.errors.len(),
                result.unused.len()
            ),
        ));
    }
    Ok((model, meta))
}

/// The default record path for a weights name: `DIR/<name>.bpk`.
pub fn record_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.bpk"))
}
