//! Training data: image folders and CIFAR-10, torchvision-style augmentation, batching.
//!
//! - [`image_folder`] and [`cifar10`] find the samples and class names and return a train and
//!   a validation [`Split`]; they read no pixels from image files (CIFAR-10 is decoded into
//!   memory once, as it is small and stored raw).
//! - [`ImageDataset`] is a Burn [`Dataset`] of [`Sample`]s: it decodes an image when it is
//!   fetched and applies a [`Transform`] (torchvision's `RandomResizedCrop`, CIFAR's pad and
//!   random crop, or the evaluation resize and center crop). Its randomness is reproducible
//!   whatever the number of loader workers, and unreadable files are skipped, not fatal.
//! - [`ImageBatcher`] stacks samples into a [`ClassificationBatch`] on a device.

use std::borrow::Cow;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, DatasetError};
use burn::tensor::{Device, Int, Tensor, TensorData};
use image::{Rgb, RgbImage};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use resnet_import::Preprocessing;
use resnet_import::preprocess::{
    Exif, ImageError, is_image_path, load_rgb, normalize, preprocess, resize_bilinear,
};

/// ImageNet's per-channel mean, the usual normalization (also for CIFAR-10 fine-tuning).
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet's per-channel standard deviation.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// CIFAR-10's class names in label order, used when `batches.meta.txt` is absent.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Bytes of one CIFAR-10 record: a label byte and a 32x32 RGB image stored as three planes.
const CIFAR_RECORD: usize = 1 + 3 * 32 * 32;

/// Errors finding or reading training data.
///
/// Every message is one line and names the path concerned.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The data directory does not exist.
    #[error("{}: no such directory", .0.display())]
    NotFound(PathBuf),
    /// The data path exists but is not a directory.
    #[error("{}: not a directory", .0.display())]
    NotADirectory(PathBuf),
    /// Listing a directory or reading a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The directory or file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The directory has no class sub-folders.
    #[error(
        "{}: no class folders (expected DIR/<class>/* images, or DIR/train/<class>/* and \
         DIR/val/<class>/*)",
        .0.display()
    )]
    NoClasses(PathBuf),
    /// A class folder holds no image file.
    #[error(
        "{}: class folder '{class}' has no images (.jpg, .jpeg, .png, .gif, .webp, .bmp, .tif, \
         .tiff)",
        path.display()
    )]
    EmptyClass {
        /// The class (the folder's name).
        class: String,
        /// The folder.
        path: PathBuf,
    },
    /// Only one class folder: a classifier has nothing to learn.
    #[error("{}: one class only ('{class}'): nothing to learn", path.display())]
    OneClass {
        /// The class.
        class: String,
        /// The folder holding the class folders.
        path: PathBuf,
    },
    /// `DIR/train` exists without `DIR/val`, and no validation fraction was given.
    #[error(
        "{}: has train/ but no val/: add {} or pass --val-split",
        .0.display(),
        .0.join("val").display()
    )]
    NoValidation(PathBuf),
    /// `DIR/val` exists without `DIR/train`.
    #[error("{}: has val/ but no train/: add {}", .0.display(), .0.join("train").display())]
    NoTrain(PathBuf),
    /// Class folders directly in `DIR` and no validation fraction to split them with.
    #[error(
        "{}: class folders but no train/ and val/: pass --val-split to hold out a validation set",
        .0.display()
    )]
    NeedsValSplit(PathBuf),
    /// The validation fraction is not strictly between 0 and 1.
    #[error("--val-split must be between 0 and 1 (exclusive), got {0}")]
    InvalidValSplit(f64),
    /// Every class has a single image, so the stratified split leaves validation empty.
    #[error("{}: no class has 2 images or more: the validation split is empty", .0.display())]
    EmptyValidation(PathBuf),
    /// `DIR/train` and `DIR/val` have different class folders.
    #[error(
        "{}: train/ and val/ have different classes (only in train/: {only_train}; only in val/: \
         {only_val})",
        path.display()
    )]
    ClassMismatch {
        /// The folder holding `train/` and `val/`.
        path: PathBuf,
        /// Classes found only under `train/`, comma-separated (`-` when none).
        only_train: String,
        /// Classes found only under `val/`, comma-separated (`-` when none).
        only_val: String,
    },
    /// A CIFAR-10 batch file is missing.
    #[error(
        "{}: missing (CIFAR-10's binary version has data_batch_1.bin..data_batch_5.bin and \
         test_batch.bin, in DIR or DIR/cifar-10-batches-bin)",
        .0.display()
    )]
    CifarMissing(PathBuf),
    /// A CIFAR-10 batch file is empty or its size is not a whole number of records.
    #[error("{}: size {len} bytes is not a positive multiple of 3073 (one CIFAR-10 record)", path.display())]
    CifarSize {
        /// The file.
        path: PathBuf,
        /// Its size in bytes.
        len: usize,
    },
    /// A CIFAR-10 record's label has no class name.
    #[error("{}: record {record} has label {label}, but there are {classes} classes", path.display())]
    CifarLabel {
        /// The file.
        path: PathBuf,
        /// The record's position in the file, from 0.
        record: usize,
        /// Its label byte.
        label: u8,
        /// How many class names there are.
        classes: usize,
    },
    /// Every image of a dataset is unreadable, so no substitute sample exists.
    #[error("no readable image among the {0} samples")]
    NoReadableImage(usize),
}

/// Where each sample's pixels come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// An image file, decoded (with `resnet_import::preprocess::load_rgb`) each time the
    /// sample is fetched.
    File(PathBuf),
    /// Pixels already in memory (CIFAR-10, decoded once).
    Memory(Arc<RgbImage>),
}

/// A labelled collection: samples and the class names.
///
/// Cloning is cheap for in-memory images (they are shared).
#[derive(Clone, Debug)]
pub struct Split {
    /// Each sample's pixels and class index (into `classes`).
    pub samples: Vec<(Source, usize)>,
    /// Class names: the sorted folder names for [`image_folder`], label order for [`cifar10`].
    pub classes: Vec<String>,
}

impl Split {
    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// How many samples each class has, indexed like `classes`.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes.len()];
        for (_, label) in &self.samples {
            if let Some(c) = counts.get_mut(*label) {
                *c += 1;
            }
        }
        counts
    }
}

/// Image files of each class under a folder, classes sorted by name.
type ClassFiles = Vec<(String, Vec<PathBuf>)>;

