//! Imported tiny torchvision-layout checkpoints reproduce PyTorch's numbers.
//!
//! The fixtures and their reference outputs come from `tests/fixtures/make_fixtures.py`
//! (PyTorch on the CPU, eval mode); no Python is needed to run these tests.

#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::tensor::{DType, Device, Tensor, TensorData};
use resnet_import::{
    Checkpoint, ImportError, ImportOptions, RecordMeta, import_checkpoint, load_record, npy,
    save_record,
};
use resnet_model::{BlockKind, ResNet, ResNetConfig};

/// Largest tolerated absolute difference from PyTorch's logits and features (float32, tiny
/// models; observed differences are around 1e-6).
const TOLERANCE: f32 = 1e-5;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn device() -> Device {
    Device::flex()
}

fn input(device: &Device) -> Tensor<4> {
    let (shape, values) = npy::read_f32(&fixture("input.npy")).unwrap();
    let shape: [usize; 4] = shape.try_into().unwrap();
    Tensor::from_data(TensorData::new(values, shape), device)
}

fn max_abs_diff(actual: Tensor<2>, expected_npy: &str) -> f32 {
    let (shape, expected) = npy::read_f32(&fixture(expected_npy)).unwrap();
    assert_eq!(actual.dims().to_vec(), shape, "{expected_npy}");
    let actual: Vec<f32> = actual.into_data().try_to_vec().unwrap();
    actual
        .iter()
        .zip(&expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0.0, f32::max)
}

fn expected_config(name: &str) -> ResNetConfig {
    #[derive(serde::Deserialize)]
    struct Json {
        block: String,
        layers: [usize; 4],
        num_classes: usize,
        in_channels: usize,
        groups: usize,
        width_per_group: usize,
        cifar_stem: bool,
        stem_channels: usize,
        stage_planes: [usize; 4],
    }
    let text = std::fs::read_to_string(fixture(&format!("{name}.json"))).unwrap();
    let json: Json = serde_json::from_str(&text).unwrap();
    let block = match json.block.as_str() {
        "Basic" => BlockKind::Basic,
        "Bottleneck" => BlockKind::Bottleneck,
        other => panic!("unknown block {other}"),
    };
    ResNetConfig::new(block, json.layers)
        .with_num_classes(json.num_classes)
        .with_in_channels(json.in_channels)
        .with_groups(json.groups)
        .with_width_per_group(json.width_per_group)
        .with_cifar_stem(json.cifar_stem)
        .with_stem_channels(json.stem_channels)
        .with_stage_planes(json.stage_planes)
}

fn import(file: &str) -> ResNet {
    let imported = import_checkpoint(&fixture(file), &ImportOptions::default(), &device())
        .unwrap_or_else(|err| panic!("{file}: {err}"));
    imported.model.valid()
}

#[test]
fn tiny_models_match_pytorch() {
    let device = device();
    for name in [
        "tiny_basic",
        "tiny_bottleneck",
        "tiny_resnext",
        "tiny_cifar",
    ] {
        let checkpoint = Checkpoint::open(fixture(&format!("{name}.pth"))).unwrap();
        let inferred = checkpoint.infer().unwrap();
        assert_eq!(inferred.config, expected_config(name), "{name}");
        assert!(inferred.has_head);
        let (model, report) = checkpoint
            .load_into(&inferred.config, &device, false)
            .unwrap();
        assert!(report.missing.is_empty() && report.unexpected.is_empty());
        let model = model.valid();

        let logits = max_abs_diff(model.forward(input(&device)), &format!("{name}.logits.npy"));
        let features = max_abs_diff(
            model.forward_features(input(&device)),
            &format!("{name}.features.npy"),
        );
        println!("{name}: max |logits - PyTorch| = {logits:e}, features {features:e}");
        assert!(logits <= TOLERANCE, "{name}: logits differ by {logits}");
        assert!(
            features <= TOLERANCE,
            "{name}: features differ by {features}"
        );
    }
}

#[test]
fn every_container_variant_gives_the_same_numbers() {
    let device = device();
    for (file, reference, prefix) in [
        ("tiny_basic.safetensors", "tiny_basic.logits.npy", ""),
        ("tiny_basic.legacy.pth", "tiny_basic.logits.npy", ""),
        (
            "tiny_basic.prefixed.pth",
            "tiny_basic.logits.npy",
            "state_dict.module.",
        ),
        ("tiny_basic.fp16.pth", "tiny_basic.fp16.logits.npy", ""),
        ("tiny_basic.bf16.pth", "tiny_basic.bf16.logits.npy", ""),
    ] {
        let checkpoint = Checkpoint::open(fixture(file)).unwrap();
        assert_eq!(checkpoint.prefix(), prefix, "{file}");
        let model = import(file);
        let diff = max_abs_diff(model.forward(input(&device)), reference);
        println!("{file}: max |logits - PyTorch| = {diff:e}");
        assert!(diff <= TOLERANCE, "{file}: logits differ by {diff}");
    }
    let half = Checkpoint::open(fixture("tiny_basic.fp16.pth")).unwrap();
    assert_eq!(half.float_dtypes(), [DType::F16]);
    let bf16 = Checkpoint::open(fixture("tiny_basic.bf16.pth")).unwrap();
    assert_eq!(bf16.float_dtypes(), [DType::BF16]);
}

