//! The MPI communicator's promises, checked with real processes: each test starts `mpirun` on
//! this test binary, which runs the same test in every process (`HYBRIDIFF_MPI_CHILD` set) as
//! one rank. Needs the `mpi` feature and Open MPI's `mpirun`.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use hybridiff_comm::mpi::{MpiComm, MpiWorld};
use hybridiff_comm::{Communicator, Error, Op};

const CHILD: &str = "HYBRIDIFF_MPI_CHILD";

/// In the parent: runs test `name` as `np` ranks under mpirun and asserts they all passed.
/// In a child: returns the world and a communicator with `timeout` for the test body.
fn ranks(name: &str, np: usize, timeout: Duration) -> Option<(MpiWorld, MpiComm)> {
    if std::env::var_os(CHILD).is_some() {
        let world = MpiWorld::init().expect("MPI init");
        let comm = world.communicator(timeout);
        return Some((world, comm));
    }
    let start = Instant::now();
    // Its own session folder: concurrent mpiruns sharing /tmp race to create
    // /tmp/ompi.HOST.UID ("mkdir ... File exists", orte_init fails).
    let session =
        std::env::temp_dir().join(format!("hybridiff-ompi-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&session).unwrap();
    let mut child = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &np.to_string(),
        ])
        // One file per rank: through one pipe the ranks' lines interleave mid-line
        // ("test result: ok" + ". 1 passed" from the other rank), which broke the count below.
        .arg("--output-filename")
        .arg(session.join("out"))
        .args(["-x", CHILD])
        .env(CHILD, "1")
        .env("TMPDIR", &session)
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start mpirun");
    // A hang must fail the test, not CI: the output is read only after the exit.
    let limit = Duration::from_secs(120);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > limit {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            std::thread::sleep(Duration::from_secs(3));
            let _ = child.kill();
            panic!("{name}: mpirun still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    let ranks_out = rank_outputs(&session.join("out"));
    let _ = std::fs::remove_dir_all(&session);
    let text = format!(
        "{}{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        ranks_out.join("\n")
    );
    assert!(out.status.success(), "{name} failed under mpirun:\n{text}");
    // Every rank ran the test body and passed it.
    assert_eq!(
        ranks_out
            .iter()
            .filter(|o| o.contains("test result: ok. 1 passed"))
            .count(),
        np,
        "{text}"
    );
    None
}

/// The text of every file under mpirun's `--output-filename` folder
/// (`<dir>/1/rank.<r>/stdout`, `stderr`), one entry per rank: stdout and stderr joined.
fn rank_outputs(dir: &std::path::Path) -> Vec<String> {
    let mut ranks = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut files = String::new();
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                files += &std::fs::read_to_string(&path).unwrap_or_default();
            }
        }
        if !files.is_empty() {
            ranks.push(files);
        }
    }
    ranks
}

use common::{t, vals};

#[test]
fn streams_and_collectives_keep_order_and_count_bytes() {
    let Some((_world, c)) = ranks(
        "streams_and_collectives_keep_order_and_count_bytes",
        3,
        Duration::from_secs(60),
    ) else {
        return;
    };
    let (me, n) = (c.rank(), c.world_size());
    assert_eq!(n, 3);
    let mut expected_bytes = 0u64;
    for i in 0..30 {
        // Point-to-point: everyone streams to rank (me + 1) before anyone receives, so an
        // unreceived send must not be mistaken for a collective's message.
        c.send(&t(&[me as f32, i as f32]), (me + 1) % n).unwrap();
        expected_bytes += 8;
        let b = c
            .broadcast((me == i % n).then(|| t(&[i as f32; 3])).as_ref(), i % n)
            .unwrap();
        assert_eq!(vals(&b), vec![i as f32; 3]);
        if me == i % n {
            expected_bytes += 12 * (n as u64 - 1);
        }
        let g = c.all_gather(&t(&[me as f32, i as f32, 1.0])).unwrap();
        expected_bytes += 12 * (n as u64 - 1);
        for (r, v) in g.iter().enumerate() {
            assert_eq!(vals(v), vec![r as f32, i as f32, 1.0]);
        }
        let got = c.recv((me + n - 1) % n).unwrap();
        assert_eq!(vals(&got), vec![((me + n - 1) % n) as f32, i as f32]);
        c.barrier().unwrap();
    }
    assert_eq!(c.bytes_sent(), expected_bytes);
}

