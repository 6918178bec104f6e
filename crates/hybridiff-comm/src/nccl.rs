//! The NCCL transport: GPU tensors between ranks that each own one CUDA device, on NCCL through
//! cudarc (feature `nccl`, which implies `cuda`).
//!
//! COMPILED, NEVER RUN: no GPU was available when this was written; see ARCHITECTURE.md for what
//! has been exercised (the header codec in [`crate::nccl_wire`] only).
//!
//! How it keeps the promises of [`Communicator`]:
//!
//! - **Start-up.** Another communicator (the *control* channel: MPI across processes, the
//!   in-process channel across threads) carries the NCCL unique ids: rank 0 makes them and
//!   broadcasts them as one byte blob ([`crate::nccl_wire::split_ids`]).
//! - **Sends never block.** NCCL's send waits for the matching receive on the GPU stream, so one
//!   stream per rank would deadlock two ranks that both send and then receive. Each ordered pair
//!   of ranks therefore gets its own two-rank NCCL communicator and stream per channel
//!   (point-to-point and collectives apart, [`crate::nccl_wire::CHANNELS`]): `send` enqueues a
//!   fixed-size header and the tensor's bytes on the `self -> dst` stream and returns; the
//!   tensor is kept alive until a CUDA event says the send is done. With the ranks this project
//!   runs (2 to 8) that is a handful of communicators per rank.
//! - **No wait is unbounded.** Communicators are made non-blocking (`blocking = 0` in
//!   `ncclCommInitRankConfig`); every NCCL call that returns `ncclInProgress` is polled with
//!   `ncclCommGetAsyncError`, and every transfer's completion with a CUDA event query, against
//!   the deadline (`--comm-timeout`). Past it, or on an NCCL error, every communicator of this
//!   rank is aborted (`ncclCommAbort`, which never waits for peers) and the call fails naming the
//!   operation and the peer.
//! - **Abort** aborts this rank's NCCL communicators and forwards the reason through the control
//!   channel; waits poll the control channel, so peers stop promptly with
//!   [`Error::Aborted`] naming the rank that gave up.
//! - **Bytes** are counted as the other transports count them (the tensor's elements times the
//!   dtype size, once per destination; headers are not counted), so traces compare.
//!
//! Received tensors are contiguous, on this rank's device. Tensors given to `send` may be on any
//! device; they are copied to this rank's first.
//!
//! candle-core's cudarc links libnccl dynamically (`-lnccl`, found at build time through
//! tools/cuda-toolchain.sh's `libnccl.so` link): a binary built with this feature needs
//! `libnccl.so.2` on the loader's path (`LD_LIBRARY_PATH`) to start at all.

use std::cell::{Cell, RefCell};
use std::ffi::CStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{DType, Device, Storage, Tensor};
use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use cudarc::nccl::sys;

use crate::collective::{self, check_p2p_peer, deadline_after, Group, Sequences, Tag, Wire};
use crate::error::{Error, Op, Result};
use crate::nccl_wire::{self, Header, CHANNELS, HEADER_LEN, UNIQUE_ID_LEN};
use crate::{tensor_bytes, Communicator, InProcessComm};

const P2P: usize = 0;
const COLL: usize = 1;

/// The communicator that carries the NCCL ids at start-up and abort notices afterwards.
pub enum Control {
    /// Ranks are threads of this process (one GPU each).
    InProcess(InProcessComm),
    /// Ranks are processes of an MPI job (one GPU each).
    #[cfg(feature = "mpi")]
    Mpi(crate::mpi::MpiComm),
}

impl Control {
    fn comm(&self) -> &dyn Communicator {
        match self {
            Control::InProcess(c) => c,
            #[cfg(feature = "mpi")]
            Control::Mpi(c) => c,
        }
    }

    fn abort_notice(&self) -> Option<(usize, String)> {
        match self {
            Control::InProcess(c) => c.abort_notice(),
            #[cfg(feature = "mpi")]
            Control::Mpi(c) => c.abort_notice(),
        }
    }
}

/// Why an NCCL group could not be set up. Every message names this rank.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum InitError {
    #[error(
        "rank {rank}: the NCCL transport needs a CUDA device, not {device}: give each rank a GPU \
         (--device cuda)"
    )]
    NotCuda { rank: usize, device: String },
    #[error("rank {rank}: {what}")]
    Setup { rank: usize, what: String },
    #[error(
        "rank {rank}: NCCL start-up with rank {peer} did not finish within {after:?}: rank \
         {peer} is stuck, dead or on a GPU this rank cannot reach; raise --comm-timeout if \
         start-up is slow"
    )]
    Timeout {
        rank: usize,
        peer: usize,
        after: Duration,
    },
    #[error("rank {rank}: NCCL start-up with rank {peer} failed: {what}")]
    Nccl {
        rank: usize,
        peer: usize,
        what: String,
    },
    /// The control channel failed while passing the ids.
    #[error("rank {rank}: passing the NCCL ids over the control channel failed: {source}")]
    Control { rank: usize, source: Error },
}

/// One two-rank NCCL communicator (one channel of one ordered pair) and its stream.
struct Link {
    comm: Cell<sys::ncclComm_t>,
    stream: Arc<CudaStream>,
    /// The other rank's index inside this two-rank communicator (the sender is 0).
    nccl_peer: i32,
}

/// A send NCCL may still be reading from: its buffers live until its event completes.
struct PendingSend {
    done: CudaEvent,
    _header: CudaSlice<u8>,
    _tensor: Option<Tensor>,
    peer: usize,
    op: Op,
}

