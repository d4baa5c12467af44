"""Generate crates/resnet-import/src/registry.rs from the installed torchvision.

Reads every ImageNet-1K weights entry of torchvision's ten ResNet presets (URL, file name and
SHA-256 prefix, accuracy, parameter count, GFLOPS, file size, preprocessing) and the 1000
ImageNet class names, and writes them as Rust constants with a few lookup helpers and tests.

Run from the repository root (CPU only, nothing is downloaded):

    .venv/bin/python crates/resnet-import/tools/gen_registry.py

The output is formatted as rustfmt (edition 2024, max_width = 100) formats it; if `rustfmt` is
on PATH the script checks that and reports any difference.
"""

import os
import re
import shutil
import subprocess
import sys

import torchvision
import torchvision.models as models

ARCHS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "src", "registry.rs")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def rust_str(s):
    """A Rust string literal for `s`."""
    out = []
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\u{%x}" % ord(ch))
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def rust_f32(x):
    """A float literal that round-trips (Python's shortest repr, always with a '.')."""
    s = repr(float(x))
    if "e" in s or "E" in s or "inf" in s or "nan" in s:
        raise ValueError("unexpected float %r" % x)
    if "." not in s:
        s += ".0"
    return s


def rust_f32_array(xs):
    return "[" + ", ".join(rust_f32(x) for x in xs) + "]"


def weights_enum(arch):
    if hasattr(models, "get_model_weights"):
        return models.get_model_weights(arch)
    raise SystemExit("torchvision %s is too old (needs get_model_weights)" % torchvision.__version__)


def collect():
    entries = []
    categories = None
    for arch in ARCHS:
        enum = weights_enum(arch)
        default = enum.DEFAULT
        found = []
        for w in enum:
            m = re.fullmatch(r"IMAGENET1K_V(\d+)", w.name)
            if not m:
                print("skipping %s.%s (not an ImageNet-1K V<n> entry)" % (arch, w.name))
                continue
            version = int(m.group(1))
            url = w.url
            file_name = url.rsplit("/", 1)[1]
            h = re.fullmatch(r"[^/]*-([0-9a-f]{8})\.pth", file_name)
            if not h:
                raise SystemExit("no 8-hex SHA-256 prefix in %r" % file_name)
            meta = w.meta
            metrics = meta["_metrics"]["ImageNet-1K"]
            t = w.transforms()
            crop = t.crop_size[0] if isinstance(t.crop_size, (list, tuple)) else t.crop_size
            resize = (
                t.resize_size[0] if isinstance(t.resize_size, (list, tuple)) else t.resize_size
            )
            kw = getattr(w.transforms, "keywords", {})
            assert crop == kw.get("crop_size", 224), (arch, w.name, crop, kw)
            assert resize == kw.get("resize_size", 256), (arch, w.name, resize, kw)
            assert tuple(t.mean) == MEAN and tuple(t.std) == STD, (arch, w.name)
            assert str(t.interpolation).lower().endswith("bilinear"), (arch, t.interpolation)
            if categories is None:
                categories = list(meta["categories"])
            assert list(meta["categories"]) == categories, (arch, w.name)
            found.append(
                dict(
                    arch=arch,
                    version=version,
                    url=url,
                    file_name=file_name,
                    sha256_prefix=h.group(1),
                    acc1=metrics["acc@1"],
                    acc5=metrics["acc@5"],
                    num_params=int(meta["num_params"]),
                    gflops=meta.get("_ops", meta.get("_flops", 0.0)),
                    file_size_mb=meta.get("_file_size", 0.0),
                    resize_size=int(resize),
                    crop_size=int(crop),
                    is_default=(w == default),
                )
            )
        found.sort(key=lambda e: e["version"])
        if not found or found[0]["version"] != 1:
            raise SystemExit("%s has no IMAGENET1K_V1 weights" % arch)
        if not found[-1]["is_default"]:
            raise SystemExit("%s: DEFAULT is not the highest version" % arch)
        if any(e["version"] > 2 for e in found):
            raise SystemExit("%s: versions beyond V2 need a new WeightsVersion variant" % arch)
        entries.extend(found)
    if len(categories) != 1000:
        raise SystemExit("expected 1000 categories, got %d" % len(categories))
    return entries, categories


