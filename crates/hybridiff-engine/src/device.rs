//! Which device each rank computes on: `--device cpu|cuda|cuda:N|auto` and `--devices 0,1`.
//!
//! The flags are parsed and checked here, and in-process rank `r` is mapped to a device by a
//! pure function ([`map_ranks`]), so the mapping is tested without a GPU. A rank whose device
//! differs from the job's (rank 0's) gets its own copy of the denoiser and inputs
//! ([`Placement::with_replica`]); tensors another rank sends are moved to the receiving rank's
//! device on arrival ([`DeviceComm`]), and the bytes that cross ranks are counted the same
//! either way.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use hybridiff_comm::{Communicator, Group, Op};
use hybridiff_models::Denoiser;

use crate::{Error, Result};

/// How to get a CUDA build, for errors of a CPU-only binary asked for a GPU.
pub const CUDA_BUILD_HINT: &str = "this hybridiff was built without CUDA; to get a CUDA build, \
run `tools/cuda-toolchain.sh` once (it sets up nvcc and the CUDA libraries outside the \
repository), then `cargo build --release -p hybridiff-cli --features cuda`";

/// Most GPU ordinals accepted (and probed) on one machine.
pub const MAX_GPUS: usize = 64;

/// What `--device` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// The CPU (the default).
    Cpu,
    /// CUDA when the build has it and a GPU is present, else the CPU (said on stderr).
    Auto,
    /// CUDA; in-process rank `r` uses `cuda:(first + r)` unless `--devices` lists the GPUs.
    Cuda { first: usize },
}

impl std::str::FromStr for DeviceRequest {
    type Err = Error;
    /// `cpu`, `auto`, `cuda` (= `cuda:0`) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| {
            Error::Options(format!(
                "--device {s}: {why}; expected cpu, cuda, cuda:N (N a GPU index, e.g. cuda:1) or auto"
            ))
        };
        match s {
            "cpu" => Ok(Self::Cpu),
            "auto" => Ok(Self::Auto),
            "cuda" => Ok(Self::Cuda { first: 0 }),
            _ => match s.strip_prefix("cuda:") {
                Some(n) => Ok(Self::Cuda {
                    first: parse_ordinal(n).map_err(|_| bad("the GPU index is not a number"))?,
                }),
                None => Err(bad("unknown device")),
            },
        }
    }
}

fn parse_ordinal(s: &str) -> std::result::Result<usize, ()> {
    // Digits only: `+1`, ` 1` and `1.0` are typos, not indices.
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(());
    }
    match s.parse::<usize>() {
        Ok(n) if n < MAX_GPUS => Ok(n),
        _ => Err(()),
    }
}

/// Parses `--devices`: GPU indices separated by commas (`0,1`), each at most once.
pub fn parse_device_list(s: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for (i, part) in s.split(',').enumerate() {
        let n = parse_ordinal(part.trim()).map_err(|()| {
            let what = if part.trim().is_empty() {
                format!("entry {} is empty", i + 1)
            } else {
                format!("`{part}` is not a GPU index below {MAX_GPUS}")
            };
            Error::Options(format!(
                "--devices {s}: {what}; expected GPU indices separated by commas, e.g. --devices 0,1"
            ))
        })?;
        if out.contains(&n) {
            return Err(Error::Options(format!(
                "--devices {s}: GPU {n} is listed twice; list each GPU once (ranks beyond the \
                 list wrap around onto it)"
            )));
        }
        out.push(n);
    }
    Ok(out)
}

/// Where one rank computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum RankDevice {
    Cpu,
    Cuda(usize),
}

impl RankDevice {
    /// The label of a candle device.
    pub fn of(device: &Device) -> Self {
        match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => Self::Cuda(gpu_id),
            _ => Self::Cpu,
        }
    }
}

impl std::fmt::Display for RankDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// How tensors cross between ranks of a layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// Every rank on the CPU: tensors are handed over in host memory.
    Host,
    /// Every rank on one GPU: tensors are handed over without a copy.
    SameDevice,
    /// Ranks on different GPUs: candle 0.11 copies CUDA tensors between GPUs with
    /// `cuMemcpyDtoD` on the receiver's stream (`CudaStorage::transfer_to_device`), which the
    /// driver routes peer-to-peer where the GPUs allow it (NVLink, PCIe P2P), else through
    /// host memory.
    DeviceToDevice,
}

