//! Collectives written once, over tagged point-to-point messages, for every transport.
//!
//! A transport carries two FIFO channels per ordered pair of ranks: point-to-point traffic and
//! collective messages, kept apart so that a `send` nobody has received yet is never taken for
//! a collective's message. It implements [`Wire`] for the collective channel (a non-blocking
//! tagged send, a receive bounded by a deadline); [`broadcast`], [`all_gather`] and
//! [`barrier`] here do the rest for any group of ranks, with the same timeouts, byte counts and
//! mismatch detection on every transport, so traces and byte counts compare across them.
//!
//! **Groups.** A collective runs over a [`Group`]: the whole world, or a subset (a band group
//! inside a branch group). Every member calls it, in the same order as its other collectives
//! with the same peers; ranks outside the group do not call it.
//!
//! **Tags.** Each message carries the operation and a sequence number: the count of earlier
//! collectives the two ranks shared. Two ranks that call different collectives, or a different
//! number of them, see a tag they did not expect and fail with
//! [`Error::CollectiveMismatch`] instead of taking each other's data. Counting per pair (not per
//! group) lets groups overlap and nest (a collective of ranks 0 and 1 between two of the whole
//! world) while keeping that check; with whole-world collectives only, the number is the
//! rank's global collective count.
//!
//! **Algorithms.** The root sends to each member (broadcast); every member sends to every other
//! (all-gather, barrier). With the 2 to 8 ranks and tensors of a few MB this project runs,
//! trees would save nothing, and these are what the byte counts of
//! [`crate::Communicator::bytes_sent`] document. Sends never block, so sending everything
//! before receiving cannot deadlock whatever order the ranks arrive in.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::Tensor;

use crate::error::{Error, Op, Result};

/// The tag of a collective message: which operation, and which of the collectives the two
/// ranks share it belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag {
    pub op: Op,
    pub seq: u64,
}

/// What a transport provides the collectives: its collective channel.
pub(crate) trait Wire {
    /// This rank.
    fn me(&self) -> usize;
    /// Ranks in the world.
    fn size(&self) -> usize;
    /// The bound on every wait.
    fn timeout(&self) -> Duration;
    /// Sends a collective message to `dst` without waiting for the receiver, and counts
    /// `tensor`'s bytes as sent.
    fn post_coll(&self, tag: Tag, dst: usize, tensor: Option<&Tensor>) -> Result<()>;
    /// The next collective message from `src`, waiting at most until `deadline` (and failing
    /// at once when the group was aborted or `src` is gone).
    fn take_coll(&self, op: Op, src: usize, deadline: Instant) -> Result<(Tag, Option<Tensor>)>;
    /// The per-pair sequence numbers of this rank's collectives.
    fn sequences(&self) -> &Sequences;
    /// What happens to an error a collective found itself (a mismatch, a missing tensor):
    /// transports that must tear their group down do it here (NCCL); the others return it.
    fn failed(&self, error: Error) -> Error {
        error
    }
}

/// Per peer: how many collectives this rank has shared with it.
#[derive(Debug, Default)]
pub(crate) struct Sequences(Mutex<Vec<u64>>);

impl Sequences {
    pub(crate) fn new(world_size: usize) -> Self {
        Self(Mutex::new(vec![0; world_size]))
    }

    /// Enters one collective of `group`: the tag number for each member (this rank's slot
    /// unused), in group order.
    fn enter(&self, group: &Group, me: usize) -> Vec<u64> {
        let mut seq = self.0.lock().unwrap_or_else(|e| e.into_inner());
        group
            .ranks()
            .iter()
            .map(|&r| {
                if r == me {
                    return 0;
                }
                let s = seq[r];
                seq[r] += 1;
                s
            })
            .collect()
    }
}

/// The ranks taking part in a collective, ascending, without repeats.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Group(Vec<usize>);

impl Group {
    /// Every rank of a world of `world_size`.
    pub fn world(world_size: usize) -> Self {
        Self((0..world_size).collect())
    }

    /// `ranks` in any order; duplicates are dropped.
    pub fn new(ranks: impl IntoIterator<Item = usize>) -> Self {
        let mut v: Vec<usize> = ranks.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        Self(v)
    }

    /// The consecutive ranks `first .. first + len`.
    pub fn span(first: usize, len: usize) -> Self {
        Self((first..first + len).collect())
    }

