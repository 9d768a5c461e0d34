//! The one place a concrete backend type appears: `--device` and `--dtype` pick one of the
//! backends compiled in (ndarray always; CUDA and wgpu behind the `cuda`/`wgpu` features) and
//! run a backend-generic job on it.

use anyhow::{Result, bail};
use clap::ValueEnum;
use phitune_model::ops::Nf4Backend;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Dtype {
    F32,
    F16,
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
    Wgpu(Option<usize>),
}

impl DeviceSpec {
    /// The best device compiled in: CUDA, then wgpu, then the CPU.
    pub fn default_compiled() -> Self {
        if cfg!(feature = "cuda-backend") {
            DeviceSpec::Cuda(0)
        } else if cfg!(feature = "wgpu") {
            DeviceSpec::Wgpu(None)
        } else {
            DeviceSpec::Cpu
        }
    }
}

impl DeviceSpec {
    /// Micro-batches on this device are widened to a multiple of this many positions: 64 on
    /// GPUs (a few sequence lengths, so a few kernels to compile and shapes to tune), none on
    /// the CPU.
    pub fn pad_multiple(&self) -> usize {
        match self {
            DeviceSpec::Cpu => 1,
            _ => 64,
        }
    }

    /// The same kind of device, number `index` (the CPU has one).
    pub fn with_index(self, index: usize) -> Self {
        match self {
            DeviceSpec::Cpu => DeviceSpec::Cpu,
            DeviceSpec::Cuda(_) => DeviceSpec::Cuda(index),
            DeviceSpec::Wgpu(_) => DeviceSpec::Wgpu(Some(index)),
        }
    }

    /// The device's index among those of its kind (0 for the CPU and a default wgpu adapter).
    pub fn index(&self) -> u16 {
        match *self {
            DeviceSpec::Cpu | DeviceSpec::Wgpu(None) => 0,
            DeviceSpec::Cuda(i) | DeviceSpec::Wgpu(Some(i)) => i as u16,
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, index) = match s.split_once(':') {
            Some((k, i)) => (
                k,
                Some(
                    i.parse::<usize>()
                        .map_err(|_| format!("bad device index in \"{s}\""))?,
                ),
            ),
            None => (s, None),
        };
        match kind {
            "cpu" | "ndarray" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(index.unwrap_or(0))),
            "wgpu" | "vulkan" | "metal" | "gpu" => Ok(DeviceSpec::Wgpu(index)),
            _ => Err(format!("unknown device \"{s}\" (cpu, cuda[:N], wgpu[:N])")),
        }
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
            DeviceSpec::Wgpu(None) => write!(f, "wgpu"),
            DeviceSpec::Wgpu(Some(i)) => write!(f, "wgpu:{i}"),
        }
    }
}

/// A piece of work that can run on any backend.
pub trait Job {
    type Output;
    fn run<B: Nf4Backend>(self, device: B::Device) -> Result<Self::Output>;
}

pub fn dispatch<J: Job>(device: DeviceSpec, dtype: Dtype, job: J) -> Result<J::Output> {
    // A bad bisection switch is refused before any work (the kernels read it lazily).
    phitune_model::ops::reference_ops_from_env().map_err(anyhow::Error::msg)?;
    if device == DeviceSpec::Cpu {
        return run_on(device, dtype, job);
    }
    crate::gpu_kernels::setup()?;
    let out = run_on(device, dtype, job);
    let c = crate::gpu_kernels::counts();
    eprintln!(
        "GPU kernels: {} compiled, {} shapes tuned, {} tuning results from the cache{}",
        c.compiled,
        c.tuned,
        c.cached,
        crate::gpu_kernels::cache_dir().map_or(String::new(), |d| format!(" ({})", d.display()))
    );
    out
}

fn run_on<J: Job>(device: DeviceSpec, dtype: Dtype, job: J) -> Result<J::Output> {
    match device {
        DeviceSpec::Cpu => match dtype {
            // i32 ints: NF4 codes are packed 8 per 32-bit element.
            Dtype::F32 => job.run::<burn::backend::NdArray<f32, i32>>(Default::default()),
            other => bail!("--dtype {other:?} needs a GPU device; the CPU backend computes in f32"),
        },
        DeviceSpec::Cuda(index) => cuda(index, dtype, job),
        DeviceSpec::Wgpu(index) => wgpu(index, dtype, job),
    }
}

#[cfg(feature = "cuda-backend")]
fn cuda<J: Job>(index: usize, dtype: Dtype, job: J) -> Result<J::Output> {
    use burn::backend::Cuda;
    use burn::backend::cuda::CudaDevice;
    let device = CudaDevice::new(index);
    match dtype {
        Dtype::F32 => job.run::<Cuda<f32>>(device),
        Dtype::F16 => job.run::<Cuda<half::f16>>(device),
        Dtype::Bf16 => job.run::<Cuda<half::bf16>>(device),
    }
}

#[cfg(not(feature = "cuda-backend"))]
fn cuda<J: Job>(_: usize, _: Dtype, _: J) -> Result<J::Output> {
    bail!("this binary was built without CUDA support: rebuild with `--features cuda`")
}

#[cfg(feature = "wgpu")]
fn wgpu<J: Job>(index: Option<usize>, dtype: Dtype, job: J) -> Result<J::Output> {
    use burn::backend::Wgpu;
    use burn::backend::wgpu::WgpuDevice;
    let device = match index {
        None => WgpuDevice::DefaultDevice,
        Some(i) => WgpuDevice::DiscreteGpu(i),
    };
    match dtype {
        Dtype::F32 => job.run::<Wgpu<f32>>(device),
        Dtype::F16 => job.run::<Wgpu<half::f16>>(device),
        Dtype::Bf16 => bail!("--dtype bf16 is not supported by the wgpu backend; use f16 or f32"),
    }
}

#[cfg(not(feature = "wgpu"))]
fn wgpu<J: Job>(_: Option<usize>, _: Dtype, _: J) -> Result<J::Output> {
    bail!("this binary was built without wgpu support: rebuild with `--features wgpu`")
}