impl std::fmt::Display for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Host => "host",
            Self::SameDevice => "same device",
            Self::DeviceToDevice => "device-to-device",
        })
    }
}

/// How tensors cross between the ranks placed on `ranks`.
pub fn transfer(ranks: &[RankDevice]) -> Transfer {
    if ranks.iter().all(|d| *d == RankDevice::Cpu) {
        Transfer::Host
    } else if ranks.windows(2).all(|w| w[0] == w[1]) {
        Transfer::SameDevice
    } else {
        Transfer::DeviceToDevice
    }
}

/// The devices the ranks of a `world_size` job use, and what the user should be told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceMap {
    /// Index = rank.
    pub ranks: Vec<RankDevice>,
    /// Lines for stderr: the fallback of `auto`, GPUs shared by several ranks.
    pub notes: Vec<String>,
}

/// Maps in-process ranks to devices, without touching a GPU.
///
/// `cuda_built`: this binary has CUDA; `gpus`: how many GPUs the machine has (asked only when
/// CUDA is wanted). Rank `r` uses `cuda:(first + r)`, or the `r`-th of `list`; ranks beyond the
/// GPUs available wrap around (several ranks on one GPU are allowed for correctness runs, and
/// the notes say so).
///
/// # Errors
/// A CPU-only build asked for CUDA ([`CUDA_BUILD_HINT`]), `--devices` with `--device cpu`, a
/// GPU index the machine does not have (naming the flag), or no GPU at all.
pub fn map_ranks(
    request: DeviceRequest,
    list: Option<&[usize]>,
    world_size: usize,
    cuda_built: bool,
    gpus: impl FnOnce() -> usize,
) -> Result<DeviceMap> {
    let mut notes = Vec::new();
    let first = match (request, list) {
        (DeviceRequest::Cpu, Some(_)) => {
            return Err(Error::Options(
                "--devices lists GPUs, but --device is cpu (the default); give --device cuda \
                 (or auto) with --devices"
                    .into(),
            ))
        }
        (DeviceRequest::Cpu, None) => {
            return Ok(DeviceMap {
                ranks: vec![RankDevice::Cpu; world_size],
                notes,
            })
        }
        (DeviceRequest::Cuda { first }, _) if !cuda_built => {
            let flag = match list {
                Some(_) => "--devices".to_string(),
                None if first == 0 => "--device cuda".to_string(),
                None => format!("--device cuda:{first}"),
            };
            return Err(Error::Options(format!("{flag}: {CUDA_BUILD_HINT}")));
        }
        (DeviceRequest::Auto, Some(_)) if !cuda_built => {
            return Err(Error::Options(format!("--devices: {CUDA_BUILD_HINT}")));
        }
        (DeviceRequest::Auto, None) if !cuda_built => {
            notes.push(
                "--device auto: this binary was built without CUDA; running on the CPU".into(),
            );
            return Ok(DeviceMap {
                ranks: vec![RankDevice::Cpu; world_size],
                notes,
            });
        }
        (DeviceRequest::Auto, _) => 0,
        (DeviceRequest::Cuda { first }, _) => first,
    };
    let count = gpus().min(MAX_GPUS);
    if count == 0 {
        if request == DeviceRequest::Auto && list.is_none() {
            notes.push("--device auto: no GPU found; running on the CPU".into());
            return Ok(DeviceMap {
                ranks: vec![RankDevice::Cpu; world_size],
                notes,
            });
        }
        let flag = if list.is_some() {
            "--devices"
        } else {
            "--device"
        };
        return Err(Error::Options(format!(
            "{flag}: this machine has no CUDA GPU that this build can use (no driver, or none visible: check nvidia-smi and CUDA_VISIBLE_DEVICES); use --device cpu"
        )));
    }
    let gpu_list: Vec<usize> = match list {
        Some(l) => {
            if let Some(bad) = l.iter().find(|&&n| n >= count) {
                return Err(Error::Options(format!(
                    "--devices: GPU {bad} does not exist; this machine has {count} GPU(s), cuda:0 to cuda:{}",
                    count - 1
                )));
            }
            l.to_vec()
        }
        None => {
            if first >= count {
                return Err(Error::Options(format!(
                    "--device cuda:{first}: GPU {first} does not exist; this machine has {count} GPU(s), cuda:0 to cuda:{}",
                    count - 1
                )));
            }
            (first..count).collect()
        }
    };
    let ranks: Vec<RankDevice> = (0..world_size)
        .map(|r| RankDevice::Cuda(gpu_list[r % gpu_list.len()]))
        .collect();
    for &g in &gpu_list {
        let on: Vec<String> = (0..world_size)
            .filter(|&r| ranks[r] == RankDevice::Cuda(g))
            .map(|r| r.to_string())
            .collect();
        if on.len() > 1 {
            notes.push(format!(
                "ranks {} share cuda:{g} ({world_size} ranks on {} GPU(s)): correct, but not faster than one rank",
                on.join(", "),
                gpu_list.len()
            ));
        }
    }
    Ok(DeviceMap { ranks, notes })
}

