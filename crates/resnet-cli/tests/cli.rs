//! End-to-end tests of the `resnet` binary.

use assert_cmd::Command;

fn resnet() -> Command {
    Command::cargo_bin("resnet").expect("the resnet binary is built")
}

fn stdout_of(args: &[&str]) -> String {
    let output = resnet().args(args).output().expect("resnet runs");
    assert!(output.status.success(), "{args:?}: {output:?}");
    String::from_utf8(output.stdout).expect("utf-8 output")
}

#[test]
fn info_prints_torchvision_numbers() {
    let out = stdout_of(&["info", "--arch", "resnet50"]);
    assert!(out.contains("25,557,032"), "{out}");
    assert!(out.contains("4.089 GMACs"), "{out}");
    assert!(out.contains("2048x7x7"), "{out}");

    let out = stdout_of(&["info", "--arch", "resnet18", "--num-classes", "10"]);
    // 11,689,512 - 513,000 (1000-class head) + 5,130 (10-class head)
    assert!(out.contains("11,181,642"), "{out}");
}

#[test]
fn info_json_is_machine_readable() {
    let out = stdout_of(&["info", "--arch", "resnet152", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
    assert_eq!(json["parameters"], 60_192_808);
    assert_eq!(json["stages"].as_array().map(Vec::len), Some(6));
    let gmacs = json["gmacs"].as_f64().expect("gmacs is a number");
    assert!((gmacs - 11.514).abs() < 0.0005, "{gmacs}");
}

#[test]
fn unknown_arch_is_a_one_line_error() {
    let output = resnet()
        .args(["info", "--arch", "resnet51"])
        .output()
        .expect("resnet runs");
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    let stderr = String::from_utf8(output.stderr).expect("utf-8");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: unknown architecture `resnet51`"),
        "{stderr}"
    );
    for name in ["resnet18", "resnext101_64x4d", "wide_resnet101_2"] {
        assert!(stderr.contains(name), "{stderr}");
    }
}

#[test]
fn bad_values_fail_cleanly() {
    for args in [
        vec!["info", "--arch", "resnet18", "--num-classes", "0"],
        vec!["info", "--arch", "resnet18", "--image-size", "0"],
    ] {
        let output = resnet().args(&args).output().expect("resnet runs");
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        let stderr = String::from_utf8(output.stderr).expect("utf-8");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: "), "{stderr}");
    }
}

#[test]
fn missing_backend_names_its_feature() {
    if cfg!(feature = "cuda") {
        return;
    }
    let output = resnet()
        .args(["--backend", "cuda", "info", "--arch", "resnet18"])
        .output()
        .expect("resnet runs");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8(output.stderr).expect("utf-8");
    assert!(stderr.contains("--features cuda"), "{stderr}");
}
