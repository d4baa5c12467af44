//! Preprocessing matches torchvision's `ImageClassification` on PIL images.
//!
//! The images and torchvision's outputs come from `tests/fixtures/images/make_images.py`
//! (Pillow 13, torchvision 0.29); no Python is needed to run these tests. Run with
//! `--nocapture` to see the measured differences.

#![allow(clippy::unwrap_used)] // Test helpers: a failed unwrap is a failed test.

use std::path::{Path, PathBuf};

use image::RgbImage;
use resnet_import::Preprocessing;
use resnet_import::preprocess::{
    Exif, ImageError, center_crop, decode_rgb, is_image_path, load_rgb, normalize, preprocess,
    preprocess_file, resize_bilinear, resize_shorter_side,
};
use sha2::{Digest, Sha256};

/// Largest tolerated difference from torchvision's normalized tensor where both sides resize
/// the same pixels. One 8-bit level is `1 / 255 / 0.224 = 0.0175` after normalization (the
/// largest of the three channels); the measured difference is 0.
const TOLERANCE: f32 = 0.02;

/// Largest difference between our JPEG decode and Pillow's (libjpeg-turbo), in 8-bit levels.
/// With the default `exact-jpeg` feature we decode with libjpeg-turbo too: 0. With the pure-Rust
/// zune-jpeg: measured 4 on `chelsea.jpg` (4:2:0, quality 90), 13% of values differing, nearly
/// all by 1 or 2 (the IDCT and color conversion arithmetic differ).
const JPEG_DECODER_LEVELS: u8 = if cfg!(feature = "exact-jpeg") { 0 } else { 5 };

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/images")
        .join(name)
}

