//! Size and cost of a network: parameters per stage, output shapes and multiply-adds, read off
//! the built module itself (no forward pass, no parameter allocation).

use std::collections::BTreeMap;

use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::conv::Conv2d;
use burn::tensor::Tensor;

use crate::block::{Downsample, ResidualBlock};
use crate::error::ConfigError;
use crate::resnet::{ResNet, conv_geometry, window_output};

/// Trainable parameters of a module, keyed by the first segment of their path (`conv1`,
/// `layer1`, `fc`, ...).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParameterCounts(pub BTreeMap<String, usize>);

impl ParameterCounts {
    /// Sum over all top-level entries.
    pub fn total(&self) -> usize {
        self.0.values().sum()
    }

    /// Parameters under the given top-level names.
    pub fn sum_of(&self, names: &[&str]) -> usize {
        names.iter().filter_map(|name| self.0.get(*name)).sum()
    }
}

/// Counts float parameters by path, leaving out batch-norm running statistics (PyTorch buffers).
#[derive(Default)]
struct CountVisitor {
    path: Vec<String>,
    counts: ParameterCounts,
}

impl ModuleVisitor for CountVisitor {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let leaf = self.path.last().map(String::as_str);
        if matches!(leaf, Some("running_mean" | "running_var")) {
            return;
        }
        let top = self.path.first().cloned().unwrap_or_default();
        *self.counts.0.entry(top).or_default() += param.lazy_shape().num_elements();
    }
}

/// Trainable parameters of any module, grouped by top-level field, without allocating them.
pub fn parameter_counts<M: Module>(module: &M) -> ParameterCounts {
    let mut visitor = CountVisitor::default();
    module.visit(&mut visitor);
    visitor.counts
}

/// One row of [`ModelSummary`]: a part of the network and what comes out of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageSummary {
    /// `stem`, `layer1`..`layer4` or `head`.
    pub name: String,
    /// Output shape for one image: `[channels, height, width]` (`[classes, 1, 1]` for the head).
    pub output_shape: [usize; 3],
    /// Trainable parameters of this part.
    pub parameters: usize,
    /// Multiply-adds of its convolutions and linear layer for one image.
    pub multiply_adds: u64,
}

/// Parameters, output shapes and multiply-adds of a network for one input size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelSummary {
    /// Input `[channels, height, width]` the costs are for.
    pub input_shape: [usize; 3],
    /// Stem, the four stages and the head, in order.
    pub stages: Vec<StageSummary>,
}

impl ModelSummary {
    /// Trainable parameters of the whole network.
    pub fn parameters(&self) -> usize {
        self.stages.iter().map(|stage| stage.parameters).sum()
    }

    /// Multiply-adds of one forward pass on one image: convolutions and the linear layer, the
    /// convention behind torchvision's published GFLOPS (4.089 for ResNet-50 at 224x224).
    pub fn multiply_adds(&self) -> u64 {
        self.stages.iter().map(|stage| stage.multiply_adds).sum()
    }
}

/// One convolution of a network and the input it sees, from [`ResNet::convolutions`].
#[derive(Clone, Copy, Debug)]
pub struct ConvolutionInput<'a> {
    /// The convolution.
    pub conv: &'a Conv2d,
    /// Its input for one image: `[channels, height, width]`.
    pub input_shape: [usize; 3],
}

/// Tracks the activation shape through the network, accumulating convolution work and
/// recording each convolution with its input.
struct ShapeTracker<'a> {
    shape: [usize; 3],
    macs: u64,
    convolutions: Vec<ConvolutionInput<'a>>,
}

impl<'a> ShapeTracker<'a> {
    fn new(shape: [usize; 3]) -> Self {
        Self {
            shape,
            macs: 0,
            convolutions: Vec::new(),
        }
    }

