//! The network wrapped for Burn's `Learner`: a [`ResNet`] with a classification loss.

use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::tensor::{Int, Tensor};
use burn::train::{ClassificationOutput, InferenceStep, TrainOutput, TrainStep};
use resnet_model::ResNet;

use crate::data::ClassificationBatch;

/// A [`ResNet`] trained with cross-entropy (optionally label-smoothed).
#[derive(Module, Debug)]
pub struct Classifier {
    /// The network.
    pub net: ResNet,
    /// Label smoothing of the loss, in [0, 1); 0 disables it.
    pub label_smoothing: f32,
    /// Factor on the loss before back-propagation (the reported loss is unscaled): `1 / N`
    /// when N devices each take a share of the batch and Burn's multi-device strategy sums
    /// their gradients, so that the update equals the single-device one on the whole batch.
    pub gradient_scale: f32,
    /// Wait for the replica's device to finish each training step before its gradients are
    /// handed to the trainer's thread. Needed for remote devices: Burn 0.22's remote client
    /// sends each thread's operations in batches, and a read from another thread can reach the
    /// server before the batch that computes the tensor, which fails the session.
    pub sync_steps: bool,
}

impl Classifier {
    /// Logits and loss for a batch.
    ///
    /// # Shapes
    /// - `images`: `[batch, 3, height, width]`
    /// - `targets`: `[batch]`
    pub fn forward_classification(
        &self,
        images: Tensor<4>,
        targets: Tensor<1, Int>,
    ) -> ClassificationOutput {
        // Batches built on a staging device (see `ImageBatcher::staging`) move to this
        // replica's device here, on the replica's own thread; elsewhere this is a no-op.
        let device = self.net.conv1.weight.val().device();
        let (images, targets) = if images.device() == device {
            (images, targets)
        } else {
            (images.to_device(&device), targets.to_device(&device))
        };
        let output = self.net.forward(images);
        let smoothing = (self.label_smoothing > 0.0).then_some(self.label_smoothing);
        let loss = CrossEntropyLossConfig::new()
            .with_smoothing(smoothing)
            .init(&output.device())
            .forward(output.clone(), targets.clone());
        ClassificationOutput {
            loss,
            output,
            targets,
        }
    }
}

impl TrainStep for Classifier {
    type Input = ClassificationBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: ClassificationBatch) -> TrainOutput<ClassificationOutput> {
        if self.sync_steps {
            crate::distributed::step_gate(std::time::Duration::from_secs(300));
        }
        let item = self.forward_classification(batch.images, batch.targets);
        let gradients = if self.gradient_scale == 1.0 {
            item.loss.backward()
        } else {
            (item.loss.clone() * self.gradient_scale).backward()
        };
        if self.sync_steps
            && let Err(err) = item.loss.device().sync()
        {
            panic!("the training step failed on its device: {err}");
        }
        crate::distributed::note_progress();
        TrainOutput::new(self, gradients, item)
    }
}

impl InferenceStep for Classifier {
    type Input = ClassificationBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: ClassificationBatch) -> ClassificationOutput {
        let output = self.forward_classification(batch.images, batch.targets);
        crate::distributed::note_progress();
        output
    }
}
