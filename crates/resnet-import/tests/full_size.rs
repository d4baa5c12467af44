//! Every torchvision preset, full size: a checkpoint written by torchvision imports and
//! reproduces PyTorch's logits within 1e-4 relative error.
//!
//! The checkpoints are generated on the fly by `tests/fixtures/full_size.py` (about 2 GB for
//! all ten, so nothing is committed). It needs a Python with torch and torchvision: the one in
//! `$RESNET_PYTHON`, else `<workspace>/.venv/bin/python`, else `python3`. Without one the test
//! prints a SKIP line and passes, unless `RESNET_REQUIRE_FULL_SIZE=1` (set by CI) makes that a
//! failure.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use resnet_import::{ImportOptions, import_checkpoint, npy};
use resnet_model::ARCHITECTURES;

/// Largest tolerated `max |ours - PyTorch| / max |PyTorch|` over the logits.
const RELATIVE_TOLERANCE: f32 = 1e-4;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A Python that can import torch and torchvision, if any.
fn python() -> Option<String> {
    let venv = workspace().join(".venv/bin/python");
    let candidates = std::env::var("RESNET_PYTHON")
        .ok()
        .into_iter()
        .chain([venv.display().to_string(), "python3".to_string()]);
    candidates.into_iter().find(|python| {
        Command::new(python)
            .args(["-c", "import torch, torchvision, numpy"])
            .output()
            .is_ok_and(|out| out.status.success())
    })
}

fn read(path: &Path) -> (Vec<usize>, Vec<f32>) {
    npy::read_f32(path).unwrap_or_else(|err| panic!("{err}"))
}

#[test]
fn every_preset_matches_pytorch_at_full_size() {
    let Some(python) = python() else {
        let message = "SKIP full-size parity: no Python with torch and torchvision \
                       (set RESNET_PYTHON, or `pip install torch torchvision` into .venv)";
        if std::env::var("RESNET_REQUIRE_FULL_SIZE").is_ok_and(|v| v == "1") {
            panic!("{message}, but RESNET_REQUIRE_FULL_SIZE=1");
        }
        println!("{message}");
        return;
    };
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/full_size.py");
    let dir = tempfile::tempdir().expect("temp dir");
    let device = Device::flex();
    let mut worst = 0.0f32;
    for arch in ARCHITECTURES {
        let status = Command::new(&python)
            .arg(&script)
            .arg(dir.path())
            .arg(arch)
            .status()
            .expect("python runs");
        assert!(status.success(), "full_size.py failed for {arch}");

        let checkpoint = dir.path().join(format!("{arch}.pth"));
        let imported = import_checkpoint(&checkpoint, &ImportOptions::default(), &device)
            .unwrap_or_else(|err| panic!("{err}"));
        assert_eq!(imported.inferred.config.preset_name(), Some(arch));
        let model = imported.model.valid();

        let (shape, values) = read(&dir.path().join("input.npy"));
        let shape: [usize; 4] = shape.try_into().expect("NCHW input");
        let input = Tensor::<4>::from_data(TensorData::new(values, shape), &device);
        let logits: Vec<f32> = model.forward(input).into_data().try_to_vec().expect("f32");
        let (_, expected) = read(&dir.path().join(format!("{arch}.logits.npy")));
        assert_eq!(logits.len(), expected.len());
        let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = logits
            .iter()
            .zip(&expected)
            .fold(0.0f32, |m, (a, e)| m.max((a - e).abs()));
        let relative = diff / scale;
        println!("{arch}: max |logits - PyTorch| = {diff:e} (relative {relative:e})");
        assert!(
            relative <= RELATIVE_TOLERANCE,
            "{arch}: relative error {relative}"
        );
        worst = worst.max(relative);
        std::fs::remove_file(&checkpoint).expect("remove checkpoint");
    }
    println!(
        "full-size parity: worst relative error {worst:e} over {} presets",
        ARCHITECTURES.len()
    );
}
