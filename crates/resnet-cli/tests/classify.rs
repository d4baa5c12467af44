//! `resnet classify`, `resnet preprocess` and `resnet bench` end to end, with a tiny imported
//! model (no network, no ImageNet weights needed).

#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use assert_cmd::Command;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../resnet-import/tests/fixtures")
}

fn image(name: &str) -> PathBuf {
    fixtures().join("images").join(name)
}

fn resnet() -> Command {
    Command::cargo_bin("resnet").unwrap()
}

/// Imports the 10-class tiny BasicBlock fixture as a record in `dir`.
fn tiny_record(dir: &Path) -> PathBuf {
    let record = dir.join("tiny.bpk");
    let output = resnet()
        .arg("import")
        .arg(fixtures().join("tiny_basic.pth"))
        .arg("--out")
        .arg(&record)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    record
}

fn run(args: &[&OsStr]) -> (Option<i32>, String, String) {
    let output = resnet().args(args).output().unwrap();
    (
        output.status.code(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

fn os<S: AsRef<OsStr> + ?Sized>(s: &S) -> &OsStr {
    s.as_ref()
}

#[derive(serde::Deserialize)]
struct Prediction {
    path: String,
    indices: Vec<usize>,
    labels: Vec<String>,
    probabilities: Vec<f32>,
}

#[test]
fn classify_prints_top_k_and_matches_preprocess_plus_forward() {
    let dir = tempfile::tempdir().unwrap();
    let record = tiny_record(dir.path());
    let (code, stdout, stderr) = run(&[
        os("classify"),
        image("chelsea.jpg").as_os_str(),
        image("coffee.png").as_os_str(),
        os("--weights"),
        record.as_os_str(),
        os("--resize"),
        os("40"),
        os("--crop"),
        os("32"),
        os("--top-k"),
        os("3"),
        os("--json"),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let predictions: Vec<Prediction> = stdout
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(predictions.len(), 2);
    for p in &predictions {
        assert_eq!(p.indices.len(), 3);
        assert!(p.probabilities.windows(2).all(|w| w[0] >= w[1]));
        assert!(p.probabilities.iter().sum::<f32>() <= 1.0 + 1e-6);
        assert_eq!(p.labels[0], format!("class {}", p.indices[0]));
    }
    assert!(predictions[0].path.ends_with("chelsea.jpg"));

    // The same numbers through `preprocess` + `forward`.
    let x = dir.path().join("x.npy");
    let y = dir.path().join("y.npy");
    let (code, _, stderr) = run(&[
        os("preprocess"),
        image("chelsea.jpg").as_os_str(),
        os("--resize"),
        os("40"),
        os("--crop"),
        os("32"),
        os("--output"),
        x.as_os_str(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let (shape, _) = resnet_import::npy::read_f32(&x).unwrap();
    assert_eq!(shape, [1, 3, 32, 32]);
    let (code, _, stderr) = run(&[
        os("forward"),
        os("--weights"),
        record.as_os_str(),
        os("--input"),
        x.as_os_str(),
        os("--output"),
        y.as_os_str(),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let (_, logits) = resnet_import::npy::read_f32(&y).unwrap();
    let max = logits.iter().copied().fold(f32::MIN, f32::max);
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    for (&index, &probability) in predictions[0]
        .indices
        .iter()
        .zip(&predictions[0].probabilities)
    {
        let expected = (logits[index] - max).exp() / sum;
        assert!(
            (expected - probability).abs() < 1e-5,
            "{expected} vs {probability}"
        );
    }

    // Text output: the path, then one line per class.
    let (code, stdout, _) = run(&[
        os("classify"),
        image("chelsea.jpg").as_os_str(),
        os("--weights"),
        record.as_os_str(),
        os("--crop"),
        os("32"),
        os("--resize"),
        os("36"),
    ]);
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    assert!(lines[1].trim_start().contains("% "), "{stdout}");
}

#[test]
fn unusual_but_valid_images_are_classified() {
    let dir = tempfile::tempdir().unwrap();
    let record = tiny_record(dir.path());
    for name in [
        "gray.png",
        "rgba.png",
        "gray16.png",
        "palette.gif",
        "small.webp",
        "small.bmp",
        "exif_rotated.jpg",
        "one_pixel.png",
    ] {
        let (code, stdout, stderr) = run(&[
            os("classify"),
            image(name).as_os_str(),
            os("--weights"),
            record.as_os_str(),
            os("--resize"),
            os("36"),
            os("--crop"),
            os("32"),
            os("--json"),
        ]);
        assert_eq!(code, Some(0), "{name}: {stderr}");
        assert_eq!(stdout.lines().count(), 1, "{name}");
    }
}

#[test]
fn bad_images_are_skipped_with_a_warning_and_fail_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let record = tiny_record(dir.path());
    let mixed = dir.path().join("mixed");
    std::fs::create_dir(&mixed).unwrap();
    std::fs::copy(image("chelsea.jpg"), mixed.join("cat.JPG")).unwrap();
    std::fs::copy(image("not_an_image.jpg"), mixed.join("text.jpg")).unwrap();
    std::fs::copy(image("empty.jpg"), mixed.join("empty.jpeg")).unwrap();
    std::fs::write(mixed.join("notes.txt"), "not an image, not looked at").unwrap();

    let (code, stdout, stderr) = run(&[
        os("classify"),
        mixed.as_os_str(),
        os("--weights"),
        record.as_os_str(),
        os("--resize"),
        os("36"),
        os("--crop"),
        os("32"),
        os("--json"),
    ]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(stdout.contains("cat.JPG"));
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), 2, "{stderr}");
    assert!(
        stderr.contains("text.jpg") && stderr.contains("empty.jpeg"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        stderr
            .lines()
            .last()
            .unwrap()
            .starts_with("error: 2 input(s)"),
        "{stderr}"
    );
}

/// Runs classify with `args`, expects exit 1 and a one-line `error:` containing `expected`.
fn fails_with(args: &[&OsStr], expected: &str) {
    let (code, stdout, stderr) = run(args);
    assert_eq!(code, Some(1), "{args:?}: {stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains(expected),
        "{stderr}"
    );
}

#[test]
fn unusable_inputs_and_weights_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let record = tiny_record(dir.path());
    let empty_dir = dir.path().join("nothing");
    std::fs::create_dir(&empty_dir).unwrap();
    let missing = dir.path().join("missing.jpg");
    let cat = image("chelsea.jpg");
    let w = record.as_os_str();

    fails_with(
        &[os("classify"), empty_dir.as_os_str(), os("--weights"), w],
        "no images",
    );
    fails_with(
        &[os("classify"), missing.as_os_str(), os("--weights"), w],
        "missing.jpg",
    );
    fails_with(
        &[
            os("classify"),
            cat.as_os_str(),
            os("--arch"),
            os("resnet51"),
        ],
        "unknown architecture `resnet51`",
    );
    fails_with(
        &[
            os("classify"),
            cat.as_os_str(),
            os("--arch"),
            os("resnet18"),
            os("--weights"),
            os("v2"),
        ],
        "no IMAGENET1K_V2 weights for resnet18",
    );
    fails_with(
        &[
            os("classify"),
            cat.as_os_str(),
            os("--arch"),
            os("resnet50"),
            os("--weights"),
            w,
        ],
        "not resnet50",
    );
    fails_with(
        &[
            os("classify"),
            cat.as_os_str(),
            os("--weights"),
            image("not_an_image.jpg").as_os_str(),
        ],
        "not_an_image.jpg",
    );
    fails_with(
        &[
            os("classify"),
            cat.as_os_str(),
            os("--weights"),
            w,
            os("--top-k"),
            os("0"),
        ],
        "--top-k",
    );
}

#[test]
fn bench_reports_latency_and_throughput() {
    let (code, stdout, stderr) = run(&[
        os("bench"),
        os("--arch"),
        os("resnet18"),
        os("--batch-size"),
        os("2"),
        os("--image-size"),
        os("64"),
        os("--iters"),
        os("3"),
        os("--warmup"),
        os("1"),
        os("--json"),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["backend"], "flex");
    assert_eq!(report["batch_size"], 2);
    assert_eq!(report["batchnorm_folded"], true);
    let median = report["median_ms"].as_f64().unwrap();
    assert!(median > 0.0);
    assert!(report["min_ms"].as_f64().unwrap() <= median);
    assert!(report["max_ms"].as_f64().unwrap() >= median);
    let mean = report["mean_ms"].as_f64().unwrap();
    assert!(
        report["min_ms"].as_f64().unwrap() <= mean && mean <= report["max_ms"].as_f64().unwrap()
    );
    let throughput = report["images_per_second"].as_f64().unwrap();
    assert!((throughput - 2.0 / (mean / 1e3)).abs() < 1e-6 * throughput);
}

#[test]
fn bench_no_fold_keeps_the_batch_norms() {
    let (code, stdout, stderr) = run(&[
        os("bench"),
        os("--arch"),
        os("resnet18"),
        os("--batch-size"),
        os("1"),
        os("--image-size"),
        os("32"),
        os("--iters"),
        os("1"),
        os("--warmup"),
        os("0"),
        os("--no-fold"),
        os("--json"),
    ]);
    assert_eq!(code, Some(0), "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(report["batchnorm_folded"], false);
}

/// `--weights v1` reuses the record imported on first use (here placed in the cache by the
/// test, with random weights: no network is touched) and labels with ImageNet's classes.
#[test]
fn torchvision_weights_are_reused_from_the_cache() {
    use burn::tensor::Device;
    use resnet_import::{Preprocessing, RecordMeta, registry::IMAGENET_CLASSES, save_record};
    use resnet_model::ResNetConfig;

    let cache = tempfile::tempdir().unwrap();
    let config = ResNetConfig::resnet18();
    let model = config.init(&Device::flex());
    let mut meta = RecordMeta::new(config);
    meta.classes = Some(IMAGENET_CLASSES.iter().map(|c| c.to_string()).collect());
    meta.preprocessing = Some(Preprocessing::imagenet(256));
    let record = cache.path().join("records/resnet18-IMAGENET1K_V1.bpk");
    save_record(&model, &meta, &record).unwrap();

    let output = resnet()
        .env("RESNET_CACHE", cache.path())
        .args([
            "classify",
            "--arch",
            "resnet18",
            "--weights",
            "v1",
            "--json",
        ])
        .arg(image("chelsea.jpg"))
        .output()
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let prediction: Prediction = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(prediction.labels.len(), 5);
    assert_eq!(
        prediction.labels[0],
        IMAGENET_CLASSES[prediction.indices[0]]
    );

    // A cached record of another architecture is refused, not silently used.
    std::fs::rename(
        &record,
        cache.path().join("records/resnet34-IMAGENET1K_V1.bpk"),
    )
    .unwrap();
    let output = resnet()
        .env("RESNET_CACHE", cache.path())
        .args(["classify", "--arch", "resnet34", "--weights", "v1"])
        .arg(image("chelsea.jpg"))
        .output()
        .unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr.contains("the cached record is not resnet34"),
        "{stderr}"
    );
}
