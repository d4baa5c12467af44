//! Training and fine-tuning of `resnet-model` networks on your own images with Burn's
//! `Learner`: image folders or CIFAR-10, torchvision-style augmentation, SGD or AdamW with
//! warm-up and cosine decay, checkpoints every epoch with `--resume`, and the run's records,
//! `metrics.csv`, `curves.png` and confusion matrix.

pub mod backend;
pub mod data;
pub mod distributed;
mod logger;
pub mod model;
pub mod plots;
mod renderer;
pub mod train;