#[test]
fn imported_parameters_are_float32() {
    let model = import("tiny_basic.fp16.pth");
    assert_eq!(model.conv1.weight.val().dtype(), DType::F32);
    assert_eq!(model.fc.weight.val().dtype(), DType::F32);
    assert_eq!(model.bn1.running_var.value().dtype(), DType::F32);
}

#[test]
fn records_round_trip_with_their_config() {
    let device = device();
    let imported = import_checkpoint(
        &fixture("tiny_resnext.pth"),
        &ImportOptions::default(),
        &device,
    )
    .unwrap();
    let mut meta = imported.meta.clone();
    meta.classes = Some((0..5).map(|i| format!("class {i}")).collect());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/tiny.bpk");
    save_record(&imported.model, &meta, &path).unwrap();
    // Nothing but the record is left in the directory (the write is atomic).
    let entries: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
    assert_eq!(entries.len(), 1);

    let (loaded, loaded_meta) = load_record(&path, &device).unwrap();
    assert_eq!(loaded_meta, meta);
    // The record is fully in memory: removing the file does not break the model.
    std::fs::remove_file(&path).unwrap();
    let diff = max_abs_diff(
        loaded.valid().forward(input(&device)),
        "tiny_resnext.logits.npy",
    );
    assert!(diff <= TOLERANCE, "{diff}");
}

#[test]
fn a_backbone_imports_only_with_allow_partial() {
    let device = device();
    let path = fixture("tiny_basic.backbone.pth");
    let err = import_checkpoint(&path, &ImportOptions::default(), &device)
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(
        message.contains("2 missing (fc.weight, fc.bias)")
            || message.contains("2 missing (fc.bias, fc.weight)"),
        "{message}"
    );

    let options = ImportOptions {
        num_classes: Some(4),
        allow_partial: true,
        ..ImportOptions::default()
    };
    let imported = import_checkpoint(&path, &options, &device).unwrap();
    assert!(!imported.inferred.has_head);
    assert_eq!(imported.report.missing.len(), 2);
    assert_eq!(imported.model.num_classes(), 4);
    let features = imported.model.valid().forward_features(input(&device));
    let diff = max_abs_diff(features, "tiny_basic.features.npy");
    assert!(diff <= TOLERANCE, "{diff}");
}

fn error_of(path: &Path, options: &ImportOptions) -> ImportError {
    match import_checkpoint(path, options, &device()) {
        Ok(_) => panic!("{} imported", path.display()),
        Err(err) => {
            let message = err.to_string();
            assert!(!message.contains('\n'), "multi-line error: {message}");
            assert!(message.contains(&path.display().to_string()), "{message}");
            err
        }
    }
}

#[test]
fn bad_checkpoints_get_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let default = ImportOptions::default();

    let missing = dir.path().join("missing.pth");
    assert!(matches!(
        error_of(&missing, &default),
        ImportError::NotFound(_)
    ));

    let empty = dir.path().join("empty.pth");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(error_of(&empty, &default), ImportError::Empty(_)));

    let random = dir.path().join("random.pth");
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&random, bytes).unwrap();
    assert!(matches!(
        error_of(&random, &default),
        ImportError::Unreadable { .. }
    ));

    let truncated = dir.path().join("truncated.pth");
    let full = std::fs::read(fixture("tiny_basic.pth")).unwrap();
    std::fs::write(&truncated, &full[..full.len() / 2]).unwrap();
    assert!(matches!(
        error_of(&truncated, &default),
        ImportError::Unreadable { .. }
    ));

    let not_resnet = fixture("not_resnet.pth");
    let err = error_of(&not_resnet, &default);
    assert!(matches!(err, ImportError::NotAResNet { .. }), "{err}");
    assert!(err.to_string().contains("decoder.weight"), "{err}");

    // A bottleneck checkpoint loaded as a basic-block architecture.
    let other_arch = ImportOptions {
        arch: Some("resnet18".into()),
        ..ImportOptions::default()
    };
    let err = error_of(&fixture("tiny_bottleneck.pth"), &other_arch);
    let message = err.to_string();
    assert!(matches!(err, ImportError::Mismatch { .. }), "{message}");
    assert!(message.contains("does not fit resnet18"), "{message}");
    assert!(message.contains("unexpected"), "{message}");
    assert!(
        message.contains("looks like custom ResNet (Bottleneck"),
        "{message}"
    );

    let unknown = ImportOptions {
        arch: Some("resnet19".into()),
        ..ImportOptions::default()
    };
    let err = import_checkpoint(&fixture("tiny_basic.pth"), &unknown, &device())
        .err()
        .unwrap();
    assert!(
        err.to_string()
            .starts_with("unknown architecture `resnet19`"),
        "{err}"
    );
}

#[test]
fn records_without_metadata_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plain.bpk");
    let config = expected_config("tiny_cifar");
    config.init(&device()).save_file(&path).unwrap();
    let err = load_record(&path, &device()).err().unwrap().to_string();
    assert!(err.contains("not written by resnet-rs"), "{err}");

    std::fs::write(&path, b"garbage").unwrap();
    let err = load_record(&path, &device()).err().unwrap().to_string();
    assert!(err.contains("not a Burnpack record"), "{err}");
    let _ = RecordMeta::new(config);
}
