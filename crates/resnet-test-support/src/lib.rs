//! Helpers shared by resnet-rs's parity tests: finding a Python with torch and torchvision,
//! and running the generator of torchvision's full-size reference checkpoints
//! (`crates/resnet-import/tests/fixtures/full_size.py`).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A Python that can import torch, torchvision and numpy: the one in `$RESNET_PYTHON`, else
/// `<workspace>/.venv/bin/python`, else `python3`; `None` if none of them can.
pub fn python_with_torch() -> Option<String> {
    let venv = workspace().join(".venv/bin/python");
    std::env::var("RESNET_PYTHON")
        .ok()
        .into_iter()
        .chain([venv.display().to_string(), "python3".to_string()])
        .find(|python| {
            Command::new(python)
                .args(["-c", "import torch, torchvision, numpy"])
                .output()
                .is_ok_and(|out| out.status.success())
        })
}

/// [`python_with_torch`] for a test that needs it. Without one the test should pass after
/// saying so: this prints `SKIP <what>: ...` and returns `None`, unless
/// `RESNET_REQUIRE_FULL_SIZE=1` (set by CI), which makes it a failure (a panic).
pub fn python_or_skip(what: &str) -> Option<String> {
    let python = python_with_torch();
    if python.is_none() {
        let message = format!(
            "SKIP {what}: no Python with torch and torchvision (set RESNET_PYTHON, or \
             `pip install torch torchvision` into .venv)"
        );
        if std::env::var("RESNET_REQUIRE_FULL_SIZE").is_ok_and(|v| v == "1") {
            panic!("{message}, but RESNET_REQUIRE_FULL_SIZE=1");
        }
        println!("{message}");
    }
    python
}

/// Runs `full_size.py` with `python` for `arch` (a torchvision preset name), writing
/// `<arch>.pth`, `<arch>.logits.npy` and `input.npy` into `dir`. Panics if it fails twice:
/// the one retry is for the generator, not the code under test, which once crashed at
/// interpreter shutdown on CI's Debian torch after writing its files.
pub fn generate_full_size(python: &str, dir: &Path, arch: &str) {
    let script = workspace().join("crates/resnet-import/tests/fixtures/full_size.py");
    let succeeded = (0..2).any(|_| {
        let status = Command::new(python)
            .arg(&script)
            .arg(dir)
            .arg(arch)
            .status()
            .unwrap_or_else(|err| panic!("cannot run {python}: {err}"));
        if !status.success() {
            println!("full_size.py {arch}: {status}");
        }
        status.success()
    });
    assert!(succeeded, "full_size.py failed twice for {arch}");
}
