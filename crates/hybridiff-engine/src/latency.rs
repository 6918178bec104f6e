//! A latency model for runs on several devices joined by a link (`bench --simulate-link`):
//! from each step's measured per-rank compute seconds and counted bytes and messages (the
//! trace), predicts what the run would take if the ranks were devices joined by a link of a
//! given bandwidth and per-message latency. See `docs/benchmarks/latency-model.md`.
//!
//! Per step, rank `r` computes for `c_r` seconds; what it sends costs
//! `messages x latency + bytes / bandwidth`, its messages leaving one after another on its
//! own link (links are full duplex and point to point, as NVLink or a PCIe switch; shared-bus
//! contention is not modelled). The part the schedule lets overlap compute (`o_r`: stage
//! outputs that `async` and `hybrid` send one step ahead, `patch --patch-mode displaced`
//! activations) runs alongside the compute; the rest (`k_r`: `cfg`'s exchange of the two
//! branches after both are computed, the last stage's prediction sent to every rank, `patch`'s
//! gather of the bands, every `sync` exchange) waits for it. Every step ends on every rank with
//! the same prediction (all ranks step the same latents), so a step ends when the slowest rank's
//! last message arrives:
//!
//! `step = max_r( max(c_r, o_r) + k_r )`, and the run is the sum of its steps.
//!
//! A step whose ranks computed one after another (a sequential fill or warm-up of the staged
//! strategies, marked `chain_groups` in the trace) lasts its slowest chain:
//! `step = max_g sum_{r in g} (c_r + o_r + k_r)` over the chains `g` (equal groups of
//! consecutive ranks).
//!
//! `c_r` is the rank's measured compute ([`Compute::Measured`]) or its counted FLOPs at a
//! stated throughput ([`Compute::Flops`], `bench --gpu-tflops`): the way to predict a GPU's
//! latency from a CPU run, since a GPU's time per step follows the FLOPs far more closely
//! than a CPU's does under a loaded machine.

use std::str::FromStr;

use crate::trace::{StepMode, Trace};
use crate::{Error, Result};

/// A link between devices: bandwidth and the fixed cost of each message.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Link {
    /// The name shown in tables (`pcie4`, `nvlink`, `25 GB/s`).
    pub name: String,
    /// Bytes per second in one direction.
    pub bytes_per_second: f64,
    /// Seconds each message costs besides its bytes (launch, synchronisation, protocol).
    pub seconds_per_message: f64,
}

impl Link {
    /// PCIe 3.0 x16: 15.75 GB/s per direction on paper; about 12 GB/s in measured
    /// device-to-device copies; about 10 us per message for a small send/recv.
    pub fn pcie3() -> Self {
        Self::new("pcie3", 12e9, 10e-6)
    }

    /// PCIe 4.0 x16: 31.5 GB/s per direction on paper; about 24 GB/s measured.
    pub fn pcie4() -> Self {
        Self::new("pcie4", 24e9, 10e-6)
    }

    /// NVLink 4 (H100/H200 SXM): 450 GB/s per direction on paper; 300 GB/s effective for
    /// point-to-point copies of a few MB; about 5 us per message.
    pub fn nvlink() -> Self {
        Self::new("nvlink", 300e9, 5e-6)
    }

    pub(crate) fn new(name: &str, bytes_per_second: f64, seconds_per_message: f64) -> Self {
        Self {
            name: name.to_string(),
            bytes_per_second,
            seconds_per_message,
        }
    }

    /// What `bytes` in `messages` messages cost on this link.
    pub fn seconds(&self, bytes: u64, messages: u64) -> f64 {
        messages as f64 * self.seconds_per_message + bytes as f64 / self.bytes_per_second
    }
}

impl FromStr for Link {
    type Err = Error;
    /// `pcie3`, `pcie4`, `nvlink`, or a bandwidth in GB/s (`25`), optionally with the
    /// per-message latency in microseconds (`25/10`; default 10).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pcie3" => return Ok(Self::pcie3()),
            "pcie4" => return Ok(Self::pcie4()),
            "nvlink" => return Ok(Self::nvlink()),
            _ => {}
        }
        let bad = |why: &str| {
            Error::Options(format!(
                "--simulate-link {s}: {why}; expected pcie3, pcie4, nvlink, or a bandwidth in GB/s with an optional per-message latency in microseconds (e.g. 25 or 25/10)"
            ))
        };
        let (gbps, lat) = match s.split_once('/') {
            Some((g, l)) => (g, Some(l)),
            None => (s, None),
        };
        let gbps: f64 = gbps
            .trim()
            .parse()
            .map_err(|_| bad("not a link name or a number"))?;
        if !gbps.is_finite() || gbps <= 0.0 || gbps > 1e6 {
            return Err(bad("the bandwidth must be above 0 and at most 1e6 GB/s"));
        }
        let lat_us: f64 = match lat {
            Some(l) => l
                .trim()
                .parse()
                .map_err(|_| bad("the latency is not a number"))?,
            None => 10.0,
        };
        if !lat_us.is_finite() || !(0.0..=1e6).contains(&lat_us) {
            return Err(bad("the latency must be 0 to 1e6 microseconds"));
        }
        Ok(Self::new(
            &format!("{gbps} GB/s, {lat_us} us"),
            gbps * 1e9,
            lat_us / 1e6,
        ))
    }
}

