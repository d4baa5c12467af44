//! The few rules that turn torchvision `state_dict` keys into `resnet-model` paths.
//!
//! 1. A checkpoint may nest the `state_dict` (`{"state_dict": ...}`, `{"model": ...}`) or prefix
//!    its keys (`module.` from `DataParallel`, `backbone.`, `model.`): the common prefix in
//!    front of `conv1.weight`/`layer1.0.conv1.weight` is found and stripped
//!    ([`find_prefix`]); tensors outside it (optimizer state, EMA copies) are ignored.
//! 2. `downsample.0.*` is `downsample.conv.*` and `downsample.1.*` is `downsample.bn.*`
//!    (Rust field names cannot be numbers).
//! 3. `num_batches_tracked` is dropped: Burn's batch norm has no such counter.
//!
//! Batch-norm `weight`/`bias` becoming `gamma`/`beta`, and `fc.weight` being transposed, are
//! done by burn-store's `PyTorchToBurnAdapter` when the tensors are applied.

/// The key every torchvision ResNet has, used to find where the `state_dict` starts.
const ANCHOR: &str = "layer1.0.conv1.weight";

/// The prefix in front of the ResNet keys (`""`, `"module."`, `"state_dict.module."`, ...), if
/// the keys contain a ResNet at all. Prefers the shortest prefix, so an EMA copy nested under
/// a longer path does not win over the main weights.
pub fn find_prefix<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let keys: Vec<&str> = keys.into_iter().collect();
    keys.iter()
        .filter_map(|key| key.strip_suffix(ANCHOR))
        .filter(|prefix| prefix.is_empty() || prefix.ends_with('.'))
        .filter(|prefix| keys.contains(&format!("{prefix}conv1.weight").as_str()))
        .min_by_key(|prefix| (prefix.len(), *prefix))
        .map(str::to_string)
}

/// The `resnet-model` path of a torchvision key (already stripped of its prefix), or `None`
/// for keys that have no counterpart and are dropped (`num_batches_tracked`).
pub fn torchvision_to_burn(key: &str) -> Option<String> {
    if key.ends_with("num_batches_tracked") {
        return None;
    }
    Some(
        key.replace(".downsample.0.", ".downsample.conv.")
            .replace(".downsample.1.", ".downsample.bn."),
    )
}

/// The torchvision key of a `resnet-model` path (for messages that speak PyTorch).
pub fn burn_to_torchvision(path: &str) -> String {
    path.replace(".downsample.conv.", ".downsample.0.")
        .replace(".downsample.bn.", ".downsample.1.")
        .replace(".gamma", ".weight")
        .replace(".beta", ".bias")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renames_the_shortcut_and_drops_the_counter() {
        assert_eq!(
            torchvision_to_burn("layer2.0.downsample.0.weight").as_deref(),
            Some("layer2.0.downsample.conv.weight")
        );
        assert_eq!(
            torchvision_to_burn("layer2.0.downsample.1.running_var").as_deref(),
            Some("layer2.0.downsample.bn.running_var")
        );
        assert_eq!(
            torchvision_to_burn("layer1.0.bn1.num_batches_tracked"),
            None
        );
        assert_eq!(torchvision_to_burn("bn1.num_batches_tracked"), None);
        for unchanged in [
            "conv1.weight",
            "layer4.2.conv3.weight",
            "fc.bias",
            "bn1.weight",
        ] {
            assert_eq!(torchvision_to_burn(unchanged).as_deref(), Some(unchanged));
        }
    }

    #[test]
    fn maps_back_to_torchvision_names() {
        assert_eq!(
            burn_to_torchvision("layer3.0.downsample.bn.gamma"),
            "layer3.0.downsample.1.weight"
        );
        assert_eq!(
            burn_to_torchvision("layer1.1.bn2.beta"),
            "layer1.1.bn2.bias"
        );
    }

    #[test]
    fn finds_plain_prefixed_and_nested_state_dicts() {
        let plain = ["conv1.weight", "layer1.0.conv1.weight", "fc.weight"];
        assert_eq!(find_prefix(plain).as_deref(), Some(""));

        let prefixed = ["module.conv1.weight", "module.layer1.0.conv1.weight"];
        assert_eq!(find_prefix(prefixed).as_deref(), Some("module."));

        let nested = [
            "state_dict.module.conv1.weight",
            "state_dict.module.layer1.0.conv1.weight",
            "optimizer.state.0.momentum_buffer",
            "ema.state_dict.module.conv1.weight",
            "ema.state_dict.module.layer1.0.conv1.weight",
        ];
        assert_eq!(find_prefix(nested).as_deref(), Some("state_dict.module."));

        // `xlayer1.0.conv1.weight` is not `layer1.0.conv1.weight` under a prefix.
        assert_eq!(
            find_prefix(["conv1.weight", "xlayer1.0.conv1.weight"]),
            None
        );
        assert_eq!(find_prefix(["encoder.weight", "decoder.bias"]), None);
        assert_eq!(find_prefix(["layer1.0.conv1.weight"]), None);
    }
}