HEADER = '''\
//! The registry of torchvision's ImageNet-1K ResNet weights: download URL, file name and
//! SHA-256 prefix, reported accuracy, size and preprocessing of every `IMAGENET1K_V*` entry of
//! the ten torchvision presets, and the 1000 ImageNet class names in output order.
//!
//! Generated by `tools/gen_registry.py` from torchvision {tv}; do not edit by hand.
//!
//! Every entry's preprocessing is torchvision's `ImageClassification`: resize the shorter side
//! to [`WeightsEntry::resize_size`] (bilinear), center-crop [`WeightsEntry::crop_size`], scale
//! to `[0, 1]`, then normalize with [`WeightsEntry::mean`] and [`WeightsEntry::std`].

/// Which of torchvision's ImageNet weight sets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightsVersion {{
    /// `IMAGENET1K_V1`: the original weights (for most presets, the paper's simple recipe).
    V1,
    /// `IMAGENET1K_V2`: retrained with torchvision's improved training recipe.
    V2,
}}

impl WeightsVersion {{
    /// Parses `"v1"`, `"V1"`, `"IMAGENET1K_V1"` (any case), and likewise for V2.
    pub fn parse(s: &str) -> Option<Self> {{
        let s = s.trim().to_ascii_uppercase();
        match s.strip_prefix("IMAGENET1K_").unwrap_or(&s) {{
            "V1" => Some(Self::V1),
            "V2" => Some(Self::V2),
            _ => None,
        }}
    }}

    /// torchvision's name for this weight set, e.g. `"IMAGENET1K_V1"`.
    pub fn name(self) -> &'static str {{
        match self {{
            Self::V1 => "IMAGENET1K_V1",
            Self::V2 => "IMAGENET1K_V2",
        }}
    }}
}}

/// One torchvision ImageNet-1K weights entry.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WeightsEntry {{
    /// The torchvision architecture name, e.g. `"resnet50"`.
    pub arch: &'static str,
    /// Which weight set of the architecture.
    pub version: WeightsVersion,
    /// Where torchvision downloads the checkpoint from.
    pub url: &'static str,
    /// The checkpoint's file name (the last segment of [`Self::url`]).
    pub file_name: &'static str,
    /// The first 8 hex digits (lowercase) of the file's SHA-256, as in [`Self::file_name`].
    pub sha256_prefix: &'static str,
    /// Reported ImageNet-1K top-1 accuracy, in percent.
    pub acc1: f32,
    /// Reported ImageNet-1K top-5 accuracy, in percent.
    pub acc5: f32,
    /// Number of parameters.
    pub num_params: u64,
    /// GFLOPS of one forward pass at the crop size (0 if torchvision does not say).
    pub gflops: f32,
    /// Size of the checkpoint file in MB (0 if torchvision does not say).
    pub file_size_mb: f32,
    /// The shorter image side is resized to this (bilinear) before cropping.
    pub resize_size: u32,
    /// Side of the center crop fed to the network.
    pub crop_size: u32,
    /// Per-channel (RGB) mean subtracted after scaling pixels to `[0, 1]`.
    pub mean: [f32; 3],
    /// Per-channel (RGB) standard deviation divided by after subtracting the mean.
    pub std: [f32; 3],
}}

impl WeightsEntry {{
    /// A name for these weights, `"<arch>-<version name>"`, e.g. `"resnet50-IMAGENET1K_V2"`.
    pub fn weights_name(&self) -> String {{
        format!("{{}}-{{}}", self.arch, self.version.name())
    }}
}}

/// Looks up the entry for `arch` (a torchvision name such as `"resnet50"`) and `version`.
pub fn find(arch: &str, version: WeightsVersion) -> Option<&'static WeightsEntry> {{
    WEIGHTS
        .iter()
        .find(|e| e.arch == arch && e.version == version)
}}

/// All entries for `arch`, oldest version first.
pub fn for_arch(arch: &str) -> impl Iterator<Item = &'static WeightsEntry> {{
    WEIGHTS.iter().filter(move |e| e.arch == arch)
}}

/// The default entry for `arch`: its highest version, as torchvision's `DEFAULT`.
pub fn default_for(arch: &str) -> Option<&'static WeightsEntry> {{
    WEIGHTS.iter().rev().find(|e| e.arch == arch)
}}

/// Every ImageNet-1K entry of torchvision's ten ResNet presets, by architecture then version.
pub const WEIGHTS: &[WeightsEntry] = &[
'''

