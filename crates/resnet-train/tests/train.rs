//! `resnet-train` learns, checkpoints, resumes after SIGKILL, fine-tunes only the head when
//! asked, and refuses bad input with one-line errors.

#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use resnet_train::train::run;

mod common;
use common::{CLASSES, args, head_weights, max_abs_diff, sample_image, shapes_dataset};

/// A narrow CIFAR-stem ResNet-18 on 3 classes of drawn shapes reaches at least 90%
/// validation accuracy (chance: 33%).
#[test]
fn learns_a_small_real_image_task() {
    let dir = tempfile::tempdir().unwrap();
    shapes_dataset(&dir.path().join("data"), 80, 30);
    let out = dir.path().join("run");
    let start = Instant::now();
    let summary = run(
        &args(
            &dir.path().join("data"),
            &out,
            &[
                "--arch",
                "resnet18",
                "--width",
                "8",
                "--cifar-stem",
                "--epochs",
                "8",
                "--batch-size",
                "32",
                "--lr",
                "0.05",
                "--seed",
                "1",
            ],
        ),
        &[Device::flex()],
    )
    .unwrap();
    println!(
        "shapes (3 classes, 240 train / 90 val): validation top-1 {:.1}% after 8 epochs in {:.0?}",
        summary.final_val_acc1 * 100.0,
        start.elapsed()
    );
    assert!(summary.final_val_acc1 >= 0.9, "{}", summary.final_val_acc1);

    // The run's outputs.
    for file in [
        "final.bpk",
        "best.bpk",
        "metrics.csv",
        "curves.png",
        "confusion.csv",
        "confusion.png",
    ] {
        assert!(out.join(file).exists(), "{file} missing");
    }
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(
        csv.lines().next(),
        Some("epoch,split,loss,acc1,acc5,lr,seconds")
    );
    assert_eq!(csv.lines().count(), 1 + 2 * 8, "{csv}");
    let first_train_loss: f64 = csv
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    let last_train_loss: f64 = csv
        .lines()
        .rfind(|l| l.contains(",train,"))
        .unwrap()
        .split(',')
        .nth(2)
        .unwrap()
        .parse()
        .unwrap();
    assert!(last_train_loss < first_train_loss, "{csv}");

    // The final record classifies with the class names it was trained on.
    let (_, meta) = resnet_import::load_record(&out.join("final.bpk"), &Device::flex()).unwrap();
    assert_eq!(meta.classes.unwrap(), CLASSES);
}

/// A small shapes dataset in `dir/data` and a one-epoch record of a narrow network to
/// fine-tune from; returns the record's path.
fn starting_record(dir: &Path) -> std::path::PathBuf {
    shapes_dataset(&dir.join("data"), 10, 4);
    let init = dir.join("init");
    run(
        &args(
            &dir.join("data"),
            &init,
            &[
                "--width",
                "4",
                "--cifar-stem",
                "--epochs",
                "1",
                "--batch-size",
                "16",
            ],
        ),
        &[Device::flex()],
    )
    .unwrap();
    init.join("final.bpk")
}

/// With `--freeze-backbone`, only the head's parameters change.
#[test]
fn frozen_backbone_changes_only_the_head() {
    let dir = tempfile::tempdir().unwrap();
    let start = starting_record(dir.path());
    let out = dir.path().join("frozen");
    let summary = run(
        &args(
            &dir.path().join("data"),
            &out,
            &[
                "--init",
                start.to_str().unwrap(),
                "--freeze-backbone",
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--image-size",
                "32",
            ],
        ),
        &[Device::flex()],
    )
    .unwrap();
    let device = Device::flex();
    let (before, _) = resnet_import::load_record(&start, &device).unwrap();
    let (after, _) = resnet_import::load_record(&summary.final_record, &device).unwrap();
    let values = |m: &resnet_model::ResNet| -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        (
            m.conv1.weight.val().into_data().try_to_vec().unwrap(),
            m.bn1.running_mean.value().into_data().try_to_vec().unwrap(),
            m.fc.weight.val().into_data().try_to_vec().unwrap(),
        )
    };
    let (conv_before, bn_before, fc_before) = values(&before);
    let (conv_after, bn_after, fc_after) = values(&after);
    assert_eq!(conv_before, conv_after, "backbone convolution changed");
    assert_eq!(
        bn_before, bn_after,
        "backbone batch-norm statistics changed"
    );
    assert_ne!(fc_before, fc_after, "the head did not train");
}