fn expected() -> serde_json::Value {
    let text = std::fs::read_to_string(fixture("expected.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn reference(name: &str) -> RgbImage {
    image::open(fixture(name)).unwrap().into_rgb8()
}

fn imagenet(resize_size: u32) -> Preprocessing {
    Preprocessing {
        resize_size,
        crop_size: 224,
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

fn max_level_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

fn count_differing(a: &RgbImage, b: &RgbImage) -> usize {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .filter(|(x, y)| x != y)
        .count()
}

/// How far one result is from torchvision's.
struct Diff {
    /// Largest absolute difference of the normalized tensors.
    normalized: f32,
    /// Mean absolute difference of the normalized tensors.
    mean: f32,
    /// Largest difference of the resized and cropped 8-bit images, in levels.
    levels: u8,
}

/// `img` through our pipeline against torchvision's output `<stem>.resize<resize>.png`
/// (Pillow's decode of the same file, resized and cropped); prints the differences.
fn compare_with_torchvision(label: &str, img: &RgbImage, stem: &str, resize: u32) -> Diff {
    let p = imagenet(resize);
    let want_u8 = reference(&format!("{stem}.resize{resize}.png"));
    let want = normalize(&want_u8, p.mean, p.std);
    let got = preprocess(img, &p);
    assert_eq!(got.len(), 3 * 224 * 224);
    let abs: Vec<f32> = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).collect();
    let got_u8 = center_crop(&resize_shorter_side(img, resize), 224);
    let diff = Diff {
        normalized: abs.iter().copied().fold(0.0, f32::max),
        mean: abs.iter().sum::<f32>() / abs.len() as f32,
        levels: max_level_diff(&got_u8, &want_u8),
    };
    println!(
        "{label} @{resize}: max |diff| = {:.4} ({} levels; mean |diff| {:.5}; {} of {} values differ)",
        diff.normalized,
        diff.levels,
        diff.mean,
        count_differing(&got_u8, &want_u8),
        got_u8.as_raw().len()
    );
    diff
}

/// End to end on a lossless file: `preprocess_file` gives torchvision's tensor exactly.
#[test]
fn lossless_photo_matches_torchvision_exactly() {
    let path = fixture("coffee.png");
    let img = load_rgb(&path, Exif::Ignore).unwrap();
    for resize in [256, 232] {
        let diff = compare_with_torchvision("coffee.png", &img, "coffee", resize);
        assert!(diff.normalized <= TOLERANCE, "coffee @{resize}");
        assert_eq!(diff.levels, 0, "coffee @{resize}");
        let from_file = preprocess_file(&path, &imagenet(resize), Exif::Ignore).unwrap();
        assert_eq!(from_file, preprocess(&img, &imagenet(resize)));
    }
}

/// The resize on exactly the pixels torchvision resized: Pillow's decode of `chelsea.jpg`.
#[test]
fn resize_is_pillow_exact_on_pillows_jpeg_decode() {
    let pil = load_rgb(&fixture("chelsea.pil.webp"), Exif::Ignore).unwrap();
    assert_eq!(
        sha256_hex(pil.as_raw()),
        expected()["chelsea.jpg"]["rgb_sha256"].as_str().unwrap(),
        "chelsea.pil.webp is not Pillow's decode of chelsea.jpg"
    );
    for resize in [256, 232] {
        let diff = compare_with_torchvision("chelsea, Pillow's decode", &pil, "chelsea", resize);
        assert!(diff.normalized <= TOLERANCE, "chelsea @{resize}");
        assert_eq!(diff.levels, 0, "chelsea @{resize}");
    }
}

/// End to end on a JPEG: the only difference from torchvision is the JPEG decoder's.
#[test]
#[allow(clippy::absurd_extreme_comparisons)] // The bound is 0 with `exact-jpeg`.
fn jpeg_photo_matches_torchvision_up_to_the_decoder() {
    let path = fixture("chelsea.jpg");
    let ours = load_rgb(&path, Exif::Ignore).unwrap();
    let pil = load_rgb(&fixture("chelsea.pil.webp"), Exif::Ignore).unwrap();
    let decoded = max_level_diff(&ours, &pil);
    println!(
        "chelsea.jpg decoded ({}) vs Pillow (libjpeg-turbo): {decoded} levels; {} of {} values differ",
        if cfg!(feature = "exact-jpeg") {
            "libjpeg-turbo"
        } else {
            "zune-jpeg"
        },
        count_differing(&ours, &pil),
        ours.as_raw().len()
    );
    assert!(decoded <= JPEG_DECODER_LEVELS, "{decoded} levels");

    let decoder_tolerance = TOLERANCE.max(f32::from(JPEG_DECODER_LEVELS) / 255.0 / 0.224);
    for resize in [256, 232] {
        let diff = compare_with_torchvision("chelsea.jpg", &ours, "chelsea", resize);
        assert!(diff.levels <= JPEG_DECODER_LEVELS, "chelsea @{resize}");
        assert!(diff.normalized <= decoder_tolerance, "chelsea @{resize}");
        // On average far below one level.
        assert!(
            diff.mean < 0.2 * TOLERANCE,
            "chelsea @{resize}: mean {}",
            diff.mean
        );
        let from_file = preprocess_file(&path, &imagenet(resize), Exif::Ignore).unwrap();
        assert_eq!(from_file, preprocess(&ours, &imagenet(resize)));
    }
}

/// Upscaling (40x30 to 341x256), zero padding (resize 160 < crop 224) and a single pixel.
#[test]
fn upscaled_padded_and_one_pixel_images_match_torchvision() {
    for (file, resize) in [("gray.png", 256), ("gray.png", 160), ("one_pixel.png", 256)] {
        let img = load_rgb(&fixture(file), Exif::Ignore).unwrap();
        let stem = file.split('.').next().unwrap();
        let diff = compare_with_torchvision(file, &img, stem, resize);
        assert_eq!(diff.levels, 0, "{file} @{resize}");
    }
}

/// Both pass orders: Pillow 13 resizes vertically first when the height shrinks by more than
/// twice as many pixels as the width (36x90 to 45x30), horizontally first otherwise (to 20x80).
#[test]
fn pass_order_matches_pillow() {
    let tall = load_rgb(&fixture("tall.png"), Exif::Ignore).unwrap();
    for (w, h) in [(45, 30), (20, 80)] {
        let want = reference(&format!("tall.{w}x{h}.png"));
        let got = resize_bilinear(&tall, w, h);
        assert_eq!(max_level_diff(&got, &want), 0, "{w}x{h}");
    }
}

#[test]
fn lossless_decodes_match_pil_convert_rgb() {
    let expected = expected();
    for name in [
        "gray.png",
        "rgba.png",
        "palette.gif",
        "small.webp",
        "small.bmp",
        "one_pixel.png",
        "coffee.png",
        "tall.png",
    ] {
        let want = &expected[name];
        let img = load_rgb(&fixture(name), Exif::Ignore).unwrap();
        assert_eq!(
            (u64::from(img.width()), u64::from(img.height())),
            (
                want["width"].as_u64().unwrap(),
                want["height"].as_u64().unwrap()
            ),
            "{name}"
        );
        assert_eq!(
            sha256_hex(img.as_raw()),
            want["rgb_sha256"].as_str().unwrap(),
            "{name} decodes to other pixels than PIL's convert(\"RGB\")"
        );
    }
}

#[test]
fn sixteen_bit_grayscale_is_scaled() {
    let want = &expected()["gray16.png"];
    let img = load_rgb(&fixture("gray16.png"), Exif::Ignore).unwrap();
    assert_eq!(img.dimensions(), (32, 24));
    // Deliberately not PIL's result (which clips at 255): v / 257, replicated.
    assert_eq!(
        sha256_hex(img.as_raw()),
        want["scaled_rgb_sha256"].as_str().unwrap()
    );
    assert_ne!(
        sha256_hex(img.as_raw()),
        want["rgb_sha256"].as_str().unwrap()
    );
}

#[test]
fn exif_orientation_is_ignored_by_default_and_applied_on_request() {
    let want = &expected()["exif_rotated.jpg"];
    let path = fixture("exif_rotated.jpg");
    let stored = load_rgb(&path, Exif::Ignore).unwrap();
    assert_eq!(stored.dimensions(), (48, 32));
    assert_eq!(Exif::default(), Exif::Ignore);
    let rotated = load_rgb(&path, Exif::Apply).unwrap();
    assert_eq!(
        (u64::from(rotated.width()), u64::from(rotated.height())),
        (
            want["transposed_width"].as_u64().unwrap(),
            want["transposed_height"].as_u64().unwrap()
        )
    );
    // Orientation 6: rotate 90 degrees clockwise.
    assert_eq!(rotated, image::imageops::rotate90(&stored));
    // Files without the tag are unaffected.
    let gray = fixture("gray.png");
    assert_eq!(
        load_rgb(&gray, Exif::Apply).unwrap(),
        load_rgb(&gray, Exif::Ignore).unwrap()
    );
}

#[test]
fn content_decides_the_format_not_the_extension() {
    let bytes = std::fs::read(fixture("small.webp")).unwrap();
    let img = decode_rgb(&bytes, Path::new("misnamed.jpg"), Exif::Ignore).unwrap();
    assert_eq!(img, load_rgb(&fixture("small.webp"), Exif::Ignore).unwrap());
}

fn assert_one_line_naming(err: &ImageError, path: &Path) {
    let message = err.to_string();
    assert!(!message.contains('\n'), "{message}");
    assert!(
        message.contains(&path.display().to_string()),
        "{message} does not name {}",
        path.display()
    );
    println!("{message}");
}

#[test]
fn unreadable_files_give_one_line_errors() {
    for name in ["not_an_image.jpg", "empty.jpg"] {
        let path = fixture(name);
        let err = load_rgb(&path, Exif::Ignore).unwrap_err();
        assert!(matches!(err, ImageError::Decode { .. }), "{err}");
        assert_one_line_naming(&err, &path);
    }

    let missing = fixture("no_such_image.png");
    let err = load_rgb(&missing, Exif::Ignore).unwrap_err();
    assert!(matches!(err, ImageError::NotFound(_)), "{err}");
    assert_one_line_naming(&err, &missing);

    let err = preprocess_file(&missing, &imagenet(256), Exif::Ignore).unwrap_err();
    assert!(matches!(err, ImageError::NotFound(_)), "{err}");

    // A directory is not a file: an error, not a panic.
    let dir = fixture("");
    let err = load_rgb(&dir, Exif::Ignore).unwrap_err();
    assert_one_line_naming(&err, &dir);
}

#[test]
fn truncated_jpeg_is_an_error() {
    let bytes = std::fs::read(fixture("chelsea.jpg")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("truncated.jpg");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_rgb(&path, Exif::Ignore).unwrap_err();
    assert!(matches!(err, ImageError::Decode { .. }), "{err}");
    assert_one_line_naming(&err, &path);
}

#[test]
fn preprocess_accepts_any_size() {
    let p = imagenet(256);
    for (w, h) in [(1, 1), (2, 1), (1, 5), (224, 224), (1000, 230)] {
        let img = RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]));
        let out = preprocess(&img, &p);
        assert_eq!(out.len(), 3 * 224 * 224, "{w}x{h}");
    }
}

#[test]
fn image_paths() {
    for yes in [
        "a.jpg", "a.JPEG", "b/c.png", "x.Gif", "y.webp", "z.BMP", "t.tif", "t.TIFF",
    ] {
        assert!(is_image_path(Path::new(yes)), "{yes}");
    }
    for no in ["a.txt", "png", ".png", "a.jpg.bak", "a", "a.svg", "dir/"] {
        assert!(!is_image_path(Path::new(no)), "{no}");
    }
}
