//! Backend names on the command line, and the `Device`s they stand for.
//!
//! The binaries (`resnet`, `resnet-train`) share this mapping; the model code never sees
//! anything but a `Device`. Which names work depends on the cargo features the binary was built
//! with: asking for one that is not compiled in is an error naming the feature to enable.

use anyhow::{Result, bail};
use burn::tensor::Device;
use clap::ValueEnum;

/// A Burn backend a binary can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Pure-Rust CPU backend (feature `flex`, the default).
    Flex,
    /// ndarray CPU backend (feature `ndarray`; deprecated in Burn, much slower than flex).
    Ndarray,
    /// wgpu: Vulkan, Metal or DX12, whichever the platform offers (feature `wgpu`).
    Wgpu,
    /// wgpu forced onto Vulkan, SPIR-V kernels (feature `vulkan`).
    Vulkan,
    /// wgpu forced onto Metal (feature `metal`, macOS).
    Metal,
    /// libtorch on the CPU (feature `tch`; needs libtorch 2.9).
    Tch,
    /// libtorch on CUDA devices (feature `tch`).
    TchCuda,
    /// CUDA devices through CubeCL (feature `cuda`).
    Cuda,
}

impl Backend {
    /// The cargo feature that compiles this backend in.
    pub fn feature(self) -> &'static str {
        match self {
            Backend::Flex => "flex",
            Backend::Ndarray => "ndarray",
            Backend::Wgpu => "wgpu",
            Backend::Vulkan => "vulkan",
            Backend::Metal => "metal",
            Backend::Tch | Backend::TchCuda => "tch",
            Backend::Cuda => "cuda",
        }
    }

    /// The name given on the command line (`--backend NAME`).
    pub fn cli_name(self) -> String {
        self.to_possible_value()
            .map(|value| value.get_name().to_string())
            .unwrap_or_default()
    }

    /// Whether this backend is compiled into this binary.
    pub fn is_compiled(self) -> bool {
        match self {
            Backend::Flex => cfg!(feature = "flex"),
            Backend::Ndarray => cfg!(feature = "ndarray"),
            Backend::Wgpu => cfg!(feature = "wgpu"),
            Backend::Vulkan => cfg!(feature = "vulkan"),
            Backend::Metal => cfg!(feature = "metal"),
            Backend::Tch | Backend::TchCuda => cfg!(feature = "tch"),
            Backend::Cuda => cfg!(feature = "cuda"),
        }
    }

    /// The backends compiled into this binary, in the order of this enum.
    pub fn compiled() -> Vec<Backend> {
        Backend::value_variants()
            .iter()
            .copied()
            .filter(|backend| backend.is_compiled())
            .collect()
    }

    /// The backend used when `--backend` is not given: the first compiled in (flex, when it
    /// is).
    pub fn default_compiled() -> Result<Backend> {
        match Backend::compiled().first() {
            Some(backend) => Ok(*backend),
            None => bail!("no backend is compiled into this binary; build with `--features flex`"),
        }
    }

    /// Whether the backend can hold several devices of one process (GPUs); the CPU backends
    /// have a single device.
    pub fn has_device_indices(self) -> bool {
        matches!(
            self,
            Backend::Wgpu | Backend::Vulkan | Backend::Metal | Backend::TchCuda | Backend::Cuda
        )
    }

    /// The backend's default device (GPU 0, or the best adapter wgpu finds), or an error naming
    /// the feature to enable.
    pub fn device(self) -> Result<Device> {
        self.device_at(None)
    }

    /// Device number `index` of this backend (`None`: the default one). For wgpu, Vulkan and
    /// Metal, `index` counts the adapters of the selected API in the order
    /// [`Device::enumerate`] lists them.
    #[allow(deprecated, unreachable_code, unused_variables)] // ndarray and tch are deprecated.
    pub fn device_at(self, index: Option<usize>) -> Result<Device> {
        self.ensure_compiled()?;
        if let Some(index) = index
            && index > 0
            && !self.has_device_indices()
        {
            bail!(
                "backend `{}` has a single device (0); device {index} does not exist",
                self.cli_name()
            );
        }
        match self {
            #[cfg(feature = "flex")]
            Backend::Flex => return Ok(Device::flex()),
            #[cfg(feature = "ndarray")]
            Backend::Ndarray => return Ok(Device::ndarray()),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => {
                return wgpu_device(index, burn::tensor::DeviceType::Wgpu, Device::wgpu);
            }
            #[cfg(feature = "vulkan")]
            Backend::Vulkan => {
                return wgpu_device(index, burn::tensor::DeviceType::Vulkan, Device::vulkan);
            }
            #[cfg(feature = "metal")]
            Backend::Metal => {
                return wgpu_device(index, burn::tensor::DeviceType::Metal, Device::metal);
            }
            #[cfg(feature = "tch")]
            Backend::Tch => return Ok(Device::libtorch()),
            #[cfg(feature = "tch")]
            Backend::TchCuda => return Ok(Device::libtorch_cuda(index.unwrap_or(0))),
            #[cfg(feature = "cuda")]
            Backend::Cuda => return Ok(Device::cuda(index.unwrap_or(0))),
            _ => {}
        }
        unreachable!("ensure_compiled checked the feature")
    }

    /// The devices named by `--devices` (indices, see [`Backend::device_at`]); the default
    /// device when `indices` is empty. Repeating an index is an error.
    pub fn devices(self, indices: &[usize]) -> Result<Vec<Device>> {
        if indices.is_empty() {
            return Ok(vec![self.device()?]);
        }
        for (i, index) in indices.iter().enumerate() {
            if indices[..i].contains(index) {
                bail!("device {index} is listed twice in --devices");
            }
        }
        indices
            .iter()
            .map(|&index| self.device_at(Some(index)))
            .collect()
    }

    /// Parses a comma-separated list of backend names, e.g. `flex,wgpu`.
    pub fn parse_list(list: &str) -> Result<Vec<Backend>> {
        list.split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .map(|name| {
                Backend::from_str(name, true).map_err(|_| {
                    let known: Vec<String> = Backend::value_variants()
                        .iter()
                        .map(|b| b.cli_name())
                        .collect();
                    anyhow::anyhow!("unknown backend `{name}` (known: {})", known.join(", "))
                })
            })
            .collect()
    }

    fn ensure_compiled(self) -> Result<()> {
        if self.is_compiled() {
            return Ok(());
        }
        bail!(
            "backend `{}` is not compiled into this binary; rebuild with `--features {}`",
            self.cli_name(),
            self.feature()
        )
    }
}

