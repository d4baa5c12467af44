//! One record, every backend: `resnet --backend NAME forward` reproduces PyTorch's logits on
//! each backend under test, and the backends agree with each other.
//!
//! The backends under test are those in `RESNET_TEST_BACKENDS` (comma-separated, e.g.
//! `flex,ndarray,wgpu`; each must be compiled in, else the test fails), or by default the
//! compiled-in backends that run without a GPU or libtorch (flex, ndarray, wgpu). CI builds
//! this test with `--features wgpu,ndarray` and runs wgpu on Mesa's lavapipe (Vulkan on the CPU).

use std::path::Path;

use resnet_test_support::{generate_full_size, python_or_skip};
use resnet_train::backend::Backend;

mod common;
use common::{fixture, read_npy, resnet};

/// Largest tolerated `max |ours - PyTorch| / max |PyTorch|` over the logits, as the CPU parity
/// tests use.
const RELATIVE_TOLERANCE: f32 = 1e-4;

/// `max |a - b| / max |b|`.
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

/// The backends this run tests (see the module docs).
fn backends_under_test() -> Vec<Backend> {
    let output = resnet().arg("backends").output().expect("resnet runs");
    assert!(output.status.success(), "{output:?}");
    let compiled = Backend::parse_list(&String::from_utf8_lossy(&output.stdout).replace('\n', ","))
        .expect("backend names");
    match std::env::var("RESNET_TEST_BACKENDS") {
        Ok(list) => {
            let wanted = Backend::parse_list(&list).expect("RESNET_TEST_BACKENDS");
            for backend in &wanted {
                assert!(
                    compiled.contains(backend),
                    "RESNET_TEST_BACKENDS names `{}`, which this build lacks: build the tests \
                     with `--features {}`",
                    backend.cli_name(),
                    backend.feature()
                );
            }
            wanted
        }
        Err(_) => compiled
            .into_iter()
            .filter(|b| matches!(b, Backend::Flex | Backend::Ndarray | Backend::Wgpu))
            .collect(),
    }
}

/// Runs `resnet --backend NAME forward` and returns the logits and the "running on" line.
fn forward(backend: Backend, weights: &Path, input: &Path, out: &Path) -> (Vec<f32>, String) {
    let output = resnet()
        .arg("--backend")
        .arg(backend.cli_name())
        .arg("forward")
        .arg("--weights")
        .arg(weights)
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(out)
        .output()
        .expect("resnet runs");
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{}: {stderr}", backend.cli_name());
    let running_on = stderr
        .lines()
        .find(|line| line.starts_with("running on "))
        .unwrap_or_else(|| panic!("no `running on` line: {stderr}"))
        .to_string();
    (read_npy(out), running_on)
}

#[test]
fn every_backend_reproduces_pytorch_on_the_tiny_models() {
    let backends = backends_under_test();
    println!(
        "backends under test: {:?}",
        backends.iter().map(|b| b.cli_name()).collect::<Vec<_>>()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out.npy");
    for model in [
        "tiny_basic",
        "tiny_bottleneck",
        "tiny_cifar",
        "tiny_resnext",
    ] {
        // A record imported once, then run on every backend.
        let record = dir.path().join(format!("{model}.bpk"));
        let status = resnet()
            .arg("import")
            .arg(fixture(&format!("{model}.pth")))
            .arg("--out")
            .arg(&record)
            .output()
            .expect("resnet runs");
        assert!(status.status.success(), "{status:?}");
        let expected = read_npy(&fixture(&format!("{model}.logits.npy")));
        let mut first: Option<(Backend, Vec<f32>)> = None;
        for &backend in &backends {
            let (logits, running_on) = forward(backend, &record, &fixture("input.npy"), &out);
            assert!(
                running_on.ends_with(&format!("({})", backend.cli_name())),
                "{running_on}"
            );
            let error = relative_error(&logits, &expected);
            println!(
                "{model} on {}: relative error vs PyTorch {error:e}; {running_on}",
                backend.cli_name()
            );
            assert!(
                error <= RELATIVE_TOLERANCE,
                "{model} on {}: {error}",
                backend.cli_name()
            );
            match &first {
                None => first = Some((backend, logits)),
                Some((other, reference)) => {
                    let error = relative_error(&logits, reference);
                    assert!(
                        error <= RELATIVE_TOLERANCE,
                        "{model}: {} vs {}: {error}",
                        backend.cli_name(),
                        other.cli_name()
                    );
                }
            }
        }
    }
}

/// Full-size ResNet-18 and ResNeXt-50 (grouped convolutions) checkpoints written by torchvision
/// reproduce PyTorch's logits on every backend under test. Skips (saying so) without Python
/// torch, unless `RESNET_REQUIRE_FULL_SIZE=1`.
#[test]
fn every_backend_reproduces_pytorch_at_full_size() {
    let Some(python) = python_or_skip("full-size backend parity") else {
        return;
    };
    let backends = backends_under_test();
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("out.npy");
    for arch in ["resnet18", "resnext50_32x4d"] {
        generate_full_size(&python, dir.path(), arch);
        let checkpoint = dir.path().join(format!("{arch}.pth"));
        let expected = read_npy(&dir.path().join(format!("{arch}.logits.npy")));
        for &backend in &backends {
            let start = std::time::Instant::now();
            let (logits, running_on) =
                forward(backend, &checkpoint, &dir.path().join("input.npy"), &out);
            let error = relative_error(&logits, &expected);
            println!(
                "{arch} on {}: relative error vs PyTorch {error:e} ({:.1} s, first run \
                 included); {running_on}",
                backend.cli_name(),
                start.elapsed().as_secs_f64()
            );
            assert!(
                error <= RELATIVE_TOLERANCE,
                "{arch} on {}: {error}",
                backend.cli_name()
            );
        }
        std::fs::remove_file(&checkpoint).expect("remove checkpoint");
    }
}
