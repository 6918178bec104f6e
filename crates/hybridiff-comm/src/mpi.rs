//! The MPI transport: one rank per process, on the `mpi` crate (rsmpi), for jobs started by
//! `mpirun` on one or several machines.
//!
//! Why everything goes through non-blocking point-to-point calls:
//!
//! - **Timeouts.** MPI's blocking receives and collectives wait forever. Every wait here polls
//!   `MPI_Improbe` against a deadline instead (spinning briefly, then sleeping at most 200 µs
//!   between polls, so an idle rank costs no core), and a peer that never answers becomes
//!   [`Error::Timeout`] naming it.
//! - **Sends never block**, as in the in-process transport: strategies send and then receive
//!   (both condition-split leaders do), which deadlocks with blocking standard-mode sends once a
//!   message is past MPI's eager limit. Each send is an `MPI_Isend` of an owned buffer that is
//!   freed when a later call finds it complete.
//! - **Collectives** are the shared ones of `collective.rs`, over this transport's tagged
//!   collective messages (`TAG_COLL`), so they time out, detect ranks calling different
//!   collectives, and count bytes exactly as on the other transports: traces and byte counts
//!   are the same whichever transport ran a job. With 2 to 8 ranks and tensors of a few MB the
//!   tree algorithms of native MPI collectives would gain nothing.
//! - **Abort** sends a notice (the reason) to every peer; their waits look for notices while
//!   polling and fail with [`Error::Aborted`] naming the rank that gave up. What stops the
//!   processes afterwards is the caller's business ([`MpiWorld::abort`], i.e. `MPI_Abort`).
//!
//! A message is one `MPI_BYTE` buffer: a header (collective op and sequence number, dtype, shape)
//! followed by the tensor's elements, little-endian. Received tensors are placed on the
//! communicator's device (the CPU unless [`MpiComm::with_device`] says otherwise).

use std::cell::{Cell, RefCell};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::request::{Request, StaticScope};
use mpi::topology::{Communicator as _, SimpleCommunicator};
use mpi::Threading;

use crate::collective::{self, check_p2p_peer, deadline_after, Group, Sequences, Tag, Wire};
use crate::error::{Error, Op, Result};
use crate::{tensor_bytes, Communicator};

/// Point-to-point tensors.
const TAG_P2P: i32 = 1;
/// Collective messages (op and sequence number in the header).
const TAG_COLL: i32 = 2;
/// Abort notices: the reason as UTF-8.
const TAG_ABORT: i32 = 3;

/// Why MPI could not be set up.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
pub enum InitError {
    #[error("MPI was already initialised in this process; keep one MpiWorld for the process")]
    AlreadyInitialized,
    #[error(
        "this MPI library gives thread level {0:?}, but ranks call MPI from their compute \
         thread, which needs at least Serialized; use an MPI built with thread support \
         (Open MPI and MPICH are by default)"
    )]
    ThreadLevel(Threading),
}

/// This process's membership of an MPI job: initialises MPI on creation and finalises it when
/// dropped. One per process, created on the main thread.
pub struct MpiWorld {
    universe: mpi::environment::Universe,
}

impl MpiWorld {
    /// Initialises MPI, asking for `MPI_THREAD_SERIALIZED` (ranks run their work, MPI calls
    /// included, on a rank thread, one call at a time).
    ///
    /// # Errors
    /// [`InitError`] if MPI is already initialised or cannot give that thread level.
    pub fn init() -> std::result::Result<Self, InitError> {
        let (universe, level) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or(InitError::AlreadyInitialized)?;
        if level < Threading::Serialized {
            return Err(InitError::ThreadLevel(level));
        }
        Ok(Self { universe })
    }

    /// This process's rank in `MPI_COMM_WORLD`.
    pub fn rank(&self) -> usize {
        self.universe.world().rank() as usize
    }

    /// The number of processes in `MPI_COMM_WORLD`.
    pub fn size(&self) -> usize {
        self.universe.world().size() as usize
    }

    /// A communicator over all processes of the job, whose waits last at most `timeout`.
    ///
    /// Use one at a time: two live communicators would share the same message streams.
    pub fn communicator(&self, timeout: Duration) -> MpiComm {
        let world = self.universe.world();
        let size = world.size() as usize;
        MpiComm {
            rank: world.rank() as usize,
            size,
            world,
            timeout,
            device: Device::Cpu,
            bytes_sent: Cell::new(0),
            sequences: Sequences::new(size),
            pending: RefCell::new(Vec::new()),
            aborted: RefCell::new(None),
        }
    }

    /// Ends every process of the job now with exit code `code` (`MPI_Abort`): what a rank does
    /// after it failed, so that no other rank waits for it.
    pub fn abort(&self, code: i32) -> ! {
        self.universe.world().abort(code)
    }
}

