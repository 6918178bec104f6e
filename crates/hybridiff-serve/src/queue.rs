//! The job queue and the single job thread: one job on the ranks at a time, up to
//! `max_queue` waiting, waiting requests dropped when their client goes, queued ones answered
//! "shutting down" when the service stops.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use tokio::sync::{oneshot, watch};

use crate::api::ApiError;
use crate::backend::{Backend, BackendError, BackendInfo, Image, ImageJob, RequestCheck};
use crate::metrics::Metrics;

/// Where a job is, for progress reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Progress {
    pub running: bool,
    /// 0-based image being made.
    pub image: usize,
    pub images: usize,
    pub step: usize,
    pub steps: usize,
}

/// Why a job gave no images.
#[derive(Debug, Clone)]
pub(crate) enum JobError {
    /// Queued when the service stopped; never ran.
    ShuttingDown,
    /// Running when the service stopped with [`crate::Stop::Cancel`]: cancelled.
    Stopped,
    Cancelled,
    Failed(String),
}

pub(crate) type JobOutcome = Result<Vec<Image>, JobError>;

struct Ticket {
    jobs: Vec<ImageJob>,
    cancel: AtomicBool,
    /// Cancelled because the service is stopping (not because its client left).
    stopped: AtomicBool,
    progress: watch::Sender<Progress>,
    answer: Mutex<Option<oneshot::Sender<JobOutcome>>>,
}