/// One rank's share of one step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RankCost {
    pub compute_seconds: f64,
    /// Counted FLOPs (0 in traces from before they were counted).
    pub flops: f64,
    /// Everything it sent in the step.
    pub bytes: u64,
    pub messages: u64,
    /// The part of `bytes` and `messages` the schedule lets overlap compute.
    pub overlapped_bytes: u64,
    pub overlapped_messages: u64,
}

/// Where a rank's compute time comes from.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum Compute {
    /// The seconds the rank measured.
    Measured,
    /// Its counted FLOPs at this many FLOP/s.
    Flops { per_second: f64 },
}

impl Compute {
    /// `r`'s compute seconds under this model.
    pub fn seconds(&self, r: &RankCost) -> f64 {
        match self {
            Compute::Measured => r.compute_seconds,
            Compute::Flops { per_second } => r.flops / per_second,
        }
    }
}

/// One step of a trace: every rank's cost, and whether they computed one after another.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepCost {
    pub ranks: Vec<RankCost>,
    /// 0: side by side; `g > 0`: `g` chains of equal consecutive rank groups.
    pub chain_groups: usize,
}

/// A step's predicted seconds on `link`: `max_r(max(c_r, o_r) + k_r)` (see the module docs).
pub fn step_seconds(ranks: &[RankCost], link: &Link) -> f64 {
    step_seconds_with(ranks, link, Compute::Measured)
}

fn step_seconds_with(ranks: &[RankCost], link: &Link, compute: Compute) -> f64 {
    ranks
        .iter()
        .map(|r| {
            let overlapped = link.seconds(r.overlapped_bytes, r.overlapped_messages);
            let critical = link.seconds(
                r.bytes.saturating_sub(r.overlapped_bytes),
                r.messages.saturating_sub(r.overlapped_messages),
            );
            compute.seconds(r).max(overlapped) + critical
        })
        .fold(0.0, f64::max)
}

/// A step's predicted seconds, chained or not (see the module docs).
pub fn step_cost_seconds(step: &StepCost, link: &Link, compute: Compute) -> f64 {
    let g = step.chain_groups;
    if g == 0 || step.ranks.is_empty() || !step.ranks.len().is_multiple_of(g) {
        return step_seconds_with(&step.ranks, link, compute);
    }
    step.ranks
        .chunks(step.ranks.len() / g)
        .map(|chain| {
            chain
                .iter()
                .map(|r| compute.seconds(r) + link.seconds(r.bytes, r.messages))
                .sum::<f64>()
        })
        .fold(0.0, f64::max)
}

/// What the model predicts for a run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Prediction {
    /// Predicted seconds of the whole run on the link.
    pub seconds: f64,
    /// The slowest rank's compute, summed over steps (the run on an infinitely fast link).
    pub compute_seconds: f64,
    /// `seconds - compute_seconds`: what the link adds.
    pub link_seconds: f64,
}

/// Predicts a run of `steps` (index = step, then rank; every step side by side) on `link`.
pub fn predict(steps: &[Vec<RankCost>], link: &Link) -> Prediction {
    let steps: Vec<StepCost> = steps
        .iter()
        .map(|r| StepCost {
            ranks: r.clone(),
            chain_groups: 0,
        })
        .collect();
    predict_with(&steps, link, Compute::Measured)
}

/// Predicts a run of `steps` on `link` with compute times from `compute`.
pub fn predict_with(steps: &[StepCost], link: &Link, compute: Compute) -> Prediction {
    let seconds: f64 = steps
        .iter()
        .map(|s| step_cost_seconds(s, link, compute))
        .sum();
    let inf = Link::new("infinite", f64::INFINITY, 0.0);
    let compute_seconds: f64 = steps
        .iter()
        .map(|s| step_cost_seconds(s, &inf, compute))
        .sum();
    Prediction {
        seconds,
        compute_seconds,
        link_seconds: seconds - compute_seconds,
    }
}

