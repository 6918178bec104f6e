//! Host-only kernels and the switch between them and candle's device-generic ops.
//!
//! A forward on a GPU must never copy a tensor to the host and back: that would stall the
//! stream and cost a PCIe round trip per call. The only code in this crate that touches
//! host memory inside a forward is the im2col convolution of [`crate::conv`] (a CPU
//! kernel, faster than candle's CPU conv2d), and it runs only when [`use_cpu_kernels`]
//! says so: for tensors on the CPU. Everything else in a forward is candle ops, which run
//! on whatever device the tensor lives on. Reads of tensor data into Rust values
//! (`to_vec*`, `to_scalar`) stay out of forwards altogether; a source scan in the tests
//! (`tests/host_transfers.rs`) keeps it so.
//!
//! No GPU is needed to check the GPU path: [`force_device_generic`] makes this thread's
//! forwards take the branch a CUDA tensor takes, and [`cpu_kernel_calls`] counts the CPU
//! kernels that ran, so a CPU test can run a whole forward on the device-generic path,
//! assert that no CPU kernel ran, and compare its output with the CPU-kernel one.

use std::cell::Cell;

use candle_core::{DType, Device};

thread_local! {
    static FORCE_GENERIC: Cell<bool> = const { Cell::new(false) };
    static CPU_KERNEL_CALLS: Cell<u64> = const { Cell::new(0) };
}

/// Whether a forward on `device` in `dtype` may use this crate's CPU kernels: the device
/// is the CPU, the dtype is one they handle (not bf16, which candle's CPU backend cannot
/// multiply), this thread has not asked for the device-generic path, and the process was
/// not started with `HYBRIDIFF_DEVICE_GENERIC=1` (every thread on the device-generic path:
/// the CPU dry run of `tools/gpu-check.sh` runs whole jobs on the GPU's code path).
pub fn use_cpu_kernels(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && dtype != DType::BF16 && !FORCE_GENERIC.with(Cell::get) && !generic_from_env()
}

fn generic_from_env() -> bool {
    static GENERIC: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GENERIC.get_or_init(|| std::env::var("HYBRIDIFF_DEVICE_GENERIC").is_ok_and(|v| v == "1"))
}

/// Counts one run of a CPU kernel on this thread.
pub(crate) fn count_cpu_kernel() {
    CPU_KERNEL_CALLS.with(|c| c.set(c.get() + 1));
}

/// How many CPU kernels (reads of a tensor's host storage) this thread has run since it
/// started. Zero growth across a forward means the forward would run on a GPU without a
/// host round trip.
pub fn cpu_kernel_calls() -> u64 {
    CPU_KERNEL_CALLS.with(Cell::get)
}

/// Makes this thread's forwards take the device-generic path (the one CUDA tensors take)
/// even on the CPU, until the returned guard is dropped. For tests and for dry runs of
/// the GPU path on a machine without a GPU.
pub fn force_device_generic() -> GenericGuard {
    let before = FORCE_GENERIC.with(|f| f.replace(true));
    GenericGuard { before }
}

/// Restores the previous setting of [`force_device_generic`] when dropped.
#[must_use = "the device-generic path lasts only while the guard lives"]
pub struct GenericGuard {
    before: bool,
}

impl Drop for GenericGuard {
    fn drop(&mut self) {
        FORCE_GENERIC.with(|f| f.set(self.before));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_switches_the_path_and_restores_it() {
        assert!(use_cpu_kernels(&Device::Cpu, DType::F32));
        assert!(!use_cpu_kernels(&Device::Cpu, DType::BF16));
        {
            let _g = force_device_generic();
            assert!(!use_cpu_kernels(&Device::Cpu, DType::F32));
            {
                let _g2 = force_device_generic();
            }
            assert!(!use_cpu_kernels(&Device::Cpu, DType::F32));
        }
        assert!(use_cpu_kernels(&Device::Cpu, DType::F16));
    }
}
