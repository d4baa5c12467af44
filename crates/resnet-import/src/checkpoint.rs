//! Reading a PyTorch checkpoint and applying it to a [`ResNet`].

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::store::burn_pack::Tensor as PackTensor;
use burn::store::{
    FloatCastAdapter, ModuleAdapter, ModuleSnapshot, ModuleStore, PyTorchToBurnAdapter,
    PytorchStore, SafetensorsStore,
};
use burn::tensor::{DType, Device};
use resnet_model::{ResNet, ResNetConfig};

use crate::error::{ImportError, io_error, one_line};
use crate::infer::{Inferred, Shapes, infer_config};
use crate::keymap::{burn_to_torchvision, find_prefix, torchvision_to_burn};

/// How many keys of each kind an error message lists before `...`.
const LISTED: usize = 3;

/// The container format of a checkpoint file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// `torch.save`: the zip format (PyTorch >= 1.6) or the legacy pickle format. Read by
    /// burn-store's pickle parser, which never executes pickle code.
    Pytorch,
    /// Hugging Face safetensors.
    Safetensors,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Pytorch => "PyTorch",
            Format::Safetensors => "safetensors",
        }
    }

    /// Guess from the first bytes: a safetensors file starts with a little-endian header length
    /// followed by `{`; anything else is handed to the PyTorch reader.
    fn sniff(path: &Path) -> Result<Self, ImportError> {
        let mut file = File::open(path).map_err(|source| io_error(path, source))?;
        let mut head = [0u8; 9];
        let mut read = 0;
        while read < head.len() {
            match file.read(&mut head[read..]) {
                Ok(0) => break,
                Ok(n) => read += n,
                Err(source) => {
                    return Err(ImportError::Io {
                        path: path.into(),
                        source,
                    });
                }
            }
        }
        if read == 0 {
            return Err(ImportError::Empty(path.into()));
        }
        Ok(if read == head.len() && head[8] == b'{' {
            Format::Safetensors
        } else {
            Format::Pytorch
        })
    }
}

/// The tensors of a torchvision-layout ResNet checkpoint, renamed to `resnet-model` paths.
///
/// Opening reads the tensor index (names, shapes, dtypes); tensor data is read when applied.
pub struct Checkpoint {
    path: PathBuf,
    format: Format,
    /// Prefix stripped from every key (`""`, `"module."`, `"state_dict."`...).
    prefix: String,
    /// Tensors to apply, keyed by `resnet-model` path.
    tensors: BTreeMap<String, PackTensor>,
    /// Shapes by torchvision key (prefix stripped), for inference and messages.
    shapes: Shapes,
    /// Tensors in the file outside the model's prefix (optimizer state, EMA copies...).
    ignored: usize,
    /// Dtypes of the floating-point tensors, as stored.
    float_dtypes: Vec<DType>,
}

/// What [`Checkpoint::load_into`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadReport {
    /// Tensors applied to the model.
    pub applied: usize,
    /// Model tensors the checkpoint did not provide (only with `allow_partial`), by
    /// torchvision name.
    pub missing: Vec<String>,
    /// Checkpoint tensors the model has no place for (only with `allow_partial`).
    pub unexpected: Vec<String>,
}

impl Checkpoint {
    /// Open a `.pth`/`.pt` (zip or legacy) or `.safetensors` checkpoint and locate the ResNet
    /// `state_dict` in it, wherever it is nested or however it is prefixed.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, ImportError> {
        let path = path.as_ref();
        let format = Format::sniff(path)?;
        let unreadable = |message: String| ImportError::Unreadable {
            path: path.into(),
            format: format.name(),
            message: one_line(message),
        };
        // Reading untrusted bytes: a parser panic must not take the caller down.
        let read = std::panic::catch_unwind(|| -> Result<BTreeMap<String, PackTensor>, String> {
            match format {
                Format::Pytorch => PytorchStore::from_file(path)
                    .map_indices_contiguous(false)
                    .get_all_tensors()
                    .cloned()
                    .map_err(|err| err.to_string()),
                Format::Safetensors => SafetensorsStore::from_file(path)
                    .get_all_tensors()
                    .cloned()
                    .map_err(|err| err.to_string()),
            }
        });
        let all = match read {
            Ok(Ok(all)) => all,
            Ok(Err(message)) => return Err(unreadable(message)),
            Err(_) => return Err(unreadable("the reader crashed on this file".into())),
        };
        if all.is_empty() {
            return Err(unreadable("it holds no tensors".into()));
        }

