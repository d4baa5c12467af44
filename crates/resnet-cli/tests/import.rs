//! `resnet import` and `resnet forward` end to end, on the tiny PyTorch fixtures of
//! resnet-import.

use std::path::PathBuf;

mod common;
use common::{fixture, read_npy, resnet};

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn import_then_forward_reproduces_pytorch() {
    let dir = tempfile::tempdir().expect("temp dir");
    let record = dir.path().join("tiny.bpk");
    let output = resnet()
        .arg("import")
        .arg(fixture("tiny_bottleneck.pth"))
        .arg("--out")
        .arg(&record)
        .output()
        .expect("resnet runs");
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8(output.stdout).expect("utf-8");
    assert!(
        stdout.starts_with(&format!("wrote {}", record.display())),
        "{stdout}"
    );
    let stderr = String::from_utf8(output.stderr).expect("utf-8");
    assert!(
        stderr.contains("custom ResNet (Bottleneck blocks [1, 2, 1, 1]"),
        "{stderr}"
    );

    for (weights, features, reference) in [
        (record.clone(), false, "tiny_bottleneck.logits.npy"),
        (record.clone(), true, "tiny_bottleneck.features.npy"),
        // A checkpoint is imported on the fly.
        (
            fixture("tiny_bottleneck.pth"),
            false,
            "tiny_bottleneck.logits.npy",
        ),
    ] {
        let out = dir.path().join("out.npy");
        let mut cmd = resnet();
        cmd.arg("forward")
            .arg("--weights")
            .arg(&weights)
            .arg("--input")
            .arg(fixture("input.npy"))
            .arg("--output")
            .arg(&out);
        if features {
            cmd.arg("--features");
        }
        let result = cmd.output().expect("resnet runs");
        assert!(result.status.success(), "{result:?}");
        let diff = max_abs_diff(&read_npy(&out), &read_npy(&fixture(reference)));
        assert!(diff <= 1e-5, "{reference}: {diff}");
    }
}

/// Runs `resnet ARGS`, expects exit code 1 with one `error:` line, and returns it.
fn fails(args: &[&std::ffi::OsStr]) -> String {
    let output = resnet().args(args).output().expect("resnet runs");
    assert_eq!(output.status.code(), Some(1), "{args:?}: {output:?}");
    let stderr = String::from_utf8(output.stderr).expect("utf-8");
    assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

#[test]
fn bad_checkpoints_fail_with_one_line_and_no_output() {
    let dir = tempfile::tempdir().expect("temp dir");
    let empty = dir.path().join("empty.pth");
    std::fs::write(&empty, b"").expect("write");
    let random = dir.path().join("random.pth");
    std::fs::write(&random, vec![0x5a; 1000]).expect("write");
    let truncated = dir.path().join("truncated.pth");
    let full = std::fs::read(fixture("tiny_basic.pth")).expect("fixture");
    std::fs::write(&truncated, &full[..full.len() / 3]).expect("write");
    let missing = dir.path().join("missing.pth");

    let out = dir.path().join("out.bpk");
    let cases: Vec<(PathBuf, Vec<&str>, &str)> = vec![
        (empty, vec![], "the file is empty"),
        (random, vec![], "not a readable PyTorch checkpoint"),
        (truncated, vec![], "not a readable PyTorch checkpoint"),
        (missing, vec![], "no such file"),
        (fixture("not_resnet.pth"), vec![], "not a ResNet state_dict"),
        (
            fixture("tiny_basic.pth"),
            vec!["--arch", "resnet50"],
            "checkpoint does not fit resnet50",
        ),
        (
            fixture("tiny_basic.backbone.pth"),
            vec![],
            "2 missing (fc.bias, fc.weight)",
        ),
    ];
    for (file, extra, expected) in cases {
        let mut args: Vec<&std::ffi::OsStr> = vec!["import".as_ref(), file.as_os_str()];
        args.extend(extra.iter().map(|a| std::ffi::OsStr::new(*a)));
        args.extend(["--out".as_ref(), out.as_os_str()]);
        let stderr = fails(&args);
        assert!(stderr.contains(expected), "{}: {stderr}", file.display());
        assert!(!out.exists(), "{} left an output file", file.display());
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x != "pth"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn forward_rejects_bad_inputs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().join("y.npy");
    let not_npy = dir.path().join("x.npy");
    std::fs::write(&not_npy, b"hello").expect("write");
    let flat = dir.path().join("flat.npy");
    resnet_import::npy::write_f32(&flat, &[6], &[0.0; 6]).expect("write");
    let weights = fixture("tiny_basic.pth");
    for (input, expected) in [
        (not_npy, "not a .npy file"),
        (flat, "expected an NCHW array"),
        (dir.path().join("none.npy"), "no such file"),
    ] {
        let stderr = fails(&[
            "forward".as_ref(),
            "--weights".as_ref(),
            weights.as_os_str(),
            "--input".as_ref(),
            input.as_os_str(),
            "--output".as_ref(),
            out.as_os_str(),
        ]);
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!out.exists());
    }
}
