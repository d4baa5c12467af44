//! Import torchvision ResNet checkpoints (`.pth`, `.safetensors`) into `resnet-model` records,
//! exactly: an imported model computes what PyTorch computes (tested to 1e-5 on tiny models and
//! 1e-4 relative on every full-size preset).
//!
//! - [`Checkpoint`] reads a checkpoint without running pickle code, finds the `state_dict`
//!   however it is nested or prefixed, maps torchvision's keys onto `resnet-model`
//!   ([`keymap`]), infers the architecture ([`infer`]), and loads it, strictly by default.
//! - [`record`] writes and reads Burnpack (`.bpk`) records that carry their configuration.
//! - [`registry`] lists torchvision's ImageNet weights; [`download`] fetches them into a
//!   verified cache.
//! - [`npy`] exchanges tensors with numpy.

mod checkpoint;
pub mod download;
mod error;
mod import;
pub mod infer;
pub mod keymap;
pub mod npy;
pub mod preprocess;
pub mod record;
pub mod registry;

pub use checkpoint::{Checkpoint, Format, LoadReport};
pub use error::ImportError;
pub use import::{
    ImportOptions, Imported, find_weights, import_checkpoint, import_pretrained, load_model,
};
pub use infer::Inferred;
pub use record::{Preprocessing, RecordMeta, load_record, save_record};