/// How many CUDA GPUs this process can open (0 on a CPU-only build). Probes ordinals in order
/// and stops at the first that fails, so it creates a CUDA context per GPU found.
pub fn cuda_device_count() -> usize {
    if !candle_core::utils::cuda_is_available() {
        return 0;
    }
    (0..MAX_GPUS)
        .take_while(|&i| matches!(open_cuda(i), Ok(Ok(_))))
        .count()
}

/// `Device::new_cuda(ordinal)`, with a panic turned into an error: candle's CUDA library
/// loader panics when the driver's `libcuda.so` cannot be loaded (a CUDA build on a machine
/// without a GPU driver), and a missing driver is bad input, not a bug.
fn open_cuda(ordinal: usize) -> std::result::Result<candle_core::Result<Device>, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(|| Device::new_cuda(ordinal));
    std::panic::set_hook(hook);
    out.map_err(|p| hybridiff_comm::panic_message(p.as_ref()))
}

/// The candle device of each rank, one `Device` per GPU shared by every rank on it (candle
/// tells CUDA devices apart by the handle, so two handles on `cuda:0` would not interoperate).
pub fn open_devices(ranks: &[RankDevice]) -> Result<Vec<Device>> {
    let mut opened: Vec<(RankDevice, Device)> = Vec::new();
    let mut out = Vec::with_capacity(ranks.len());
    for &r in ranks {
        if let Some((_, d)) = opened.iter().find(|(k, _)| *k == r) {
            out.push(d.clone());
            continue;
        }
        let d = match r {
            RankDevice::Cpu => Device::Cpu,
            RankDevice::Cuda(n) => match open_cuda(n) {
                Ok(Ok(d)) => d,
                Ok(Err(e)) => {
                    return Err(Error::Options(format!(
                        "cuda:{n}: could not open the GPU: {e}"
                    )))
                }
                Err(e) => {
                    return Err(Error::Options(format!(
                        "cuda:{n}: could not load the CUDA driver ({e}); is the NVIDIA driver installed? Use --device cpu otherwise"
                    )))
                }
            },
        };
        opened.push((r, d.clone()));
        out.push(d);
    }
    Ok(out)
}

/// The rank-to-device layout a job runs with. The default puts every rank on the job's own
/// device (the device its inputs are on), as every run did before devices could be chosen.
#[derive(Clone, Default)]
pub struct Placement {
    /// Index = rank; empty: every rank on the job's device.
    ranks: Vec<RankDevice>,
    devices: Vec<Device>,
    /// Denoisers loaded on devices other than the job's, for the ranks placed there.
    replicas: Vec<(RankDevice, Arc<dyn Denoiser>)>,
}

