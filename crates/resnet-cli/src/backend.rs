//! The one place where a backend name becomes a Burn `Device`.
//!
//! Which names work depends on the cargo features the binary was built with; the model code
//! never sees anything but the `Device`.

use anyhow::{Result, bail};
use burn::tensor::Device;
use clap::ValueEnum;

/// A Burn backend the CLI can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// Pure-Rust CPU backend (feature `flex`, the default).
    Flex,
    /// ndarray CPU backend (feature `ndarray`; deprecated in Burn, much slower than flex).
    Ndarray,
    /// wgpu: Vulkan, Metal or DX12, whichever the platform offers (feature `wgpu`).
    Wgpu,
    /// wgpu forced onto Vulkan (feature `vulkan`).
    Vulkan,
    /// wgpu forced onto Metal (feature `metal`, macOS).
    Metal,
    /// libtorch on the CPU (feature `tch`; needs libtorch 2.9).
    Tch,
    /// libtorch on CUDA device 0 (feature `tch`).
    TchCuda,
    /// CUDA device 0 through CubeCL (feature `cuda`).
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

    /// The backends compiled into this binary.
    pub fn compiled() -> Vec<Backend> {
        Backend::value_variants()
            .iter()
            .copied()
            .filter(|backend| backend.device().is_ok())
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

    /// The device of this backend, or an error naming the feature to enable.
    #[allow(deprecated, unreachable_code)] // ndarray and tch are deprecated in Burn 0.22.
    pub fn device(self) -> Result<Device> {
        match self {
            #[cfg(feature = "flex")]
            Backend::Flex => return Ok(Device::flex()),
            #[cfg(feature = "ndarray")]
            Backend::Ndarray => return Ok(Device::ndarray()),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu => return Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "vulkan")]
            Backend::Vulkan => return Ok(Device::vulkan(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "metal")]
            Backend::Metal => return Ok(Device::metal(burn::tensor::DeviceKind::DefaultDevice)),
            #[cfg(feature = "tch")]
            Backend::Tch => return Ok(Device::libtorch()),
            #[cfg(feature = "tch")]
            Backend::TchCuda => return Ok(Device::libtorch_cuda(0)),
            #[cfg(feature = "cuda")]
            Backend::Cuda => return Ok(Device::cuda(0)),
            _ => {}
        }
        bail!(
            "backend `{}` is not compiled into this binary; rebuild with `--features {}`",
            self.cli_name(),
            self.feature()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_backend_is_compiled_and_the_others_name_their_feature() {
        assert!(Backend::compiled().contains(&Backend::Flex));
        #[cfg(not(feature = "cuda"))]
        {
            let err = Backend::Cuda.device().unwrap_err().to_string();
            assert_eq!(
                err,
                "backend `cuda` is not compiled into this binary; rebuild with `--features cuda`"
            );
        }
    }
}
