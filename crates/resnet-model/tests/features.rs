//! A library user who depends on `resnet-model` with one backend feature gets that backend and
//! no other: checked on the dependency graph cargo resolves (`cargo tree`, offline), so no
//! backend has to be built for it.

use std::collections::BTreeSet;
use std::process::Command;

/// Crates that are, or exist only for, one backend.
const BACKEND_CRATES: [&str; 10] = [
    "burn-flex",
    "burn-ndarray",
    "burn-wgpu",
    "burn-cubecl",
    "burn-cuda",
    "burn-cpu",
    "burn-tch",
    "wgpu",
    "tch",
    "cubecl-cuda",
];

/// The backend crates among `resnet-model`'s normal dependencies with `features` only.
fn backend_crates(features: &str) -> BTreeSet<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let output = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "tree",
            "--offline",
            "-p",
            "resnet-model",
            "--no-default-features",
            "--features",
            features,
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo tree failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| BACKEND_CRATES.contains(name))
        .map(str::to_string)
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|name| name.to_string()).collect()
}

#[test]
fn one_backend_feature_pulls_in_that_backend_only() {
    assert_eq!(backend_crates("flex"), set(&["burn-flex"]));
    assert_eq!(backend_crates("ndarray"), set(&["burn-ndarray"]));
    assert_eq!(
        backend_crates("wgpu"),
        set(&["burn-cubecl", "burn-wgpu", "wgpu"])
    );
    assert_eq!(backend_crates("tch"), set(&["burn-tch", "tch"]));
    assert_eq!(
        backend_crates("cuda"),
        set(&["burn-cubecl", "burn-cuda", "cubecl-cuda"])
    );
}