    /// The members, ascending.
    pub fn ranks(&self) -> &[usize] {
        &self.0
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the group has no members.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `rank`'s index in the group, if it is a member.
    pub fn index_of(&self, rank: usize) -> Option<usize> {
        self.0.binary_search(&rank).ok()
    }

    /// Whether `rank` is a member.
    pub fn contains(&self, rank: usize) -> bool {
        self.index_of(rank).is_some()
    }

    /// Fails unless every member is in `0..world_size` and `me` is one of them.
    fn check(&self, me: usize, world_size: usize, op: Op) -> Result<()> {
        if let Some(&bad) = self.0.iter().find(|&&r| r >= world_size) {
            return Err(Error::InvalidRank {
                rank: me,
                peer: bad,
                world_size,
                op,
            });
        }
        if !self.contains(me) {
            return Err(Error::BadArgument {
                rank: me,
                op,
                what: format!(
                    "this rank is not in the group {:?} it called the collective for; only members call a group's collectives",
                    self.0
                ),
            });
        }
        Ok(())
    }
}

/// `now + timeout`, or as far as representable when that overflows (`Duration::MAX`).
pub(crate) fn deadline_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// Fails unless `peer` is in `0..world_size`.
pub(crate) fn check_peer(me: usize, world_size: usize, peer: usize, op: Op) -> Result<()> {
    if peer >= world_size {
        return Err(Error::InvalidRank {
            rank: me,
            peer,
            world_size,
            op,
        });
    }
    Ok(())
}

/// [`check_peer`], and not this rank itself (real transports cannot send to themselves).
pub(crate) fn check_p2p_peer(me: usize, world_size: usize, peer: usize, op: Op) -> Result<()> {
    check_peer(me, world_size, peer, op)?;
    if peer == me {
        return Err(Error::SelfPeer { rank: me, op });
    }
    Ok(())
}

/// Receives `src`'s message of this collective and checks its tag.
fn recv_tagged<W: Wire + ?Sized>(
    w: &W,
    want: Tag,
    src: usize,
    deadline: Instant,
) -> Result<Option<Tensor>> {
    let (got, tensor) = w.take_coll(want.op, src, deadline)?;
    if got != want {
        return Err(w.failed(Error::CollectiveMismatch {
            rank: w.me(),
            peer: src,
            op: want.op,
            seq: want.seq,
            got_op: got.op,
            got_seq: got.seq,
        }));
    }
    Ok(tensor)
}

fn no_tensor<W: Wire + ?Sized>(w: &W, op: Op, src: usize) -> Error {
    w.failed(Error::BadArgument {
        rank: w.me(),
        op,
        what: format!("rank {src} sent no tensor"),
    })
}

/// `root` (a member) passes `Some(tensor)`, the other members `None`; every member gets
/// root's tensor. Sends `len - 1` messages from the root.
pub(crate) fn broadcast<W: Wire + ?Sized>(
    w: &W,
    group: &Group,
    tensor: Option<&Tensor>,
    root: usize,
) -> Result<Tensor> {
    let op = Op::Broadcast;
    let me = w.me();
    check_peer(me, w.size(), root, op)?;
    group.check(me, w.size(), op)?;
    if !group.contains(root) {
        return Err(Error::BadArgument {
            rank: me,
            op,
            what: format!("the root, rank {root}, is not in the group {:?}", group.0),
        });
    }
    let seqs = w.sequences().enter(group, me);
    let tag = |i: usize| Tag { op, seq: seqs[i] };
    if me == root {
        let Some(tensor) = tensor else {
            return Err(Error::BadArgument {
                rank: me,
                op,
                what: format!("rank {root} is the root and must pass Some(tensor)"),
            });
        };
        for (i, &dst) in group.ranks().iter().enumerate() {
            if dst != root {
                w.post_coll(tag(i), dst, Some(tensor))?;
            }
        }
        return Ok(tensor.clone());
    }
    if tensor.is_some() {
        return Err(Error::BadArgument {
            rank: me,
            op,
            what: format!(
                "only the root (rank {root}) passes a tensor; other ranks pass None \
                 (do two ranks think they are the root?)"
            ),
        });
    }
    let i = group.index_of(root).expect("checked above");
    recv_tagged(w, tag(i), root, deadline_after(w.timeout()))?.ok_or_else(|| no_tensor(w, op, root))
}

/// Every member contributes one tensor and gets all of them, in group order (index = the
/// member's position in the group; the rank itself with the whole world). Each member sends
/// its tensor to the `len - 1` others.
pub(crate) fn all_gather<W: Wire + ?Sized>(
    w: &W,
    group: &Group,
    tensor: &Tensor,
) -> Result<Vec<Tensor>> {
    let op = Op::AllGather;
    let me = w.me();
    group.check(me, w.size(), op)?;
    let seqs = w.sequences().enter(group, me);
    for (i, &dst) in group.ranks().iter().enumerate() {
        if dst != me {
            w.post_coll(Tag { op, seq: seqs[i] }, dst, Some(tensor))?;
        }
    }
    let deadline = deadline_after(w.timeout());
    let mut out = Vec::with_capacity(group.len());
    for (i, &src) in group.ranks().iter().enumerate() {
        if src == me {
            out.push(tensor.clone());
            continue;
        }
        let t = recv_tagged(w, Tag { op, seq: seqs[i] }, src, deadline)?;
        out.push(t.ok_or_else(|| no_tensor(w, op, src))?);
    }
    Ok(out)
}

/// Returns once every member has entered. Sends an empty message to each other member
/// (no bytes counted).
pub(crate) fn barrier<W: Wire + ?Sized>(w: &W, group: &Group) -> Result<()> {
    let op = Op::Barrier;
    let me = w.me();
    group.check(me, w.size(), op)?;
    let seqs = w.sequences().enter(group, me);
    for (i, &dst) in group.ranks().iter().enumerate() {
        if dst != me {
            w.post_coll(Tag { op, seq: seqs[i] }, dst, None)?;
        }
    }
    let deadline = deadline_after(w.timeout());
    for (i, &src) in group.ranks().iter().enumerate() {
        if src != me {
            recv_tagged(w, Tag { op, seq: seqs[i] }, src, deadline)?;
        }
    }
    Ok(())
}
