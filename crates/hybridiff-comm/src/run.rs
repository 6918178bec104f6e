//! Running one closure per rank on threads, with failure propagation.

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

use crate::error::Error;
use crate::in_process::{InProcessComm, InProcessGroup, Shared};
use crate::Communicator;

/// Why [`run_ranks`] failed: the root cause, not the other ranks' "aborted" echoes.
#[derive(Debug)]
pub enum RunError<E> {
    /// `f` returned an error on `rank`.
    Failed { rank: usize, error: E },
    /// `f` panicked on `rank`.
    Panicked { rank: usize, message: String },
    /// A rank could not be started (bad arguments, thread or thread-pool creation failed).
    Setup {
        rank: Option<usize>,
        message: String,
    },
}

impl<E> RunError<E> {
    /// The rank that caused the failure, when one did.
    pub fn rank(&self) -> Option<usize> {
        match self {
            RunError::Failed { rank, .. } | RunError::Panicked { rank, .. } => Some(*rank),
            RunError::Setup { rank, .. } => *rank,
        }
    }
}

impl<E: fmt::Display> fmt::Display for RunError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RunError::Failed { rank, error } => write!(f, "rank {rank} failed: {error}"),
            RunError::Panicked { rank, message } => write!(
                f,
                "rank {rank} panicked: {message} (a bug; run with RUST_BACKTRACE=1 for where)"
            ),
            RunError::Setup {
                rank: Some(rank),
                message,
            } => write!(f, "could not start rank {rank}: {message}"),
            RunError::Setup {
                rank: None,
                message,
            } => write!(f, "could not start the ranks: {message}"),
        }
    }
}

impl<E: fmt::Display + fmt::Debug> std::error::Error for RunError<E> {}

/// Rank threads and rank pool workers this process has started (see [`threads_started`]).
static THREADS_STARTED: AtomicU64 = AtomicU64::new(0);

/// How many rank threads and rank-pool worker threads this process has started so far, by
/// [`run_ranks`] and [`WarmRanks`](crate::WarmRanks) together. A service shows with it that
/// requests run on warm ranks: the count stays put while jobs come and go.
pub fn threads_started() -> u64 {
    THREADS_STARTED.load(Ordering::SeqCst)
}

pub(crate) fn count_thread_start() {
    THREADS_STARTED.fetch_add(1, Ordering::SeqCst);
}

/// Rank `rank`'s rayon pool of `threads` workers (counted in [`threads_started`] once built:
/// rayon starts exactly that many, though not all may be running yet).
pub(crate) fn rank_pool(rank: usize, threads: usize) -> Result<rayon::ThreadPool, String> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(move |i| format!("hybridiff-rank-{rank}-worker-{i}"))
        .build()
        .map_err(|e| format!("could not build its rayon pool of {threads}: {e}"))?;
    THREADS_STARTED.fetch_add(threads as u64, Ordering::SeqCst);
    Ok(pool)
}

/// How one rank ended; `order` ranks failures by time, so the first can be told from echoes.
pub(crate) enum Outcome<T, E> {
    Done(T),
    Failed { order: usize, error: RunError<E> },
}