/// A non-blocking send whose buffer must live until MPI is done with it.
struct PendingSend {
    request: Request<'static, [u8], StaticScope>,
    /// The leaked buffer `request` reads; reclaimed once the request completes.
    buf: *mut [u8],
}

impl PendingSend {
    fn start(world: &SimpleCommunicator, dst: usize, tag: i32, bytes: Vec<u8>) -> Self {
        let buf: &'static mut [u8] = Box::leak(bytes.into_boxed_slice());
        let ptr: *mut [u8] = buf;
        // SAFETY: `ptr` stays valid and unaliased by us until the request completes (below).
        let request = world.process_at_rank(dst as i32).immediate_send_with_tag(
            StaticScope,
            unsafe { &*ptr },
            tag,
        );
        Self { request, buf: ptr }
    }

    /// `None` once the send completed (its buffer freed), else the still pending send.
    fn test(self) -> Option<Self> {
        match self.request.test() {
            Ok(_) => {
                // SAFETY: the request is complete, so MPI no longer reads the buffer, and
                // `buf` came from `Box::leak` in `start`.
                drop(unsafe { Box::from_raw(self.buf) });
                None
            }
            Err(request) => Some(Self { request, ..self }),
        }
    }

    /// Gives up on a send that cannot complete (the peer is gone): MPI may still read the
    /// buffer, so it is leaked, and dropping an incomplete request would panic in rsmpi.
    fn abandon(self) {
        std::mem::forget(self.request);
    }
}

/// One rank's end of an MPI job (see the module docs for how it works).
///
/// Not `Sync`: one thread at a time uses it, which is what `MPI_THREAD_SERIALIZED` allows.
pub struct MpiComm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    timeout: Duration,
    device: Device,
    bytes_sent: Cell<u64>,
    /// Tags collective messages.
    sequences: Sequences,
    pending: RefCell<Vec<PendingSend>>,
    /// `(by_rank, reason)` once the group was aborted, by this rank or a notice.
    aborted: RefCell<Option<(usize, String)>>,
}

// SAFETY: the communicator handle is only an MPI_Comm; MPI was initialised with
// MPI_THREAD_SERIALIZED, so any thread may call MPI as long as calls do not overlap, and
// `MpiComm` is not `Sync`, so only the thread that owns it makes calls through it.
unsafe impl Send for MpiComm {}

