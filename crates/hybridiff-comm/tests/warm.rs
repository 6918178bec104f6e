//! `WarmRanks`: ranks started once and given jobs, with `run_ranks`' failure semantics.
//!
//! nextest runs each test in its own process, so the process-wide thread counter only sees
//! this test's threads.

use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use candle_core::{Device, Tensor};
use hybridiff_comm::{threads_started, Communicator, Error, RunError, WarmRanks};

const LONG: Duration = Duration::from_secs(60);

fn t(vals: &[f32]) -> Tensor {
    Tensor::new(vals, &Device::Cpu).unwrap()
}

fn all_gather_sum(c: &mut dyn Communicator, x: f32) -> anyhow::Result<f32> {
    let got = c.all_gather(&t(&[x]))?;
    Ok(got
        .iter()
        .map(|g| g.to_vec1::<f32>().unwrap()[0])
        .sum::<f32>())
}

#[test]
fn jobs_run_on_the_same_threads_and_start_none() {
    let ranks = WarmRanks::start(3, 2, LONG).unwrap();
    let started = threads_started();
    // 3 rank threads plus 3 pools of 2 workers.
    assert_eq!(started, 3 + 3 * 2);
    for job in 0..5 {
        let names = Mutex::new(vec![String::new(); 3]);
        let sums = ranks
            .run(|c| -> anyhow::Result<f32> {
                assert_eq!(rayon::current_num_threads(), 2, "the rank's own pool");
                names.lock().unwrap()[c.rank()] = thread::current().name().unwrap().to_string();
                let x = (c.rank() + job) as f32;
                all_gather_sum(c, x)
            })
            .unwrap();
        assert_eq!(sums, vec![(3 + 3 * job) as f32; 3]);
        for (rank, name) in names.into_inner().unwrap().iter().enumerate() {
            assert!(
                name.starts_with(&format!("hybridiff-rank-{rank}-worker-")),
                "rank {rank} ran on {name}, not in its own pool"
            );
        }
    }
    assert_eq!(threads_started(), started, "no thread started per job");
}

#[test]
fn a_failed_job_reports_its_root_cause_and_the_next_job_runs() {
    let ranks = WarmRanks::start(3, 1, LONG).unwrap();
    let t0 = Instant::now();
    let err = ranks
        .run(|c| -> anyhow::Result<()> {
            if c.rank() == 1 {
                return Err(anyhow!("bad input on rank 1"));
            }
            // Would wait 60 s for rank 1 without the abort.
            c.barrier()?;
            Ok(())
        })
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(10));
    match &err {
        RunError::Failed { rank, error } => {
            assert_eq!(*rank, 1);
            assert!(error.to_string().contains("bad input"), "{error}");
        }
        other => panic!("expected rank 1's failure, got {other}"),
    }
    // The aborted group is not reused: the next job works.
    let out = ranks
        .run(|c| -> anyhow::Result<f32> { all_gather_sum(c, 1.0) })
        .unwrap();
    assert_eq!(out, vec![3.0; 3]);
}

#[test]
fn a_panicking_rank_is_reported_and_the_ranks_survive() {
    let ranks = WarmRanks::start(2, 1, LONG).unwrap();
    let started = threads_started();
    let err = ranks
        .run(|c| -> anyhow::Result<()> {
            if c.rank() == 0 {
                panic!("boom on rank 0");
            }
            c.barrier()?;
            Ok(())
        })
        .unwrap_err();
    match &err {
        RunError::Panicked { rank, message } => {
            assert_eq!(*rank, 0);
            assert!(message.contains("boom"), "{message}");
        }
        other => panic!("expected rank 0's panic, got {other}"),
    }
    let out = ranks
        .run(|c| -> anyhow::Result<usize> { Ok(c.rank() * 10) })
        .unwrap();
    assert_eq!(out, vec![0, 10]);
    assert_eq!(threads_started(), started);
}

#[test]
fn a_timeout_fails_the_job_not_the_ranks() {
    let ranks = WarmRanks::start(2, 1, Duration::from_millis(200)).unwrap();
    let err = ranks
        .run(|c| -> Result<(), Error> {
            if c.rank() == 0 {
                // Rank 1 never sends.
                c.recv(1)?;
            } else {
                thread::sleep(Duration::from_secs(1));
            }
            Ok(())
        })
        .unwrap_err();
    match &err {
        RunError::Failed {
            rank: 0,
            error: Error::Timeout { peer: 1, .. },
        } => {}
        other => panic!("expected rank 0's timeout, got {other}"),
    }
    assert_eq!(
        ranks
            .run(|c| -> Result<usize, Error> { Ok(c.rank()) })
            .unwrap(),
        vec![0, 1]
    );
}

#[test]
fn messages_left_by_one_job_never_reach_the_next() {
    let ranks = WarmRanks::start(2, 1, Duration::from_millis(300)).unwrap();
    ranks
        .run(|c| -> Result<(), Error> {
            if c.rank() == 0 {
                c.send(&t(&[42.0]), 1)?; // never received
            }
            // Rank 1 stays in the job until the send is done: a send to a rank that has
            // left its job fails (PeerGone) rather than queueing.
            c.barrier()
        })
        .unwrap();
    let err = ranks
        .run(|c| -> Result<(), Error> {
            if c.rank() == 1 {
                c.recv(0)?; // rank 0 sends nothing in this job
            }
            Ok(())
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            RunError::Failed {
                rank: 1,
                error: Error::PeerGone { .. } | Error::Timeout { .. }
            }
        ),
        "{err}"
    );
}

#[test]
fn jobs_from_several_callers_run_one_at_a_time() {
    let ranks = WarmRanks::start(2, 1, LONG).unwrap();
    let running = Mutex::new(0usize);
    let max_seen = Mutex::new(0usize);
    thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| {
                ranks
                    .run(|c| -> anyhow::Result<()> {
                        if c.rank() == 0 {
                            let mut r = running.lock().unwrap();
                            *r += 1;
                            let mut m = max_seen.lock().unwrap();
                            *m = (*m).max(*r);
                        }
                        c.barrier()?;
                        thread::sleep(Duration::from_millis(20));
                        c.barrier()?;
                        if c.rank() == 0 {
                            *running.lock().unwrap() -= 1;
                        }
                        Ok(())
                    })
                    .unwrap();
            });
        }
    });
    assert_eq!(*max_seen.lock().unwrap(), 1);
}

#[test]
fn bad_sizes_are_rejected_at_start() {
    let err = WarmRanks::start(2, 0, LONG).unwrap_err();
    assert!(err.to_string().contains("threads_per_rank"), "{err}");
    let err = WarmRanks::start(0, 1, LONG).unwrap_err();
    assert!(err.to_string().contains("world_size"), "{err}");
}
