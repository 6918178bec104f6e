//! `hybridiff nccl-check`: runs the NCCL transport's path on one GPU (a one-rank communicator
//! sending a header and a tensor to itself), for machines with a single GPU, where NCCL refuses
//! the two ranks a real exchange needs.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct NcclCheckArgs {
    /// The CUDA device's ordinal.
    #[arg(long, default_value_t = 0)]
    pub gpu: usize,
    /// Seconds before start-up or the transfer counts as hung (then the communicator is aborted).
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub comm_timeout: u64,
}

#[cfg(feature = "nccl")]
pub fn run(args: NcclCheckArgs) -> Result<()> {
    use anyhow::Context;
    let device = candle_core::Device::new_cuda(args.gpu)
        .with_context(|| format!("--gpu {}: opening the CUDA device", args.gpu))?;
    let seen = hybridiff_comm::nccl::self_check(
        &device,
        std::time::Duration::from_secs(args.comm_timeout),
    )?;
    let v = seen.nccl_version;
    println!(
        "nccl-check: ok: NCCL {}.{}.{} on cuda:{}: a one-rank non-blocking communicator sent a \
         header and {} bytes of f16 tensor to itself and got them back equal",
        v / 10000,
        (v / 100) % 100,
        v % 100,
        args.gpu,
        seen.bytes
    );
    Ok(())
}

#[cfg(not(feature = "nccl"))]
pub fn run(args: NcclCheckArgs) -> Result<()> {
    let _ = args;
    anyhow::bail!(
        "nccl-check: this hybridiff was built without NCCL; {}",
        crate::launch::NCCL_BUILD
    )
}