impl Ticket {
    fn answer(&self, outcome: JobOutcome) {
        if let Some(tx) = lock(&self.answer).take() {
            let _ = tx.send(outcome); // the client may be gone
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Inner {
    waiting: VecDeque<Arc<Ticket>>,
    running: Option<Arc<Ticket>>,
    open: bool,
    /// Running mean of job seconds, for `Retry-After`.
    mean_seconds: f64,
}

pub(crate) struct Queue {
    inner: Mutex<Inner>,
    wake: Condvar,
    max_queue: usize,
    metrics: Arc<Metrics>,
}

/// A submitted request's claim on its job. Dropping it (the client left, the handler timed
/// out) takes the job out of the queue, or cancels it if it is running.
pub(crate) struct Handle {
    queue: Arc<Queue>,
    ticket: Arc<Ticket>,
    pub answer: oneshot::Receiver<JobOutcome>,
    pub progress: watch::Receiver<Progress>,
    /// Jobs ahead of this one when it was queued (the running one included).
    pub position: usize,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.queue.withdraw(&self.ticket);
    }
}

/// What `/health` reports.
pub(crate) struct Status {
    pub waiting: usize,
    pub running: bool,
    pub open: bool,
}

impl Queue {
    fn new(max_queue: usize, metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                waiting: VecDeque::new(),
                running: None,
                open: true,
                mean_seconds: 1.0,
            }),
            wake: Condvar::new(),
            max_queue,
            metrics,
        }
    }

    /// Queues `jobs`, or refuses: 429 with `Retry-After` when `max_queue` are waiting, 503
    /// once the service is stopping.
    pub fn submit(self: &Arc<Self>, jobs: Vec<ImageJob>) -> Result<Handle, ApiError> {
        let mut inner = lock(&self.inner);
        if !inner.open {
            return Err(ApiError::shutting_down());
        }
        let ahead = inner.waiting.len() + usize::from(inner.running.is_some());
        // `max_queue` 0 still runs a request when nothing else is waiting or running.
        let busy = inner.running.is_some() || !inner.waiting.is_empty();
        if busy && inner.waiting.len() >= self.max_queue {
            let secs = (inner.mean_seconds * ahead as f64).ceil().max(1.0) as u64;
            return Err(ApiError::queue_full(secs, self.max_queue));
        }
        let (answer_tx, answer) = oneshot::channel();
        let (progress_tx, progress) = watch::channel(Progress {
            images: jobs.len(),
            ..Progress::default()
        });
        let ticket = Arc::new(Ticket {
            jobs,
            cancel: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            progress: progress_tx,
            answer: Mutex::new(Some(answer_tx)),
        });
        inner.waiting.push_back(Arc::clone(&ticket));
        self.metrics.queue_depth.set(inner.waiting.len() as i64);
        drop(inner);
        self.wake.notify_all();
        Ok(Handle {
            queue: Arc::clone(self),
            ticket,
            answer,
            progress,
            position: ahead,
        })
    }

    fn withdraw(&self, ticket: &Arc<Ticket>) {
        let mut inner = lock(&self.inner);
        if let Some(i) = inner.waiting.iter().position(|t| Arc::ptr_eq(t, ticket)) {
            inner.waiting.remove(i);
            self.metrics.queue_depth.set(inner.waiting.len() as i64);
            self.metrics.dropped.inc();
            tracing::info!("a queued request was dropped (client gone or timed out)");
        } else if inner
            .running
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, ticket))
        {
            ticket.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// Stops taking jobs and answers every waiting one "shutting down"; the running job
    /// finishes.
    pub fn close(&self) {
        let mut inner = lock(&self.inner);
        inner.open = false;
        let waiting: Vec<_> = inner.waiting.drain(..).collect();
        self.metrics.queue_depth.set(0);
        drop(inner);
        for t in waiting {
            t.answer(Err(JobError::ShuttingDown));
        }
        self.wake.notify_all();
    }

    /// Cancels the running job (if any) at its next step; its request is answered 503.
    pub fn cancel_running(&self) {
        let inner = lock(&self.inner);
        if let Some(t) = &inner.running {
            t.stopped.store(true, Ordering::SeqCst);
            t.cancel.store(true, Ordering::SeqCst);
        }
    }

    pub fn status(&self) -> Status {
        let inner = lock(&self.inner);
        Status {
            waiting: inner.waiting.len(),
            running: inner.running.is_some(),
            open: inner.open,
        }
    }

    /// The next job for the job thread; `None` once closed.
    fn next(&self) -> Option<Arc<Ticket>> {
        let mut inner = lock(&self.inner);
        loop {
            if let Some(t) = inner.waiting.pop_front() {
                inner.running = Some(Arc::clone(&t));
                self.metrics.queue_depth.set(inner.waiting.len() as i64);
                self.metrics.jobs_running.set(1);
                return Some(t);
            }
            if !inner.open {
                return None;
            }
            inner = self
                .wake
                .wait(inner)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn finish(&self, seconds: f64) {
        let mut inner = lock(&self.inner);
        inner.running = None;
        inner.mean_seconds = 0.7 * inner.mean_seconds + 0.3 * seconds;
        self.metrics.jobs_running.set(0);
    }
}

/// The thread that owns the backend and runs the queue's jobs one by one.
pub(crate) struct JobThread {
    pub queue: Arc<Queue>,
    pub info: BackendInfo,
    /// The backend's [`Backend::request_check`].
    pub check: Option<RequestCheck>,
    handle: Option<JoinHandle<()>>,
}

impl JobThread {
    /// Starts the thread, builds the backend on it with `make`, and returns once it is ready
    /// (or with `make`'s error).
    pub fn start<F>(make: F, max_queue: usize, metrics: Arc<Metrics>) -> Result<Self, String>
    where
        F: FnOnce() -> Result<Box<dyn Backend>, String> + Send + 'static,
    {
        let queue = Arc::new(Queue::new(max_queue, Arc::clone(&metrics)));
        let (ready_tx, ready_rx) = mpsc::channel();
        let q = Arc::clone(&queue);
        let handle = std::thread::Builder::new()
            .name("hybridiff-serve-jobs".into())
            .spawn(move || {
                let mut backend = match make() {
                    Ok(b) => {
                        let _ = ready_tx.send(Ok((b.info().clone(), b.request_check())));
                        b
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Some(ticket) = q.next() {
                    let start = Instant::now();
                    let mut outcome = run_ticket(backend.as_mut(), &ticket, &metrics);
                    if matches!(outcome, Err(JobError::Cancelled))
                        && ticket.stopped.load(Ordering::SeqCst)
                    {
                        outcome = Err(JobError::Stopped);
                    }
                    let label = match &outcome {
                        Ok(_) => "ok",
                        Err(JobError::Cancelled | JobError::Stopped) => "cancelled",
                        Err(JobError::ShuttingDown) => "shutdown",
                        Err(JobError::Failed(_)) => "failed",
                    };
                    metrics.jobs.with_label_values(&[label]).inc();
                    q.finish(start.elapsed().as_secs_f64());
                    ticket.answer(outcome);
                }
            })
            .map_err(|e| format!("could not start the job thread: {e}"))?;
        match ready_rx.recv() {
            Ok(Ok((info, check))) => Ok(Self {
                queue,
                info,
                check,
                handle: Some(handle),
            }),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => {
                let _ = handle.join();
                Err("the job thread exited while building the backend".into())
            }
        }
    }
}

/// Closes the queue and waits for the running job to end.
impl Drop for JobThread {
    fn drop(&mut self) {
        self.queue.close();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run_ticket(backend: &mut dyn Backend, ticket: &Ticket, metrics: &Metrics) -> JobOutcome {
    let images = ticket.jobs.len();
    let mut out = Vec::with_capacity(images);
    for (i, job) in ticket.jobs.iter().enumerate() {
        if ticket.cancel.load(Ordering::SeqCst) {
            return Err(JobError::Cancelled);
        }
        ticket.progress.send_replace(Progress {
            running: true,
            image: i,
            images,
            step: 0,
            steps: job.steps,
        });
        let progress = |step: usize, steps: usize| {
            ticket.progress.send_replace(Progress {
                running: true,
                image: i,
                images,
                step,
                steps,
            });
        };
        // A panicking backend fails this job only; the service keeps serving.
        let result = catch_unwind(AssertUnwindSafe(|| {
            backend.generate(job, &progress, &ticket.cancel)
        }))
        .unwrap_or_else(|payload| {
            let msg = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".into());
            Err(BackendError::Failed(format!("panicked: {msg}")))
        });
        match result {
            Ok(img) => {
                metrics.images.inc();
                out.push(img);
            }
            Err(BackendError::Cancelled) => return Err(JobError::Cancelled),
            Err(BackendError::Failed(m)) => {
                tracing::warn!(error = %m, "image job failed");
                return Err(JobError::Failed(m));
            }
        }
    }
    Ok(out)
}
