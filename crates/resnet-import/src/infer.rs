//! Reading the architecture off a torchvision `state_dict`'s keys and shapes.

use std::collections::BTreeMap;

use resnet_model::{BlockKind, ResNetConfig};

/// Tensor shapes by torchvision key (prefix already stripped).
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// What could be read off a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inferred {
    /// The architecture, with `num_classes` from `fc` (1000 if the checkpoint has no head).
    pub config: ResNetConfig,
    /// Whether the checkpoint has a classifier head (`fc.weight`).
    pub has_head: bool,
}

impl Inferred {
    /// One line for the user: `resnet50 (1000 classes)` or the full settings of a custom net.
    pub fn describe(&self) -> String {
        let c = &self.config;
        let name = match c.preset_name() {
            Some(name) => name.to_string(),
            None => format!(
                "custom ResNet ({} blocks {:?}, groups {}, width/group {}, stem {} ch, planes {:?})",
                c.block.name(),
                c.layers,
                c.groups,
                c.width_per_group,
                c.stem_channels,
                c.stage_planes
            ),
        };
        let stem = if c.cifar_stem { ", CIFAR stem" } else { "" };
        let head = if self.has_head {
            format!("{} classes", c.num_classes)
        } else {
            "no classifier head".to_string()
        };
        format!("{name} ({head}{stem}, {} input channels)", c.in_channels)
    }
}

fn shape<'a>(shapes: &'a Shapes, key: &str) -> Result<&'a [usize], String> {
    shapes
        .get(key)
        .map(Vec::as_slice)
        .ok_or_else(|| format!("no `{key}`"))
}

fn dim(shapes: &Shapes, key: &str, rank: usize, index: usize) -> Result<usize, String> {
    let s = shape(shapes, key)?;
    if s.len() != rank {
        return Err(format!("`{key}` has shape {s:?}, expected rank {rank}"));
    }
    Ok(s[index])
}

