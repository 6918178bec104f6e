//! The in-process transport: ranks are threads of one process sharing a mailbox.
//!
//! One mutex guards every queue of the group and each rank has a condition variable that is
//! signalled when something arrives for it, when a peer exits and when the group is aborted, so
//! waits wake at once instead of polling. Each ordered pair of ranks has two FIFO queues, one for
//! point-to-point traffic and one for collectives, so a `send` that nobody has received yet can
//! never be mistaken for a collective's message. Collective messages carry the operation and a
//! per-rank sequence number, so ranks that call collectives in different orders get an error
//! instead of each other's data.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::collective::{self, check_p2p_peer, deadline_after, Group, Sequences, Tag, Wire};
use crate::error::{Error, Op, Result};
use crate::{tensor_bytes, Communicator};

/// A collective's message; the tag lets the receiver check that both sides are in the same call.
struct CollMsg {
    tag: Tag,
    tensor: Option<Tensor>,
}

#[derive(Default)]
struct Pair {
    p2p: VecDeque<Tensor>,
    coll: VecDeque<CollMsg>,
}

struct AbortInfo {
    by_rank: usize,
    reason: String,
}

struct State {
    /// Indexed by `src * world_size + dst`.
    pairs: Vec<Pair>,
    /// Ranks whose communicator was dropped: waiting for them would only run into the timeout.
    departed: Vec<bool>,
    aborted: Option<AbortInfo>,
}

pub(crate) struct Shared {
    world_size: usize,
    state: Mutex<State>,
    /// One per rank, signalled when that rank may have something new to look at.
    wakers: Vec<Condvar>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock, but a poisoned mailbox is still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wake_all(&self) {
        for w in &self.wakers {
            w.notify_all();
        }
    }

    /// Marks the group failed on behalf of `by_rank`; the first abort wins so its reason is kept.
    /// Returns whether this call was the one that aborted the group.
    pub(crate) fn abort_as(&self, by_rank: usize, reason: &str) -> bool {
        let first = {
            let mut st = self.lock();
            if st.aborted.is_none() {
                st.aborted = Some(AbortInfo {
                    by_rank,
                    reason: reason.to_string(),
                });
                true
            } else {
                false
            }
        };
        if first {
            tracing::warn!(rank = by_rank, reason, "communication group aborted");
        }
        self.wake_all();
        first
    }

    /// The rank that aborted the group, if it was aborted.
    pub(crate) fn aborted_by(&self) -> Option<usize> {
        self.lock().aborted.as_ref().map(|a| a.by_rank)
    }
}

/// Builds in-process groups; ranks are threads of this process.
pub struct InProcessGroup;

impl InProcessGroup {
    /// One communicator per rank, in rank order; move each into its rank's thread.
    ///
    /// `timeout` bounds every wait of every call, so a dead rank turns into an error rather
    /// than a hang.
    // The group has no state of its own once built: the communicators are the group.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(world_size: usize, timeout: Duration) -> Vec<InProcessComm> {
        Self::with_shared(world_size, timeout).1
    }

    pub(crate) fn with_shared(
        world_size: usize,
        timeout: Duration,
    ) -> (Arc<Shared>, Vec<InProcessComm>) {
        let shared = Arc::new(Shared {
            world_size,
            state: Mutex::new(State {
                pairs: (0..world_size * world_size)
                    .map(|_| Pair::default())
                    .collect(),
                departed: vec![false; world_size],
                aborted: None,
            }),
            wakers: (0..world_size).map(|_| Condvar::new()).collect(),
        });
        let comms = (0..world_size)
            .map(|rank| InProcessComm {
                rank,
                timeout,
                shared: Arc::clone(&shared),
                bytes_sent: AtomicU64::new(0),
                sequences: Sequences::new(world_size),
            })
            .collect();
        (shared, comms)
    }
}

/// One rank's end of an in-process group.
///
/// Tensors are handed over without copying (candle tensors are reference counted), so the
/// receiver gets a tensor on the sender's device; callers must not rely on that sharing, since
/// other transports copy. Sends never block (queues are unbounded); receives wait at most the
/// group's timeout. Dropping it tells the peers that this rank will send nothing more.
pub struct InProcessComm {
    rank: usize,
    timeout: Duration,
    shared: Arc<Shared>,
    bytes_sent: AtomicU64,
    /// Tags collective messages.
    sequences: Sequences,
}