TESTS = '''\

#[cfg(test)]
mod tests {
    use super::*;
    use resnet_model::ARCHITECTURES as ARCHS;

    #[test]
    fn every_arch_has_v1() {
        for arch in ARCHS {
            assert!(find(arch, WeightsVersion::V1).is_some(), "{arch}");
        }
        assert!(WEIGHTS.iter().all(|e| ARCHS.contains(&e.arch)));
    }

    #[test]
    fn sha256_prefixes_are_in_file_names() {
        for e in WEIGHTS {
            assert_eq!(e.sha256_prefix.len(), 8, "{}", e.file_name);
            assert!(
                e.sha256_prefix
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)),
                "{}",
                e.sha256_prefix
            );
            assert!(e.file_name.contains(e.sha256_prefix), "{}", e.file_name);
            assert!(e.url.ends_with(e.file_name), "{}", e.url);
        }
    }

    #[test]
    fn resnet50_entries() {
        let v2 = find("resnet50", WeightsVersion::V2).unwrap();
        assert!((v2.acc1 - 80.858).abs() < 1e-4);
        assert_eq!(v2.resize_size, 232);
        assert_eq!(v2.crop_size, 224);
        let v1 = find("resnet50", WeightsVersion::V1).unwrap();
        assert_eq!(v1.resize_size, 256);
        assert_eq!(v1.crop_size, 224);
        let r18 = find("resnet18", WeightsVersion::V1).unwrap();
        assert_eq!(r18.resize_size, 256);
        assert_eq!(v1.mean, [0.485, 0.456, 0.406]);
        assert_eq!(v1.std, [0.229, 0.224, 0.225]);
        assert_eq!(v2.weights_name(), "resnet50-IMAGENET1K_V2");
    }

    #[test]
    fn class_names() {
        assert_eq!(IMAGENET_CLASSES[0], "tench");
        assert_eq!(IMAGENET_CLASSES[999], "toilet tissue");
    }

    #[test]
    fn lookups() {
        assert_eq!(default_for("resnet50").unwrap().version, WeightsVersion::V2);
        assert_eq!(default_for("resnet18").unwrap().version, WeightsVersion::V1);
        assert!(default_for("resnet19").is_none());
        assert!(find("resnet18", WeightsVersion::V2).is_none());
        assert_eq!(for_arch("resnet50").count(), 2);
        assert_eq!(for_arch("nope").count(), 0);
        for arch in ARCHS {
            let versions: Vec<_> = for_arch(arch).map(|e| e.version).collect();
            assert_eq!(versions.first(), Some(&WeightsVersion::V1), "{arch}");
            assert_eq!(versions.last(), Some(&default_for(arch).unwrap().version));
        }
        assert_eq!(WeightsVersion::parse("v1"), Some(WeightsVersion::V1));
        assert_eq!(WeightsVersion::parse("V2"), Some(WeightsVersion::V2));
        let v1 = WeightsVersion::parse("IMAGENET1K_V1");
        assert_eq!(v1, Some(WeightsVersion::V1));
        let v2 = WeightsVersion::parse("imagenet1k_v2");
        assert_eq!(v2, Some(WeightsVersion::V2));
        assert_eq!(WeightsVersion::parse("v3"), None);
        assert_eq!(WeightsVersion::parse("DEFAULT"), None);
        for v in [WeightsVersion::V1, WeightsVersion::V2] {
            assert_eq!(WeightsVersion::parse(v.name()), Some(v));
        }
    }
}
'''


def render(entries, categories):
    tv = torchvision.__version__.split("+")[0]
    out = [HEADER.format(tv=tv)]
    for e in entries:
        out.append("    WeightsEntry {\n")
        fields = [
            ("arch", rust_str(e["arch"])),
            ("version", "WeightsVersion::V%d" % e["version"]),
            ("url", rust_str(e["url"])),
            ("file_name", rust_str(e["file_name"])),
            ("sha256_prefix", rust_str(e["sha256_prefix"])),
            ("acc1", rust_f32(e["acc1"])),
            ("acc5", rust_f32(e["acc5"])),
            ("num_params", str(e["num_params"])),
            ("gflops", rust_f32(e["gflops"])),
            ("file_size_mb", rust_f32(e["file_size_mb"])),
            ("resize_size", str(e["resize_size"])),
            ("crop_size", str(e["crop_size"])),
            ("mean", rust_f32_array(MEAN)),
            ("std", rust_f32_array(STD)),
        ]
        for name, value in fields:
            line = "        %s: %s,\n" % (name, value)
            if len(line) - 1 > 100:
                raise SystemExit("line too long for rustfmt: %r" % line)
            out.append(line)
        out.append("    },\n")
    out.append("];\n\n")
    out.append("/// The 1000 ImageNet-1K class names, in the order of the networks' outputs.\n")
    out.append("pub const IMAGENET_CLASSES: [&str; 1000] = [\n")
    for c in categories:
        out.append("    %s,\n" % rust_str(c))
    out.append("];\n")
    out.append(TESTS)
    return "".join(out)


def check_rustfmt(path):
    rustfmt = shutil.which("rustfmt")
    if rustfmt is None:
        print("rustfmt not found; not checked")
        return
    r = subprocess.run(
        [rustfmt, "--edition", "2024", "--check", path], capture_output=True, text=True
    )
    if r.returncode == 0:
        print("rustfmt --check: clean")
    else:
        print("rustfmt would change the output:\n" + r.stdout + r.stderr)


def main():
    entries, categories = collect()
    text = render(entries, categories)
    path = os.path.normpath(OUT)
    with open(path, "w") as f:
        f.write(text)
    print(
        "wrote %s: %d entries for %d archs, %d classes (torchvision %s)"
        % (path, len(entries), len(ARCHS), len(categories), torchvision.__version__)
    )
    check_rustfmt(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