#[test]
fn large_messages_sent_both_ways_at_once_do_not_deadlock() {
    let Some((_world, c)) = ranks(
        "large_messages_sent_both_ways_at_once_do_not_deadlock",
        2,
        Duration::from_secs(60),
    ) else {
        return;
    };
    // 16 MB, far past any eager limit: blocking sends would wait for each other forever.
    let me = c.rank();
    let big = Tensor::full(me as f32 + 0.5, (4, 1024, 1024), &Device::Cpu).unwrap();
    let half = big.to_dtype(DType::F16).unwrap();
    c.send(&big, 1 - me).unwrap();
    c.send(&half, 1 - me).unwrap();
    let a = c.recv(1 - me).unwrap();
    let b = c.recv(1 - me).unwrap();
    assert_eq!(a.dims(), &[4, 1024, 1024]);
    assert_eq!(b.dtype(), DType::F16);
    let want = (1 - me) as f32 + 0.5;
    assert_eq!(a.max_all().unwrap().to_scalar::<f32>().unwrap(), want);
    assert_eq!(a.min_all().unwrap().to_scalar::<f32>().unwrap(), want);
    c.barrier().unwrap();
}

#[test]
fn recv_from_a_silent_rank_times_out_naming_it() {
    let Some((_world, c)) = ranks(
        "recv_from_a_silent_rank_times_out_naming_it",
        2,
        Duration::from_secs(2),
    ) else {
        return;
    };
    if c.rank() == 0 {
        let start = Instant::now();
        let e = c.recv(1).unwrap_err();
        let waited = start.elapsed();
        assert!(
            matches!(
                e,
                Error::Timeout {
                    rank: 0,
                    peer: 1,
                    op: Op::Recv,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(e.to_string().contains("rank 1 is stuck or dead"), "{e}");
        assert!(
            waited >= Duration::from_secs(2) && waited < Duration::from_secs(10),
            "{waited:?}"
        );
    }
    // Rank 1 sends nothing; both meet again so that neither finalises early.
    std::thread::sleep(Duration::from_millis(100));
    let mut c = c;
    c.set_timeout(Duration::from_secs(60));
    c.barrier().unwrap();
}

#[test]
fn abort_stops_blocked_ranks_promptly_with_the_reason() {
    let Some((_world, c)) = ranks(
        "abort_stops_blocked_ranks_promptly_with_the_reason",
        3,
        Duration::from_secs(60),
    ) else {
        return;
    };
    let start = Instant::now();
    match c.rank() {
        2 => {
            std::thread::sleep(Duration::from_millis(300));
            c.abort("rank 2 could not load its weights");
            let e = c.barrier().unwrap_err();
            assert!(matches!(e, Error::Aborted { by_rank: 2, .. }), "{e:?}");
        }
        r => {
            // Blocked on rank 2 (point-to-point for rank 0, a collective for rank 1), with a
            // 60 s timeout: the abort must end the wait long before it.
            let e = if r == 0 {
                c.recv(2).unwrap_err()
            } else {
                c.all_gather(&t(&[1.0])).unwrap_err()
            };
            assert!(
                matches!(&e, Error::Aborted { rank, by_rank: 2, reason, .. }
                    if *rank == r && reason.contains("could not load its weights")),
                "{e:?}"
            );
            assert!(e.to_string().contains("fix the error of rank 2"), "{e}");
            assert!(start.elapsed() < Duration::from_secs(10));
            // Later calls fail at once too.
            assert!(c.send(&t(&[1.0]), 2).unwrap_err().is_aborted());
        }
    }
    // Every rank then finalises MPI as usual (dropping `c` leaves the undeliverable sends).
}

#[test]
fn ranks_calling_different_collectives_get_an_error() {
    let Some((_world, c)) = ranks(
        "ranks_calling_different_collectives_get_an_error",
        2,
        Duration::from_secs(60),
    ) else {
        return;
    };
    if c.rank() == 0 {
        c.broadcast(Some(&t(&[1.0])), 0).unwrap();
        assert_eq!(vals(&c.recv(1).unwrap()), vec![9.0]);
    } else {
        let e = c.all_gather(&t(&[2.0])).unwrap_err();
        assert!(
            matches!(
                e,
                Error::CollectiveMismatch {
                    op: Op::AllGather,
                    got_op: Op::Broadcast,
                    ..
                }
            ),
            "{e:?}"
        );
        // Point-to-point traffic is a separate stream and still works.
        c.send(&t(&[9.0]), 0).unwrap();
    }
}

#[test]
fn band_groups_inside_branch_groups_interleave_with_world_collectives() {
    let Some((_world, c)) = ranks(
        "band_groups_inside_branch_groups_interleave_with_world_collectives",
        4,
        Duration::from_secs(60),
    ) else {
        return;
    };
    common::band_groups_in_branch_groups(&c).unwrap();
}
