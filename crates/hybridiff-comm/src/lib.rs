//! The parallel runtime of hybridiff: how the ranks of a distributed denoising job exchange
//! tensors.
//!
//! The engine only talks to the [`Communicator`] trait, so the transport can change (threads of
//! one process, or one process per rank over MPI with the `mpi` feature; NCCL later) without
//! touching it. The trait is deliberately
//! transport-neutral: tensors go in and new tensors come out, and nothing may rely on sender and
//! receiver sharing memory or a device.
//!
//! Two promises hold for every transport: no call blocks longer than the configured timeout, and
//! [`Communicator::abort`] makes every pending and future wait on every rank fail promptly, so a
//! failing rank stops the whole job instead of leaving the others hung.

mod collective;
mod error;
#[doc(hidden)]
pub mod fault;
mod in_process;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod nccl_wire;
mod run;
mod warm;

use candle_core::Tensor;

pub use collective::Group;
pub use error::{Error, Op, Result};
pub use in_process::{InProcessComm, InProcessGroup};
pub use run::{panic_message, run_ranks, threads_started, RunError};
pub use warm::WarmRanks;

/// One rank's handle on a group of ranks.
///
/// Point-to-point messages are FIFO per (source, destination) pair. Collectives must be called
/// by every member of their group, in the same order; they may be called repeatedly, and a fast
/// rank's next collective never mixes with a slow rank's current one. Transports implement
/// send/recv and a tagged collective channel; the collectives themselves are written once
/// (`collective.rs`) over that channel, for every transport.
pub trait Communicator: Send {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Sends `tensor` to `dst`; the matching [`recv`](Self::recv) on `dst` gets it, in order.
    fn send(&self, tensor: &Tensor, dst: usize) -> Result<()>;

    /// Receives the next tensor `src` sent to this rank, waiting at most the timeout.
    fn recv(&self, src: usize) -> Result<Tensor>;

    /// Broadcast within `group` (see [`Group`]): `root`, a member, passes `Some(tensor)`, the
    /// other members `None`; every member gets root's tensor. Ranks outside the group do not
    /// call it.
    fn broadcast_in(&self, group: &Group, tensor: Option<&Tensor>, root: usize) -> Result<Tensor>;

    /// All-gather within `group`: every member contributes one tensor and gets all of them,
    /// index = the member's position in the group.
    fn all_gather_in(&self, group: &Group, tensor: &Tensor) -> Result<Vec<Tensor>>;

    /// Returns once every member of `group` has entered the barrier.
    fn barrier_in(&self, group: &Group) -> Result<()>;

    /// Root passes `Some(tensor)`, others `None`; every rank gets root's tensor.
    fn broadcast(&self, tensor: Option<&Tensor>, root: usize) -> Result<Tensor> {
        self.broadcast_in(&Group::world(self.world_size()), tensor, root)
    }

    /// Every rank contributes one tensor; every rank gets all, index = rank.
    fn all_gather(&self, tensor: &Tensor) -> Result<Vec<Tensor>> {
        self.all_gather_in(&Group::world(self.world_size()), tensor)
    }

    /// Returns once every rank has entered the barrier.
    fn barrier(&self) -> Result<()> {
        self.barrier_in(&Group::world(self.world_size()))
    }

    /// Bytes this rank has sent so far, counted as a wire transport would: elements × dtype size
    /// of every tensor, once per destination (a broadcast from the root to 3 others counts 3×, an
    /// all_gather sends its tensor to `world_size - 1` peers, a barrier sends nothing). Lets us
    /// compare the communication volume of parallel strategies independently of the transport.
    fn bytes_sent(&self) -> u64;

    /// Messages this rank has sent so far, counted as [`bytes_sent`](Self::bytes_sent) counts
    /// bytes (one per destination; a barrier sends none), for latency models that charge a
    /// cost per message. Transports that do not count return 0; the engine wraps every rank's
    /// communicator in one that does (`hybridiff_engine::device::DeviceComm`).
    fn messages_sent(&self) -> u64 {
        0
    }

    /// Marks the whole group failed with `reason`: every pending and future wait on every rank
    /// returns [`Error::Aborted`] promptly. The first abort's reason is the one reported.
    fn abort(&self, reason: &str);
}

/// What sending `t` costs on a real wire: its elements in its dtype, views included.
pub fn tensor_bytes(t: &Tensor) -> u64 {
    (t.elem_count() * t.dtype().size_in_bytes()) as u64
}

/// How many processes the job this process belongs to has, according to the environment an MPI
/// launcher sets (`OMPI_COMM_WORLD_SIZE` for Open MPI, `PMI_SIZE` for MPICH, Intel MPI and
/// Slurm's PMI), or `None` when no launcher started this process. Needs no MPI library, so a
/// build without the `mpi` feature can tell that it was started by `mpirun`.
pub fn launcher_world_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}

/// How many processes of this job run on this machine, from the launcher's environment
/// (`OMPI_COMM_WORLD_LOCAL_SIZE`, `MPI_LOCALNRANKS`), when it says.
pub fn launcher_local_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .iter()
        .find_map(|v| std::env::var(v).ok()?.trim().parse().ok())
}
