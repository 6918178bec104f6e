//! Behaviour of the in-process communicator and `run_ranks`.
//!
//! Timing bounds are deliberately generous: CI machines are loaded.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

mod common;

use anyhow::anyhow;
use candle_core::{DType, Device, Tensor};
use hybridiff_comm::{
    run_ranks, Communicator, Error, Group, InProcessGroup, Op, Result as CommResult, RunError,
};

const LONG: Duration = Duration::from_secs(60);
/// How fast an abort must reach ranks blocked with a 60 s timeout.
const PROMPT: Duration = Duration::from_secs(5);

use common::{t, vals};

#[test]
fn send_recv_keeps_order_per_pair() {
    // Rank 0 and rank 2 both stream to rank 1, interleaved in time; rank 1 drains rank 2 first,
    // so the streams must be kept apart and each kept in order.
    let got = run_ranks(3, 1, LONG, |c| -> anyhow::Result<Vec<f32>> {
        match c.rank() {
            0 | 2 => {
                for i in 0..50 {
                    c.send(&t(&[c.rank() as f32, i as f32]), 1)?;
                    if i % 10 == 0 {
                        thread::yield_now();
                    }
                }
                Ok(vec![])
            }
            _ => {
                let mut seen = vec![];
                for src in [2, 0] {
                    for i in 0..50 {
                        let v = vals(&c.recv(src)?);
                        assert_eq!(v, vec![src as f32, i as f32], "from rank {src}, msg {i}");
                        seen.push(v[1]);
                    }
                }
                Ok(seen)
            }
        }
    })
    .unwrap();
    assert_eq!(got[1].len(), 100);
}

