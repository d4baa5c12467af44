//! Training runs on every backend under test with autodiff: a short run lowers the training
//! loss.
//!
//! The backends under test are those in `RESNET_TEST_BACKENDS` (comma-separated; each must be
//! compiled in, else the test fails), or by default every compiled-in backend that runs without
//! a GPU or libtorch (flex, ndarray, wgpu). CI builds this test with `--features wgpu,ndarray`
//! and runs wgpu on Mesa's lavapipe.

#![allow(clippy::unwrap_used)] // Test: a failed unwrap is a failed test.

use burn::tensor::Device;
use resnet_import::{RecordMeta, save_record};
use resnet_model::ResNetConfig;
use resnet_train::backend::{Backend, describe};
use resnet_train::train::run;

mod common;
use common::{args, shapes_dataset};

fn backends_under_test() -> Vec<Backend> {
    match std::env::var("RESNET_TEST_BACKENDS") {
        Ok(list) => {
            let wanted = Backend::parse_list(&list).unwrap();
            for backend in &wanted {
                assert!(
                    backend.is_compiled(),
                    "RESNET_TEST_BACKENDS names `{}`, which this build lacks: build the tests \
                     with `--features {}`",
                    backend.cli_name(),
                    backend.feature()
                );
            }
            wanted
        }
        Err(_) => Backend::compiled()
            .into_iter()
            .filter(|b| matches!(b, Backend::Flex | Backend::Ndarray | Backend::Wgpu))
            .collect(),
    }
}

/// Every backend starts from the same weights (initialized once on the CPU), so their
/// training losses follow the same course up to float rounding.
#[test]
fn training_lowers_the_loss_on_every_backend() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    shapes_dataset(&data, 24, 6);
    let config = ResNetConfig::resnet18()
        .with_cifar_stem(true)
        .with_stem_channels(4)
        .with_stage_planes([4, 8, 16, 32])
        .with_num_classes(3);
    let start = dir.path().join("start.bpk");
    let meta = RecordMeta {
        config: config.clone(),
        weights: None,
        classes: None,
        preprocessing: None,
    };
    let cpu = Device::flex();
    cpu.seed(3);
    save_record(&config.init(&cpu), &meta, &start).unwrap();
    let mut reference: Option<(Backend, Vec<f64>)> = None;
    for backend in backends_under_test() {
        let device = backend.device().unwrap();
        let out = dir.path().join(backend.cli_name());
        let summary = run(
            &args(
                &data,
                &out,
                &[
                    "--init",
                    start.to_str().unwrap(),
                    "--image-size",
                    "32",
                    "--epochs",
                    "3",
                    "--batch-size",
                    "24",
                    "--lr",
                    "0.05",
                    "--warmup-epochs",
                    "0",
                    "--workers",
                    "1",
                ],
            ),
            std::slice::from_ref(&device),
        )
        .unwrap();
        let losses: Vec<f64> = summary
            .metrics
            .iter()
            .filter(|row| row.split == "train")
            .map(|row| row.loss)
            .collect();
        println!(
            "{} on {}: training loss per epoch {losses:?}",
            backend.cli_name(),
            describe(backend, &device)
        );
        assert_eq!(losses.len(), 3);
        assert!(losses.iter().all(|loss| loss.is_finite()), "{losses:?}");
        // flex goes from 1.25 to 0.97 in three epochs.
        assert!(
            losses[2] < 0.95 * losses[0],
            "{}: {losses:?}",
            backend.cli_name()
        );
        // Measured: the backends agree to 1.5% after three epochs (rounding differences grow
        // with every step).
        match &reference {
            None => reference = Some((backend, losses)),
            Some((other, expected)) => {
                for (loss, expected) in losses.iter().zip(expected) {
                    assert!(
                        (loss - expected).abs() <= 0.05 * expected,
                        "{} {losses:?} vs {} {expected:?}",
                        backend.cli_name(),
                        other.cli_name()
                    );
                }
            }
        }
    }
}
