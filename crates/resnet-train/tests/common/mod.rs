//! Helpers shared by the training tests: a small real image task drawn on the fly.

#![allow(clippy::unwrap_used, dead_code)] // Test helpers; not every test file uses each one.

use std::path::Path;

use burn::tensor::Device;
use clap::Parser;
use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use resnet_train::train::TrainArgs;

/// Draws one 32x32 image of `class`: 0 a horizontal bar, 1 a vertical bar, 2 a filled disc;
/// random position, size and colours, on a noisy background.
fn shape(class: usize, rng: &mut StdRng) -> RgbImage {
    let mut img = RgbImage::new(32, 32);
    let background = [
        rng.random_range(0..100u8),
        rng.random_range(0..100),
        rng.random_range(0..100),
    ];
    let colour = [
        rng.random_range(150..=255u8),
        rng.random_range(150..=255),
        rng.random_range(150..=255),
    ];
    for pixel in img.pixels_mut() {
        let noise = rng.random_range(0..30u8);
        *pixel = Rgb(background.map(|c| c.saturating_add(noise)));
    }
    let (cx, cy) = (rng.random_range(8..24i32), rng.random_range(8..24i32));
    let half = rng.random_range(5..8i32);
    for y in 0..32i32 {
        for x in 0..32i32 {
            let (dx, dy) = (x - cx, y - cy);
            let inside = match class {
                0 => dx.abs() <= half && dy.abs() <= 1,
                1 => dx.abs() <= 1 && dy.abs() <= half,
                _ => dx * dx + dy * dy <= half * half,
            };
            if inside {
                img.put_pixel(x as u32, y as u32, Rgb(colour));
            }
        }
    }
    img
}

/// One image of the first shape class, for tests that need a single valid image.
pub fn sample_image() -> RgbImage {
    shape(0, &mut StdRng::seed_from_u64(1))
}

/// Class folder names, sorted as the dataset sorts them.
pub const CLASSES: [&str; 3] = ["disc", "horizontal", "vertical"];

/// `dir/train/<class>/*.png` and `dir/val/<class>/*.png`.
pub fn shapes_dataset(dir: &Path, train_per_class: usize, val_per_class: usize) {
    let mut rng = StdRng::seed_from_u64(7);
    for (split, count) in [("train", train_per_class), ("val", val_per_class)] {
        for (class, name) in [(2, CLASSES[0]), (0, CLASSES[1]), (1, CLASSES[2])] {
            let folder = dir.join(split).join(name);
            std::fs::create_dir_all(&folder).unwrap();
            for i in 0..count {
                shape(class, &mut rng)
                    .save(folder.join(format!("{i}.png")))
                    .unwrap();
            }
        }
    }
}

pub fn args(data: &Path, out: &Path, extra: &[&str]) -> TrainArgs {
    let mut argv: Vec<String> = vec![
        "resnet-train".into(),
        "--data".into(),
        data.display().to_string(),
        "--out".into(),
        out.display().to_string(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    TrainArgs::try_parse_from(argv).unwrap()
}

/// The classifier head's weights in a record.
pub fn head_weights(record: &Path) -> Vec<f32> {
    let (net, _) = resnet_import::load_record(record, &Device::flex()).unwrap();
    net.fc.weight.val().into_data().try_to_vec().unwrap()
}

/// The largest absolute difference between two equally long vectors.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
}