/// One rank's end of an NCCL group (see the module docs).
///
/// Not `Sync`: one thread at a time uses it.
pub struct NcclComm {
    rank: usize,
    world: usize,
    timeout: Duration,
    max_bytes: u64,
    device: Device,
    cuda: CudaDevice,
    /// candle's stream on this device: where tensors are made and used.
    stream: Arc<CudaStream>,
    /// `sends[channel][peer]` and `recvs[channel][peer]`; `None` at this rank's own index.
    sends: [Vec<Option<Link>>; CHANNELS],
    recvs: [Vec<Option<Link>>; CHANNELS],
    control: Control,
    bytes_sent: Cell<u64>,
    /// Tags collective messages.
    sequences: Sequences,
    pending: RefCell<Vec<PendingSend>>,
    aborted: RefCell<Option<(usize, String)>>,
}

// SAFETY: the NCCL communicator handles are only used through `&self` methods by the thread
// that owns the `NcclComm` (it is not `Sync`); NCCL allows a communicator to be used from any
// thread as long as calls do not overlap, and the CUDA context is bound before every call.
unsafe impl Send for NcclComm {}

fn nccl_error_string(r: sys::ncclResult_t) -> String {
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for every code.
    let s = unsafe { sys::ncclGetErrorString(r) };
    if s.is_null() {
        return format!("{r:?}");
    }
    // SAFETY: non-null, NUL-terminated, static.
    let s = unsafe { CStr::from_ptr(s) }.to_string_lossy();
    format!("{s} ({r:?})")
}