/// The per-step, per-rank costs a trace recorded.
///
/// # Errors
/// A trace without per-rank counts (written before they were recorded) or with ragged ones.
pub fn costs_of(trace: &Trace) -> Result<Vec<StepCost>> {
    trace
        .steps
        .iter()
        .map(|s| {
            let w = s.rank_compute_seconds.len();
            let n = |v: &[u64], what: &str| -> Result<()> {
                // Traces of one rank record no counts; that is no communication.
                if v.len() == w || (v.is_empty() && s.bytes_sent == 0) {
                    Ok(())
                } else {
                    Err(Error::Input(format!(
                        "trace of {}: step {} has {} compute times but {} `{what}` entries (a trace from before per-rank counts were recorded? re-run bench --trace-dir)",
                        trace.strategy,
                        s.index,
                        w,
                        v.len()
                    )))
                }
            };
            n(&s.rank_bytes_sent, "rank_bytes_sent")?;
            n(&s.rank_messages_sent, "rank_messages_sent")?;
            n(&s.rank_overlapped_bytes, "rank_overlapped_bytes")?;
            n(&s.rank_overlapped_messages, "rank_overlapped_messages")?;
            let get = |v: &[u64], r: usize| v.get(r).copied().unwrap_or(0);
            let ranks = (0..w)
                .map(|r| RankCost {
                    compute_seconds: s.rank_compute_seconds[r],
                    flops: s.rank_flops.get(r).copied().unwrap_or(0.0),
                    bytes: get(&s.rank_bytes_sent, r),
                    messages: get(&s.rank_messages_sent, r),
                    overlapped_bytes: get(&s.rank_overlapped_bytes, r),
                    overlapped_messages: get(&s.rank_overlapped_messages, r),
                })
                .collect();
            Ok(StepCost {
                ranks,
                chain_groups: s.chain_groups,
            })
        })
        .collect()
}

/// [`predict`] for a recorded run.
pub fn predict_trace(trace: &Trace, link: &Link) -> Result<Prediction> {
    predict_trace_with(trace, link, Compute::Measured)
}

/// [`predict_with`] for a recorded run.
///
/// # Errors
/// As [`costs_of`]; with [`Compute::Flops`], a trace without counted FLOPs.
pub fn predict_trace_with(trace: &Trace, link: &Link, compute: Compute) -> Result<Prediction> {
    if let Compute::Flops { .. } = compute {
        if trace.steps.iter().any(|s| s.rank_flops.is_empty()) {
            return Err(Error::Input(format!(
                "trace of {}: no counted FLOPs (`rank_flops`), so --gpu-tflops cannot time it; re-run bench --trace-dir",
                trace.strategy
            )));
        }
    }
    Ok(predict_with(&costs_of(trace)?, link, compute))
}

