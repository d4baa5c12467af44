//! Every torchvision preset, full size: a checkpoint written by torchvision imports and
//! reproduces PyTorch's logits within 1e-4 relative error.
//!
//! The checkpoints are generated on the fly by `tests/fixtures/full_size.py` (about 2 GB for
//! all ten, so nothing is committed). It needs a Python with torch and torchvision: the one in
//! `$RESNET_PYTHON`, else `<workspace>/.venv/bin/python`, else `python3`. Without one the test
//! prints a SKIP line and passes, unless `RESNET_REQUIRE_FULL_SIZE=1` (set by CI) makes that a
//! failure.

use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};
use resnet_import::download::sha256_file;
use resnet_import::registry::{self, IMAGENET_CLASSES, WeightsVersion};
use resnet_import::{ImportOptions, import_checkpoint, import_pretrained, load_record, npy};
use resnet_model::ARCHITECTURES;
use resnet_test_support::{generate_full_size, python_or_skip};

/// Largest tolerated `max |ours - PyTorch| / max |PyTorch|` over the logits.
const RELATIVE_TOLERANCE: f32 = 1e-4;

fn read(path: &Path) -> (Vec<usize>, Vec<f32>) {
    npy::read_f32(path).unwrap_or_else(|err| panic!("{err}"))
}

#[test]
fn every_preset_matches_pytorch_at_full_size() {
    let Some(python) = python_or_skip("full-size parity") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let device = Device::flex();
    let mut worst = 0.0f32;
    for arch in ARCHITECTURES {
        generate_full_size(&python, dir.path(), arch);

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
        if arch == "resnet18" {
            pretrained_pipeline_over_loopback(&checkpoint, &expected, &device);
        }
        std::fs::remove_file(&checkpoint).expect("remove checkpoint");
    }
    println!(
        "full-size parity: worst relative error {worst:e} over {} presets",
        ARCHITECTURES.len()
    );
}

/// Serves `body` at any path to `requests` connections on 127.0.0.1, then stops.
fn serve(body: Vec<u8>, requests: usize) -> (String, std::thread::JoinHandle<()>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let addr = listener.local_addr().expect("address");
    let handle = std::thread::spawn(move || {
        for stream in listener.incoming().take(requests) {
            let Ok(mut stream) = stream else { return };
            let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let header = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(header.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    (format!("http://{addr}"), handle)
}

/// torchvision's resnet18 weights entry, pointed at a loopback server serving a real
/// torchvision checkpoint: download into the cache, verify, import, write the record.
fn pretrained_pipeline_over_loopback(checkpoint: &Path, expected: &[f32], device: &Device) {
    let real = registry::find("resnet18", WeightsVersion::V1).expect("resnet18 V1 entry");
    let hash = sha256_file(checkpoint).expect("hash");
    let file_name = format!("resnet18-{}.pth", &hash[..8]);
    let (base, server) = serve(std::fs::read(checkpoint).expect("read checkpoint"), 1);
    let url = format!("{base}/models/{file_name}");
    let mut entry = *real;
    entry.url = Box::leak(url.into_boxed_str());
    entry.file_name = Box::leak(file_name.into_boxed_str());
    entry.sha256_prefix = Box::leak(hash[..8].to_string().into_boxed_str());

    let cache = tempfile::tempdir().expect("cache dir");
    let out = tempfile::tempdir().expect("out dir");
    let record = import_pretrained(&entry, None, cache.path(), out.path(), false, device)
        .unwrap_or_else(|err| panic!("{err}"));
    server.join().expect("server thread");
    assert_eq!(record, out.path().join("resnet18-IMAGENET1K_V1.bpk"));
    assert!(cache.path().join(entry.file_name).exists());

    let (model, meta) = load_record(&record, device).expect("record loads");
    assert_eq!(meta.weights.as_deref(), Some("resnet18-IMAGENET1K_V1"));
    assert_eq!(
        meta.classes.as_ref().map(Vec::len),
        Some(IMAGENET_CLASSES.len())
    );
    assert_eq!(
        meta.preprocessing.as_ref().map(|p| p.resize_size),
        Some(256)
    );
    let (shape, values) = read(&checkpoint.with_file_name("input.npy"));
    let shape: [usize; 4] = shape.try_into().expect("NCHW input");
    let input = Tensor::<4>::from_data(TensorData::new(values, shape), device);
    let logits: Vec<f32> = model
        .valid()
        .forward(input)
        .into_data()
        .try_to_vec()
        .expect("f32");
    let diff = logits
        .iter()
        .zip(expected)
        .fold(0.0f32, |m, (a, e)| m.max((a - e).abs()));
    println!("resnet18 via loopback download and record: max |logits - PyTorch| = {diff:e}");
    assert!(diff <= 1e-4, "{diff}");
}