/// NCCL's last error text for `comm`, when it has one.
fn last_error(comm: sys::ncclComm_t) -> String {
    // SAFETY: ncclGetLastError accepts any communicator (or null) and returns a
    // NUL-terminated string owned by NCCL.
    let s = unsafe { sys::ncclGetLastError(comm) };
    if s.is_null() {
        return String::new();
    }
    // SAFETY: as above.
    unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned()
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: every field NCCL's default, except that calls
/// return `ncclInProgress` instead of waiting, so every wait here can have a deadline.
fn nonblocking_config() -> sys::ncclConfig_t {
    const UNDEF: i32 = i32::MIN;
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        // The version of the header cudarc's `nccl-02030` bindings were made from.
        version: 23000,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// Sleeps a little longer each round (spinning first), up to 200 µs, never past `deadline`.
struct Backoff {
    polls: u32,
    nap: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self {
            polls: 0,
            nap: Duration::from_micros(10),
        }
    }

    fn pause(&mut self, deadline: Instant) {
        self.polls += 1;
        if self.polls < 200 {
            std::hint::spin_loop();
        } else {
            let now = Instant::now();
            std::thread::sleep(self.nap.min(deadline.saturating_duration_since(now)));
            self.nap = (self.nap * 2).min(Duration::from_micros(200));
        }
    }
}

/// `ncclCommGetAsyncError` for `comm`.
fn async_state(comm: sys::ncclComm_t) -> sys::ncclResult_t {
    let mut state = sys::ncclResult_t::ncclInProgress;
    // SAFETY: `comm` is a live communicator; `state` is a valid out-pointer.
    let r = unsafe { sys::ncclCommGetAsyncError(comm, &mut state) };
    if r != sys::ncclResult_t::ncclSuccess {
        return r;
    }
    state
}

fn abort_comm(comm: &Cell<sys::ncclComm_t>) {
    let c = comm.replace(std::ptr::null_mut());
    if !c.is_null() {
        // SAFETY: `c` was a live communicator and is forgotten here (nulled), so it is
        // aborted exactly once; ncclCommAbort never waits for peers.
        unsafe { sys::ncclCommAbort(c) };
    }
}

impl NcclComm {
    /// Joins the NCCL group of the ranks of `control` (each must call this, with its own
    /// device), every wait bounded by `timeout`. `device` must be a CUDA device, a different
    /// GPU on each rank of a machine (NCCL refuses two ranks of one communicator on one GPU).
    ///
    /// # Errors
    /// [`InitError`]: not a CUDA device, the ids could not be passed, or a peer
    /// did not finish start-up within `timeout` (all of this rank's NCCL communicators are then
    /// aborted).
    pub fn new(
        control: Control,
        device: &Device,
        timeout: Duration,
    ) -> std::result::Result<Self, InitError> {
        let (rank, world) = (control.comm().rank(), control.comm().world_size());
        let Device::Cuda(cuda) = device else {
            return Err(InitError::NotCuda {
                rank,
                device: format!("{:?}", device.location()),
            });
        };
        let setup = |what: String| InitError::Setup { rank, what };
        let len = nccl_wire::ids_len(world).map_err(|e| setup(e.to_string()))?;
        let blob = if rank == 0 {
            let mut blob = Vec::with_capacity(len);
            for _ in 0..len / UNIQUE_ID_LEN {
                let mut id = sys::ncclUniqueId {
                    internal: [0; UNIQUE_ID_LEN],
                };
                // SAFETY: `id` is a valid out-pointer.
                let r = unsafe { sys::ncclGetUniqueId(&mut id) };
                if r != sys::ncclResult_t::ncclSuccess {
                    return Err(setup(format!(
                        "ncclGetUniqueId failed: {}",
                        nccl_error_string(r)
                    )));
                }
                blob.extend(id.internal.iter().map(|&c| c as u8));
            }
            Some(Tensor::from_vec(blob, len, &Device::Cpu).map_err(|e| setup(e.to_string()))?)
        } else {
            None
        };
        let blob = control
            .comm()
            .broadcast(blob.as_ref(), 0)
            .and_then(|t| {
                t.to_vec1::<u8>().map_err(|e| Error::Transport {
                    rank,
                    peer: 0,
                    op: Op::Broadcast,
                    what: e.to_string(),
                })
            })
            .map_err(|source| InitError::Control { rank, source })?;
        let ids = nccl_wire::split_ids(&blob, world).map_err(|e| setup(e.to_string()))?;

        let stream = cuda.cuda_stream();
        let ctx = stream.context().clone();
        ctx.bind_to_thread()
            .map_err(|e| setup(format!("binding the CUDA context: {e}")))?;
        let mut comm = NcclComm {
            rank,
            world,
            timeout,
            max_bytes: nccl_wire::DEFAULT_MAX_BYTES,
            device: device.clone(),
            cuda: cuda.clone(),
            stream,
            sends: std::array::from_fn(|_| (0..world).map(|_| None).collect()),
            recvs: std::array::from_fn(|_| (0..world).map(|_| None).collect()),
            control,
            bytes_sent: Cell::new(0),
            sequences: Sequences::new(world),
            pending: RefCell::new(Vec::new()),
            aborted: RefCell::new(None),
        };
        // Start every communicator, then wait for all: non-blocking init returns at once, so
        // the order ranks start them in cannot deadlock.
        for channel in 0..CHANNELS {
            for peer in (0..world).filter(|&p| p != rank) {
                for sending in [true, false] {
                    let (src, dst) = if sending { (rank, peer) } else { (peer, rank) };
                    let id = &ids[nccl_wire::pair_index(channel, src, dst, world)];
                    let link = comm.start_link(id, sending, peer, &ctx)?;
                    if sending {
                        comm.sends[channel][peer] = Some(link);
                    } else {
                        comm.recvs[channel][peer] = Some(link);
                    }
                }
            }
        }
        let deadline = deadline_after(timeout);
        for peer in (0..world).filter(|&p| p != rank) {
            for channel in 0..CHANNELS {
                for link in [&comm.sends[channel][peer], &comm.recvs[channel][peer]]
                    .into_iter()
                    .flatten()
                {
                    let mut backoff = Backoff::new();
                    loop {
                        match async_state(link.comm.get()) {
                            sys::ncclResult_t::ncclSuccess => break,
                            sys::ncclResult_t::ncclInProgress => {}
                            other => {
                                let what = format!(
                                    "{} {}",
                                    nccl_error_string(other),
                                    last_error(link.comm.get())
                                );
                                comm.abort_links();
                                return Err(InitError::Nccl { rank, peer, what });
                            }
                        }
                        if let Some((by, reason)) = comm.control.abort_notice() {
                            comm.abort_links();
                            return Err(InitError::Control {
                                rank,
                                source: Error::Aborted {
                                    rank,
                                    by_rank: by,
                                    reason,
                                    op: Op::Barrier,
                                },
                            });
                        }
                        if Instant::now() >= deadline {
                            comm.abort_links();
                            return Err(InitError::Timeout {
                                rank,
                                peer,
                                after: timeout,
                            });
                        }
                        backoff.pause(deadline);
                    }
                }
            }
        }
        tracing::debug!(rank, world, "NCCL links up");
        Ok(comm)
    }

    /// Starts one two-rank communicator (non-blocking) with its own stream.
    fn start_link(
        &self,
        id: &[u8; UNIQUE_ID_LEN],
        sending: bool,
        peer: usize,
        ctx: &Arc<cudarc::driver::CudaContext>,
    ) -> std::result::Result<Link, InitError> {
        let rank = self.rank;
        let stream = ctx.new_stream().map_err(|e| InitError::Setup {
            rank,
            what: format!("creating a CUDA stream: {e}"),
        })?;
        let mut uid = sys::ncclUniqueId {
            internal: [0; UNIQUE_ID_LEN],
        };
        for (d, &s) in uid.internal.iter_mut().zip(id.iter()) {
            *d = s as _;
        }
        let mut config = nonblocking_config();
        let mut handle: sys::ncclComm_t = std::ptr::null_mut();
        // The sender is rank 0 of the pair's communicator, the receiver rank 1.
        let me = if sending { 0 } else { 1 };
        // SAFETY: valid out-pointer, id and config; the config outlives the call (NCCL copies
        // it).
        let r = unsafe { sys::ncclCommInitRankConfig(&mut handle, 2, uid, me, &mut config) };
        if !matches!(
            r,
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
        ) || handle.is_null()
        {
            let what = format!(
                "ncclCommInitRankConfig failed: {} {}",
                nccl_error_string(r),
                last_error(handle)
            );
            let link = Link {
                comm: Cell::new(handle),
                stream,
                nccl_peer: 1 - me,
            };
            abort_comm(&link.comm);
            self.abort_links();
            return Err(InitError::Nccl { rank, peer, what });
        }
        Ok(Link {
            comm: Cell::new(handle),
            stream,
            nccl_peer: 1 - me,
        })
    }

    /// The bound on every wait.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the bound on one message's tensor data (default
    /// [`nccl_wire::DEFAULT_MAX_BYTES`]); a header announcing more is refused before anything
    /// is allocated.
    pub fn set_max_bytes(&mut self, max_bytes: u64) {
        self.max_bytes = max_bytes;
    }

    fn links(&self) -> impl Iterator<Item = &Link> {
        self.sends
            .iter()
            .chain(self.recvs.iter())
            .flat_map(|v| v.iter().flatten())
    }

    fn abort_links(&self) {
        for link in self.links() {
            abort_comm(&link.comm);
        }
    }

    fn check_p2p_peer(&self, peer: usize, op: Op) -> Result<()> {
        check_p2p_peer(self.rank, self.world, peer, op)
    }

    fn transport_error(&self, peer: usize, op: Op, what: impl std::fmt::Display) -> Error {
        Error::Transport {
            rank: self.rank,
            peer,
            op,
            what: what.to_string(),
        }
    }

    /// Fails with [`Error::Aborted`] if the group was aborted, here or (seen on the control
    /// channel) by a peer; a peer's abort also aborts this rank's NCCL communicators.
    fn check_aborted(&self, op: Op) -> Result<()> {
        if self.aborted.borrow().is_none() {
            if let Some(notice) = self.control.abort_notice() {
                tracing::warn!(
                    rank = self.rank,
                    by_rank = notice.0,
                    "NCCL group aborted by a peer"
                );
                *self.aborted.borrow_mut() = Some(notice);
                self.abort_links();
            }
        }
        match &*self.aborted.borrow() {
            Some((by_rank, reason)) => Err(Error::Aborted {
                rank: self.rank,
                by_rank: *by_rank,
                reason: reason.clone(),
                op,
            }),
            None => Ok(()),
        }
    }

    /// Gives up on the whole group after a failure of this rank's: aborts its NCCL
    /// communicators and tells the peers, then returns `error`.
    fn fail(&self, error: Error) -> Error {
        self.abort(&error.to_string());
        error
    }

    /// Frees the buffers of the sends that completed.
    fn progress_sends(&self) -> Result<()> {
        let mut pending = self.pending.borrow_mut();
        let mut first_error = None;
        pending.retain(|p| match p.done.try_is_complete() {
            Ok(done) => !done,
            Err(e) => {
                first_error.get_or_insert_with(|| (p.peer, p.op, e.to_string()));
                false
            }
        });
        drop(pending);
        match first_error {
            None => Ok(()),
            Some((peer, op, e)) => Err(self.fail(self.transport_error(
                peer,
                op,
                format!("the GPU reported an error for a send: {e}"),
            ))),
        }
    }

    /// Polls until `link`'s communicator has taken the last call (`ncclInProgress` done).
    fn settle(&self, link: &Link, op: Op, peer: usize, deadline: Instant) -> Result<()> {
        let mut backoff = Backoff::new();
        loop {
            let comm = link.comm.get();
            if comm.is_null() {
                return self.check_aborted(op).and(Err(self.transport_error(
                    peer,
                    op,
                    "the NCCL communicator was aborted",
                )));
            }
            match async_state(comm) {
                sys::ncclResult_t::ncclSuccess => return Ok(()),
                sys::ncclResult_t::ncclInProgress => {}
                other => {
                    let what = format!("NCCL: {} {}", nccl_error_string(other), last_error(comm));
                    return Err(self.fail(self.transport_error(peer, op, what)));
                }
            }
            self.check_aborted(op)?;
            if Instant::now() >= deadline {
                return Err(self.timed_out(peer, op));
            }
            backoff.pause(deadline);
        }
    }

    fn timed_out(&self, peer: usize, op: Op) -> Error {
        self.fail(Error::Timeout {
            rank: self.rank,
            peer,
            op,
            after: self.timeout,
        })
    }

    /// Checks an NCCL call's return code; `ncclInProgress` is waited out.
    fn call(
        &self,
        r: sys::ncclResult_t,
        link: &Link,
        op: Op,
        peer: usize,
        deadline: Instant,
        what: &str,
    ) -> Result<()> {
        match r {
            sys::ncclResult_t::ncclSuccess => Ok(()),
            sys::ncclResult_t::ncclInProgress => self.settle(link, op, peer, deadline),
            other => {
                let what = format!(
                    "{what}: {} {}",
                    nccl_error_string(other),
                    last_error(link.comm.get())
                );
                Err(self.fail(self.transport_error(peer, op, what)))
            }
        }
    }

    /// Waits for `event` (recorded after a transfer on `link`'s stream) until `deadline`,
    /// watching NCCL's asynchronous errors and the control channel for aborts.
    fn wait_event(
        &self,
        event: &CudaEvent,
        link: &Link,
        op: Op,
        peer: usize,
        deadline: Instant,
    ) -> Result<()> {
        let mut backoff = Backoff::new();
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    return Err(self.fail(self.transport_error(
                        peer,
                        op,
                        format!("the GPU reported an error: {e}"),
                    )))
                }
            }
            let comm = link.comm.get();
            if !comm.is_null() {
                match async_state(comm) {
                    sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => {}
                    other => {
                        let what =
                            format!("NCCL: {} {}", nccl_error_string(other), last_error(comm));
                        return Err(self.fail(self.transport_error(peer, op, what)));
                    }
                }
            }
            self.check_aborted(op)?;
            if Instant::now() >= deadline {
                return Err(self.timed_out(peer, op));
            }
            backoff.pause(deadline);
        }
    }

    fn cuda_error(&self, peer: usize, op: Op, e: impl std::fmt::Display) -> Error {
        self.fail(self.transport_error(peer, op, format!("CUDA: {e}")))
    }

    /// Enqueues a header and (when given) a tensor's bytes on channel `channel` to `dst`;
    /// returns without waiting for the receiver.
    fn post(
        &self,
        channel: usize,
        op: Op,
        seq: u64,
        dst: usize,
        tensor: Option<&Tensor>,
    ) -> Result<()> {
        self.check_aborted(op)?;
        self.progress_sends()?;
        let deadline = deadline_after(self.timeout);
        let tensor = match tensor {
            Some(t) => Some(
                t.to_device(&self.device)
                    .and_then(|t| t.contiguous())
                    .map_err(|e| self.transport_error(dst, op, e))?,
            ),
            None => None,
        };
        let header = Header {
            op,
            seq,
            src: self.rank,
            world: self.world,
            tensor: tensor.as_ref().map(|t| (t.dtype(), t.dims().to_vec())),
        }
        .encode()
        .map_err(|e| self.transport_error(dst, op, e))?;
        let link = self.sends[channel][dst]
            .as_ref()
            .expect("a link to every other rank");
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| self.cuda_error(dst, op, e))?;
        let header_dev = self
            .stream
            .clone_htod(&header[..])
            .map_err(|e| self.cuda_error(dst, op, e))?;
        // The link's stream starts after candle's work so far: the tensor and header are ready.
        let ready = self
            .stream
            .record_event(None)
            .map_err(|e| self.cuda_error(dst, op, e))?;
        link.stream
            .wait(&ready)
            .map_err(|e| self.cuda_error(dst, op, e))?;
        let raw_stream = link.stream.cu_stream() as sys::cudaStream_t;
        {
            let (hptr, _guard) = header_dev.device_ptr(&link.stream);
            // SAFETY: `hptr` holds HEADER_LEN bytes that live (in `PendingSend`) until the
            // send's event completes; the communicator is live.
            let r = unsafe {
                sys::ncclSend(
                    hptr as *const _,
                    HEADER_LEN,
                    sys::ncclDataType_t::ncclUint8,
                    link.nccl_peer,
                    link.comm.get(),
                    raw_stream,
                )
            };
            self.call(r, link, op, dst, deadline, "ncclSend of a header")?;
        }
        if let Some(t) = &tensor {
            let r = with_device_ptr(t, &link.stream, |ptr, bytes| {
                if bytes == 0 {
                    return sys::ncclResult_t::ncclSuccess;
                }
                // SAFETY: `ptr` holds `bytes` bytes of `t`, kept alive (in `PendingSend`) until
                // the send's event completes.
                unsafe {
                    sys::ncclSend(
                        ptr as *const _,
                        bytes,
                        sys::ncclDataType_t::ncclUint8,
                        link.nccl_peer,
                        link.comm.get(),
                        raw_stream,
                    )
                }
            })
            .map_err(|e| self.transport_error(dst, op, e))?;
            self.call(r, link, op, dst, deadline, "ncclSend of a tensor")?;
        }
        let done = link
            .stream
            .record_event(None)
            .map_err(|e| self.cuda_error(dst, op, e))?;
        self.bytes_sent
            .set(self.bytes_sent.get() + tensor.as_ref().map_or(0, tensor_bytes));
        self.pending.borrow_mut().push(PendingSend {
            done,
            _header: header_dev,
            _tensor: tensor,
            peer: dst,
            op,
        });
        Ok(())
    }

    /// Receives the next header and tensor on channel `channel` from `src`, until `deadline`.
    fn take(
        &self,
        channel: usize,
        op: Op,
        src: usize,
        deadline: Instant,
    ) -> Result<(Header, Option<Tensor>)> {
        self.check_aborted(op)?;
        self.progress_sends()?;
        let link = self.recvs[channel][src]
            .as_ref()
            .expect("a link from every other rank");
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| self.cuda_error(src, op, e))?;
        let raw_stream = link.stream.cu_stream() as sys::cudaStream_t;
        // SAFETY: uninitialised bytes that NCCL overwrites before anyone reads them.
        let mut header_dev = unsafe { self.stream.alloc::<u8>(HEADER_LEN) }
            .map_err(|e| self.cuda_error(src, op, e))?;
        {
            let (hptr, _guard) = header_dev.device_ptr_mut(&link.stream);
            // SAFETY: `hptr` holds HEADER_LEN bytes that outlive the wait below.
            let r = unsafe {
                sys::ncclRecv(
                    hptr as *mut _,
                    HEADER_LEN,
                    sys::ncclDataType_t::ncclUint8,
                    link.nccl_peer,
                    link.comm.get(),
                    raw_stream,
                )
            };
            self.call(r, link, op, src, deadline, "ncclRecv of a header")?;
        }
        let got = link
            .stream
            .record_event(None)
            .map_err(|e| self.cuda_error(src, op, e))?;
        self.wait_event(&got, link, op, src, deadline)?;
        let bytes = link
            .stream
            .clone_dtoh(&header_dev)
            .map_err(|e| self.cuda_error(src, op, e))?;
        let header = Header::decode(&bytes, src, self.world, self.max_bytes)
            .map_err(|e| self.fail(self.transport_error(src, op, e)))?;
        let Some((dtype, dims)) = header.tensor.clone() else {
            return Ok((header, None));
        };
        let n: usize = dims.iter().product();
        let tensor = alloc_tensor(
            &self.cuda,
            dtype,
            &dims,
            &self.stream,
            &link.stream,
            |ptr, bytes| {
                if bytes == 0 {
                    return sys::ncclResult_t::ncclSuccess;
                }
                // SAFETY: `ptr` holds `bytes` bytes of a fresh buffer that the returned tensor
                // owns; nobody reads it before the wait below.
                unsafe {
                    sys::ncclRecv(
                        ptr as *mut _,
                        bytes,
                        sys::ncclDataType_t::ncclUint8,
                        link.nccl_peer,
                        link.comm.get(),
                        raw_stream,
                    )
                }
            },
        )
        .map_err(|e| self.cuda_error(src, op, e))?;
        let (r, tensor) = tensor;
        self.call(r, link, op, src, deadline, "ncclRecv of a tensor")?;
        if n > 0 {
            let got = link
                .stream
                .record_event(None)
                .map_err(|e| self.cuda_error(src, op, e))?;
            self.wait_event(&got, link, op, src, deadline)?;
        }
        Ok((header, Some(tensor)))
    }
}

