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
        let item = self.forward_classification(batch.images, batch.targets);
        let gradients = if self.gradient_scale == 1.0 {
            item.loss.backward()
        } else {
            (item.loss.clone() * self.gradient_scale).backward()
        };
        TrainOutput::new(self, gradients, item)
    }
}

impl InferenceStep for Classifier {
    type Input = ClassificationBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: ClassificationBatch) -> ClassificationOutput {
        self.forward_classification(batch.images, batch.targets)
    }
}