impl std::fmt::Debug for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Placement")
            .field("ranks", &self.ranks)
            .field(
                "replicas",
                &self.replicas.iter().map(|(d, _)| *d).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Placement {
    /// A layout of `ranks` on their opened `devices` (see [`open_devices`]), index = rank.
    pub fn new(ranks: Vec<RankDevice>, devices: Vec<Device>) -> Result<Self> {
        if ranks.len() != devices.len() {
            return Err(Error::Options(format!(
                "a placement of {} ranks got {} devices",
                ranks.len(),
                devices.len()
            )));
        }
        Ok(Self {
            ranks,
            devices,
            replicas: Vec::new(),
        })
    }

    /// Adds the denoiser loaded on `device` for the ranks placed there.
    pub fn with_replica(mut self, device: RankDevice, model: Arc<dyn Denoiser>) -> Self {
        self.replicas.push((device, model));
        self
    }

    /// The devices, index = rank (empty: every rank on the job's device).
    pub fn ranks(&self) -> &[RankDevice] {
        &self.ranks
    }

    /// The distinct devices after the first rank's, which need their own copy of the model.
    pub fn other_devices(&self) -> Vec<(RankDevice, Device)> {
        let mut out: Vec<(RankDevice, Device)> = Vec::new();
        for (r, d) in self.ranks.iter().zip(&self.devices).skip(1) {
            if Some(r) != self.ranks.first() && !out.iter().any(|(k, _)| k == r) {
                out.push((*r, d.clone()));
            }
        }
        out
    }

    /// Rank `rank`'s device label, `job_device` when the placement does not say.
    pub fn label(&self, rank: usize, job_device: &Device) -> RankDevice {
        self.ranks
            .get(rank)
            .copied()
            .unwrap_or_else(|| RankDevice::of(job_device))
    }

    /// Rank `rank`'s device and, when it is not `job_device`, its replica of the denoiser.
    ///
    /// # Errors
    /// The placement has fewer ranks than the job, or no replica for the rank's device.
    pub(crate) fn for_rank(
        &self,
        rank: usize,
        job_device: &Device,
    ) -> Result<(Device, Option<Arc<dyn Denoiser>>)> {
        if self.ranks.is_empty() {
            return Ok((job_device.clone(), None));
        }
        let (Some(label), Some(device)) = (self.ranks.get(rank), self.devices.get(rank)) else {
            return Err(Error::Options(format!(
                "rank {rank}: the device layout has only {} rank(s)",
                self.ranks.len()
            )));
        };
        if device.same_device(job_device) {
            return Ok((device.clone(), None));
        }
        let model = self
            .replicas
            .iter()
            .find(|(d, _)| d == label)
            .map(|(_, m)| m.clone())
            .ok_or_else(|| {
                Error::Options(format!(
                    "rank {rank} is placed on {label}, but no copy of the model was loaded there"
                ))
            })?;
        Ok((device.clone(), Some(model)))
    }
}

/// A rank's communicator that moves every tensor it receives to the rank's device (no copy
/// when it is already there) and counts the messages this rank sends. Bytes are the inner
/// communicator's count, whatever the devices.
pub struct DeviceComm<'a> {
    inner: &'a mut dyn Communicator,
    device: Device,
    messages: AtomicU64,
}

impl<'a> DeviceComm<'a> {
    pub fn new(inner: &'a mut dyn Communicator, device: Device) -> Self {
        Self {
            inner,
            device,
            messages: AtomicU64::new(0),
        }
    }

    fn here(&self, t: Tensor, op: Op, peer: usize) -> hybridiff_comm::Result<Tensor> {
        t.to_device(&self.device)
            .map_err(|e| hybridiff_comm::Error::Transport {
                rank: self.inner.rank(),
                peer,
                op,
                what: format!(
                    "moving the received tensor to this rank's device ({:?}): {e}",
                    self.device.location()
                ),
            })
    }
}

