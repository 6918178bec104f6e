//! No host round trip inside a forward on a GPU, checked on the CPU (see
//! `hybridiff_models::host`): the forwards of both fixtures and their VAE decodes run on
//! the device-generic path (the one CUDA tensors take) without a single CPU kernel and
//! still match diffusers; and no source file of this crate reads tensor data back into
//! Rust values outside the known places, none of which is inside a forward.

mod common;
use common::*;

use candle_core::{DType, Device};
use hybridiff_models::{host, parity};

#[test]
fn forwards_on_the_device_generic_path_run_no_cpu_kernel_and_match_diffusers() {
    let before = host::cpu_kernel_calls();
    let rows = {
        let _generic = host::force_device_generic();
        parity::run_all(&fixtures(), &Device::Cpu, DType::F32).unwrap()
    };
    assert_eq!(
        host::cpu_kernel_calls(),
        before,
        "a forward on the device-generic path ran a CPU kernel (a host round trip on a GPU)"
    );
    assert_eq!(rows.len(), 6);
    assert_rows_pass(&rows);

    // The counter does count: the CPU path runs the im2col kernel.
    let n = host::cpu_kernel_calls();
    parity::vae_decode(&fixtures().join("tiny-sdxl"), &Device::Cpu, DType::F32).unwrap();
    assert!(
        host::cpu_kernel_calls() > n,
        "the CPU path ran no CPU kernel"
    );
}

#[test]
fn fixtures_match_diffusers_in_f16_on_the_cpu() {
    let rows = parity::run_all(&fixtures(), &Device::Cpu, DType::F16).unwrap();
    assert_eq!(rows.len(), 6);
    assert_rows_pass(&rows);
}

/// Where this crate may read tensor data into Rust values (`to_vec*`, `to_scalar`) or
/// touch host storage (`CpuStorage`), and why none of them is a round trip inside a
/// forward: (file, number of such calls, reason).
const ALLOWED_HOST_READS: &[(&str, usize, &str)] = &[
    (
        "conv.rs",
        12,
        "the im2col + GEMM CPU kernel: runs only when host::use_cpu_kernels",
    ),
    (
        "kernels.rs",
        16,
        "the CPU kernels (linear, softmax, activations, GroupNorm): run only when \
         host::use_cpu_kernels",
    ),
    (
        "weights.rs",
        1,
        "the finiteness check of weights while loading",
    ),
    (
        "vae.rs",
        2,
        "to_rgb8: the decoded image leaves the device for good; PipelineVae's finiteness \
         scalar of a half-precision decode, after the decode",
    ),
    (
        "nn.rs",
        1,
        "mean_abs: the engine's per-step rel-MAE scalar, between forwards",
    ),
    ("parity.rs", 4, "fixture comparisons after the forward"),
    (
        "lora.rs",
        3,
        "LoRA files are read on the host when the model is resolved (their alpha scalars \
         too), before any weight loads; each delta moves to its weight's device to merge",
    ),
    (
        "lpips.rs",
        4,
        "a metric, never inside a denoising forward: the distances leave the device once \
         per image pair, images come from (and LPIPS weights load on) the host, and the heads' \
         sign is checked once at load",
    ),
];

#[test]
fn no_source_file_reads_tensors_back_to_the_host_outside_the_known_places() {
    let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![src];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    assert!(files.len() > 10, "found only {} source files", files.len());
    let mut problems = Vec::new();
    for p in files {
        let text = std::fs::read_to_string(&p).unwrap();
        // Unit tests may read whatever they like.
        let code = text.split("#[cfg(test)]").next().unwrap();
        let n: usize = [".to_vec", ".to_scalar", "CpuStorage::", "Device::Cpu"]
            .iter()
            .map(|pat| code.matches(pat).count())
            .sum();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let allowed = ALLOWED_HOST_READS
            .iter()
            .find(|(f, _, _)| *f == name)
            .map_or(0, |(_, n, _)| *n);
        if n != allowed {
            problems.push(format!(
                "{}: {n} host reads, {allowed} allowed",
                p.display()
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "host reads changed (a forward must not read tensors back on a GPU; update \
         ALLOWED_HOST_READS with the reason if this one is outside every forward): {problems:#?}"
    );
}
