//! Errors of this crate.

use crate::resnet::ARCHITECTURES;

/// A configuration that cannot be built, or a name that is not a preset.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The name is not one of torchvision's ResNet architectures.
    #[error("unknown architecture `{0}`; valid names: {names}", names = ARCHITECTURES.join(", "))]
    UnknownArchitecture(String),
    /// The settings contradict each other (e.g. a grouped BasicBlock).
    #[error("invalid ResNet configuration: {0}")]
    Invalid(String),
    /// The input is smaller than the stem's receptive field.
    #[error("input of {height}x{width} pixels is too small for this network")]
    InputTooSmall {
        /// Input height.
        height: usize,
        /// Input width.
        width: usize,
    },
}