impl Communicator for DeviceComm<'_> {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn send(&self, tensor: &Tensor, dst: usize) -> hybridiff_comm::Result<()> {
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.inner.send(tensor, dst)
    }
    fn recv(&self, src: usize) -> hybridiff_comm::Result<Tensor> {
        self.here(self.inner.recv(src)?, Op::Recv, src)
    }
    fn broadcast_in(
        &self,
        group: &Group,
        tensor: Option<&Tensor>,
        root: usize,
    ) -> hybridiff_comm::Result<Tensor> {
        let t = self.inner.broadcast_in(group, tensor, root)?;
        if self.rank() == root {
            let n = group.len() as u64 - 1;
            self.messages.fetch_add(n, Ordering::Relaxed);
        }
        self.here(t, Op::Broadcast, root)
    }
    fn all_gather_in(&self, group: &Group, tensor: &Tensor) -> hybridiff_comm::Result<Vec<Tensor>> {
        let all = self.inner.all_gather_in(group, tensor)?;
        let n = group.len() as u64 - 1;
        self.messages.fetch_add(n, Ordering::Relaxed);
        all.into_iter()
            .zip(group.ranks())
            .map(|(t, &peer)| self.here(t, Op::AllGather, peer))
            .collect()
    }
    fn barrier_in(&self, group: &Group) -> hybridiff_comm::Result<()> {
        self.inner.barrier_in(group)
    }
    fn bytes_sent(&self) -> u64 {
        self.inner.bytes_sent()
    }
    fn messages_sent(&self) -> u64 {
        self.messages.load(Ordering::Relaxed)
    }
    fn abort(&self, reason: &str) {
        self.inner.abort(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(s: &str) -> Result<DeviceRequest> {
        s.parse()
    }

    #[test]
    fn device_flag_parses_and_names_itself_on_error() {
        assert_eq!(req("cpu").unwrap(), DeviceRequest::Cpu);
        assert_eq!(req("auto").unwrap(), DeviceRequest::Auto);
        assert_eq!(req("cuda").unwrap(), DeviceRequest::Cuda { first: 0 });
        assert_eq!(req("cuda:3").unwrap(), DeviceRequest::Cuda { first: 3 });
        for bad in [
            "gpu",
            "cuda:x",
            "cuda:",
            "cuda:-1",
            "cuda:+1",
            "CUDA",
            "cuda:99999",
        ] {
            let e = req(bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("--device {bad}:")), "{e}");
            assert!(e.contains("expected cpu, cuda, cuda:N"), "{e}");
        }
    }

    #[test]
    fn devices_list_parses_and_rejects_empty_repeated_and_non_numbers() {
        assert_eq!(parse_device_list("0,1").unwrap(), vec![0, 1]);
        assert_eq!(parse_device_list("3").unwrap(), vec![3]);
        assert_eq!(parse_device_list(" 2 , 0").unwrap(), vec![2, 0]);
        let e = parse_device_list("0,,1").unwrap_err().to_string();
        assert!(e.contains("--devices 0,,1: entry 2 is empty"), "{e}");
        let e = parse_device_list("0,a").unwrap_err().to_string();
        assert!(e.contains("`a` is not a GPU index"), "{e}");
        let e = parse_device_list("1,1").unwrap_err().to_string();
        assert!(e.contains("GPU 1 is listed twice"), "{e}");
        assert!(parse_device_list("").is_err());
    }

    fn no_gpu_probe() -> usize {
        panic!("the GPU count must not be asked for")
    }

    #[test]
    fn cpu_maps_every_rank_to_the_cpu_and_refuses_a_gpu_list() {
        let m = map_ranks(DeviceRequest::Cpu, None, 3, true, no_gpu_probe).unwrap();
        assert_eq!(m.ranks, vec![RankDevice::Cpu; 3]);
        assert!(m.notes.is_empty());
        assert_eq!(transfer(&m.ranks), Transfer::Host);
        let e = map_ranks(DeviceRequest::Cpu, Some(&[0, 1]), 2, true, no_gpu_probe)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--devices") && e.contains("--device is cpu"),
            "{e}"
        );
    }

    #[test]
    fn a_cpu_only_build_asked_for_cuda_says_how_to_get_one() {
        for (r, list, flag) in [
            (DeviceRequest::Cuda { first: 0 }, None, "--device cuda:"),
            (DeviceRequest::Cuda { first: 1 }, None, "--device cuda:1:"),
            (
                DeviceRequest::Cuda { first: 0 },
                Some(&[0usize, 1][..]),
                "--devices:",
            ),
            (DeviceRequest::Auto, Some(&[0usize][..]), "--devices:"),
        ] {
            let e = map_ranks(r, list, 2, false, no_gpu_probe)
                .unwrap_err()
                .to_string();
            assert!(e.starts_with(flag), "{e}");
            assert!(e.contains("built without CUDA"), "{e}");
            assert!(e.contains("tools/cuda-toolchain.sh"), "{e}");
            assert!(e.contains("cargo build --release"), "{e}");
            assert!(e.contains("--features cuda"), "{e}");
        }
    }

    #[test]
    fn auto_falls_back_to_the_cpu_and_says_why() {
        let m = map_ranks(DeviceRequest::Auto, None, 2, false, no_gpu_probe).unwrap();
        assert_eq!(m.ranks, vec![RankDevice::Cpu; 2]);
        assert!(m.notes[0].contains("built without CUDA"), "{:?}", m.notes);
        let m = map_ranks(DeviceRequest::Auto, None, 2, true, || 0).unwrap();
        assert_eq!(m.ranks, vec![RankDevice::Cpu; 2]);
        assert!(m.notes[0].contains("no GPU found"), "{:?}", m.notes);
        let m = map_ranks(DeviceRequest::Auto, None, 2, true, || 2).unwrap();
        assert_eq!(m.ranks, vec![RankDevice::Cuda(0), RankDevice::Cuda(1)]);
        assert!(m.notes.is_empty());
    }

    #[test]
    fn rank_r_uses_first_plus_r_and_wraps_onto_the_gpus_there_are() {
        let c = |first| DeviceRequest::Cuda { first };
        let m = map_ranks(c(0), None, 2, true, || 4).unwrap();
        assert_eq!(m.ranks, vec![RankDevice::Cuda(0), RankDevice::Cuda(1)]);
        assert_eq!(transfer(&m.ranks), Transfer::DeviceToDevice);
        let m = map_ranks(c(2), None, 2, true, || 4).unwrap();
        assert_eq!(m.ranks, vec![RankDevice::Cuda(2), RankDevice::Cuda(3)]);
        // cuda:3 of 4 GPUs: one GPU from there, so both ranks share it.
        let m = map_ranks(c(3), None, 2, true, || 4).unwrap();
        assert_eq!(m.ranks, vec![RankDevice::Cuda(3); 2]);
        assert_eq!(transfer(&m.ranks), Transfer::SameDevice);
        assert!(
            m.notes[0].contains("ranks 0, 1 share cuda:3"),
            "{:?}",
            m.notes
        );
        // Two ranks on the one GPU of an H200 machine.
        let m = map_ranks(c(0), None, 2, true, || 1).unwrap();
        assert_eq!(m.ranks, vec![RankDevice::Cuda(0); 2]);
        assert_eq!(m.notes.len(), 1);
        // Four ranks on two listed GPUs: 0, 1, 0, 1.
        let m = map_ranks(c(0), Some(&[1, 0]), 4, true, || 2).unwrap();
        assert_eq!(
            m.ranks,
            [1, 0, 1, 0].map(RankDevice::Cuda).to_vec(),
            "the r-th listed GPU, wrapping"
        );
        assert_eq!(m.notes.len(), 2, "{:?}", m.notes);
        assert!(
            m.notes[0].contains("ranks 0, 2 share cuda:1"),
            "{:?}",
            m.notes
        );
    }

    #[test]
    fn gpus_the_machine_lacks_are_named_with_the_flag() {
        let c = |first| DeviceRequest::Cuda { first };
        let e = map_ranks(c(2), None, 2, true, || 2)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--device cuda:2: GPU 2 does not exist"),
            "{e}"
        );
        assert!(e.contains("2 GPU(s)"), "{e}");
        let e = map_ranks(c(0), Some(&[0, 5]), 2, true, || 2)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--devices: GPU 5 does not exist"), "{e}");
        let e = map_ranks(c(0), None, 2, true, || 0)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("--device: this machine has no CUDA GPU"),
            "{e}"
        );
    }

    #[test]
    fn a_cpu_placement_runs_every_rank_on_the_job_device() {
        let p = Placement::new(
            vec![RankDevice::Cpu; 2],
            open_devices(&[RankDevice::Cpu; 2]).unwrap(),
        )
        .unwrap();
        let (d, replica) = p.for_rank(1, &Device::Cpu).unwrap();
        assert!(d.is_cpu() && replica.is_none());
        assert!(p.other_devices().is_empty());
        assert!(p.for_rank(2, &Device::Cpu).is_err());
        assert_eq!(Placement::default().label(3, &Device::Cpu), RankDevice::Cpu);
    }
}
