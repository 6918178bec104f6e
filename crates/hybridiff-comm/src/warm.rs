//! Ranks started once and fed jobs: what a service or a batch needs so that each job does
//! not pay for starting threads and thread pools.

use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc;
use std::sync::{Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::error::Error;
use crate::in_process::{InProcessComm, InProcessGroup};
use crate::run::{count_thread_start, fail, rank_pool, root_cause, run_body, Outcome};
use crate::run::{panic_message, RunError};
use crate::Communicator;

/// The type-erased body a rank runs for one job: takes the rank's communicator by value, so
/// that it is dropped (telling peers "this rank sends nothing more") when the body ends.
type Body<'a> = dyn Fn(InProcessComm) + Sync + 'a;

/// One job for one rank: its communicator and the body to run.
struct Task {
    comm: InProcessComm,
    /// Really borrowed for the duration of one [`WarmRanks::run`] call; see the safety note
    /// there.
    body: &'static Body<'static>,
}

/// `world_size` rank threads, each with its own rayon pool of `threads_per_rank` workers,
/// started once by [`WarmRanks::start`] and then given one job at a time by
/// [`WarmRanks::run`].
///
/// [`run`](Self::run) behaves like [`run_ranks`](crate::run_ranks) (same closure, same
/// errors, the root cause of a failure rather than the echoes), except that no thread is
/// started: [`threads_started`](crate::threads_started) does not move. Every job gets a
/// fresh in-process group (a few allocations, no threads), so a job that failed and
/// aborted its group, or left messages behind, cannot disturb the next one; the threads
/// and pools, which are the costly part, are what is kept. Dropping it stops and joins the
/// threads.
pub struct WarmRanks {
    world_size: usize,
    threads_per_rank: usize,
    timeout: Duration,
    tasks: Vec<mpsc::Sender<Task>>,
    /// Rank threads report here when they are done with a task. Locked for a whole job,
    /// which also makes jobs run one at a time.
    done: Mutex<mpsc::Receiver<usize>>,
    handles: Vec<JoinHandle<()>>,
}

impl fmt::Debug for WarmRanks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WarmRanks")
            .field("world_size", &self.world_size)
            .field("threads_per_rank", &self.threads_per_rank)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Sends "done" when dropped, so the waiting [`WarmRanks::run`] hears of the end of the
/// task even if the rank thread unwinds.
struct DoneGuard<'a> {
    rank: usize,
    tx: &'a mpsc::Sender<usize>,
}

impl Drop for DoneGuard<'_> {
    fn drop(&mut self) {
        let _ = self.tx.send(self.rank);
    }
}