/// Image-folder data, laid out as torchvision's `ImageFolder` expects.
///
/// Two layouts are read:
/// - `DIR/train/<class>/*` and `DIR/val/<class>/*`: the two splits as given (`val_split` is then
///   ignored). Both must have the same class folders.
/// - `DIR/<class>/*` (or `DIR/train/<class>/*` without `DIR/val`) with `val_split` in (0, 1): a
///   seeded, stratified split. Each class is split separately: `round(n * val_split)` of its
///   `n` images, at least 1 and at most `n - 1`, go to validation when `n >= 2`; a class with
///   one image keeps it for training. The same `seed` and files give the same split.
///
/// Class names are the sorted folder names (byte order, as Python's `sorted`). Image files are
/// found recursively by extension (`is_image_path`), following symbolic links, in sorted
/// order. Hidden files and folders (name starting with `.`, such as macOS's `._x.jpg`
/// AppleDouble files or `.ipynb_checkpoints`) are skipped, unlike torchvision.
///
/// Unreadable image files are not detected here (that costs a decode): [`ImageDataset`]
/// skips them when fetched.
///
/// # Errors
///
/// A missing directory, no class folders, a class folder with no images (named), fewer than
/// two classes, `train/` without `val/` and no `val_split` (or the reverse), class folders
/// directly in `DIR` without `val_split`, different classes in `train/` and `val/`, a
/// `val_split` outside (0, 1), or an I/O error while listing.
pub fn image_folder(
    dir: &Path,
    val_split: Option<f64>,
    seed: u64,
) -> Result<(Split, Split), DataError> {
    if let Some(f) = val_split
        && !(f > 0.0 && f < 1.0)
    {
        return Err(DataError::InvalidValSplit(f));
    }
    check_dir(dir)?;
    let (train_dir, val_dir) = (dir.join("train"), dir.join("val"));
    let (has_train, has_val) = (train_dir.is_dir(), val_dir.is_dir());
    if has_train && has_val {
        let train = scan_classes(&train_dir)?;
        let val = scan_classes(&val_dir)?;
        let names = |c: &ClassFiles| c.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
        let (train_names, val_names) = (names(&train), names(&val));
        if train_names != val_names {
            let missing = |a: &[String], b: &[String]| {
                let only: Vec<&str> = a
                    .iter()
                    .filter(|n| !b.contains(n))
                    .map(String::as_str)
                    .collect();
                if only.is_empty() {
                    "-".to_string()
                } else {
                    only.join(", ")
                }
            };
            return Err(DataError::ClassMismatch {
                path: dir.to_path_buf(),
                only_train: missing(&train_names, &val_names),
                only_val: missing(&val_names, &train_names),
            });
        }
        return Ok((labelled(train), labelled(val)));
    }
    if has_val {
        return Err(DataError::NoTrain(dir.to_path_buf()));
    }
    let root = if has_train { &train_dir } else { dir };
    let classes = scan_classes(root)?;
    match val_split {
        Some(fraction) => stratified_split(classes, fraction, seed, root),
        None if has_train => Err(DataError::NoValidation(dir.to_path_buf())),
        None => Err(DataError::NeedsValSplit(dir.to_path_buf())),
    }
}

