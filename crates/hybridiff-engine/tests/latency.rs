//! The traces' per-rank counts that the latency model reads, on real runs of the tiny SDXL,
//! and the model over them.

mod common;

use common::{run, setup};
use hybridiff_engine::latency::{costs_of, predict_trace, Link};
use hybridiff_engine::stages::PlanKind;
use hybridiff_engine::switch::SwitchParams;
use hybridiff_engine::trace::StepMode;
use hybridiff_engine::{StrategyKind, StrategyOptions, Trace};

fn options() -> StrategyOptions {
    StrategyOptions {
        switch: SwitchParams {
            l_slope: 3,
            eps_slope: 0.05,
            k: 4,
            tau_cap: 10,
        },
        stages: PlanKind::Auto,
        ..Default::default()
    }
}

fn trace(kind: StrategyKind, world: usize) -> Trace {
    run(&setup(), kind, world, &options()).unwrap().trace
}

/// Per-rank bytes add up to the step's, and the overlapped part is within what was sent.
fn check_counts(t: &Trace) {
    for s in &t.steps {
        let w = t.world_size;
        assert_eq!(s.rank_bytes_sent.len(), w, "step {}", s.index);
        assert_eq!(s.rank_messages_sent.len(), w);
        assert_eq!(s.rank_bytes_sent.iter().sum::<u64>(), s.bytes_sent);
        for r in 0..w {
            assert!(s.rank_overlapped_bytes[r] <= s.rank_bytes_sent[r]);
            assert!(s.rank_overlapped_messages[r] <= s.rank_messages_sent[r]);
            // A message carries bytes, and bytes travel in messages.
            assert_eq!(s.rank_bytes_sent[r] == 0, s.rank_messages_sent[r] == 0);
        }
    }
    assert_eq!(t.rank_devices, vec!["cpu"; t.world_size]);
    assert_eq!(t.transfer, "host");
}

#[test]
fn cfg_sends_one_critical_message_per_leader_per_step() {
    let t = trace(StrategyKind::Cfg, 2);
    check_counts(&t);
    for s in &t.steps {
        assert_eq!(s.rank_messages_sent, vec![1, 1]);
        assert_eq!(s.rank_overlapped_bytes, vec![0, 0], "cfg overlaps nothing");
        // The prediction of one branch: [1, 4, h, w] f32.
        assert_eq!(s.rank_bytes_sent[0], s.rank_bytes_sent[1]);
    }
}

#[test]
fn staged_steps_overlap_the_stage_outputs_and_wait_for_the_prediction() {
    for kind in [StrategyKind::Async, StrategyKind::Hybrid] {
        let t = trace(kind, 2);
        check_counts(&t);
        let mut pipelined = 0;
        for s in &t.steps {
            match s.mode {
                StepMode::Pipelined => {
                    pipelined += 1;
                    // Stage outputs of the last step go one way or both; the last stage
                    // (rank 1) also sends the prediction, which is waited for.
                    let overlapped: u64 = s.rank_overlapped_bytes.iter().sum();
                    assert!(overlapped > 0, "{kind}: step {}", s.index);
                    assert!(
                        s.rank_bytes_sent[1] > s.rank_overlapped_bytes[1],
                        "{kind}: step {}: the prediction is critical",
                        s.index
                    );
                }
                _ => assert_eq!(s.rank_overlapped_bytes, vec![0, 0]),
            }
        }
        assert!(pipelined > 0, "{kind} ran no pipelined step");
    }
}

#[test]
fn serial_predicts_its_compute_and_a_fast_link_the_slowest_rank() {
    let serial = trace(StrategyKind::Serial, 1);
    let compute: f64 = serial.steps.iter().map(|s| s.rank_compute_seconds[0]).sum();
    let p = predict_trace(&serial, &Link::pcie3()).unwrap();
    assert!((p.seconds - compute).abs() < 1e-12);
    let inf = Link {
        name: "inf".into(),
        bytes_per_second: f64::INFINITY,
        seconds_per_message: 0.0,
    };
    let t = trace(StrategyKind::Hybrid, 2);
    let slowest: f64 = t
        .steps
        .iter()
        .map(|s| s.rank_compute_seconds.iter().cloned().fold(0.0, f64::max))
        .sum();
    assert!((predict_trace(&t, &inf).unwrap().seconds - slowest).abs() < 1e-12);
    assert!(predict_trace(&t, &Link::pcie3()).unwrap().seconds > slowest);
}

#[test]
fn traces_round_trip_through_json_and_old_ones_are_refused_by_name() {
    let t = trace(StrategyKind::Cfg, 2);
    let json = serde_json::to_string(&t).unwrap();
    let back: Trace = serde_json::from_str(&json).unwrap();
    assert_eq!(costs_of(&back).unwrap(), costs_of(&t).unwrap());
    // A trace written before the per-rank counts existed.
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    for s in v["steps"].as_array_mut().unwrap() {
        s.as_object_mut().unwrap().remove("rank_bytes_sent");
    }
    let old: Trace = serde_json::from_value(v).unwrap();
    let e = costs_of(&old).unwrap_err().to_string();
    assert!(e.contains("rank_bytes_sent") && e.contains("cfg"), "{e}");
}