/// How many of a trace's steps were staged (not exact), for tables.
pub fn staged_steps(trace: &Trace) -> usize {
    trace
        .steps
        .iter()
        .filter(|s| s.mode != StepMode::Exact)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(c: f64, bytes: u64, messages: u64) -> RankCost {
        RankCost {
            compute_seconds: c,
            bytes,
            messages,
            ..Default::default()
        }
    }

    fn link(gbps: f64, lat_us: f64) -> Link {
        Link::new("test", gbps * 1e9, lat_us * 1e-6)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * b.abs().max(1.0)
    }

    #[test]
    fn a_cfg_step_waits_for_the_slower_branch_and_then_the_exchange() {
        // Two leaders exchange a 1 MB prediction after computing 1.0 s and 1.2 s.
        let step = vec![rank(1.0, 1_000_000, 1), rank(1.2, 1_000_000, 1)];
        let l = link(1.0, 100.0); // 1 GB/s: 1 ms per MB, 0.1 ms per message
        assert!(close(step_seconds(&step, &l), 1.2 + 0.001 + 0.0001));
        let p = predict(&[step.clone(), step], &l);
        assert!(close(p.seconds, 2.0 * 1.2011));
        assert!(close(p.compute_seconds, 2.4));
        assert!(close(p.link_seconds, 2.0 * 0.0011));
    }

    #[test]
    fn messages_of_one_rank_leave_one_after_another() {
        // A cfg leader with W = 4 sends its branch to the peer and both to its member.
        let l = link(1.0, 0.0);
        let step = vec![rank(1.0, 3_000_000, 3), rank(1.0, 0, 0)];
        assert!(close(step_seconds(&step, &l), 1.003));
    }

    #[test]
    fn overlapped_sends_hide_behind_compute_until_they_take_longer() {
        let l = link(1.0, 0.0);
        // A staged step: 2 MB of stage outputs sent ahead (2 ms), 1 MB broadcast after.
        let staged = |c: f64| RankCost {
            compute_seconds: c,
            bytes: 3_000_000,
            messages: 2,
            overlapped_bytes: 2_000_000,
            overlapped_messages: 1,
            ..Default::default()
        };
        assert!(close(step_seconds(&[staged(0.5)], &l), 0.5 + 0.001));
        // Compute shorter than the overlapped transfer: the transfer sets the pace.
        assert!(close(step_seconds(&[staged(0.001)], &l), 0.002 + 0.001));
        // The same bytes not overlapped (sync) add in full.
        assert!(close(
            step_seconds(&[rank(0.5, 3_000_000, 2)], &l),
            0.5 + 0.003
        ));
    }

    #[test]
    fn an_infinitely_fast_link_gives_the_slowest_rank_of_each_step() {
        let l = Link::new("inf", f64::INFINITY, 0.0);
        let steps = vec![
            vec![rank(1.0, 10, 1), rank(2.0, 10, 1)],
            vec![rank(3.0, 10, 1), rank(0.5, 10, 1)],
        ];
        let p = predict(&steps, &l);
        assert!(close(p.seconds, 5.0));
        assert!(close(p.compute_seconds, 5.0));
        assert_eq!(p.link_seconds, 0.0);
    }

    #[test]
    fn serial_is_its_compute_on_any_link() {
        let steps = vec![vec![rank(0.25, 0, 0)]; 8];
        for l in [Link::pcie3(), Link::nvlink(), link(0.001, 1e5)] {
            assert!(close(predict(&steps, &l).seconds, 2.0));
        }
    }

    #[test]
    fn named_links_and_numbers_parse_and_bad_values_name_the_flag() {
        assert_eq!("pcie3".parse::<Link>().unwrap(), Link::pcie3());
        assert_eq!("pcie4".parse::<Link>().unwrap().bytes_per_second, 24e9);
        assert_eq!("nvlink".parse::<Link>().unwrap().bytes_per_second, 300e9);
        let l: Link = "25".parse().unwrap();
        assert_eq!((l.bytes_per_second, l.seconds_per_message), (25e9, 10e-6));
        let l: Link = "50/2.5".parse().unwrap();
        assert_eq!((l.bytes_per_second, l.seconds_per_message), (50e9, 2.5e-6));
        for bad in ["pcie5", "0", "-3", "nan", "inf", "25/x", "25/-1", ""] {
            let e = bad.parse::<Link>().unwrap_err().to_string();
            assert!(e.starts_with(&format!("--simulate-link {bad}:")), "{e}");
        }
    }

    #[test]
    fn a_chained_step_sums_its_ranks_and_flops_give_compute_at_the_stated_rate() {
        let l = link(1.0, 0.0);
        let r = |c: f64, flops: f64| RankCost {
            compute_seconds: c,
            flops,
            bytes: 1_000_000,
            messages: 1,
            ..Default::default()
        };
        let step = StepCost {
            ranks: vec![r(1.0, 4e12), r(2.0, 2e12), r(0.5, 1e12), r(0.25, 1e12)],
            chain_groups: 2,
        };
        // Two chains: (1.0 + 0.001) + (2.0 + 0.001) against (0.5 + 0.001) + (0.25 + 0.001).
        let got = step_cost_seconds(&step, &l, Compute::Measured);
        assert!(close(got, 3.002), "{got}");
        // At 1e12 FLOP/s the chains take 4 + 2 and 1 + 1 seconds of compute.
        let got = step_cost_seconds(&step, &l, Compute::Flops { per_second: 1e12 });
        assert!(close(got, 6.002), "{got}");
        // Side by side, the slowest rank sets the pace.
        let side = StepCost {
            chain_groups: 0,
            ..step
        };
        assert!(close(
            step_cost_seconds(&side, &l, Compute::Measured),
            2.001
        ));
    }

    #[test]
    fn a_slower_link_never_predicts_less() {
        let steps = vec![vec![rank(0.1, 5_000_000, 4), rank(0.12, 2_000_000, 1)]; 5];
        let a = predict(&steps, &Link::nvlink()).seconds;
        let b = predict(&steps, &Link::pcie4()).seconds;
        let c = predict(&steps, &Link::pcie3()).seconds;
        assert!(a < b && b < c, "{a} {b} {c}");
    }
}