/// Data-parallel training (Burn's multi-device strategy) over two replicas of the CPU device
/// makes the same update as one device on the combined batch: each replica takes half of
/// `--batch-size` and the summed gradients are scaled by 1/2. The backbone is frozen so that
/// batch-norm batch statistics (per replica, as in PyTorch's DDP) play no part; one step.
#[test]
fn two_devices_update_like_one_device_on_the_combined_batch() {
    let dir = tempfile::tempdir().unwrap();
    let start = starting_record(dir.path());
    let head = |devices: &[Device], name: &str| -> Vec<f32> {
        let out = dir.path().join(name);
        let summary = run(
            &args(
                &dir.path().join("data"),
                &out,
                &[
                    "--init",
                    start.to_str().unwrap(),
                    "--freeze-backbone",
                    "--epochs",
                    "1",
                    "--warmup-epochs",
                    "0",
                    "--batch-size",
                    "64",
                    "--lr",
                    "0.5",
                    "--image-size",
                    "32",
                ],
            ),
            devices,
        )
        .unwrap();
        head_weights(&summary.final_record)
    };
    let before = head_weights(&start);
    let one = head(&[Device::flex()], "one");
    let two = head(&[Device::flex(), Device::flex()], "two");
    let update = max_abs_diff(&one, &before);
    let diff = max_abs_diff(&one, &two);
    println!("head update {update:e}; one vs two devices {diff:e}");
    assert!(update > 1e-3, "the head barely trained: {update}");
    assert!(
        diff <= 1e-4 * update,
        "one vs two devices differ by {diff} (update {update})"
    );
}

/// Same seed, same run: two trainings with several data-loading threads end with the same
/// weights, bit for bit (batches keep their order whatever the threads' timing).
#[test]
fn same_seed_same_weights_with_several_loader_threads() {
    let dir = tempfile::tempdir().unwrap();
    shapes_dataset(&dir.path().join("data"), 10, 4);
    let weights = |name: &str| -> Vec<f32> {
        let summary = run(
            &args(
                &dir.path().join("data"),
                &dir.path().join(name),
                &[
                    "--width",
                    "4",
                    "--cifar-stem",
                    "--epochs",
                    "2",
                    "--batch-size",
                    "6",
                    "--workers",
                    "3",
                    "--seed",
                    "11",
                ],
            ),
            &[Device::flex()],
        )
        .unwrap();
        let (net, _) = resnet_import::load_record(&summary.final_record, &Device::flex()).unwrap();
        let mut values: Vec<f32> = net.conv1.weight.val().into_data().try_to_vec().unwrap();
        values.extend(net.fc.weight.val().into_data().try_to_vec::<f32>().unwrap());
        values
    };
    let first = weights("first");
    let second = weights("second");
    assert_eq!(first, second);
}

fn train_binary() -> Command {
    Command::new(env!("CARGO_BIN_EXE_resnet-train"))
}