impl MpiComm {
    /// The bound on every wait.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Changes the bound on every wait from now on.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// Places received tensors on `device` instead of the CPU.
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = device;
        self
    }

    fn check_p2p_peer(&self, peer: usize, op: Op) -> Result<()> {
        check_p2p_peer(self.rank, self.size, peer, op)
    }

    /// Lets MPI progress the pending sends and frees the finished ones.
    fn progress_sends(&self) {
        let mut pending = self.pending.borrow_mut();
        let still: Vec<PendingSend> = pending.drain(..).filter_map(PendingSend::test).collect();
        *pending = still;
    }

    /// Fails with [`Error::Aborted`] if the group was aborted, here or by a peer's notice.
    fn check_aborted(&self, op: Op) -> Result<()> {
        if self.aborted.borrow().is_none() {
            if let Some(msg) = self
                .world
                .any_process()
                .immediate_matched_probe_with_tag(TAG_ABORT)
            {
                let by_rank = msg.1.source_rank() as usize;
                let (bytes, _) = msg.matched_receive_vec::<u8>();
                let reason = String::from_utf8_lossy(&bytes).into_owned();
                tracing::warn!(
                    rank = self.rank,
                    by_rank,
                    reason,
                    "received an abort notice"
                );
                *self.aborted.borrow_mut() = Some((by_rank, reason));
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

    /// `(by_rank, reason)` once the job was aborted, here or by a peer's notice; never waits.
    /// Lets a transport that uses MPI only as its control channel (NCCL) see aborts while it
    /// polls its own waits.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn abort_notice(&self) -> Option<(usize, String)> {
        match self.check_aborted(Op::Barrier) {
            Err(Error::Aborted {
                by_rank, reason, ..
            }) => Some((by_rank, reason)),
            _ => None,
        }
    }

    fn post(&self, op: Op, dst: usize, tag: i32, bytes: Vec<u8>, counted: u64) -> Result<()> {
        self.check_aborted(op)?;
        let send = PendingSend::start(&self.world, dst, tag, bytes);
        self.pending.borrow_mut().push(send);
        self.bytes_sent.set(self.bytes_sent.get() + counted);
        // One test right away lets MPI start the transfer before this rank goes computing.
        self.progress_sends();
        Ok(())
    }

    /// Waits for the next message with `tag` from `src` until `deadline`, watching for aborts.
    fn wait_from(&self, op: Op, src: usize, tag: i32, deadline: Instant) -> Result<Vec<u8>> {
        let mut polls = 0u32;
        let mut nap = Duration::from_micros(10);
        loop {
            self.check_aborted(op)?;
            self.progress_sends();
            if let Some(msg) = self
                .world
                .process_at_rank(src as i32)
                .immediate_matched_probe_with_tag(tag)
            {
                return Ok(msg.matched_receive_vec::<u8>().0);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout {
                    rank: self.rank,
                    peer: src,
                    op,
                    after: self.timeout,
                });
            }
            // Spin briefly for the quick answers of a busy exchange, then nap so that a rank
            // waiting through a peer's long compute leaves the core to it.
            polls += 1;
            if polls < 200 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(nap.min(deadline - now));
                nap = (nap * 2).min(Duration::from_micros(200));
            }
        }
    }

    fn transport_error(&self, peer: usize, op: Op, what: impl std::fmt::Display) -> Error {
        Error::Transport {
            rank: self.rank,
            peer,
            op,
            what: what.to_string(),
        }
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        if self.aborted.borrow().is_some() {
            // The job is failing; peers may be gone, so nothing is waited for.
            self.pending
                .borrow_mut()
                .drain(..)
                .for_each(PendingSend::abandon);
            return;
        }
        let deadline = deadline_after(self.timeout);
        while !self.pending.borrow().is_empty() && Instant::now() < deadline {
            self.progress_sends();
            std::thread::sleep(Duration::from_micros(100));
        }
        let left: Vec<PendingSend> = self.pending.borrow_mut().drain(..).collect();
        if !left.is_empty() {
            tracing::warn!(
                rank = self.rank,
                sends = left.len(),
                "sends never received by their peers; leaking their buffers"
            );
            left.into_iter().for_each(PendingSend::abandon);
        }
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn send(&self, tensor: &Tensor, dst: usize) -> Result<()> {
        self.check_p2p_peer(dst, Op::Send)?;
        let bytes = encode(Op::Send, 0, Some(tensor))
            .map_err(|e| self.transport_error(dst, Op::Send, e))?;
        self.post(Op::Send, dst, TAG_P2P, bytes, tensor_bytes(tensor))
    }

    fn recv(&self, src: usize) -> Result<Tensor> {
        self.check_p2p_peer(src, Op::Recv)?;
        let bytes = self.wait_from(Op::Recv, src, TAG_P2P, deadline_after(self.timeout))?;
        match decode(&bytes, &self.device).map_err(|e| self.transport_error(src, Op::Recv, e))? {
            (_, _, Some(t)) => Ok(t),
            _ => Err(self.transport_error(src, Op::Recv, "the message held no tensor")),
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
        tracing::warn!(rank = self.rank, reason, "aborting the MPI job");
        *self.aborted.borrow_mut() = Some((self.rank, reason.to_string()));
        for dst in (0..self.size).filter(|&d| d != self.rank) {
            let send = PendingSend::start(&self.world, dst, TAG_ABORT, reason.as_bytes().to_vec());
            self.pending.borrow_mut().push(send);
        }
        self.progress_sends();
    }
}

impl Wire for MpiComm {
    fn me(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn post_coll(&self, tag: Tag, dst: usize, tensor: Option<&Tensor>) -> Result<()> {
        let bytes =
            encode(tag.op, tag.seq, tensor).map_err(|e| self.transport_error(dst, tag.op, e))?;
        self.post(tag.op, dst, TAG_COLL, bytes, tensor.map_or(0, tensor_bytes))
    }

    fn take_coll(&self, op: Op, src: usize, deadline: Instant) -> Result<(Tag, Option<Tensor>)> {
        let bytes = self.wait_from(op, src, TAG_COLL, deadline)?;
        let (op, seq, tensor) =
            decode(&bytes, &self.device).map_err(|e| self.transport_error(src, op, e))?;
        Ok((Tag { op, seq }, tensor))
    }

    fn sequences(&self) -> &Sequences {
        &self.sequences
    }
}

fn op_code(op: Op) -> u8 {
    match op {
        Op::Send => 0,
        Op::Recv => 1,
        Op::Broadcast => 2,
        Op::AllGather => 3,
        Op::Barrier => 4,
    }
}

fn op_from_code(c: u8) -> Option<Op> {
    Some(match c {
        0 => Op::Send,
        1 => Op::Recv,
        2 => Op::Broadcast,
        3 => Op::AllGather,
        4 => Op::Barrier,
        _ => return None,
    })
}

/// `[op u8][seq u64][has tensor u8]` then, with a tensor,
/// `[dtype name len u8][dtype name][ndim u8][dims u64 x ndim][elements, little-endian]`.
fn encode(op: Op, seq: u64, tensor: Option<&Tensor>) -> candle_core::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(16 + tensor.map_or(0, |t| tensor_bytes(t) as usize + 64));
    out.push(op_code(op));
    out.extend_from_slice(&seq.to_le_bytes());
    let Some(t) = tensor else {
        out.push(0);
        return Ok(out);
    };
    out.push(1);
    let name = t.dtype().as_str();
    out.push(name.len() as u8);
    out.extend_from_slice(name.as_bytes());
    out.push(t.rank() as u8);
    for &d in t.dims() {
        out.extend_from_slice(&(d as u64).to_le_bytes());
    }
    let flat = t.flatten_all()?;
    macro_rules! put {
        ($ty:ty) => {
            for v in flat.to_vec1::<$ty>()? {
                out.extend_from_slice(&v.to_le_bytes());
            }
        };
    }
    match t.dtype() {
        DType::U8 => put!(u8),
        DType::U32 => put!(u32),
        DType::I16 => put!(i16),
        DType::I32 => put!(i32),
        DType::I64 => put!(i64),
        DType::F16 => put!(half::f16),
        DType::BF16 => put!(half::bf16),
        DType::F32 => put!(f32),
        DType::F64 => put!(f64),
        other => {
            return Err(candle_core::Error::Msg(format!(
                "tensors of dtype {other:?} cannot be sent over MPI"
            )))
        }
    }
    Ok(out)
}

/// Reads a message front to back.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let s = self
            .bytes
            .get(self.at..self.at.saturating_add(n))
            .ok_or_else(|| format!("a message of {} bytes ended early", self.bytes.len()))?;
        self.at += n;
        Ok(s)
    }

    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn u64(&mut self) -> std::result::Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().expect("8 bytes")))
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.bytes[self.at.min(self.bytes.len())..];
        self.at = self.bytes.len();
        s
    }
}

