//! Errors of the parallel runtime.
//!
//! Every message names the rank that saw the problem, the peer and the operation involved, and
//! says what to do about it: a distributed failure is read from one log line, by someone who
//! does not know the code.

use std::fmt;
use std::time::Duration;

/// The communication operation an error happened in, so messages can say where a rank was.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    Send,
    Recv,
    Broadcast,
    AllGather,
    Barrier,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Send => "send",
            Op::Recv => "recv",
            Op::Broadcast => "broadcast",
            Op::AllGather => "all_gather",
            Op::Barrier => "barrier",
        })
    }
}

/// Why a communication call failed.
///
/// `non_exhaustive` because other transports (NCCL, TCP) will add their own failure kinds.
#[derive(thiserror::Error, Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A wait ran out of time: the peer is slow, stuck or dead.
    #[error(
        "rank {rank} waited {after:?} for rank {peer} in {op}: rank {peer} is stuck or dead; \
         raise --comm-timeout if steps are slow"
    )]
    Timeout {
        rank: usize,
        peer: usize,
        op: Op,
        after: Duration,
    },

    /// The group was aborted (by `by_rank`, usually because it failed); this rank is only an echo.
    #[error("{}", aborted_message(*.rank, *.by_rank, .reason, *.op))]
    Aborted {
        /// The rank that observed the abort.
        rank: usize,
        /// The rank that aborted the group.
        by_rank: usize,
        reason: String,
        op: Op,
    },

    /// A peer or root rank outside `0..world_size`.
    #[error(
        "rank {rank} called {op} with rank {peer}, but the world size is {world_size}: \
         use a rank in 0..{world_size}"
    )]
    InvalidRank {
        rank: usize,
        peer: usize,
        world_size: usize,
        op: Op,
    },

    /// Point-to-point with oneself; rejected because real transports do not support it either.
    #[error(
        "rank {rank} called {op} with itself as the peer: point-to-point needs another rank; \
         keep local data local"
    )]
    SelfPeer { rank: usize, op: Op },

    /// The peer's communicator is gone, so the awaited message can never come.
    #[error(
        "rank {rank} needs a message from rank {peer} in {op}, but rank {peer} has already exited: \
         every rank must make matching sends/receives and the same collectives in the same order"
    )]
    PeerGone { rank: usize, peer: usize, op: Op },

    /// Ranks called different collectives (or a different number of them).
    #[error(
        "rank {rank} in {op} #{seq} received {got_op} #{got_seq} from rank {peer}: the ranks called \
         collectives in different orders; every rank must call the same collectives in the same order"
    )]
    CollectiveMismatch {
        rank: usize,
        peer: usize,
        op: Op,
        seq: u64,
        got_op: Op,
        got_seq: u64,
    },

    /// The transport could not carry a message (a malformed message, a dtype it cannot send).
    #[error("rank {rank} in {op} with rank {peer}: {what}")]
    Transport {
        rank: usize,
        peer: usize,
        op: Op,
        what: String,
    },

    /// The call's arguments are inconsistent (e.g. a broadcast root without a tensor).
    #[error("rank {rank} called {op} wrongly: {what}")]
    BadArgument { rank: usize, op: Op, what: String },
}

fn aborted_message(rank: usize, by_rank: usize, reason: &str, op: Op) -> String {
    if rank == by_rank {
        format!("rank {rank} stopped in {op} because it aborted the group itself ({reason})")
    } else {
        format!(
            "rank {rank} stopped in {op} because rank {by_rank} aborted the group ({reason}); \
             this rank is only a bystander: fix the error of rank {by_rank}"
        )
    }
}

impl Error {
    /// True for the echo of another rank's abort, so callers can look past it to the root cause.
    pub fn is_aborted(&self) -> bool {
        matches!(self, Error::Aborted { .. })
    }
}

/// Result of communication calls.
pub type Result<T, E = Error> = std::result::Result<T, E>;