        let sample = || {
            let mut names: Vec<&str> = all.keys().take(LISTED + 1).map(String::as_str).collect();
            if names.len() > LISTED {
                names[LISTED] = "...";
            }
            names.join(", ")
        };
        let Some(prefix) = find_prefix(all.keys().map(String::as_str)) else {
            return Err(ImportError::NotAResNet {
                path: path.into(),
                reason: "no `conv1.weight` and `layer1.0.conv1.weight`".into(),
                sample: sample(),
            });
        };

        let mut tensors = BTreeMap::new();
        let mut shapes = Shapes::new();
        let mut ignored = 0;
        let mut float_dtypes = Vec::new();
        for (name, mut tensor) in all {
            let Some(key) = name.strip_prefix(&prefix) else {
                ignored += 1;
                continue;
            };
            if tensor.dtype.is_float() && !float_dtypes.contains(&tensor.dtype) {
                float_dtypes.push(tensor.dtype);
            }
            shapes.insert(key.to_string(), tensor.shape.to_vec());
            if let Some(target) = torchvision_to_burn(key) {
                tensor.name = target.clone();
                tensors.insert(target, tensor);
            }
        }
        Ok(Self {
            path: path.into(),
            format,
            prefix,
            tensors,
            shapes,
            ignored,
            float_dtypes,
        })
    }

    /// The file this checkpoint was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Its container format.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The prefix stripped from its keys (empty for a plain `state_dict`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Number of tensors outside the model's `state_dict` that were ignored.
    pub fn ignored(&self) -> usize {
        self.ignored
    }

    /// Floating-point dtypes as stored (e.g. `[F16]` for torchvision's Wide ResNet V1 files);
    /// they are converted to the model's float type when applied.
    pub fn float_dtypes(&self) -> &[DType] {
        &self.float_dtypes
    }

    /// Tensor shapes by torchvision key.
    pub fn shapes(&self) -> &Shapes {
        &self.shapes
    }

    /// Read the architecture and number of classes off the keys and shapes.
    pub fn infer(&self) -> Result<Inferred, ImportError> {
        infer_config(&self.shapes).map_err(|reason| ImportError::NotAResNet {
            path: self.path.clone(),
            reason,
            sample: self
                .shapes
                .keys()
                .take(LISTED)
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Build `config` on `device` and load this checkpoint into it.
    ///
    /// Strict unless `allow_partial`: any missing, unexpected or differently shaped tensor is
    /// an [`ImportError::Mismatch`] listing the first few of each kind with counts. With
    /// `allow_partial`, missing and unexpected tensors are reported in the [`LoadReport`]
    /// (e.g. a backbone without `fc`), but shape mismatches are still errors.
    pub fn load_into(
        self,
        config: &ResNetConfig,
        device: &Device,
        allow_partial: bool,
    ) -> Result<(ResNet, LoadReport), ImportError> {
        config.validate()?;
        let target = config
            .preset_name()
            .map_or_else(|| "the given architecture".to_string(), str::to_string);
        let mut model = config.init(device);
        let adapter = PyTorchToBurnAdapter.chain(FloatCastAdapter::to(DType::F32));
        let result = model.apply(
            self.tensors.into_values().collect(),
            None,
            Some(Box::new(adapter)),
            true,
        );

        let missing: Vec<String> = result
            .missing
            .iter()
            .map(|(path, _)| burn_to_torchvision(&strip_variants(path)))
            .collect();
        let unexpected: Vec<String> = result
            .unused
            .iter()
            .map(|p| burn_to_torchvision(p))
            .collect();
        let errors: Vec<String> = result
            .errors
            .iter()
            .map(|err| {
                one_line(err.to_string())
                    .replace(".Basic.", ".")
                    .replace(".Bottleneck.", ".")
            })
            .collect();
        if !errors.is_empty() || (!allow_partial && (!missing.is_empty() || !unexpected.is_empty()))
        {
            let mut parts = Vec::new();
            for (label, items) in [
                ("missing", &missing),
                ("unexpected", &unexpected),
                ("mismatched", &errors),
            ] {
                if !items.is_empty() {
                    parts.push(format!("{} {label} ({})", items.len(), listed(items)));
                }
            }
            return Err(ImportError::Mismatch {
                path: self.path,
                target,
                details: parts.join("; "),
            });
        }
        Ok((
            model,
            LoadReport {
                applied: result.applied.len(),
                missing,
                unexpected,
            },
        ))
    }
}

/// `layer1.0.Basic.conv1.weight` -> `layer1.0.conv1.weight`.
fn strip_variants(path: &str) -> String {
    path.split('.')
        .filter(|segment| !matches!(*segment, "Basic" | "Bottleneck"))
        .collect::<Vec<_>>()
        .join(".")
}

fn listed(items: &[String]) -> String {
    let mut shown: Vec<&str> = items.iter().take(LISTED).map(String::as_str).collect();
    if items.len() > LISTED {
        shown.push("...");
    }
    shown.join(", ")
}