/// Infer the configuration of the torchvision-layout ResNet whose tensor shapes are given.
///
/// Reads the block kind (`conv3` exists in bottlenecks), blocks per stage, stem width and
/// kernel (7: torchvision stem, 3: CIFAR stem), stage widths, ResNeXt groups and width per
/// group, input channels and classes. Errors name the first key that does not fit.
pub fn infer_config(shapes: &Shapes) -> Result<Inferred, String> {
    let block = if shapes.contains_key("layer1.0.conv3.weight") {
        BlockKind::Bottleneck
    } else {
        BlockKind::Basic
    };
    let stem = shape(shapes, "conv1.weight")?;
    let &[stem_channels, in_channels, kh, kw] = stem else {
        return Err(format!(
            "`conv1.weight` has shape {stem:?}, expected rank 4"
        ));
    };
    let cifar_stem = match (kh, kw) {
        (7, 7) => false,
        (3, 3) => true,
        _ => return Err(format!("unsupported {kh}x{kw} stem convolution")),
    };

    let mut layers = [0; 4];
    let mut stage_planes = [0; 4];
    let mut groups = 1;
    let mut width_per_group = 64;
    for stage in 0..4 {
        let prefix = format!("layer{}", stage + 1);
        layers[stage] = (0..)
            .take_while(|i| shapes.contains_key(&format!("{prefix}.{i}.conv1.weight")))
            .count();
        if layers[stage] == 0 {
            return Err(format!("no `{prefix}.0.conv1.weight`"));
        }
        let first = format!("{prefix}.0");
        match block {
            BlockKind::Basic => {
                stage_planes[stage] = dim(shapes, &format!("{first}.conv1.weight"), 4, 0)?
            }
            BlockKind::Bottleneck => {
                let out = dim(shapes, &format!("{first}.conv3.weight"), 4, 0)?;
                if out % BlockKind::Bottleneck.expansion() != 0 {
                    return Err(format!(
                        "`{first}.conv3.weight` has {out} outputs, not a multiple of 4"
                    ));
                }
                let planes = out / BlockKind::Bottleneck.expansion();
                stage_planes[stage] = planes;
                let conv2 = shape(shapes, &format!("{first}.conv2.weight"))?;
                let &[width, per_group, _, _] = conv2 else {
                    return Err(format!("`{first}.conv2.weight` has shape {conv2:?}"));
                };
                if per_group == 0 || width % per_group != 0 {
                    return Err(format!("`{first}.conv2.weight` has shape {conv2:?}"));
                }
                if stage == 0 {
                    groups = width / per_group;
                    width_per_group = width * 64 / (planes * groups);
                }
            }
        }
    }

    let has_head = shapes.contains_key("fc.weight");
    let num_classes = if has_head {
        dim(shapes, "fc.weight", 2, 0)?
    } else {
        1000
    };
    let config = ResNetConfig::new(block, layers)
        .with_num_classes(num_classes)
        .with_in_channels(in_channels)
        .with_groups(groups)
        .with_width_per_group(width_per_group)
        .with_cifar_stem(cifar_stem)
        .with_stem_channels(stem_channels)
        .with_stage_planes(stage_planes);
    config.validate().map_err(|err| err.to_string())?;
    Ok(Inferred { config, has_head })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shapes of a torchvision model's state_dict, from our own module (whose parameter
    /// counts are tested equal to torchvision's).
    fn shapes_of(config: &ResNetConfig) -> Shapes {
        use burn::module::{Module, ModuleVisitor, Param};
        use burn::tensor::Tensor;
        #[derive(Default)]
        struct Collect {
            path: Vec<String>,
            shapes: Shapes,
        }
        impl ModuleVisitor for Collect {
            fn enter_module(&mut self, name: &str, container: &str) {
                if !container.starts_with("Enum:") {
                    self.path.push(name.to_string());
                }
            }
            fn exit_module(&mut self, _name: &str, container: &str) {
                if !container.starts_with("Enum:") {
                    self.path.pop();
                }
            }
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                let key = crate::keymap::burn_to_torchvision(&self.path.join("."));
                let mut dims = param.lazy_shape().dims::<D>().to_vec();
                if key == "fc.weight" {
                    dims.reverse();
                }
                self.shapes.insert(key, dims);
            }
        }
        let model = config.init(&burn::tensor::Device::flex());
        let mut visitor = Collect::default();
        model.visit(&mut visitor);
        visitor.shapes
    }

    #[test]
    fn infers_every_preset() {
        for name in resnet_model::ARCHITECTURES {
            let config = ResNetConfig::from_name(name).unwrap();
            let inferred = infer_config(&shapes_of(&config)).unwrap();
            assert_eq!(inferred.config, config, "{name}");
            assert_eq!(inferred.config.preset_name(), Some(name));
            assert!(inferred.has_head);
            assert!(
                inferred
                    .describe()
                    .starts_with(&format!("{name} (1000 classes"))
            );
        }
    }

    #[test]
    fn infers_narrow_cifar_and_headless_networks() {
        let config = ResNetConfig::new(BlockKind::Bottleneck, [1, 2, 1, 1])
            .with_groups(4)
            .with_width_per_group(16)
            .with_stem_channels(8)
            .with_stage_planes([8, 8, 16, 16])
            .with_num_classes(5)
            .with_in_channels(1)
            .with_cifar_stem(true);
        let mut shapes = shapes_of(&config);
        assert_eq!(infer_config(&shapes).unwrap().config, config);

        shapes.remove("fc.weight");
        shapes.remove("fc.bias");
        let headless = infer_config(&shapes).unwrap();
        assert!(!headless.has_head);
        assert_eq!(headless.config.num_classes, 1000);
        assert!(headless.describe().contains("no classifier head"));
    }

    #[test]
    fn explains_what_is_not_a_resnet() {
        let mut shapes = Shapes::new();
        assert_eq!(infer_config(&shapes).unwrap_err(), "no `conv1.weight`");
        shapes.insert("conv1.weight".into(), vec![64, 3, 5, 5]);
        assert_eq!(
            infer_config(&shapes).unwrap_err(),
            "unsupported 5x5 stem convolution"
        );
        shapes.insert("conv1.weight".into(), vec![64, 3, 7, 7]);
        assert_eq!(
            infer_config(&shapes).unwrap_err(),
            "no `layer1.0.conv1.weight`"
        );
    }
}