fn broadcast_loop(n: usize) {
    run_ranks(n, 1, LONG, |c| -> anyhow::Result<()> {
        for i in 0..100 {
            let root = i % n;
            if c.rank() == (i + 1) % n && i % 7 == 0 {
                thread::sleep(Duration::from_millis(1)); // skew the ranks
            }
            let mine = t(&[i as f32, root as f32, c.rank() as f32]);
            let arg = (c.rank() == root).then_some(&mine);
            let got = c.broadcast(arg, root)?;
            assert_eq!(vals(&got), vec![i as f32, root as f32, root as f32]);
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn broadcast_2_ranks_100_iterations() {
    broadcast_loop(2);
}

#[test]
fn broadcast_4_ranks_100_iterations() {
    broadcast_loop(4);
}

fn all_gather_loop(n: usize) {
    run_ranks(n, 1, LONG, |c| -> anyhow::Result<()> {
        for i in 0..100 {
            if c.rank() == i % n && i % 5 == 0 {
                thread::sleep(Duration::from_millis(2)); // skew the ranks
            }
            // Different shape per rank, so a swapped slot shows.
            let mine = t(&vec![(i * 10 + c.rank()) as f32; c.rank() + 1]);
            let all = c.all_gather(&mine)?;
            assert_eq!(all.len(), n);
            for (j, g) in all.iter().enumerate() {
                assert_eq!(
                    vals(g),
                    vec![(i * 10 + j) as f32; j + 1],
                    "iter {i} slot {j}"
                );
            }
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn all_gather_2_ranks_100_iterations() {
    all_gather_loop(2);
}

#[test]
fn all_gather_4_ranks_100_iterations() {
    all_gather_loop(4);
}

#[test]
fn mixed_p2p_and_collectives_loop() {
    // A ring send that nobody receives until after the collectives must not confuse them.
    let n = 4;
    run_ranks(n, 1, LONG, |c| -> anyhow::Result<()> {
        let (r, next, prev) = (c.rank(), (c.rank() + 1) % n, (c.rank() + n - 1) % n);
        for i in 0..50 {
            c.send(&t(&[i as f32, r as f32]), next)?;
            let all = c.all_gather(&t(&[(i * n + r) as f32]))?;
            let all: Vec<f32> = all.iter().flat_map(vals).collect();
            assert_eq!(all, (0..n).map(|j| (i * n + j) as f32).collect::<Vec<_>>());
            let root = i % n;
            let b = c.broadcast((r == root).then_some(&t(&[-(i as f32)])), root)?;
            assert_eq!(vals(&b), vec![-(i as f32)]);
            c.barrier()?;
            assert_eq!(vals(&c.recv(prev)?), vec![i as f32, prev as f32]);
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn barrier_waits_for_every_rank() {
    let n = 4;
    let arrived = AtomicUsize::new(0);
    run_ranks(n, 1, LONG, |c| -> anyhow::Result<()> {
        for iter in 0..5 {
            if c.rank() == iter % n {
                thread::sleep(Duration::from_millis(50));
            }
            arrived.fetch_add(1, Ordering::SeqCst);
            c.barrier()?;
            let seen = arrived.load(Ordering::SeqCst);
            assert!(
                seen >= (iter + 1) * n,
                "iter {iter}: left barrier after {seen} arrivals"
            );
        }
        Ok(())
    })
    .unwrap();
}

#[test]
fn bytes_sent_counts_every_destination() {
    let bytes = run_ranks(4, 1, LONG, |c| -> anyhow::Result<u64> {
        let dev = Device::Cpu;
        match c.rank() {
            0 => {
                c.send(&Tensor::zeros((3, 4), DType::F32, &dev)?, 1)?; // 48
                c.send(&Tensor::zeros(5, DType::U8, &dev)?, 2)?; // 5
            }
            1 => {
                c.recv(0)?;
            }
            2 => {
                c.recv(0)?;
            }
            _ => {
                // A strided view still costs its elements on the wire.
                let view = Tensor::zeros((2, 3), DType::F32, &dev)?.t()?;
                c.send(&view, 0)?; // 24
            }
        }
        if c.rank() == 0 {
            c.recv(3)?;
        }
        let half = Tensor::zeros(10, DType::F16, &dev)?; // 20 bytes, to 3 peers
        c.broadcast((c.rank() == 1).then_some(&half), 1)?;
        c.all_gather(&Tensor::zeros(2, DType::F64, &dev)?)?; // 16 bytes, to 3 peers
        c.barrier()?; // free
        Ok(c.bytes_sent())
    })
    .unwrap();
    assert_eq!(bytes, vec![48 + 5 + 48, 60 + 48, 48, 24 + 48]);
}

#[test]
fn recv_timeout_names_op_and_peer() {
    let comms = InProcessGroup::new(2, Duration::from_millis(200));
    let start = Instant::now();
    let err = comms[1].recv(0).unwrap_err();
    let waited = start.elapsed();
    assert!(
        matches!(
            err,
            Error::Timeout { rank: 1, peer: 0, op: Op::Recv, after } if after == Duration::from_millis(200)
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    for part in ["rank 1 waited 200ms for rank 0 in recv", "--comm-timeout"] {
        assert!(msg.contains(part), "{msg:?} lacks {part:?}");
    }
    assert!(
        waited >= Duration::from_millis(190),
        "gave up after {waited:?}"
    );
    assert!(waited < PROMPT, "took {waited:?}");
    drop(comms);
}

#[test]
fn all_gather_timeout_names_the_missing_rank() {
    let comms = InProcessGroup::new(3, Duration::from_millis(200));
    let errs: Vec<Error> = thread::scope(|s| {
        let hs: Vec<_> = comms[..2]
            .iter()
            .map(|c| s.spawn(move || c.all_gather(&t(&[1.0])).unwrap_err()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, err) in errs.iter().enumerate() {
        assert!(
            matches!(err, Error::Timeout { rank: r, peer: 2, op: Op::AllGather, .. } if *r == rank),
            "{err:?}"
        );
        assert!(
            err.to_string().contains("for rank 2 in all_gather"),
            "{err}"
        );
    }
    drop(comms); // rank 2 stays alive (but silent) until here
}

#[test]
fn abort_wakes_pending_and_future_waits() {
    let comms = InProcessGroup::new(3, LONG);
    let (c0, c1, c2) = (&comms[0], &comms[1], &comms[2]);
    let results: Vec<(CommResult<()>, Duration)> = thread::scope(|s| {
        let start = Instant::now();
        let a = s.spawn(move || (c1.recv(0).map(drop), start.elapsed()));
        let b = s.spawn(move || (c2.barrier(), start.elapsed()));
        thread::sleep(Duration::from_millis(100));
        c0.abort("operator stop");
        vec![a.join().unwrap(), b.join().unwrap()]
    });
    for ((res, took), (rank, op)) in results.into_iter().zip([(1, Op::Recv), (2, Op::Barrier)]) {
        let err = res.unwrap_err();
        assert!(took < PROMPT, "abort took {took:?} to reach rank {rank}");
        assert_eq!(
            err,
            Error::Aborted {
                rank,
                by_rank: 0,
                reason: "operator stop".into(),
                op
            }
        );
        assert!(err
            .to_string()
            .contains("rank 0 aborted the group (operator stop)"));
    }
    // Later aborts do not overwrite the first reason; every later call fails at once.
    c1.abort("second");
    let checks: [CommResult<()>; 5] = [
        c1.send(&t(&[1.0]), 2),
        c2.recv(1).map(drop),
        c0.all_gather(&t(&[1.0])).map(drop),
        c2.broadcast(None, 0).map(drop),
        c0.barrier(),
    ];
    for r in checks {
        match r.unwrap_err() {
            Error::Aborted {
                by_rank: 0, reason, ..
            } => assert_eq!(reason, "operator stop"),
            e => panic!("expected Aborted, got {e:?}"),
        }
    }
}

/// Ranks 0, 1 and 3 block (in recv and all_gather) on rank 2, which `fail`s after a moment.
fn blocked_ranks_stop_when_rank_2<T: Send>(
    fail: impl Fn() -> anyhow::Result<T> + Sync,
) -> (RunError<anyhow::Error>, Vec<(usize, Error)>, Duration) {
    let echoes = Mutex::new(vec![]);
    let start = Instant::now();
    let res = run_ranks(4, 1, LONG, |c| -> anyhow::Result<()> {
        let r = c.rank();
        let blocked = match r {
            2 => {
                thread::sleep(Duration::from_millis(100));
                fail()?;
                return Ok(());
            }
            0 => c.recv(2).map(drop),
            _ => c.all_gather(&t(&[r as f32])).map(drop),
        };
        let e = blocked.unwrap_err();
        echoes.lock().unwrap().push((r, e.clone()));
        Err(e.into())
    });
    let took = start.elapsed();
    let mut echoes = echoes.into_inner().unwrap();
    echoes.sort_by_key(|(r, _)| *r);
    (res.unwrap_err(), echoes, took)
}

fn assert_echoes(echoes: &[(usize, Error)], reason_part: &str) {
    assert_eq!(
        echoes.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
        [0, 1, 3]
    );
    for (r, e) in echoes {
        match e {
            Error::Aborted {
                rank,
                by_rank: 2,
                reason,
                ..
            } if rank == r => assert!(reason.contains(reason_part), "{reason}"),
            e => panic!("rank {r}: expected Aborted by rank 2, got {e:?}"),
        }
    }
}

#[test]
fn failing_rank_aborts_the_others_and_is_reported() {
    let (err, echoes, took) = blocked_ranks_stop_when_rank_2(|| -> anyhow::Result<()> {
        Err(anyhow!("boom: bad weights"))
    });
    assert!(took < PROMPT, "took {took:?}");
    assert_echoes(&echoes, "boom: bad weights");
    match &err {
        RunError::Failed { rank: 2, error } => assert_eq!(error.to_string(), "boom: bad weights"),
        e => panic!("expected rank 2's own error, got {e}"),
    }
    assert_eq!(err.rank(), Some(2));
    assert_eq!(err.to_string(), "rank 2 failed: boom: bad weights");
}

#[test]
fn panicking_rank_aborts_the_others_and_is_reported() {
    let (err, echoes, took) = blocked_ranks_stop_when_rank_2(|| -> anyhow::Result<()> {
        panic!("kaboom in the unet");
    });
    assert!(took < PROMPT, "took {took:?}");
    assert_echoes(&echoes, "kaboom in the unet");
    match &err {
        RunError::Panicked { rank: 2, message } => assert_eq!(message, "kaboom in the unet"),
        e => panic!("expected rank 2's panic, got {e}"),
    }
}

#[test]
fn timeout_under_run_ranks_is_the_root_cause() {
    let err = run_ranks(2, 1, Duration::from_millis(200), |c| -> CommResult<()> {
        if c.rank() == 0 {
            thread::sleep(Duration::from_millis(800)); // too slow, then stuck in the barrier
            c.barrier()
        } else {
            c.recv(0).map(drop)
        }
    })
    .unwrap_err();
    match err {
        RunError::Failed {
            rank: 1,
            error:
                Error::Timeout {
                    peer: 0,
                    op: Op::Recv,
                    ..
                },
        } => {}
        e => panic!("expected rank 1's timeout, got {e:?}"),
    }
}

#[test]
fn rank_aborting_itself_is_the_root_cause() {
    let err = run_ranks(3, 1, LONG, |c| -> CommResult<()> {
        if c.rank() == 2 {
            thread::sleep(Duration::from_millis(50));
            c.abort("out of memory");
            // Fail last, so only the abort (not the timing) can single this rank out.
            thread::sleep(Duration::from_millis(300));
            Err(Error::BadArgument {
                rank: 2,
                op: Op::Barrier,
                what: "gave up".into(),
            })
        } else {
            c.barrier()
        }
    })
    .unwrap_err();
    assert_eq!(err.rank(), Some(2), "{err}");
    assert!(err.to_string().contains("gave up"), "{err}");
}

#[test]
fn each_rank_gets_its_thread_budget() {
    for (n, threads) in [(3, 2), (2, 1)] {
        let seen = run_ranks(n, threads, LONG, |c| -> CommResult<_> {
            use rayon::prelude::*;
            let sum: u64 = (0..1000u64).into_par_iter().sum();
            let name = thread::current().name().map(str::to_string);
            c.barrier()?;
            Ok((rayon::current_num_threads(), sum, name))
        })
        .unwrap();
        for (rank, (num, sum, name)) in seen.into_iter().enumerate() {
            assert_eq!(num, threads, "rank {rank}");
            assert_eq!(sum, 499_500);
            let name = name.unwrap_or_default();
            assert!(
                name.starts_with(&format!("hybridiff-rank-{rank}-")),
                "{name}"
            );
        }
    }
}

#[test]
fn zero_threads_per_rank_is_rejected() {
    let err = run_ranks(2, 0, LONG, |_| -> CommResult<()> { Ok(()) }).unwrap_err();
    assert!(matches!(err, RunError::Setup { rank: None, .. }), "{err}");
}

#[test]
fn results_come_back_in_rank_order() {
    let out = run_ranks(4, 1, LONG, |c| -> CommResult<usize> {
        thread::sleep(Duration::from_millis(20 * (4 - c.rank() as u64)));
        Ok(c.rank() * 10)
    })
    .unwrap();
    assert_eq!(out, vec![0, 10, 20, 30]);
}

#[test]
fn invalid_ranks_are_rejected() {
    let comms = InProcessGroup::new(2, Duration::from_millis(200));
    let c = &comms[0];
    let x = t(&[1.0]);
    let invalid = |e: Error, want_peer: usize, want_op: Op| match e {
        Error::InvalidRank {
            rank: 0,
            peer,
            world_size: 2,
            op,
        } if peer == want_peer && op == want_op => {
            assert!(e.to_string().contains("use a rank in 0..2"), "{e}")
        }
        e => panic!("expected InvalidRank({want_peer}, {want_op}), got {e:?}"),
    };
    invalid(c.send(&x, 2).unwrap_err(), 2, Op::Send);
    invalid(c.recv(7).unwrap_err(), 7, Op::Recv);
    invalid(c.broadcast(Some(&x), 5).unwrap_err(), 5, Op::Broadcast);
    assert_eq!(
        c.send(&x, 0).unwrap_err(),
        Error::SelfPeer {
            rank: 0,
            op: Op::Send
        }
    );
    assert_eq!(
        c.recv(0).unwrap_err(),
        Error::SelfPeer {
            rank: 0,
            op: Op::Recv
        }
    );
    assert_eq!(c.bytes_sent(), 0);
}

#[test]
fn broadcast_arguments_are_checked() {
    let comms = InProcessGroup::new(2, Duration::from_millis(200));
    let x = t(&[1.0]);
    assert!(matches!(
        comms[0].broadcast(None, 0),
        Err(Error::BadArgument { rank: 0, .. })
    ));
    assert!(matches!(
        comms[1].broadcast(Some(&x), 0),
        Err(Error::BadArgument { rank: 1, .. })
    ));
    let solo = InProcessGroup::new(1, Duration::from_millis(200));
    assert_eq!(vals(&solo[0].broadcast(Some(&x), 0).unwrap()), vec![1.0]);
    assert_eq!(solo[0].all_gather(&x).unwrap().len(), 1);
    solo[0].barrier().unwrap();
}

#[test]
fn mismatched_collectives_are_detected() {
    let err = run_ranks(2, 1, LONG, |c| -> CommResult<()> {
        if c.rank() == 0 {
            c.barrier()
        } else {
            c.all_gather(&t(&[1.0])).map(drop)
        }
    })
    .unwrap_err();
    match err {
        RunError::Failed {
            error: Error::CollectiveMismatch { .. },
            ..
        } => {}
        e => panic!("expected a collective mismatch, got {e:?}"),
    }
}

#[test]
fn exited_peer_is_reported_without_waiting_for_the_timeout() {
    let mut comms = InProcessGroup::new(2, LONG);
    let c1 = comms.pop().unwrap();
    let c0 = comms.pop().unwrap();
    c0.send(&t(&[7.0]), 1).unwrap();
    drop(c0);
    let start = Instant::now();
    // What was sent before exiting still arrives; after that, waiting is pointless.
    assert_eq!(vals(&c1.recv(0).unwrap()), vec![7.0]);
    assert_eq!(
        c1.recv(0).unwrap_err(),
        Error::PeerGone {
            rank: 1,
            peer: 0,
            op: Op::Recv
        }
    );
    assert!(c1.send(&t(&[1.0]), 0).is_err());
    assert!(start.elapsed() < PROMPT);
}

#[test]
fn works_through_a_trait_object() {
    let comms: Vec<Box<dyn Communicator>> = InProcessGroup::new(2, LONG)
        .into_iter()
        .map(|c| Box::new(c) as Box<dyn Communicator>)
        .collect();
    let out: Vec<Vec<f32>> = thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let all = c.all_gather(&t(&[c.rank() as f32])).unwrap();
                    all.iter().flat_map(vals).collect()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(out, vec![vec![0.0, 1.0], vec![0.0, 1.0]]);
}

#[test]
fn band_groups_inside_branch_groups_interleave_with_world_collectives() {
    run_ranks(4, 1, LONG, |c| common::band_groups_in_branch_groups(c)).unwrap();
}

#[test]
fn group_collectives_detect_mismatches_and_refuse_outsiders() {
    let comms = InProcessGroup::new(4, LONG);
    let pair = Group::new([0, 1]);
    // Rank 0 broadcasts in {0, 1} while rank 1 all-gathers there: rank 1 sees the mismatch.
    thread::scope(|s| {
        let (c0, c1) = (&comms[0], &comms[1]);
        let a = s.spawn(|| c0.broadcast_in(&pair, Some(&t(&[1.0])), 0));
        let b = s.spawn(|| c1.all_gather_in(&pair, &t(&[2.0])));
        a.join().unwrap().unwrap();
        let e = b.join().unwrap().unwrap_err();
        assert!(
            matches!(
                e,
                Error::CollectiveMismatch {
                    rank: 1,
                    peer: 0,
                    op: Op::AllGather,
                    got_op: Op::Broadcast,
                    ..
                }
            ),
            "{e:?}"
        );
    });
    // A rank outside the group, a group naming a rank that does not exist, a root outside.
    let e = comms[3].all_gather_in(&pair, &t(&[1.0])).unwrap_err();
    assert!(e.to_string().contains("not in the group [0, 1]"), "{e}");
    let e = comms[0].barrier_in(&Group::new([0, 7])).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidRank {
                peer: 7,
                world_size: 4,
                ..
            }
        ),
        "{e:?}"
    );
    let e = comms[0].broadcast_in(&pair, None, 2).unwrap_err();
    assert!(
        e.to_string()
            .contains("the root, rank 2, is not in the group"),
        "{e}"
    );
    // Groups of one are a no-op that returns this rank's own tensor.
    let solo = Group::new([2]);
    assert_eq!(
        vals(&comms[2].all_gather_in(&solo, &t(&[5.0])).unwrap()[0]),
        vec![5.0]
    );
    comms[2].barrier_in(&solo).unwrap();
}