impl InProcessComm {
    /// The bound on every wait, as given to [`InProcessGroup::new`].
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    fn pair(&self, src: usize, dst: usize) -> usize {
        src * self.shared.world_size + dst
    }

    /// `(by_rank, reason)` once the group was aborted; never waits. Lets a transport that uses
    /// this group only as its control channel (NCCL) see aborts while it polls its own waits.
    #[cfg_attr(not(feature = "nccl"), allow(dead_code))]
    pub(crate) fn abort_notice(&self) -> Option<(usize, String)> {
        self.shared
            .lock()
            .aborted
            .as_ref()
            .map(|a| (a.by_rank, a.reason.clone()))
    }

    fn aborted_error(&self, a: &AbortInfo, op: Op) -> Error {
        Error::Aborted {
            rank: self.rank,
            by_rank: a.by_rank,
            reason: a.reason.clone(),
            op,
        }
    }

    /// Enqueues a message for `dst` and counts its bytes as a wire transport would.
    fn post(&self, op: Op, dst: usize, bytes: u64, put: impl FnOnce(&mut Pair)) -> Result<()> {
        {
            let mut st = self.shared.lock();
            if let Some(a) = &st.aborted {
                return Err(self.aborted_error(a, op));
            }
            if st.departed[dst] {
                return Err(Error::PeerGone {
                    rank: self.rank,
                    peer: dst,
                    op,
                });
            }
            let idx = self.pair(self.rank, dst);
            put(&mut st.pairs[idx]);
        }
        self.bytes_sent.fetch_add(bytes, Ordering::Relaxed);
        self.shared.wakers[dst].notify_all();
        Ok(())
    }

    /// Waits until `take` yields a message from `src`, the deadline passes, `src` exits or the
    /// group is aborted, whichever comes first.
    fn wait_from<M>(
        &self,
        op: Op,
        src: usize,
        deadline: Instant,
        mut take: impl FnMut(&mut Pair) -> Option<M>,
    ) -> Result<M> {
        let idx = self.pair(src, self.rank);
        let waker = &self.shared.wakers[self.rank];
        let mut st = self.shared.lock();
        loop {
            if let Some(a) = &st.aborted {
                return Err(self.aborted_error(a, op));
            }
            if let Some(m) = take(&mut st.pairs[idx]) {
                return Ok(m);
            }
            if st.departed[src] {
                return Err(Error::PeerGone {
                    rank: self.rank,
                    peer: src,
                    op,
                });
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
            st = waker
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn check_p2p_peer(&self, peer: usize, op: Op) -> Result<()> {
        check_p2p_peer(self.rank, self.shared.world_size, peer, op)
    }
}

impl Drop for InProcessComm {
    fn drop(&mut self) {
        self.shared.lock().departed[self.rank] = true;
        self.shared.wake_all();
    }
}

impl Communicator for InProcessComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world_size
    }

    fn send(&self, tensor: &Tensor, dst: usize) -> Result<()> {
        self.check_p2p_peer(dst, Op::Send)?;
        let t = tensor.clone();
        self.post(Op::Send, dst, tensor_bytes(tensor), |p| p.p2p.push_back(t))
    }

    fn recv(&self, src: usize) -> Result<Tensor> {
        self.check_p2p_peer(src, Op::Recv)?;
        self.wait_from(Op::Recv, src, deadline_after(self.timeout), |p| {
            p.p2p.pop_front()
        })
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
        self.bytes_sent.load(Ordering::Relaxed)
    }

    fn abort(&self, reason: &str) {
        self.shared.abort_as(self.rank, reason);
    }
}

impl Wire for InProcessComm {
    fn me(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.world_size
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn post_coll(&self, tag: Tag, dst: usize, tensor: Option<&Tensor>) -> Result<()> {
        let bytes = tensor.map_or(0, tensor_bytes);
        let tensor = tensor.cloned();
        self.post(tag.op, dst, bytes, |p| {
            p.coll.push_back(CollMsg { tag, tensor })
        })
    }

    fn take_coll(&self, op: Op, src: usize, deadline: Instant) -> Result<(Tag, Option<Tensor>)> {
        let msg = self.wait_from(op, src, deadline, |p| p.coll.pop_front())?;
        Ok((msg.tag, msg.tensor))
    }

    fn sequences(&self) -> &Sequences {
        &self.sequences
    }
}
