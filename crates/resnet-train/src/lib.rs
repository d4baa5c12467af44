//! Training and fine-tuning of `resnet-model` networks on your own images with Burn's
//! `Learner`.
//!
//! Not implemented yet: this crate is wired into the workspace so that the training loop
//! (issue "resnet-train") lands without restructuring. The binary says so and exits non-zero.
