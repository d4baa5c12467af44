//! Errors of the importer.

use std::path::PathBuf;

use resnet_model::ConfigError;

/// Why a checkpoint could not be imported or a record could not be read or written.
///
/// Every message is one line, naming the file it is about.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The file does not exist.
    #[error("{}: no such file", .0.display())]
    NotFound(PathBuf),
    /// The file exists but is empty.
    #[error("{}: the file is empty", .0.display())]
    Empty(PathBuf),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The file is not a readable PyTorch (`.pth`) or safetensors checkpoint.
    #[error("{}: not a readable {format} checkpoint ({message})", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The format it was read as.
        format: &'static str,
        /// The reader's explanation, on one line.
        message: String,
    },
    /// The checkpoint's tensors do not look like a torchvision ResNet `state_dict`.
    #[error("{}: not a ResNet state_dict: {reason} (keys: {sample})", path.display())]
    NotAResNet {
        /// The file.
        path: PathBuf,
        /// What is missing or inconsistent.
        reason: String,
        /// The first few tensor names found.
        sample: String,
    },
    /// The checkpoint is a ResNet, but not the architecture it is loaded into.
    #[error("{}: checkpoint does not fit {target}: {details}", path.display())]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// The architecture it was loaded into.
        target: String,
        /// Missing, unexpected and shape-mismatched keys (first few of each, with counts).
        details: String,
    },
    /// The requested or inferred configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The registry has no such weights.
    #[error("no {version} weights for {arch} (available: {available})")]
    UnknownWeights {
        /// The architecture.
        arch: String,
        /// The version asked for.
        version: String,
        /// The versions that exist.
        available: String,
    },
    /// Fetching a checkpoint failed.
    #[error(transparent)]
    Download(#[from] crate::download::DownloadError),
    /// A model record (`.bpk`) is missing its configuration or is otherwise unusable.
    #[error("{}: {message}", path.display())]
    Record {
        /// The record.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
}

/// An I/O error on `path`: [`ImportError::NotFound`] when the file is missing.
pub(crate) fn io_error(path: &std::path::Path, source: std::io::Error) -> ImportError {
    if source.kind() == std::io::ErrorKind::NotFound {
        ImportError::NotFound(path.into())
    } else {
        ImportError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Collapse a multi-line message from a dependency onto one line.
pub(crate) fn one_line(message: impl std::fmt::Display) -> String {
    message
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