impl WarmRanks {
    /// Starts the rank threads and their pools. `timeout` bounds every communication wait of
    /// every later job.
    ///
    /// Errors: `world_size` or `threads_per_rank` of 0, or a thread or pool the OS refused
    /// ([`RunError::Setup`], naming the rank).
    pub fn start(
        world_size: usize,
        threads_per_rank: usize,
        timeout: Duration,
    ) -> Result<Self, RunError<Error>> {
        if world_size == 0 || threads_per_rank == 0 {
            return Err(RunError::Setup {
                rank: None,
                message: format!(
                    "world_size {world_size} x threads_per_rank {threads_per_rank}: \
                     both must be at least 1"
                ),
            });
        }
        let (done_tx, done_rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, Result<(), String>)>();
        let mut ranks = WarmRanks {
            world_size,
            threads_per_rank,
            timeout,
            tasks: Vec::with_capacity(world_size),
            done: Mutex::new(done_rx),
            handles: Vec::with_capacity(world_size),
        };
        for rank in 0..world_size {
            let (task_tx, task_rx) = mpsc::channel::<Task>();
            let done_tx = done_tx.clone();
            let ready_tx = ready_tx.clone();
            count_thread_start();
            let spawned = thread::Builder::new()
                .name(format!("hybridiff-rank-{rank}"))
                .spawn(move || {
                    let pool = match rank_pool(rank, threads_per_rank) {
                        Ok(p) => {
                            let _ = ready_tx.send((rank, Ok(())));
                            p
                        }
                        Err(e) => {
                            let _ = ready_tx.send((rank, Err(e)));
                            return;
                        }
                    };
                    drop(ready_tx);
                    // Ends when `WarmRanks` is dropped (its senders close the channel).
                    while let Ok(task) = task_rx.recv() {
                        let _done = DoneGuard { rank, tx: &done_tx };
                        let Task { comm, body } = task;
                        pool.install(|| body(comm));
                    }
                });
            match spawned {
                Ok(h) => {
                    ranks.tasks.push(task_tx);
                    ranks.handles.push(h);
                }
                Err(e) => {
                    return Err(RunError::Setup {
                        rank: Some(rank),
                        message: format!("could not spawn its thread: {e}"),
                    });
                }
            }
        }
        drop(ready_tx);
        for _ in 0..world_size {
            match ready_rx.recv() {
                Ok((_, Ok(()))) => {}
                Ok((rank, Err(message))) => {
                    return Err(RunError::Setup {
                        rank: Some(rank),
                        message,
                    })
                }
                Err(_) => {
                    return Err(RunError::Setup {
                        rank: None,
                        message: "a rank thread exited while starting".into(),
                    })
                }
            }
        }
        Ok(ranks)
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn threads_per_rank(&self) -> usize {
        self.threads_per_rank
    }

    /// Runs `f` once per rank on the warm threads, each inside its rank's pool, and returns
    /// the results in rank order; blocks until every rank is done. Jobs from several callers
    /// run one after another.
    ///
    /// Errors as [`run_ranks`](crate::run_ranks): the failure of the rank that aborted the
    /// group, else the earliest; a rank whose thread has gone is a [`RunError::Setup`]. After
    /// an error the ranks are ready for the next job.
    pub fn run<T, E, F>(&self, f: F) -> Result<Vec<T>, RunError<E>>
    where
        T: Send,
        E: From<Error> + Send + fmt::Display,
        F: Fn(&mut dyn Communicator) -> Result<T, E> + Sync,
    {
        let done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        // Leftover reports cannot exist (every task's report is awaited below), but a stale
        // one would make this job return early, so drain defensively.
        while done.try_recv().is_ok() {}

        let (shared, comms) = InProcessGroup::with_shared(self.world_size, self.timeout);
        let order = AtomicUsize::new(0);
        let slots: Vec<Mutex<Option<Outcome<T, E>>>> =
            (0..self.world_size).map(|_| Mutex::new(None)).collect();
        let (f, order_ref, shared_ref, slots_ref) = (&f, &order, &*shared, &slots);
        let body = move |mut comm: InProcessComm| {
            let rank = comm.rank();
            let outcome = run_body(&mut comm, f, order_ref, shared_ref);
            drop(comm);
            *slots_ref[rank]
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(outcome);
        };
        let body_ref: &Body<'_> = &body;
        // SAFETY: the rank threads only use `body` (and what it borrows: `f`, `order`,
        // `shared`, `slots`) between receiving their `Task` and dropping its `DoneGuard`,
        // which reports on `done`. This function does not return, nor unwind (nothing
        // below panics: locks ignore poisoning, sends and receives return `Result`s),
        // before it has received one report per task it handed out, so every borrow
        // outlives every use. A task that could not be handed out is never run.
        let body_static =
            unsafe { std::mem::transmute::<&Body<'_>, &'static Body<'static>>(body_ref) };

        let mut handed_out = 0;
        let mut lost: Vec<usize> = Vec::new();
        for (rank, comm) in comms.into_iter().enumerate() {
            let task = Task {
                comm,
                body: body_static,
            };
            match self.tasks[rank].send(task) {
                Ok(()) => handed_out += 1,
                Err(mpsc::SendError(task)) => {
                    // The thread is gone; dropping its communicator tells peers at once.
                    shared.abort_as(rank, "its rank thread has exited");
                    drop(task);
                    lost.push(rank);
                }
            }
        }
        let mut reported = 0;
        while reported < handed_out {
            match done.recv() {
                Ok(_) => reported += 1,
                // Every rank thread has exited, so none is using `body` any more.
                Err(_) => break,
            }
        }
        let mut outcomes = Vec::with_capacity(self.world_size);
        for (rank, slot) in slots.iter().enumerate() {
            let taken = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            outcomes.push(match taken {
                Some(o) => o,
                None => {
                    let message = if lost.contains(&rank) {
                        "its rank thread has exited".to_string()
                    } else {
                        "its rank thread stopped before finishing the job".to_string()
                    };
                    fail(
                        rank,
                        RunError::Setup {
                            rank: Some(rank),
                            message: message.clone(),
                        },
                        message,
                        &order,
                        &shared,
                    )
                }
            });
        }
        root_cause(&shared, outcomes)
    }
}

impl Drop for WarmRanks {
    fn drop(&mut self) {
        self.tasks.clear();
        for h in self.handles.drain(..) {
            if let Err(payload) = h.join() {
                tracing::error!(
                    "a rank thread panicked outside a job: {}",
                    panic_message(payload.as_ref())
                );
            }
        }
    }
}