/// Checks that `dir` is an existing directory.
fn check_dir(dir: &Path) -> Result<(), DataError> {
    match fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(DataError::NotADirectory(dir.to_path_buf())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(DataError::NotFound(dir.to_path_buf()))
        }
        Err(source) => Err(DataError::Io {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// Whether a directory entry's name starts with a dot.
fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
}

/// Entries of a directory, sorted by path.
fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let io = |source| DataError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut paths = Vec::new();
    for entry in fs::read_dir(dir).map_err(io)? {
        paths.push(entry.map_err(io)?.path());
    }
    paths.sort();
    Ok(paths)
}

/// The class folders of `root` (sorted, hidden ones skipped) with their image files.
fn scan_classes(root: &Path) -> Result<ClassFiles, DataError> {
    let mut classes = Vec::new();
    for path in sorted_entries(root)? {
        // `is_dir` follows symbolic links.
        if is_hidden(&path) || !path.is_dir() {
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut files = Vec::new();
        collect_images(&path, 0, &mut files)?;
        if files.is_empty() {
            return Err(DataError::EmptyClass { class: name, path });
        }
        files.sort();
        classes.push((name, files));
    }
    classes.sort_by(|a, b| a.0.cmp(&b.0));
    match classes.len() {
        0 => Err(DataError::NoClasses(root.to_path_buf())),
        1 => Err(DataError::OneClass {
            class: classes.swap_remove(0).0,
            path: root.to_path_buf(),
        }),
        _ => Ok(classes),
    }
}

/// Deepest folder nesting searched under a class folder (a guard against symbolic link loops).
const MAX_DEPTH: usize = 32;

/// Appends the image files under `dir`, recursively.
fn collect_images(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    for path in sorted_entries(dir)? {
        if is_hidden(&path) {
            continue;
        }
        if path.is_dir() {
            if depth < MAX_DEPTH {
                collect_images(&path, depth + 1, out)?;
            }
        } else if is_image_path(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// Both splits' class names and every file labelled with its class index.
fn labelled(classes: ClassFiles) -> Split {
    let names = classes.iter().map(|(n, _)| n.clone()).collect();
    let samples = classes
        .into_iter()
        .enumerate()
        .flat_map(|(label, (_, files))| files.into_iter().map(move |f| (Source::File(f), label)))
        .collect();
    Split {
        samples,
        classes: names,
    }
}

/// A seeded, stratified train/validation split of each class's files.
fn stratified_split(
    classes: ClassFiles,
    fraction: f64,
    seed: u64,
    root: &Path,
) -> Result<(Split, Split), DataError> {
    let names: Vec<String> = classes.iter().map(|(n, _)| n.clone()).collect();
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (label, (_, files)) in classes.into_iter().enumerate() {
        let n = files.len();
        let n_val = if n >= 2 {
            ((n as f64 * fraction).round() as usize).clamp(1, n - 1)
        } else {
            0
        };
        // Each class has its own generator, so its split does not depend on the other classes.
        let mut rng = StdRng::seed_from_u64(mix(mix(seed) ^ label as u64));
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut rng);
        let mut is_val = vec![false; n];
        for &i in &order[..n_val] {
            is_val[i] = true;
        }
        for (file, to_val) in files.into_iter().zip(is_val) {
            let sample = (Source::File(file), label);
            if to_val {
                val.push(sample);
            } else {
                train.push(sample);
            }
        }
    }
    if val.is_empty() {
        return Err(DataError::EmptyValidation(root.to_path_buf()));
    }
    Ok((
        Split {
            samples: train,
            classes: names.clone(),
        },
        Split {
            samples: val,
            classes: names,
        },
    ))
}

/// CIFAR-10's binary version.
///
/// Reads `data_batch_1.bin`..`data_batch_5.bin` (train, 50 000 images) and `test_batch.bin`
/// (validation, 10 000 images) from `dir`, or from `dir/cifar-10-batches-bin/` (where the
/// archive unpacks). Each record is 1 label byte and 3072 pixel bytes: the 1024 red values of
/// the 32x32 image row by row, then the green, then the blue. Class names come from
/// `batches.meta.txt` (one per line) when present, else [`CIFAR10_CLASSES`]. The images are
/// decoded into memory ([`Source::Memory`]).
///
/// # Errors
///
/// A missing directory or file, a file whose size is not a positive multiple of 3073 bytes, a
/// label without a class name, or an I/O error.
pub fn cifar10(dir: &Path) -> Result<(Split, Split), DataError> {
    check_dir(dir)?;
    let nested = dir.join("cifar-10-batches-bin");
    let base = if !dir.join("data_batch_1.bin").exists() && nested.join("data_batch_1.bin").exists()
    {
        nested
    } else {
        dir.to_path_buf()
    };
    let meta = base.join("batches.meta.txt");
    let classes: Vec<String> = match fs::read_to_string(&meta) {
        Ok(text) => text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect()
        }
        Err(source) => return Err(DataError::Io { path: meta, source }),
    };
    let mut train = Vec::new();
    for i in 1..=5 {
        train.extend(read_cifar_file(
            &base.join(format!("data_batch_{i}.bin")),
            classes.len(),
        )?);
    }
    let val = read_cifar_file(&base.join("test_batch.bin"), classes.len())?;
    Ok((
        Split {
            samples: train,
            classes: classes.clone(),
        },
        Split {
            samples: val,
            classes,
        },
    ))
}

/// The records of one CIFAR-10 batch file.
fn read_cifar_file(path: &Path, classes: usize) -> Result<Vec<(Source, usize)>, DataError> {
    let bytes = fs::read(path).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            DataError::CifarMissing(path.to_path_buf())
        } else {
            DataError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })?;
    if bytes.is_empty() || !bytes.len().is_multiple_of(CIFAR_RECORD) {
        return Err(DataError::CifarSize {
            path: path.to_path_buf(),
            len: bytes.len(),
        });
    }
    let mut samples = Vec::with_capacity(bytes.len() / CIFAR_RECORD);
    for (record, chunk) in bytes.chunks_exact(CIFAR_RECORD).enumerate() {
        let label = chunk[0];
        if usize::from(label) >= classes {
            return Err(DataError::CifarLabel {
                path: path.to_path_buf(),
                record,
                label,
                classes,
            });
        }
        let (r, rest) = chunk[1..].split_at(1024);
        let (g, b) = rest.split_at(1024);
        let mut raw = Vec::with_capacity(3 * 1024);
        for i in 0..1024 {
            raw.extend_from_slice(&[r[i], g[i], b[i]]);
        }
        let img = RgbImage::from_raw(32, 32, raw).unwrap_or_else(|| RgbImage::new(32, 32));
        samples.push((Source::Memory(Arc::new(img)), usize::from(label)));
    }
    Ok(samples)
}

/// How samples are turned into tensors.
#[derive(Clone, Debug)]
pub enum Transform {
    /// ImageNet-style training, as torchvision's `RandomResizedCrop(size)` (scale 0.08..1,
    /// aspect ratio 3/4..4/3, BILINEAR, antialiased) then `RandomHorizontalFlip()`: the crop is
    /// sampled exactly as `RandomResizedCrop.get_params` does (10 attempts, then the
    /// center-crop fallback), resized with `resize_bilinear` (Pillow's resampler), flipped with
    /// probability 0.5, and normalized.
    RandomResizedCrop {
        /// Output side, in pixels (224 for ImageNet).
        size: u32,
    },
    /// CIFAR-style training, as torchvision's `RandomCrop(size, padding)` then
    /// `RandomHorizontalFlip()`: zero padding on every side, a random `size` crop, a flip with
    /// probability 0.5, normalize. Images are not resized; one still smaller than `size` after
    /// padding is padded further with zeros on the right and bottom (torchvision would raise).
    PadCrop {
        /// Output side, in pixels (32 for CIFAR-10).
        size: u32,
        /// Zero padding added on each side before cropping (4 for CIFAR-10).
        padding: u32,
    },
    /// Evaluation: resize the shorter side to `resize_size` and take the center `crop_size`
    /// square (`resnet_import::preprocess::preprocess`). The dataset's `mean` and `std` are
    /// used, not the ones in the [`Preprocessing`], so training and evaluation normalize alike.
    Eval(Preprocessing),
}

impl Transform {
    /// The side of the square images this transform produces.
    pub fn image_size(&self) -> u32 {
        match self {
            Transform::RandomResizedCrop { size } | Transform::PadCrop { size, .. } => *size,
            Transform::Eval(p) => p.crop_size,
        }
    }
}

/// One sample: CHW `f32` pixels (`3 * size * size` values) and its class index.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Normalized pixels, channel-major (all red, then green, then blue), rows top to bottom.
    pub pixels: Vec<f32>,
    /// Class index.
    pub label: usize,
}