/// Calls `f` with the device address and byte length of contiguous CUDA tensor `t`, as seen by
/// work on `stream` (cudarc orders `stream` after the tensor's last write).
fn with_device_ptr<R>(
    t: &Tensor,
    stream: &CudaStream,
    f: impl FnOnce(u64, usize) -> R,
) -> std::result::Result<R, String> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(cs) = &*storage else {
        return Err(format!(
            "the tensor is on {:?}, not a CUDA device",
            t.device().location()
        ));
    };
    let start = layout.start_offset();
    let n = t.elem_count();
    macro_rules! go {
        ($ty:ty) => {{
            let s = cs.as_cuda_slice::<$ty>().map_err(|e| e.to_string())?;
            let v = s.slice(start..start + n);
            let (ptr, _guard) = v.device_ptr(stream);
            Ok(f(ptr, n * std::mem::size_of::<$ty>()))
        }};
    }
    match t.dtype() {
        DType::U8 => go!(u8),
        DType::U32 => go!(u32),
        DType::I16 => go!(i16),
        DType::I32 => go!(i32),
        DType::I64 => go!(i64),
        DType::F16 => go!(half::f16),
        DType::BF16 => go!(half::bf16),
        DType::F32 => go!(f32),
        DType::F64 => go!(f64),
        other => Err(format!(
            "tensors of dtype {other:?} cannot be sent over NCCL"
        )),
    }
}

