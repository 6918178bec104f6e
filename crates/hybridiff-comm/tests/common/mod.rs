//! Scenarios shared by the in-process and MPI tests, so both transports are held to the same
//! promises by the same code.
#![allow(dead_code)]

use anyhow::{ensure, Result};
use candle_core::{Device, Tensor};
use hybridiff_comm::{Communicator, Group};

pub fn t(vals: &[f32]) -> Tensor {
    Tensor::new(vals, &Device::Cpu).unwrap()
}

pub fn vals(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// A band of `rows` rows tagged with its rank and iteration, `[rows, 3]`.
fn band(rank: usize, i: usize, rows: usize) -> Tensor {
    Tensor::full((rank * 100 + i) as f32, (rows, 3), &Device::Cpu).unwrap()
}

/// Four ranks as two branch groups {0, 1} and {2, 3} (a band group each), interleaving
/// band-group collectives (all-gathers of bands of unequal heights, a broadcast from the
/// group's second member), a group across the branch groups ({1, 2}) and whole-world
/// collectives, 20 times; then checks every value and the bytes this rank counted.
pub fn band_groups_in_branch_groups(c: &dyn Communicator) -> Result<()> {
    ensure!(c.world_size() == 4, "needs 4 ranks");
    let me = c.rank();
    let mine = if me < 2 {
        Group::span(0, 2)
    } else {
        Group::span(2, 2)
    };
    let across = Group::new([2, 1]);
    let mut bytes = 0u64;
    for i in 0..20 {
        // Unequal band heights: rank r holds r + 1 rows.
        let all = c.all_gather_in(&mine, &band(me, i, me + 1))?;
        bytes += 4 * 3 * (me as u64 + 1);
        ensure!(all.len() == 2);
        for (slot, (got, &r)) in all.iter().zip(mine.ranks()).enumerate() {
            ensure!(
                got.dims() == [r + 1, 3],
                "iter {i} slot {slot}: {:?}",
                got.dims()
            );
            ensure!(vals(got).iter().all(|&v| v == (r * 100 + i) as f32));
        }
        let root = mine.ranks()[1];
        let b = c.broadcast_in(
            &mine,
            (me == root).then(|| t(&[i as f32, me as f32])).as_ref(),
            root,
        )?;
        if me == root {
            bytes += 8;
        }
        ensure!(
            vals(&b) == [i as f32, root as f32],
            "iter {i}: {:?}",
            vals(&b)
        );
        if across.contains(me) {
            let g = c.all_gather_in(&across, &t(&[me as f32]))?;
            bytes += 4;
            ensure!(g.iter().map(vals).collect::<Vec<_>>() == [vec![1.0], vec![2.0]]);
            c.barrier_in(&across)?;
        }
        let w = c.all_gather(&t(&[i as f32, me as f32]))?;
        bytes += 8 * 3;
        for (r, got) in w.iter().enumerate() {
            ensure!(vals(got) == [i as f32, r as f32]);
        }
        c.barrier()?;
    }
    ensure!(
        c.bytes_sent() == bytes,
        "rank {me} counted {} bytes, expected {bytes}",
        c.bytes_sent()
    );
    Ok(())
}