/// A Burn [`Dataset`] of [`Sample`]s over a [`Split`], decoding and transforming images as
/// they are fetched.
///
/// **Reproducible randomness.** The random draws for fetching item `i` come from a generator
/// seeded with a hash of `(seed, i, v)`, where `v` counts how many times item `i` was fetched
/// before (a counter per item). With one fetch per item per epoch, `v` is the epoch number, so
/// the augmented pixels do not depend on how many loader workers there are or in which order
/// they run.
///
/// **Unreadable images** (missing, truncated, not an image) do not panic or stop training. The
/// first time a file fails, `warning: skipping unreadable image PATH: reason` is written to
/// stderr and [`ImageDataset::unreadable`] goes up by one; the file is then remembered and not
/// read again. Fetching it returns a substitute: the next readable item in index order
/// (wrapping around), with that item's own label, transformed with the failed fetch's random
/// draws, so the substitute is deterministic too. Only when no item at all is readable does
/// `get` return an error.
///
/// Burn's `DataLoaderBuilder::build` takes the dataset by value: to read
/// [`ImageDataset::unreadable`] during or after training, wrap it in an [`Arc`] (which is a
/// `Dataset` too) and keep a clone.
#[derive(Debug)]
pub struct ImageDataset {
    split: Split,
    transform: Transform,
    mean: [f32; 3],
    std: [f32; 3],
    seed: u64,
    /// How many times each item was fetched.
    visits: Vec<AtomicU32>,
    /// Items known to be unreadable.
    bad: Vec<AtomicBool>,
    /// How many items are known to be unreadable.
    unreadable: AtomicUsize,
}

impl ImageDataset {
    /// A dataset over `split`, transforming with `transform`, normalizing with `mean` and `std`
    /// (usually [`IMAGENET_MEAN`] and [`IMAGENET_STD`]), with random draws derived from `seed`.
    pub fn new(
        split: Split,
        transform: Transform,
        mean: [f32; 3],
        std: [f32; 3],
        seed: u64,
    ) -> Self {
        let n = split.samples.len();
        Self {
            split,
            transform,
            mean,
            std,
            seed,
            visits: (0..n).map(|_| AtomicU32::new(0)).collect(),
            bad: (0..n).map(|_| AtomicBool::new(false)).collect(),
            unreadable: AtomicUsize::new(0),
        }
    }

    /// How many distinct image files were found unreadable so far.
    pub fn unreadable(&self) -> usize {
        self.unreadable.load(Ordering::Relaxed)
    }

    /// The side of the square images the samples have.
    pub fn image_size(&self) -> u32 {
        self.transform.image_size()
    }

    /// The class names.
    pub fn classes(&self) -> &[String] {
        &self.split.classes
    }

    /// The underlying split.
    pub fn split(&self) -> &Split {
        &self.split
    }

    /// The transform applied.
    pub fn transform(&self) -> &Transform {
        &self.transform
    }

    /// Decodes a sample's image.
    fn load<'a>(&self, source: &'a Source) -> Result<Cow<'a, RgbImage>, ImageError> {
        match source {
            Source::File(path) => load_rgb(path, Exif::Ignore).map(Cow::Owned),
            Source::Memory(img) => Ok(Cow::Borrowed(img.as_ref())),
        }
    }

    /// Records that item `index` is unreadable, warning once.
    fn mark_unreadable(&self, index: usize, error: &ImageError) {
        let Some(flag) = self.bad.get(index) else {
            return;
        };
        if !flag.swap(true, Ordering::Relaxed) {
            self.unreadable.fetch_add(1, Ordering::Relaxed);
            let (path, reason) = match error {
                ImageError::NotFound(path) => (path, "no such file".to_string()),
                ImageError::Io { path, source } => (path, source.to_string()),
                ImageError::Decode { path, message } => (path, message.clone()),
            };
            eprintln!(
                "warning: skipping unreadable image {}: {reason}",
                path.display()
            );
        }
    }

    /// Applies the transform and normalization.
    fn apply(&self, img: &RgbImage, rng: &mut StdRng) -> Vec<f32> {
        let out = match &self.transform {
            Transform::Eval(p) => {
                let p = Preprocessing {
                    mean: self.mean,
                    std: self.std,
                    ..p.clone()
                };
                return preprocess(img, &p);
            }
            Transform::RandomResizedCrop { size } => {
                let (x, y, w, h) = random_resized_crop_params(img.width(), img.height(), rng);
                if w == 0 || h == 0 {
                    RgbImage::new(*size, *size)
                } else {
                    let crop = image::imageops::crop_imm(img, x, y, w, h).to_image();
                    resize_bilinear(&crop, *size, *size)
                }
            }
            Transform::PadCrop { size, padding } => pad_crop(img, *size, *padding, rng),
        };
        let out = if rng.random::<f64>() < 0.5 {
            image::imageops::flip_horizontal(&out)
        } else {
            out
        };
        normalize(&out, self.mean, self.std)
    }
}

impl Dataset<Sample> for ImageDataset {
    /// The transformed item `index`, or a substitute when its image is unreadable (see
    /// [`ImageDataset`]).
    ///
    /// # Panics
    ///
    /// When `index >= len()`, as the trait requires.
    fn get(&self, index: usize) -> Result<Sample, DatasetError> {
        let n = self.split.samples.len();
        assert!(index < n, "index out of bounds for dataset: {index} >= {n}");
        let visit = self.visits[index].fetch_add(1, Ordering::Relaxed);
        let mut rng = StdRng::seed_from_u64(sample_seed(self.seed, index, visit));
        for j in (index..n).chain(0..index) {
            if self.bad[j].load(Ordering::Relaxed) {
                continue;
            }
            let (source, label) = &self.split.samples[j];
            match self.load(source) {
                Ok(img) => {
                    return Ok(Sample {
                        pixels: self.apply(&img, &mut rng),
                        label: *label,
                    });
                }
                Err(e) => self.mark_unreadable(j, &e),
            }
        }
        Err(DatasetError::new(DataError::NoReadableImage(n)))
    }

    fn len(&self) -> usize {
        self.split.samples.len()
    }
}