    fn conv(&mut self, conv: &'a Conv2d) -> Result<[usize; 3], ConfigError> {
        let ([out_c, in_per_group, kh, kw], padding) = conv_geometry(conv);
        let [_, h, w] = self.shape;
        let out = |size: usize, kernel: usize, axis: usize| {
            let reach = conv.dilation[axis] * (kernel - 1) + 1;
            if size + 2 * padding < reach {
                return Err(ConfigError::InputTooSmall {
                    height: self.shape[1],
                    width: self.shape[2],
                });
            }
            Ok(window_output(
                size,
                kernel,
                conv.stride[axis],
                padding,
                conv.dilation[axis],
            ))
        };
        let (oh, ow) = (out(h, kh, 0)?, out(w, kw, 1)?);
        self.macs += (out_c * in_per_group * kh * kw * oh * ow) as u64;
        self.convolutions.push(ConvolutionInput {
            conv,
            input_shape: self.shape,
        });
        Ok([out_c, oh, ow])
    }

    /// The stem convolution and, unless the CIFAR stem left it out, the 3x3 stride-2 max-pool.
    fn stem(&mut self, model: &'a ResNet) -> Result<(), ConfigError> {
        self.shape = self.conv(&model.conv1)?;
        if model.maxpool.is_some() {
            let [c, h, w] = self.shape;
            self.shape = [
                c,
                window_output(h, 3, 2, 1, 1),
                window_output(w, 3, 2, 1, 1),
            ];
        }
        Ok(())
    }

    fn downsample(&mut self, downsample: &'a Option<Downsample>) -> Result<(), ConfigError> {
        if let Some(downsample) = downsample {
            self.conv(&downsample.conv)?;
        }
        Ok(())
    }

    fn block(&mut self, block: &'a ResidualBlock) -> Result<(), ConfigError> {
        match block {
            ResidualBlock::Basic(b) => {
                self.downsample(&b.downsample)?;
                for conv in [&b.conv1, &b.conv2] {
                    self.shape = self.conv(conv)?;
                }
            }
            ResidualBlock::Bottleneck(b) => {
                self.downsample(&b.downsample)?;
                for conv in [&b.conv1, &b.conv2, &b.conv3] {
                    self.shape = self.conv(conv)?;
                }
            }
        }
        Ok(())
    }
}

impl ResNet {
    /// Parameters, per-stage output shapes and multiply-adds for one `[in_channels, height,
    /// width]` image. Errors when the input is too small for the stem.
    pub fn summary(&self, height: usize, width: usize) -> Result<ModelSummary, ConfigError> {
        let counts = parameter_counts(self);
        let in_channels = conv_geometry(&self.conv1).0[1];
        let mut tracker = ShapeTracker::new([in_channels, height, width]);
        let mut stages = Vec::with_capacity(6);

        tracker.stem(self)?;
        stages.push(StageSummary {
            name: "stem".into(),
            output_shape: tracker.shape,
            parameters: counts.sum_of(&["conv1", "bn1"]),
            multiply_adds: std::mem::take(&mut tracker.macs),
        });

        for (index, stage) in self.stages().into_iter().enumerate() {
            for block in stage {
                tracker.block(block)?;
            }
            let name = format!("layer{}", index + 1);
            stages.push(StageSummary {
                parameters: counts.sum_of(&[name.as_str()]),
                name,
                output_shape: tracker.shape,
                multiply_adds: std::mem::take(&mut tracker.macs),
            });
        }

        let [features, classes] = self.fc.weight.lazy_shape().dims::<2>();
        stages.push(StageSummary {
            name: "head".into(),
            output_shape: [classes, 1, 1],
            parameters: counts.sum_of(&["fc"]),
            multiply_adds: (features * classes) as u64,
        });
        Ok(ModelSummary {
            input_shape: [in_channels, height, width],
            stages,
        })
    }

    /// Every convolution of the network, in the order the forward pass runs them (a block's
    /// downsample first), with the input each sees for one `height x width` image: for
    /// per-layer benchmarks and kernel tests on a model's real shapes. Errors when the input
    /// is too small for the stem.
    pub fn convolutions(
        &self,
        height: usize,
        width: usize,
    ) -> Result<Vec<ConvolutionInput<'_>>, ConfigError> {
        let in_channels = conv_geometry(&self.conv1).0[1];
        let mut tracker = ShapeTracker::new([in_channels, height, width]);
        tracker.stem(self)?;
        for block in self.stages().into_iter().flatten() {
            tracker.block(block)?;
        }
        Ok(tracker.convolutions)
    }
}