/// Runs `f` once per rank of a fresh in-process group of `world_size` ranks and collects the
/// results in rank order.
///
/// Each rank gets its own OS thread, and `f` runs inside that rank's own rayon pool of
/// `threads_per_rank` threads, so candle's and the caller's rayon work stays within the rank's
/// core budget instead of every rank fanning out over the global pool. `timeout` bounds every
/// communication wait.
///
/// If `f` returns `Err` or panics on a rank, the group is aborted at once, so the ranks blocked
/// waiting for it return [`Error::Aborted`] instead of hanging until the timeout. The returned
/// error is the root cause: the failure of the rank that aborted the group (or, if that rank
/// itself returned `Ok` after calling [`Communicator::abort`], the earliest failure), never the
/// echo of a bystander.
///
/// `E: From<Error>` lets `f` use `?` on communication calls.
pub fn run_ranks<T, E, F>(
    world_size: usize,
    threads_per_rank: usize,
    timeout: Duration,
    f: F,
) -> Result<Vec<T>, RunError<E>>
where
    T: Send,
    E: From<Error> + Send + fmt::Display,
    F: Fn(&mut dyn Communicator) -> Result<T, E> + Sync,
{
    if threads_per_rank == 0 {
        return Err(RunError::Setup {
            rank: None,
            message: "threads_per_rank is 0: give each rank at least one thread".into(),
        });
    }
    let (shared, comms) = InProcessGroup::with_shared(world_size, timeout);
    let order = AtomicUsize::new(0);
    let (f, order_ref, shared_ref) = (&f, &order, &*shared);

    let outcomes: Vec<Outcome<T, E>> = thread::scope(|s| {
        let mut handles = Vec::with_capacity(world_size);
        let mut outcomes = Vec::with_capacity(world_size);
        for comm in comms {
            let rank = comm.rank();
            count_thread_start();
            let spawned = thread::Builder::new()
                .name(format!("hybridiff-rank-{rank}"))
                .spawn_scoped(s, move || {
                    run_one(comm, threads_per_rank, f, order_ref, shared_ref)
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => {
                    let message = format!("could not spawn its thread: {e}");
                    let o = order_ref.fetch_add(1, Ordering::SeqCst);
                    shared_ref.abort_as(rank, &message);
                    outcomes.push((
                        rank,
                        Outcome::Failed {
                            order: o,
                            error: RunError::Setup {
                                rank: Some(rank),
                                message,
                            },
                        },
                    ));
                    break;
                }
            }
        }
        for (rank, h) in handles.into_iter().enumerate() {
            let outcome = h.join().unwrap_or_else(|payload| {
                // run_one catches f's panics; this is a panic in the runtime itself.
                let message = panic_message(payload.as_ref());
                let o = order_ref.fetch_add(1, Ordering::SeqCst);
                shared_ref.abort_as(rank, &message);
                Outcome::Failed {
                    order: o,
                    error: RunError::Panicked { rank, message },
                }
            });
            outcomes.push((rank, outcome));
        }
        outcomes.sort_by_key(|(r, _)| *r);
        outcomes.into_iter().map(|(_, o)| o).collect()
    });

    root_cause(&shared, outcomes)
}

/// The results in rank order, or the root cause among the failed ranks: the rank that
/// aborted the group (whatever the timing), else the earliest failure.
pub(crate) fn root_cause<T, E>(
    shared: &Shared,
    outcomes: Vec<Outcome<T, E>>,
) -> Result<Vec<T>, RunError<E>> {
    let by_rank = shared.aborted_by();
    let mut results = Vec::with_capacity(outcomes.len());
    let mut first: Option<(usize, RunError<E>)> = None;
    for outcome in outcomes {
        match outcome {
            Outcome::Done(v) => results.push(v),
            Outcome::Failed { order, error } => {
                let key = if error.rank().is_some() && error.rank() == by_rank {
                    0 // the rank that aborted the group is the cause, whatever the timing
                } else {
                    order + 1
                };
                if first.as_ref().is_none_or(|(k, _)| key < *k) {
                    first = Some((key, error));
                }
            }
        }
    }
    match first {
        Some((_, e)) => Err(e),
        None => Ok(results),
    }
}

fn run_one<T, E, F>(
    mut comm: InProcessComm,
    threads_per_rank: usize,
    f: &F,
    order: &AtomicUsize,
    shared: &Shared,
) -> Outcome<T, E>
where
    T: Send,
    E: From<Error> + Send + fmt::Display,
    F: Fn(&mut dyn Communicator) -> Result<T, E> + Sync,
{
    let rank = comm.rank();
    match rank_pool(rank, threads_per_rank) {
        Ok(pool) => pool.install(|| run_body(&mut comm, f, order, shared)),
        Err(message) => fail(
            rank,
            RunError::Setup {
                rank: Some(rank),
                message: message.clone(),
            },
            message,
            order,
            shared,
        ),
    }
}

/// Runs `f` on one rank and turns an error or a panic into a failed [`Outcome`], aborting
/// the group so that peers stop waiting for this rank.
pub(crate) fn run_body<T, E, F>(
    comm: &mut InProcessComm,
    f: &F,
    order: &AtomicUsize,
    shared: &Shared,
) -> Outcome<T, E>
where
    E: fmt::Display,
    F: Fn(&mut dyn Communicator) -> Result<T, E> + ?Sized,
{
    let rank = comm.rank();
    let result = catch_unwind(AssertUnwindSafe(|| f(comm as &mut dyn Communicator)));
    match result {
        Ok(Ok(v)) => Outcome::Done(v),
        Ok(Err(error)) => {
            let reason = error.to_string();
            fail(
                rank,
                RunError::Failed { rank, error },
                reason,
                order,
                shared,
            )
        }
        Err(payload) => {
            let message = panic_message(payload.as_ref());
            let reason = format!("panicked: {message}");
            fail(
                rank,
                RunError::Panicked { rank, message },
                reason,
                order,
                shared,
            )
        }
    }
}

pub(crate) fn fail<T, E>(
    rank: usize,
    error: RunError<E>,
    reason: String,
    order: &AtomicUsize,
    shared: &Shared,
) -> Outcome<T, E> {
    let o = order.fetch_add(1, Ordering::SeqCst);
    // Abort before the rank's communicator is dropped so peers see the reason, not "exited".
    shared.abort_as(rank, &reason);
    Outcome::Failed { order: o, error }
}

/// The message of a caught panic's payload.
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-string panic payload".to_string()
    }
}