/// Adapter `index` of a wgpu API, or the default adapter.
#[cfg(any(feature = "wgpu", feature = "vulkan", feature = "metal"))]
fn wgpu_device(
    index: Option<usize>,
    device_type: burn::tensor::DeviceType,
    default: fn(burn::tensor::DeviceKind) -> Device,
) -> Result<Device> {
    let Some(index) = index else {
        return Ok(default(burn::tensor::DeviceKind::DefaultDevice));
    };
    let devices: Vec<Device> = Device::enumerate(device_type).into_iter().collect();
    match devices.get(index) {
        Some(device) => Ok(device.clone()),
        None => bail!(
            "no device {index}: this machine has {} adapter(s) for this backend",
            devices.len()
        ),
    }
}

/// What `device` is, for the "running on ..." line: the adapter's name for GPU backends, the
/// thread count for the CPU ones. Opens the device.
pub fn describe(backend: Backend, device: &Device) -> String {
    #[cfg(any(
        feature = "wgpu",
        feature = "vulkan",
        feature = "metal",
        feature = "cuda"
    ))]
    if let Some(identity) = device.identity() {
        return format!("{} ({})", identity.name, backend.cli_name());
    }
    match backend {
        Backend::Flex | Backend::Ndarray | Backend::Tch => {
            format!("CPU, {} threads ({})", cpu_threads(), backend.cli_name())
        }
        _ => format!("{device:?} ({})", backend.cli_name()),
    }
}

/// Threads the CPU backends use: `RAYON_NUM_THREADS` if set, else the available cores.
pub fn cpu_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|value| value.parse().ok())
        .filter(|&threads| threads > 0)
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(usize::from)
                .unwrap_or(1)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_backend_is_compiled_and_the_others_name_their_feature() {
        assert_eq!(
            Backend::compiled().contains(&Backend::Flex),
            cfg!(feature = "flex")
        );
        #[cfg(not(feature = "cuda"))]
        {
            let err = Backend::Cuda.device().unwrap_err().to_string();
            assert_eq!(
                err,
                "backend `cuda` is not compiled into this binary; rebuild with `--features cuda`"
            );
        }
    }

    #[cfg(feature = "flex")]
    #[test]
    fn cpu_backends_have_one_device() {
        assert_eq!(Backend::Flex.devices(&[]).unwrap().len(), 1);
        assert_eq!(Backend::Flex.devices(&[0]).unwrap().len(), 1);
        let err = Backend::Flex.devices(&[0, 1]).unwrap_err().to_string();
        assert_eq!(
            err,
            "backend `flex` has a single device (0); device 1 does not exist"
        );
        let err = Backend::Flex.devices(&[0, 0]).unwrap_err().to_string();
        assert_eq!(err, "device 0 is listed twice in --devices");
    }

    #[test]
    fn backend_lists_parse() {
        assert_eq!(
            Backend::parse_list("flex, wgpu,tch-cuda").unwrap(),
            [Backend::Flex, Backend::Wgpu, Backend::TchCuda]
        );
        let err = Backend::parse_list("flex,opencl").unwrap_err().to_string();
        assert!(
            err.starts_with("unknown backend `opencl` (known: flex, ndarray"),
            "{err}"
        );
    }
}