/// SIGKILL in the middle of a run loses at most the current epoch: `--resume-if-present`
/// continues after the last checkpoint and finishes (and, the first time, with no checkpoint
/// yet, starts afresh: the same command line serves a scheduler's restarts).
#[test]
fn resumes_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    shapes_dataset(&data, 40, 10);
    let out = dir.path().join("run");
    let common = [
        "--width",
        "8",
        "--cifar-stem",
        "--epochs",
        "4",
        "--batch-size",
        "16",
        "--seed",
        "3",
    ];
    let mut child = train_binary()
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(common)
        .arg("--resume-if-present")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the first checkpoint, then kill without warning.
    let deadline = Instant::now() + Duration::from_secs(300);
    let checkpoint = out.join("checkpoint/model-1.bpk");
    while !checkpoint.exists() {
        assert!(Instant::now() < deadline, "no checkpoint after 300 s");
        assert!(child.try_wait().unwrap().is_none(), "training ended early");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap(); // SIGKILL on Unix.
    child.wait().unwrap();
    assert!(!out.join("final.bpk").exists());

    let output = train_binary()
        .arg("--data")
        .arg(&data)
        .arg("--out")
        .arg(&out)
        .args(common)
        .arg("--resume-if-present")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("resuming after epoch"), "{stderr}");
    assert!(out.join("final.bpk").exists());
    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    for epoch in 1..=4 {
        for split in ["train", "val"] {
            assert!(
                csv.lines()
                    .any(|l| l.starts_with(&format!("{epoch},{split},"))),
                "epoch {epoch} {split} missing:\n{csv}"
            );
        }
    }
}

fn fails(data: &Path, out: &Path, extra: &[&str], expected: &str) {
    let output = train_binary()
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{extra:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains(expected),
        "{stderr}"
    );
}

#[test]
fn bad_input_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    fails(&empty, &out, &[], "empty");

    let missing = dir.path().join("missing");
    fails(&missing, &out, &[], "missing");

    let one_class = dir.path().join("one");
    std::fs::create_dir_all(one_class.join("cats")).unwrap();
    sample_image().save(one_class.join("cats/a.png")).unwrap();
    fails(&one_class, &out, &["--val-split", "0.5"], "one class");

    let hollow = dir.path().join("hollow");
    std::fs::create_dir_all(hollow.join("cats")).unwrap();
    std::fs::create_dir_all(hollow.join("dogs")).unwrap();
    sample_image().save(hollow.join("cats/a.png")).unwrap();
    fails(&hollow, &out, &["--val-split", "0.5"], "dogs");

    let data = dir.path().join("data");
    shapes_dataset(&data, 2, 1);
    fails(&data, &out, &["--resume"], "no checkpoint");
    fails(
        &data,
        &out,
        &["--arch", "resnet18", "--pretrained", "resnet50:v2"],
        "does not match --arch resnet18",
    );
}

/// `--unfreeze-after 1`: epoch 1 trains only the head, epoch 2 the whole network.
#[test]
fn unfreeze_after_trains_the_backbone_in_the_second_phase() {
    let dir = tempfile::tempdir().unwrap();
    let start = starting_record(dir.path());
    let out = dir.path().join("unfrozen");
    let summary = run(
        &args(
            &dir.path().join("data"),
            &out,
            &[
                "--init",
                start.to_str().unwrap(),
                "--freeze-backbone",
                "--unfreeze-after",
                "1",
                "--epochs",
                "2",
                "--batch-size",
                "16",
                "--image-size",
                "32",
            ],
        ),
        &[Device::flex()],
    )
    .unwrap();
    let device = Device::flex();
    let (before, _) = resnet_import::load_record(&start, &device).unwrap();
    let (after, _) = resnet_import::load_record(&summary.final_record, &device).unwrap();
    let conv = |m: &resnet_model::ResNet| -> Vec<f32> {
        m.conv1.weight.val().into_data().try_to_vec().unwrap()
    };
    assert_ne!(conv(&before), conv(&after), "the backbone never trained");
    let epochs: Vec<usize> = summary
        .metrics
        .iter()
        .filter(|row| row.split == "train")
        .map(|row| row.epoch)
        .collect();
    assert_eq!(epochs, [1, 2]);

    let err = run(
        &args(
            &dir.path().join("data"),
            &dir.path().join("bad"),
            &[
                "--freeze-backbone",
                "--unfreeze-after",
                "3",
                "--epochs",
                "2",
            ],
        ),
        std::slice::from_ref(&device),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("--unfreeze-after"), "{err}");
}