/// Allocates a `dtype` tensor of shape `dims` on `cuda` (on candle's `alloc_stream`) and calls
/// `f` with its address and byte length as seen by `stream`, returning `f`'s result and the
/// tensor.
fn alloc_tensor<R>(
    cuda: &CudaDevice,
    dtype: DType,
    dims: &[usize],
    alloc_stream: &Arc<CudaStream>,
    stream: &Arc<CudaStream>,
    f: impl FnOnce(u64, usize) -> R,
) -> std::result::Result<(R, Tensor), String> {
    let n: usize = dims.iter().product();
    macro_rules! go {
        ($ty:ty) => {{
            // SAFETY: every byte is written by the receive before the tensor is handed out.
            let mut s = unsafe { alloc_stream.alloc::<$ty>(n) }.map_err(|e| e.to_string())?;
            let r = {
                let (ptr, _guard) = s.device_ptr_mut(stream);
                f(ptr, n * std::mem::size_of::<$ty>())
            };
            let storage = CudaStorage::wrap_cuda_slice(s, cuda.clone());
            let t = Tensor::from_storage(
                Storage::Cuda(storage),
                dims,
                candle_core::op::BackpropOp::none(),
                false,
            );
            Ok((r, t))
        }};
    }
    match dtype {
        DType::U8 => go!(u8),
        DType::U32 => go!(u32),
        DType::I16 => go!(i16),
        DType::I32 => go!(i32),
        DType::I64 => go!(i64),
        DType::F16 => go!(half::f16),
        DType::BF16 => go!(half::bf16),
        DType::F32 => go!(f32),
        DType::F64 => go!(f64),
        other => Err(format!(
            "tensors of dtype {other:?} cannot be received over NCCL"
        )),
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        let _ = self.stream.context().bind_to_thread();
        if self.aborted.borrow().is_none() {
            // Let the last sends reach their receivers, as long as the timeout allows.
            let deadline = deadline_after(self.timeout);
            while !self.pending.borrow().is_empty() && Instant::now() < deadline {
                if self.progress_sends().is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        if !self.pending.borrow().is_empty() || self.aborted.borrow().is_some() {
            if !self.pending.borrow().is_empty() {
                tracing::warn!(
                    rank = self.rank,
                    sends = self.pending.borrow().len(),
                    "NCCL sends never received by their peers; aborting the communicators"
                );
            }
            self.abort_links();
            // NCCL may still own the buffers of aborted sends: leak them rather than free
            // memory a kernel could touch.
            std::mem::forget(std::mem::take(&mut *self.pending.borrow_mut()));
            return;
        }
        for link in self.links() {
            let comm = link.comm.replace(std::ptr::null_mut());
            if comm.is_null() {
                continue;
            }
            // SAFETY: a live communicator with no pending work, destroyed once (nulled above).
            // ncclCommDestroy does not wait for peers once the work is done.
            unsafe { sys::ncclCommDestroy(comm) };
        }
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn send(&self, tensor: &Tensor, dst: usize) -> Result<()> {
        self.check_p2p_peer(dst, Op::Send)?;
        self.post(P2P, Op::Send, 0, dst, Some(tensor))
    }

    fn recv(&self, src: usize) -> Result<Tensor> {
        self.check_p2p_peer(src, Op::Recv)?;
        let (h, t) = self.take(P2P, Op::Recv, src, deadline_after(self.timeout))?;
        match (h.op, t) {
            (Op::Send, Some(t)) => Ok(t),
            _ => Err(self.fail(self.transport_error(
                src,
                Op::Recv,
                format!("expected a sent tensor, got a {} message", h.op),
            ))),
        }
    }

    fn broadcast_in(&self, group: &Group, tensor: Option<&Tensor>, root: usize) -> Result<Tensor> {
        collective::broadcast(self, group, tensor, root)
    }

    fn all_gather_in(&self, group: &Group, tensor: &Tensor) -> Result<Vec<Tensor>> {
        collective::all_gather(self, group, tensor)
    }

    fn barrier_in(&self, group: &Group) -> Result<()> {
        collective::barrier(self, group)
    }

    fn bytes_sent(&self) -> u64 {
        self.bytes_sent.get()
    }

    fn abort(&self, reason: &str) {
        if self.aborted.borrow().is_some() {
            return; // the first abort's reason is the one reported
        }
        tracing::warn!(rank = self.rank, reason, "aborting the NCCL group");
        *self.aborted.borrow_mut() = Some((self.rank, reason.to_string()));
        self.abort_links();
        self.control.comm().abort(reason);
    }
}

impl Wire for NcclComm {
    fn me(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.world
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn post_coll(&self, tag: Tag, dst: usize, tensor: Option<&Tensor>) -> Result<()> {
        self.post(COLL, tag.op, tag.seq, dst, tensor)
    }

    fn take_coll(&self, op: Op, src: usize, deadline: Instant) -> Result<(Tag, Option<Tensor>)> {
        let (h, tensor) = self.take(COLL, op, src, deadline)?;
        Ok((
            Tag {
                op: h.op,
                seq: h.seq,
            },
            tensor,
        ))
    }

    fn sequences(&self) -> &Sequences {
        &self.sequences
    }

    /// A collective that went wrong here leaves the peers' NCCL sends unmatched: the group
    /// is torn down and the peers told.
    fn failed(&self, error: Error) -> Error {
        self.fail(error)
    }
}

/// What [`self_check`] saw.
#[derive(Debug, Clone, PartialEq)]
pub struct SelfCheck {
    /// `ncclGetVersion`'s code (e.g. 23007 for 2.30.7).
    pub nccl_version: i32,
    /// Bytes of tensor data that went through NCCL and came back equal.
    pub bytes: u64,
}

/// Runs this transport's NCCL path on one GPU, for a machine with a single GPU (NCCL refuses two
/// ranks of one communicator on one GPU): loads libnccl, starts a one-rank communicator
/// non-blocking with a deadline, sends a header and an f16 tensor of shape `[3, 5, 7]` to itself
/// in one NCCL group (on a stream of its own, completion polled with a CUDA event), then decodes
/// the header and compares the tensor with what was sent. Two ranks, the control channel and
/// aborts are not exercised.
///
/// # Errors
/// [`InitError`] naming the step that failed, or a timeout after `timeout`.
pub fn self_check(device: &Device, timeout: Duration) -> std::result::Result<SelfCheck, InitError> {
    let rank = 0;
    let Device::Cuda(cuda) = device else {
        return Err(InitError::NotCuda {
            rank,
            device: format!("{:?}", device.location()),
        });
    };
    let setup = |what: String| InitError::Setup { rank, what };
    let nccl = |step: &str, r: sys::ncclResult_t| InitError::Nccl {
        rank,
        peer: 0,
        what: format!("{step}: {}", nccl_error_string(r)),
    };
    let ok = sys::ncclResult_t::ncclSuccess;
    let mut version = 0;
    // SAFETY: valid out-pointer.
    let r = unsafe { sys::ncclGetVersion(&mut version) };
    if r != ok {
        return Err(nccl("ncclGetVersion", r));
    }
    let stream = cuda.cuda_stream();
    let ctx = stream.context().clone();
    ctx.bind_to_thread().map_err(|e| setup(e.to_string()))?;
    let link_stream = ctx.new_stream().map_err(|e| setup(e.to_string()))?;
    let mut id = sys::ncclUniqueId {
        internal: [0; UNIQUE_ID_LEN],
    };
    // SAFETY: valid out-pointer.
    let r = unsafe { sys::ncclGetUniqueId(&mut id) };
    if r != ok {
        return Err(nccl("ncclGetUniqueId", r));
    }
    let mut config = nonblocking_config();
    let mut handle: sys::ncclComm_t = std::ptr::null_mut();
    // SAFETY: valid out-pointer, id and config.
    let r = unsafe { sys::ncclCommInitRankConfig(&mut handle, 1, id, 0, &mut config) };
    if !matches!(
        r,
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
    ) || handle.is_null()
    {
        return Err(nccl("ncclCommInitRankConfig", r));
    }
    let comm = Cell::new(handle);
    let deadline = deadline_after(timeout);
    // Waits until the communicator's last call is done, aborting it on error or timeout.
    let settle = |step: &str| -> std::result::Result<(), InitError> {
        let mut backoff = Backoff::new();
        loop {
            match async_state(comm.get()) {
                sys::ncclResult_t::ncclSuccess => return Ok(()),
                sys::ncclResult_t::ncclInProgress => {}
                other => {
                    let what = format!(
                        "{step}: {} {}",
                        nccl_error_string(other),
                        last_error(comm.get())
                    );
                    abort_comm(&comm);
                    return Err(InitError::Nccl {
                        rank,
                        peer: 0,
                        what,
                    });
                }
            }
            if Instant::now() >= deadline {
                abort_comm(&comm);
                return Err(InitError::Timeout {
                    rank,
                    peer: 0,
                    after: timeout,
                });
            }
            backoff.pause(deadline);
        }
    };
    settle("ncclCommInitRankConfig")?;

    let fail = |what: String| {
        abort_comm(&comm);
        setup(what)
    };
    let sent = Tensor::arange(0f32, 105f32, device)
        .and_then(|t| t.affine(0.25, -3.0))
        .and_then(|t| t.reshape((3, 5, 7)))
        .and_then(|t| t.to_dtype(DType::F16))
        .map_err(|e| fail(e.to_string()))?;
    let header = Header {
        op: Op::Send,
        seq: 0,
        src: 0,
        world: 1,
        tensor: Some((sent.dtype(), sent.dims().to_vec())),
    }
    .encode()
    .map_err(|e| fail(e.to_string()))?;
    let header_out = stream
        .clone_htod(&header[..])
        .map_err(|e| fail(e.to_string()))?;
    // SAFETY: overwritten by the receive before it is read.
    let mut header_in =
        unsafe { stream.alloc::<u8>(HEADER_LEN) }.map_err(|e| fail(e.to_string()))?;
    let ready = stream.record_event(None).map_err(|e| fail(e.to_string()))?;
    link_stream.wait(&ready).map_err(|e| fail(e.to_string()))?;
    let raw = link_stream.cu_stream() as sys::cudaStream_t;
    let u8t = sys::ncclDataType_t::ncclUint8;
    let c = comm.get();
    // One group: a rank's sends to itself need their receives in the same group.
    // SAFETY: group calls take no pointers.
    let r = unsafe { sys::ncclGroupStart() };
    if r != ok {
        abort_comm(&comm);
        return Err(nccl("ncclGroupStart", r));
    }
    let (r, received) = {
        let (hout, _g1) = header_out.device_ptr(&link_stream);
        let (hin, _g2) = header_in.device_ptr_mut(&link_stream);
        // SAFETY: both header buffers hold HEADER_LEN bytes and outlive the wait below.
        let r1 = unsafe { sys::ncclSend(hout as *const _, HEADER_LEN, u8t, 0, c, raw) };
        let r2 = unsafe { sys::ncclRecv(hin as *mut _, HEADER_LEN, u8t, 0, c, raw) };
        let sent_r = with_device_ptr(&sent, &link_stream, |ptr, bytes| {
            // SAFETY: `sent` holds `bytes` bytes and outlives the wait below.
            unsafe { sys::ncclSend(ptr as *const _, bytes, u8t, 0, c, raw) }
        })
        .map_err(&fail)?;
        let (recv_r, received) = alloc_tensor(
            cuda,
            DType::F16,
            &[3, 5, 7],
            &stream,
            &link_stream,
            |ptr, bytes| {
                // SAFETY: a fresh buffer of `bytes` bytes, read only after the wait below.
                unsafe { sys::ncclRecv(ptr as *mut _, bytes, u8t, 0, c, raw) }
            },
        )
        .map_err(&fail)?;
        // SAFETY: closes the group opened above.
        let end = unsafe { sys::ncclGroupEnd() };
        let first_bad = [r1, r2, sent_r, recv_r, end].into_iter().find(|r| {
            !matches!(
                r,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            )
        });
        (first_bad.unwrap_or(end), received)
    };
    if !matches!(
        r,
        sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
    ) {
        abort_comm(&comm);
        return Err(nccl("ncclSend/ncclRecv to itself", r));
    }
    settle("ncclGroupEnd")?;
    let done = link_stream
        .record_event(None)
        .map_err(|e| fail(e.to_string()))?;
    let mut backoff = Backoff::new();
    loop {
        match done.try_is_complete() {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(fail(format!("the GPU reported an error: {e}"))),
        }
        if Instant::now() >= deadline {
            abort_comm(&comm);
            return Err(InitError::Timeout {
                rank,
                peer: 0,
                after: timeout,
            });
        }
        backoff.pause(deadline);
    }
    let bytes = link_stream
        .clone_dtoh(&header_in)
        .map_err(|e| fail(e.to_string()))?;
    let got = Header::decode(&bytes, 0, 1, nccl_wire::DEFAULT_MAX_BYTES)
        .map_err(|e| fail(format!("the header came back wrong: {e}")))?;
    if got.tensor != Some((DType::F16, vec![3, 5, 7])) {
        return Err(fail(format!("the header came back as {got:?}")));
    }
    let flat = |t: &Tensor| -> std::result::Result<Vec<f32>, InitError> {
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| setup(e.to_string()))
    };
    let (a, b) = (flat(&sent)?, flat(&received)?);
    if a != b {
        abort_comm(&comm);
        return Err(setup(format!(
            "the tensor came back different: sent {:?}..., got {:?}...",
            &a[..4],
            &b[..4]
        )));
    }
    let c = comm.replace(std::ptr::null_mut());
    // SAFETY: a live communicator with no pending work, destroyed once.
    unsafe { sys::ncclCommDestroy(c) };
    Ok(SelfCheck {
        nccl_version: version,
        bytes: tensor_bytes(&sent),
    })
}