/// The inverse of [`encode`]; errors say what was malformed.
fn decode(bytes: &[u8], device: &Device) -> std::result::Result<(Op, u64, Option<Tensor>), String> {
    let mut r = Reader { bytes, at: 0 };
    let op = op_from_code(r.u8()?).ok_or("unknown operation code in a message")?;
    let seq = r.u64()?;
    if r.u8()? == 0 {
        return Ok((op, seq, None));
    }
    let name_len = r.u8()? as usize;
    let name = std::str::from_utf8(r.take(name_len)?).map_err(|e| e.to_string())?;
    let dtype: DType = name
        .parse()
        .map_err(|_| format!("unknown dtype `{name}` in a message"))?;
    let ndim = r.u8()? as usize;
    let mut dims = Vec::with_capacity(ndim);
    for _ in 0..ndim {
        dims.push(r.u64()? as usize);
    }
    let data = r.rest();
    let expected = dims
        .iter()
        .try_fold(dtype.size_in_bytes(), |acc, &d| acc.checked_mul(d));
    if expected != Some(data.len()) {
        return Err(format!(
            "a {dtype:?} tensor of shape {dims:?} does not fit the message's {} bytes of data",
            data.len()
        ));
    }
    let t = Tensor::from_raw_buffer(data, dtype, &dims, device).map_err(|e| e.to_string())?;
    Ok((op, seq, Some(t)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_every_dtype_bit_for_bit() {
        let base = Tensor::arange(0f32, 24f32, &Device::Cpu)
            .unwrap()
            .affine(0.37, -1.1)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        // A strided view must arrive with its logical values.
        let view = base.transpose(1, 2).unwrap();
        for dt in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::F64,
            DType::I64,
            DType::U8,
        ] {
            let t = view.to_dtype(dt).unwrap();
            let bytes = encode(Op::AllGather, 7, Some(&t)).unwrap();
            let (op, seq, got) = decode(&bytes, &Device::Cpu).unwrap();
            let got = got.unwrap();
            assert_eq!((op, seq), (Op::AllGather, 7));
            assert_eq!((got.dtype(), got.dims()), (dt, t.dims()));
            let a: Vec<f64> = t
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f64> = got
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a, b, "{dt:?}");
        }
        let (op, seq, none) = decode(&encode(Op::Barrier, 3, None).unwrap(), &Device::Cpu).unwrap();
        assert_eq!((op, seq, none.is_none()), (Op::Barrier, 3, true));
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let t = Tensor::ones((2, 2), DType::F32, &Device::Cpu).unwrap();
        let bytes = encode(Op::Send, 0, Some(&t)).unwrap();
        for cut in [0, 1, 5, 12, bytes.len() - 1] {
            assert!(decode(&bytes[..cut], &Device::Cpu).is_err(), "cut at {cut}");
        }
        let mut bad = bytes.clone();
        bad[0] = 99;
        assert!(decode(&bad, &Device::Cpu)
            .unwrap_err()
            .contains("operation"));
    }
}
