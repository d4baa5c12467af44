//! Helpers shared by the `resnet` command tests.

#![allow(dead_code)] // Not every test file uses each helper.

use std::path::{Path, PathBuf};

use assert_cmd::Command;

/// A file of resnet-import's test fixtures (tiny PyTorch checkpoints and their outputs).
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../resnet-import/tests/fixtures")
        .join(name)
}

/// The `resnet` binary under test.
pub fn resnet() -> Command {
    Command::cargo_bin("resnet").expect("the resnet binary is built")
}

/// A float32 `.npy` file's values.
pub fn read_npy(path: &Path) -> Vec<f32> {
    resnet_import::npy::read_f32(path).expect("readable npy").1
}