/// SplitMix64's finalizer: a well-mixed 64-bit hash of `z`.
fn mix(z: u64) -> u64 {
    let mut z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The generator seed for the `visit`-th fetch of item `index`.
fn sample_seed(seed: u64, index: usize, visit: u32) -> u64 {
    mix(mix(mix(seed) ^ index as u64) ^ u64::from(visit))
}

/// torchvision's `RandomResizedCrop.get_params` with scale (0.08, 1) and ratio (3/4, 4/3) for
/// an image of `width` x `height`: the crop's `(left, top, width, height)`.
///
/// Up to 10 attempts draw an area fraction uniformly in [0.08, 1) and a log aspect ratio
/// uniformly in [ln 3/4, ln 4/3); the side lengths are rounded half to even as Python's
/// `round`; the first crop that fits gets a uniform position. Otherwise the fallback is the
/// center crop of the whole image with the aspect ratio clamped to [3/4, 4/3].
fn random_resized_crop_params(width: u32, height: u32, rng: &mut StdRng) -> (u32, u32, u32, u32) {
    const SCALE: (f64, f64) = (0.08, 1.0);
    const RATIO: (f64, f64) = (3.0 / 4.0, 4.0 / 3.0);
    let area = f64::from(width) * f64::from(height);
    let (log_lo, log_hi) = (RATIO.0.ln(), RATIO.1.ln());
    for _ in 0..10 {
        let target_area = area * rng.random_range(SCALE.0..SCALE.1);
        let aspect = rng.random_range(log_lo..log_hi).exp();
        let w = (target_area * aspect).sqrt().round_ties_even();
        let h = (target_area / aspect).sqrt().round_ties_even();
        if w > 0.0 && w <= f64::from(width) && h > 0.0 && h <= f64::from(height) {
            let (w, h) = (w as u32, h as u32);
            // torchvision draws the row first, then the column.
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (left, top, w, h);
        }
    }
    let in_ratio = f64::from(width) / f64::from(height);
    let (w, h) = if in_ratio < RATIO.0 {
        (width, (f64::from(width) / RATIO.0).round_ties_even() as u32)
    } else if in_ratio > RATIO.1 {
        (
            (f64::from(height) * RATIO.1).round_ties_even() as u32,
            height,
        )
    } else {
        (width, height)
    };
    let (w, h) = (w.min(width), h.min(height));
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// torchvision's `RandomCrop(size, padding)` with zero fill: a `size` x `size` crop at a
/// uniform position of the image padded by `padding` on each side.
fn pad_crop(img: &RgbImage, size: u32, padding: u32, rng: &mut StdRng) -> RgbImage {
    let (w, h) = img.dimensions();
    let (padded_w, padded_h) = (w + 2 * padding, h + 2 * padding);
    // torchvision draws the row first, then the column.
    let top = rng.random_range(0..=padded_h.saturating_sub(size));
    let left = rng.random_range(0..=padded_w.saturating_sub(size));
    RgbImage::from_fn(size, size, |x, y| {
        let sx = i64::from(x) + i64::from(left) - i64::from(padding);
        let sy = i64::from(y) + i64::from(top) - i64::from(padding);
        if sx >= 0 && sy >= 0 && sx < i64::from(w) && sy < i64::from(h) {
            *img.get_pixel(sx as u32, sy as u32)
        } else {
            Rgb([0, 0, 0])
        }
    })
}

/// A batch on the device.
#[derive(Clone, Debug)]
pub struct ClassificationBatch {
    /// Images, `[N, 3, S, S]`, float.
    pub images: Tensor<4>,
    /// Class indices, `[N]`.
    pub targets: Tensor<1, Int>,
}

/// Stacks [`Sample`]s into a [`ClassificationBatch`].
///
/// Images become an `[N, 3, S, S]` float tensor and labels an `[N]` integer tensor, created
/// from `f32` and `i64` data in the device's default float and int types.
#[derive(Clone, Debug, Default)]
pub struct ImageBatcher {
    /// The side `S` of the images; 0 infers it from the first sample.
    pub image_size: usize,
    /// Build every batch on this device instead of the one the loader asks for; the training
    /// step moves it to its replica's device. Set for remote devices: Burn 0.22's remote
    /// server can run an operation before the creation of its input when the two were sent
    /// from different threads (the loader's and the replica's), and fails the session.
    pub staging: Option<Device>,
}

impl ImageBatcher {
    /// A batcher for `size` x `size` images.
    pub fn new(image_size: usize) -> Self {
        Self {
            image_size,
            staging: None,
        }
    }
}

impl Batcher<Sample, ClassificationBatch> for ImageBatcher {
    /// # Panics
    ///
    /// When a sample does not have `3 * S * S` values (a transform and batcher that disagree).
    fn batch(&self, items: Vec<Sample>, device: &Device) -> ClassificationBatch {
        let device = self.staging.as_ref().unwrap_or(device);
        let n = items.len();
        let size = if self.image_size > 0 {
            self.image_size
        } else {
            items
                .first()
                .map_or(0, |s| ((s.pixels.len() / 3) as f64).sqrt().round() as usize)
        };
        let per_image = 3 * size * size;
        let mut pixels = Vec::with_capacity(n * per_image);
        let mut targets = Vec::with_capacity(n);
        for sample in items {
            assert_eq!(
                sample.pixels.len(),
                per_image,
                "sample has {} values, expected 3 x {size} x {size}",
                sample.pixels.len()
            );
            pixels.extend_from_slice(&sample.pixels);
            targets.push(sample.label as i64);
        }
        ClassificationBatch {
            images: Tensor::from_data(TensorData::new(pixels, [n, 3, size, size]), device),
            targets: Tensor::from_data(TensorData::new(targets, [n]), device),
        }
    }
}

/// The item indices `0..len` of a dataset whose items a [`FetchingBatcher`] fetches itself.
#[derive(Clone, Copy, Debug)]
pub struct Indices(pub usize);

impl Dataset<usize> for Indices {
    fn get(&self, index: usize) -> Result<usize, DatasetError> {
        Ok(index)
    }

    fn len(&self) -> usize {
        self.0
    }
}

/// Fetches (decodes and augments) the items of each batch from an [`ImageDataset`] on
/// `threads` threads, then stacks them with an [`ImageBatcher`].
///
/// Paired with a data loader over [`Indices`] with one worker, batches come out in the
/// loader's order, whatever the thread timing: Burn's loader with several workers gives each
/// worker a slice of the epoch and hands their batches over in the order they finish, so the
/// batch order (and the trained weights) would change from run to run.
#[derive(Clone, Debug)]
pub struct FetchingBatcher {
    /// The dataset the indices refer to.
    pub dataset: Arc<ImageDataset>,
    /// Stacks the fetched samples.
    pub batcher: ImageBatcher,
    /// Threads fetching the items of one batch (at least 1).
    pub threads: usize,
}

impl Batcher<usize, ClassificationBatch> for FetchingBatcher {
    /// # Panics
    ///
    /// When no image of the dataset can be read any more (see [`ImageDataset`]).
    fn batch(&self, indices: Vec<usize>, device: &Device) -> ClassificationBatch {
        let per_thread = indices.len().div_ceil(self.threads.max(1)).max(1);
        let fetched: Vec<Result<Sample, DatasetError>> = std::thread::scope(|scope| {
            let parts: Vec<_> = indices
                .chunks(per_thread)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .map(|&i| self.dataset.get(i))
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            parts
                .into_iter()
                .flat_map(|part| part.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let samples = fetched
            .into_iter()
            .collect::<Result<Vec<Sample>, DatasetError>>()
            .unwrap_or_else(|err| panic!("training data: {err}"));
        self.batcher.batch(samples, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a `w` x `h` PNG filled with `color`.
    fn write_png(path: &Path, w: u32, h: u32, color: [u8; 3]) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        RgbImage::from_pixel(w, h, Rgb(color)).save(path).unwrap();
    }

    /// Creates `root/<class>/<i>.png` for each `(class, count)`.
    fn make_classes(root: &Path, classes: &[(&str, usize)]) {
        for (class, count) in classes {
            for i in 0..*count {
                write_png(
                    &root.join(class).join(format!("{i:03}.png")),
                    8,
                    6,
                    [10, 20, 30],
                );
            }
        }
    }

    fn val_files(split: &Split) -> Vec<PathBuf> {
        split
            .samples
            .iter()
            .map(|(s, _)| match s {
                Source::File(p) => p.clone(),
                Source::Memory(_) => panic!("expected files"),
            })
            .collect()
    }

    #[test]
    fn stratified_split_sizes_and_determinism() {
        let dir = tempfile::tempdir().unwrap();
        make_classes(
            dir.path(),
            &[("cat", 10), ("dog", 3), ("emu", 1), ("fox", 2)],
        );
        let (train, val) = image_folder(dir.path(), Some(0.2), 7).unwrap();
        assert_eq!(train.classes, ["cat", "dog", "emu", "fox"]);
        assert_eq!(val.classes, train.classes);
        // cat: round(2.0) = 2; dog: round(0.6) = 1; emu: single image stays in train; fox: 1.
        assert_eq!(val.class_counts(), [2, 1, 0, 1]);
        assert_eq!(train.class_counts(), [8, 2, 1, 1]);
        // Disjoint and complete.
        let (mut all, v) = (val_files(&train), val_files(&val));
        assert!(v.iter().all(|f| !all.contains(f)));
        all.extend(v);
        assert_eq!(all.len(), 16);

        let (train2, val2) = image_folder(dir.path(), Some(0.2), 7).unwrap();
        assert_eq!(val_files(&val), val_files(&val2));
        assert_eq!(val_files(&train), val_files(&train2));
        let differs = (0..10u64).any(|seed| {
            let (_, v) = image_folder(dir.path(), Some(0.2), 100 + seed).unwrap();
            val_files(&v) != val_files(&val)
        });
        assert!(differs, "the split should depend on the seed");
        // Labels match the folder.
        for (s, label) in train.samples.iter().chain(&val.samples) {
            let Source::File(p) = s else { panic!() };
            assert!(p.starts_with(dir.path().join(&train.classes[*label])));
        }
    }

    #[test]
    fn class_names_sorted_and_files_recursive() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let train = root.join("train");
        make_classes(&train, &[("zebra", 1), ("Apple", 1), ("mango", 1)]);
        write_png(&train.join("mango/deeper/more/x.PNG"), 4, 4, [0, 0, 0]);
        fs::write(train.join("mango/notes.txt"), "not an image").unwrap();
        fs::write(train.join("mango/._003.png"), "AppleDouble").unwrap();
        fs::create_dir_all(train.join(".ipynb_checkpoints")).unwrap();
        fs::write(train.join("README.md"), "stray file").unwrap();
        make_classes(
            &root.join("val"),
            &[("zebra", 1), ("Apple", 2), ("mango", 1)],
        );
        let (train, val) = image_folder(root, None, 0).unwrap();
        assert_eq!(train.classes, ["Apple", "mango", "zebra"]);
        assert_eq!(train.class_counts(), [1, 2, 1]);
        assert_eq!(val.class_counts(), [2, 1, 1]);
        // With both train/ and val/, val_split is ignored.
        let (_, val) = image_folder(root, Some(0.5), 0).unwrap();
        assert_eq!(val.len(), 4);
    }

    #[test]
    fn folder_errors() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let err = |dir: &Path, split: Option<f64>| image_folder(dir, split, 0).unwrap_err();

        let missing = root.join("nope");
        let e = err(&missing, Some(0.1));
        assert!(matches!(e, DataError::NotFound(_)), "{e}");
        assert!(e.to_string().contains("nope"));

        let empty = root.join("empty");
        fs::create_dir(&empty).unwrap();
        assert!(matches!(err(&empty, Some(0.1)), DataError::NoClasses(_)));

        let one = root.join("one");
        make_classes(&one, &[("only", 3)]);
        let e = err(&one, Some(0.1));
        assert!(matches!(e, DataError::OneClass { .. }));
        assert!(e.to_string().contains("nothing to learn"), "{e}");

        let hollow = root.join("hollow");
        make_classes(&hollow, &[("a", 2)]);
        fs::create_dir_all(hollow.join("b_empty")).unwrap();
        let e = err(&hollow, Some(0.1));
        assert!(matches!(e, DataError::EmptyClass { .. }));
        assert!(e.to_string().contains("'b_empty'"), "{e}");

        let flat = root.join("flat");
        make_classes(&flat, &[("a", 2), ("b", 2)]);
        let e = err(&flat, None);
        assert!(matches!(e, DataError::NeedsValSplit(_)));
        assert!(e.to_string().contains("--val-split"), "{e}");
        assert!(matches!(
            err(&flat, Some(1.0)),
            DataError::InvalidValSplit(_)
        ));
        assert!(matches!(
            err(&flat, Some(0.0)),
            DataError::InvalidValSplit(_)
        ));
        assert!(matches!(
            err(&flat, Some(f64::NAN)),
            DataError::InvalidValSplit(_)
        ));

        let train_only = root.join("train_only");
        make_classes(&train_only.join("train"), &[("a", 2), ("b", 2)]);
        let e = err(&train_only, None);
        assert!(matches!(e, DataError::NoValidation(_)));
        let msg = e.to_string();
        assert!(
            msg.contains("--val-split") && msg.contains("train_only/val"),
            "{msg}"
        );
        // With a fraction, train/ is split.
        let (train, val) = image_folder(&train_only, Some(0.5), 1).unwrap();
        assert_eq!((train.len(), val.len()), (2, 2));

        let val_only = root.join("val_only");
        make_classes(&val_only.join("val"), &[("a", 2), ("b", 2)]);
        assert!(matches!(err(&val_only, Some(0.5)), DataError::NoTrain(_)));

        let mismatch = root.join("mismatch");
        make_classes(&mismatch.join("train"), &[("a", 1), ("b", 1), ("c", 1)]);
        make_classes(&mismatch.join("val"), &[("a", 1), ("b", 1), ("d", 1)]);
        let e = err(&mismatch, None);
        assert!(matches!(e, DataError::ClassMismatch { .. }));
        assert!(
            e.to_string().contains("only in train/: c; only in val/: d"),
            "{e}"
        );

        let singles = root.join("singles");
        make_classes(&singles, &[("a", 1), ("b", 1)]);
        assert!(matches!(
            err(&singles, Some(0.5)),
            DataError::EmptyValidation(_)
        ));

        // Every message is one line.
        for e in [
            err(&missing, None),
            err(&hollow, None),
            err(&mismatch, None),
        ] {
            assert!(!e.to_string().contains('\n'));
        }
    }

    /// A CIFAR-10 record.
    fn cifar_record(label: u8, r: impl Fn(usize) -> u8, g: u8, b: u8) -> Vec<u8> {
        let mut rec = vec![label];
        rec.extend((0..1024).map(r));
        rec.extend(std::iter::repeat_n(g, 1024));
        rec.extend(std::iter::repeat_n(b, 1024));
        rec
    }

    fn write_cifar(dir: &Path, records: &[u8]) {
        fs::create_dir_all(dir).unwrap();
        for i in 1..=5 {
            fs::write(dir.join(format!("data_batch_{i}.bin")), records).unwrap();
        }
        fs::write(dir.join("test_batch.bin"), records).unwrap();
    }

    fn memory_image(source: &Source) -> &RgbImage {
        match source {
            Source::Memory(img) => img,
            Source::File(_) => panic!("expected an in-memory image"),
        }
    }

    #[test]
    fn cifar_parsing() {
        let dir = tempfile::tempdir().unwrap();
        let mut bytes = cifar_record(3, |_| 255, 0, 0);
        bytes.extend(cifar_record(9, |i| (i % 256) as u8, 7, 200));
        bytes.extend(cifar_record(0, |_| 0, 0, 255));
        write_cifar(dir.path(), &bytes);
        let (train, val) = cifar10(dir.path()).unwrap();
        assert_eq!(train.len(), 15);
        assert_eq!(val.len(), 3);
        assert_eq!(train.classes, CIFAR10_CLASSES);
        let labels: Vec<usize> = val.samples.iter().map(|(_, l)| *l).collect();
        assert_eq!(labels, [3, 9, 0]);
        let red = memory_image(&val.samples[0].0);
        assert_eq!(red.dimensions(), (32, 32));
        assert!(red.pixels().all(|p| p.0 == [255, 0, 0]));
        let ramp = memory_image(&val.samples[1].0);
        // Row-major: pixel (x = 5, y = 1) is the 37th value of each plane.
        assert_eq!(ramp.get_pixel(5, 1).0, [37, 7, 200]);
        assert_eq!(ramp.get_pixel(31, 7).0, [255, 7, 200]);
        assert!(
            memory_image(&val.samples[2].0)
                .pixels()
                .all(|p| p.0 == [0, 0, 255])
        );

        // One level down, with class names from batches.meta.txt.
        let outer = tempfile::tempdir().unwrap();
        let nested = outer.path().join("cifar-10-batches-bin");
        write_cifar(&nested, &bytes);
        let names: String = (0..10).map(|i| format!("class{i}\n")).collect();
        fs::write(nested.join("batches.meta.txt"), names + "\n\n").unwrap();
        let (train, _) = cifar10(outer.path()).unwrap();
        assert_eq!(train.classes.len(), 10);
        assert_eq!(train.classes[9], "class9");

        // Errors.
        fs::remove_file(nested.join("data_batch_4.bin")).unwrap();
        let e = cifar10(outer.path()).unwrap_err();
        assert!(matches!(e, DataError::CifarMissing(_)));
        assert!(e.to_string().contains("data_batch_4.bin"), "{e}");
        fs::write(nested.join("data_batch_4.bin"), &bytes[..3000]).unwrap();
        let e = cifar10(outer.path()).unwrap_err();
        assert!(matches!(e, DataError::CifarSize { len: 3000, .. }), "{e}");
        let mut bad_label = bytes.clone();
        bad_label[CIFAR_RECORD] = 10;
        fs::write(nested.join("data_batch_4.bin"), &bad_label).unwrap();
        let e = cifar10(outer.path()).unwrap_err();
        assert!(
            matches!(
                e,
                DataError::CifarLabel {
                    record: 1,
                    label: 10,
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(
            cifar10(&outer.path().join("missing")).unwrap_err(),
            DataError::NotFound(_)
        ));
    }

    /// A split of in-memory images with distinct content.
    fn memory_split(n: usize, w: u32, h: u32) -> Split {
        let samples = (0..n)
            .map(|k| {
                let img = RgbImage::from_fn(w, h, |x, y| {
                    Rgb([(x * 7 + k as u32) as u8, (y * 5) as u8, ((x ^ y) * 3) as u8])
                });
                (Source::Memory(Arc::new(img)), k % 2)
            })
            .collect();
        Split {
            samples,
            classes: vec!["a".into(), "b".into()],
        }
    }

    fn dataset(split: Split, transform: Transform, seed: u64) -> ImageDataset {
        ImageDataset::new(split, transform, IMAGENET_MEAN, IMAGENET_STD, seed)
    }

    #[test]
    fn random_transforms_sizes_and_determinism() {
        for transform in [
            Transform::RandomResizedCrop { size: 24 },
            Transform::PadCrop {
                size: 24,
                padding: 4,
            },
        ] {
            let a = dataset(memory_split(4, 40, 30), transform.clone(), 11);
            let b = dataset(memory_split(4, 40, 30), transform.clone(), 11);
            let c = dataset(memory_split(4, 40, 30), transform.clone(), 12);
            assert_eq!(a.image_size(), 24);
            assert_eq!(a.len(), 4);
            // b fetches in another order first: item 2's first visit must not depend on it.
            let b_first_3 = b.get(3).unwrap();
            let first = a.get(2).unwrap();
            assert_eq!(first.pixels.len(), 3 * 24 * 24);
            assert_eq!(first.label, 0);
            assert_eq!(b.get(2).unwrap().pixels, first.pixels, "{transform:?}");
            assert_eq!(a.get(3).unwrap().pixels, b_first_3.pixels);
            // The second visit differs, and so does another seed.
            assert_ne!(a.get(2).unwrap().pixels, first.pixels, "{transform:?}");
            assert_ne!(c.get(2).unwrap().pixels, first.pixels, "{transform:?}");
        }
    }

    #[test]
    fn random_resized_crop_params_follow_torchvision() {
        let mut rng = StdRng::seed_from_u64(3);
        for _ in 0..200 {
            let (x, y, w, h) = random_resized_crop_params(64, 48, &mut rng);
            assert!(w > 0 && h > 0 && x + w <= 64 && y + h <= 48);
            let (area, ratio) = (
                f64::from(w * h) / (64.0 * 48.0),
                f64::from(w) / f64::from(h),
            );
            assert!((0.06..=1.0).contains(&area), "{area}");
            assert!((0.6..=1.5).contains(&ratio), "{ratio}");
        }
        // No crop of a 200x2 strip fits: torchvision's fallback, h = 2, w = round(2 * 4/3) = 3,
        // centered.
        assert_eq!(random_resized_crop_params(200, 2, &mut rng), (98, 0, 3, 2));
        assert_eq!(random_resized_crop_params(2, 200, &mut rng), (0, 98, 2, 3));
    }

    #[test]
    fn flips_about_half_the_time() {
        // Left half black, right half white; padding 0 and full size leave only the flip.
        let img = RgbImage::from_fn(8, 8, |x, _| Rgb(if x < 4 { [0; 3] } else { [255; 3] }));
        let split = Split {
            samples: (0..100)
                .map(|_| (Source::Memory(Arc::new(img.clone())), 0))
                .collect(),
            classes: vec!["a".into(), "b".into()],
        };
        let ds = ImageDataset::new(
            split,
            Transform::PadCrop {
                size: 8,
                padding: 0,
            },
            [0.0; 3],
            [1.0; 3],
            5,
        );
        let mut flipped = 0;
        for visit in 0..2 {
            for i in 0..100 {
                let s = ds.get(i).unwrap();
                let first = s.pixels[0];
                assert!(first == 0.0 || first == 1.0, "visit {visit}");
                if first == 1.0 {
                    flipped += 1;
                }
            }
        }
        assert!((70..=130).contains(&flipped), "flipped {flipped} of 200");
    }

    #[test]
    fn eval_transform() {
        let ds = dataset(
            memory_split(2, 50, 40),
            Transform::Eval(Preprocessing {
                resize_size: 36,
                crop_size: 32,
                ..Preprocessing::imagenet(36)
            }),
            0,
        );
        assert_eq!(ds.image_size(), 32);
        let a = ds.get(1).unwrap();
        assert_eq!(a.pixels.len(), 3 * 32 * 32);
        assert_eq!(
            ds.get(1).unwrap().pixels,
            a.pixels,
            "evaluation is not random"
        );
    }

    #[test]
    fn unreadable_images_are_counted_and_substituted() {
        let dir = tempfile::tempdir().unwrap();
        make_classes(&dir.path().join("train"), &[("a", 2), ("b", 2)]);
        make_classes(&dir.path().join("val"), &[("a", 1), ("b", 1)]);
        // a/001.png is garbage, b/000.png is truncated.
        fs::write(dir.path().join("train/a/001.png"), b"definitely not a png").unwrap();
        let good = fs::read(dir.path().join("train/b/001.png")).unwrap();
        fs::write(dir.path().join("train/b/000.png"), &good[..good.len() / 2]).unwrap();
        let (train, _) = image_folder(dir.path(), None, 0).unwrap();
        let ds = dataset(train, Transform::RandomResizedCrop { size: 8 }, 0);
        assert_eq!(ds.unreadable(), 0);
        // Item 1 (a/001) and item 2 (b/000) are bad: the substitute is item 3 (b/001).
        let s = ds.get(1).unwrap();
        assert_eq!(s.label, 1);
        assert_eq!(s.pixels.len(), 3 * 8 * 8);
        assert_eq!(ds.unreadable(), 2);
        // Fetching again neither re-counts nor fails.
        for i in 0..4 {
            ds.get(i).unwrap();
        }
        assert_eq!(ds.unreadable(), 2);
        assert_eq!(ds.get(0).unwrap().label, 0);
        assert_eq!(ds.get(2).unwrap().label, 1);

        // With nothing readable, an error instead of a loop or a panic.
        let split = Split {
            samples: vec![(Source::File(dir.path().join("train/a/001.png")), 0)],
            classes: vec!["a".into(), "b".into()],
        };
        let ds = dataset(split, Transform::RandomResizedCrop { size: 8 }, 0);
        let e = ds.get(0).unwrap_err();
        assert!(e.to_string().contains("no readable image"), "{e}");
        assert_eq!(ds.unreadable(), 1);
    }

    #[cfg(feature = "flex")]
    #[test]
    fn batcher_shapes_and_dtypes() {
        use burn::tensor::DType;
        let device = Device::flex();
        let ds = dataset(
            memory_split(3, 20, 20),
            Transform::RandomResizedCrop { size: 16 },
            0,
        );
        let items: Vec<Sample> = (0..3).map(|i| ds.get(i).unwrap()).collect();
        let expected = items[1].pixels.clone();
        for batcher in [ImageBatcher::new(16), ImageBatcher::default()] {
            let batch = batcher.batch(items.clone(), &device);
            assert_eq!(batch.images.dims(), [3, 3, 16, 16]);
            assert_eq!(batch.targets.dims(), [3]);
            assert_eq!(batch.images.dtype(), DType::F32);
            assert!(matches!(batch.targets.dtype(), DType::I64 | DType::I32));
            let targets: Vec<i64> = batch.targets.into_data().try_into_vec_as::<i64>().unwrap();
            assert_eq!(targets, [0, 1, 0]);
            let pixels: Vec<f32> = batch.images.into_data().try_into_vec_as::<f32>().unwrap();
            assert_eq!(&pixels[3 * 256..6 * 256], expected.as_slice());
        }
    }
}
