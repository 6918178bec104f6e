//! Hybridiff's adaptive parallelism switching: when the branches' rel-MAE curve
//! flattens (`tau1`), run `k` pipelined steps, then exact again after `tau2`. The
//! rules follow the authors' code exactly (see `shared/docs/hybridiff-method.md`).

use serde::Serialize;

use crate::{Error, Result};

/// The switching parameters (`--l-slope`, `--eps-slope`, `--k`, `--tau-cap`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SwitchParams {
    /// Window `L` of the slope.
    pub l_slope: usize,
    /// The slope below which the curve counts as flat.
    pub eps_slope: f64,
    /// Pipelined steps after `tau1`.
    pub k: usize,
    /// Fallback `tau1` when no flattening is detected before it.
    pub tau_cap: usize,
}

impl SwitchParams {
    /// The paper's SDXL defaults.
    pub const SDXL: SwitchParams = SwitchParams {
        l_slope: 12,
        eps_slope: 0.4e-3,
        k: 5,
        tau_cap: 15,
    };

    /// The step count the [`SDXL`](Self::SDXL) values were tuned for (the paper's 50 steps).
    pub const SDXL_STEPS: usize = 50;

    /// These thresholds, tuned for `from` steps, carried to a run of `to` steps: the window
    /// `L`, `k` and `tau_cap` in proportion (at least 1 each), `eps_slope` inversely (the
    /// rel-MAE curve falls by as much over fewer steps, so by more per step).
    pub fn scaled(&self, from: usize, to: usize) -> SwitchParams {
        if from == to || from == 0 || to == 0 {
            return *self;
        }
        let r = to as f64 / from as f64;
        let scale = |v: usize| ((v as f64 * r).round() as usize).max(1);
        SwitchParams {
            l_slope: scale(self.l_slope),
            eps_slope: self.eps_slope / r,
            k: scale(self.k),
            tau_cap: scale(self.tau_cap),
        }
    }

    /// Rejects parameters that cannot fit `steps` steps, before any compute, saying which
    /// flag to change and to what.
    pub fn check(&self, steps: usize) -> Result<()> {
        if self.l_slope < 2 {
            return Err(Error::Options(format!(
                "--l-slope {}: expected 2 or more (the slope over a window of 1 is always 0, so the first step would count as flat)",
                self.l_slope
            )));
        }
        if !self.eps_slope.is_finite() || self.eps_slope < 0.0 {
            return Err(Error::Options(format!(
                "--eps-slope {}: expected a finite number >= 0 (the rel-MAE slope below which the curve counts as flat)",
                self.eps_slope
            )));
        }
        if self.k == 0 {
            return Err(Error::Options("--k must be at least 1".into()));
        }
        if self.tau_cap == 0 {
            return Err(Error::Options("--tau-cap must be at least 1".into()));
        }
        if steps < 2 {
            return Err(Error::refused(
                crate::Field::Steps,
                format!(
                    "--steps {steps}: hybrid needs at least 2 steps (one exact step, then one pipelined); for a 1-step run use --strategy cfg (exact, the same speed)"
                ),
                format!(
                    "`num_inference_steps` {steps}: this service's strategy (hybrid) needs at least 2 steps with guidance_scale above 1 (one exact step, then one pipelined)"
                ),
            ));
        }
        if self.tau_cap + self.k > steps {
            // Only changes that fit: no "smaller --k" at --k 1, no --tau-cap below 1.
            let (k, cap) = (self.k, self.tau_cap);
            let mut fixes = Vec::new();
            if k < steps {
                fixes.push(format!(
                    "use --tau-cap {} or lower (with --k {k})",
                    steps - k
                ));
                if k > 1 && cap < steps {
                    fixes.push(format!(
                        "--k {} or lower (with --tau-cap {cap})",
                        steps - cap
                    ));
                }
            } else {
                fixes.push(format!("use --k {} or lower and --tau-cap 1", steps - 1));
            }
            fixes.push(format!("--steps {} or more", cap + k));
            let fix = fixes.join(", or ");
            let need = self.tau_cap + self.k;
            return Err(Error::refused(
                crate::Field::Steps,
                format!(
                    "--tau-cap {} + --k {} = {need} exceeds --steps {steps}: the fallback switch would run past the last step; {fix}",
                    self.tau_cap, self.k
                ),
                format!(
                    "`num_inference_steps` {steps}: this service's hybrid switching thresholds (tau_cap {} + k {} = {need}) need at least {need} steps with guidance_scale above 1",
                    self.tau_cap, self.k
                ),
            ));
        }
        Ok(())
    }
}

/// Switching parameters that may each be unset (flags, a model's `hybridiff.json`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PartialSwitch {
    pub l_slope: Option<usize>,
    pub eps_slope: Option<f64>,
    pub k: Option<usize>,
    pub tau_cap: Option<usize>,
}

impl PartialSwitch {
    /// Rejects values outside their domain, whatever the strategy, naming the flag or,
    /// when they come from a file (a model's `hybridiff.json`), the file and key.
    pub fn check_domains(&self, file: Option<&std::path::Path>) -> Result<()> {
        let bad = |flag: &str, v: String, expected: &str| {
            let name = match file {
                None => format!("--{flag} {v}"),
                Some(f) => format!("{}: `{}` = {v}", f.display(), flag.replace('-', "_")),
            };
            Err(Error::Options(format!("{name}: expected {expected}")))
        };
        if let Some(l) = self.l_slope {
            if l < 2 {
                return bad(
                    "l-slope",
                    l.to_string(),
                    "2 or more (the slope over a window of 1 is always 0, so the first step would count as flat)",
                );
            }
        }
        if let Some(e) = self.eps_slope {
            if !e.is_finite() || e < 0.0 {
                return bad(
                    "eps-slope",
                    e.to_string(),
                    "a finite number >= 0 (the rel-MAE slope below which the curve counts as flat)",
                );
            }
        }
        if self.k == Some(0) {
            return bad("k", "0".into(), "1 or more pipelined steps");
        }
        if self.tau_cap == Some(0) {
            return bad(
                "tau-cap",
                "0".into(),
                "1 or more (the step at which to switch when no flattening is seen)",
            );
        }
        Ok(())
    }
}

/// The switching parameters of a run, which of them were derived rather than given as
/// flags, and a line saying which values were used and where they came from.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedSwitch {
    pub params: SwitchParams,
    /// The flags that were not given (derived from a recommendation or the paper).
    pub derived: Vec<&'static str>,
    pub note: String,
}

impl ResolvedSwitch {
    /// [`SwitchParams::check`], saying which of the values were derived, not flags.
    pub fn check(&self, steps: usize) -> Result<()> {
        let derived = || {
            format!(
                " (not given as flags but derived for {steps} steps: {})",
                self.derived.join(", ")
            )
        };
        self.params.check(steps).map_err(|e| match e {
            Error::Options(m) if !self.derived.is_empty() => {
                Error::Options(format!("{m}{}", derived()))
            }
            Error::Refused(mut r) if !self.derived.is_empty() => {
                r.flags.push_str(&derived());
                Error::Refused(r)
            }
            e => e,
        })
    }
}

/// The smallest derived window: over a window of 1 the slope is always 0.
const MIN_DERIVED_L: usize = 2;

/// Picks each switching parameter for a run of `steps` steps: the user's flag as given;
/// else the model's recommendation (tuned for `recommended_steps`, or for `steps` when the
/// model says nothing) scaled to `steps`; else the paper's SDXL values (tuned for 50 steps)
/// scaled to `steps` (see [`SwitchParams::scaled`]). Derived values are then fitted around
/// the flags: `L >= 2`, `k >= 2` where `steps >= 3` (so that at least one step after the
/// fill step is pipelined), and `tau_cap + k <= steps`, which makes few-step schedules (4
/// to 8 steps) work without flags. Flags are never changed: [`ResolvedSwitch::check`]
/// reports those that cannot fit.
pub fn resolve(
    flags: PartialSwitch,
    recommended: PartialSwitch,
    recommended_steps: Option<usize>,
    steps: usize,
) -> ResolvedSwitch {
    let paper = SwitchParams::SDXL.scaled(SwitchParams::SDXL_STEPS, steps);
    let ratio = steps as f64 / recommended_steps.unwrap_or(steps).max(1) as f64;
    let rec = |v: Option<usize>| v.map(|v| ((v as f64 * ratio).round() as usize).max(1));
    let rec_eps = recommended.eps_slope.map(|e| e / ratio);
    let mut p = SwitchParams {
        l_slope: flags
            .l_slope
            .or(rec(recommended.l_slope))
            .unwrap_or(paper.l_slope),
        eps_slope: flags.eps_slope.or(rec_eps).unwrap_or(paper.eps_slope),
        k: flags.k.or(rec(recommended.k)).unwrap_or(paper.k),
        tau_cap: flags
            .tau_cap
            .or(rec(recommended.tau_cap))
            .unwrap_or(paper.tau_cap),
    };
    if flags.l_slope.is_none() {
        p.l_slope = p.l_slope.max(MIN_DERIVED_L);
    }
    if flags.k.is_none() {
        let room = match flags.tau_cap {
            Some(cap) => steps.saturating_sub(cap),
            None => steps.saturating_sub(1),
        };
        let min_k = if steps >= 3 { 2 } else { 1 };
        p.k = p.k.max(min_k).min(room).max(1);
    }
    if flags.tau_cap.is_none() {
        p.tau_cap = p.tau_cap.min(steps.saturating_sub(p.k)).max(1);
    }
    let mut derived = Vec::new();
    for (name, given) in [
        ("--l-slope", flags.l_slope.is_some()),
        ("--eps-slope", flags.eps_slope.is_some()),
        ("--k", flags.k.is_some()),
        ("--tau-cap", flags.tau_cap.is_some()),
    ] {
        if !given {
            derived.push(name);
        }
    }
    let source = if recommended == PartialSwitch::default() {
        format!(
            "the paper's SDXL values for {} steps",
            SwitchParams::SDXL_STEPS
        )
    } else {
        let rec_steps = recommended_steps.map_or(String::new(), |n| format!(" for {n} steps"));
        format!(
            "the model's hybridiff.json{rec_steps} where it sets them, else the paper's SDXL values for {} steps",
            SwitchParams::SDXL_STEPS
        )
    };
    let mut note = format!(
        "hybrid thresholds for {steps} steps: --l-slope {} --eps-slope {:.3e} --k {} --tau-cap {}",
        p.l_slope, p.eps_slope, p.k, p.tau_cap
    );
    if !derived.is_empty() {
        note += &format!(
            " ({} from {source}, scaled to {steps} steps and fitted around the flags)",
            derived.join(", ")
        );
    }
    if p.l_slope >= p.tau_cap {
        note += &format!(
            "; with L {} >= tau_cap {} the flattening test cannot fire before the fallback switch at tau_cap",
            p.l_slope, p.tau_cap
        );
    }
    ResolvedSwitch {
        params: p,
        derived,
        note,
    }
}

/// The phase of a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Exact,
    Pipelined,
}

/// The switching state, identical on every rank (it only sees values all ranks share).
#[derive(Debug, Clone)]
pub struct Switcher {
    pub params: SwitchParams,
    pub log: Vec<f64>,
    pub tau1: Option<usize>,
    pub tau2: Option<usize>,
    /// The step at whose end `tau1` became known.
    decided_at: Option<usize>,
}

impl Switcher {
    pub fn new(params: SwitchParams) -> Self {
        Self {
            params,
            log: Vec::new(),
            tau1: None,
            tau2: None,
            decided_at: None,
        }
    }

    /// The step at whose end `tau1` became known (`None` while it is unknown).
    pub fn decided_at(&self) -> Option<usize> {
        self.decided_at
    }

    /// The phase of step `i`, given what is known before it runs.
    pub fn phase(&self, i: usize) -> Phase {
        match (self.tau1, self.tau2, self.decided_at) {
            (Some(t1), Some(t2), Some(d)) if i >= t1 && i <= t2 && i > d => Phase::Pipelined,
            _ => Phase::Exact,
        }
    }

    /// Records step `i`'s rel-MAE (0 for pipelined steps) and, while `tau1` is unknown,
    /// looks for the flattening. Returns the slope when one was computed.
    pub fn record(&mut self, i: usize, rel_mae: f64) -> Option<f64> {
        self.log.push(rel_mae);
        if self.tau1.is_some() {
            return None;
        }
        let p = self.params;
        let n = self.log.len();
        let mut slope = None;
        if n > p.l_slope {
            let s = (self.log[n - p.l_slope] - self.log[n - 1]) / p.l_slope as f64;
            slope = Some(s);
            if (0.0..p.eps_slope).contains(&s) {
                self.tau1 = Some(i);
            }
        }
        if self.tau1.is_none() && i + 1 >= p.tau_cap {
            self.tau1 = Some(p.tau_cap);
        }
        if let Some(t1) = self.tau1 {
            self.tau2 = Some(t1 + p.k);
            self.decided_at = Some(i);
        }
        slope
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(l: usize, eps: f64, k: usize, cap: usize) -> SwitchParams {
        SwitchParams {
            l_slope: l,
            eps_slope: eps,
            k,
            tau_cap: cap,
        }
    }

    #[test]
    fn detection_gives_k_pipelined_steps_after_tau1() {
        let mut s = Switcher::new(params(3, 0.05, 4, 10));
        let curve = [0.098, 0.073, 0.050, 0.034];
        for (i, m) in curve.iter().enumerate() {
            assert_eq!(s.phase(i), Phase::Exact);
            s.record(i, *m);
        }
        assert_eq!((s.tau1, s.tau2), (Some(3), Some(7)));
        let phases: Vec<Phase> = (4..10).map(|i| s.phase(i)).collect();
        assert_eq!(
            phases,
            [
                Phase::Pipelined,
                Phase::Pipelined,
                Phase::Pipelined,
                Phase::Pipelined,
                Phase::Exact,
                Phase::Exact
            ]
        );
    }

    #[test]
    fn fallback_gives_k_plus_one_pipelined_steps_from_tau_cap() {
        let mut s = Switcher::new(params(3, 1e-9, 2, 5));
        for i in 0..5 {
            assert_eq!(s.phase(i), Phase::Exact);
            s.record(i, 1.0 - 0.1 * i as f64);
        }
        assert_eq!((s.tau1, s.tau2), (Some(5), Some(7)));
        let pipelined: Vec<usize> = (0..12)
            .filter(|&i| s.phase(i) == Phase::Pipelined)
            .collect();
        assert_eq!(pipelined, [5, 6, 7]);
    }

    #[test]
    fn rising_curve_is_not_flat() {
        let mut s = Switcher::new(params(2, 0.5, 1, 100));
        for i in 0..10 {
            s.record(i, i as f64 * 0.01);
        }
        assert_eq!(s.tau1, None);
    }

    #[test]
    fn parameters_that_overrun_the_steps_are_rejected() {
        let err = params(12, 0.4e-3, 5, 15).check(18).unwrap_err().to_string();
        assert!(
            err.contains("--tau-cap 15") && err.contains("--steps 18"),
            "{err}"
        );
        assert!(err.contains("use --tau-cap 13 or lower"), "{err}");
        assert!(params(12, 0.4e-3, 5, 15).check(20).is_ok());
        let err = params(2, 0.1, 6, 1).check(4).unwrap_err().to_string();
        assert!(err.contains("use --k 3 or lower"), "{err}");
        // At --k 1 a smaller --k is no fix.
        let err = params(2, 0.1, 1, 8).check(8).unwrap_err().to_string();
        assert!(
            err.contains("use --tau-cap 7 or lower (with --k 1)")
                && err.contains("--steps 9 or more")
                && !err.contains("--k 0"),
            "{err}"
        );
        let err = params(2, 0.1, 3, 6).check(8).unwrap_err().to_string();
        assert!(
            err.contains("use --tau-cap 5 or lower") && err.contains("--k 2 or lower"),
            "{err}"
        );
        let err = params(2, 0.1, 1, 1).check(1).unwrap_err().to_string();
        assert!(err.contains("--strategy cfg"), "{err}");
        for eps in [f64::NAN, f64::INFINITY, -1.0] {
            let err = params(2, eps, 1, 2).check(10).unwrap_err().to_string();
            assert!(err.contains("--eps-slope"), "{err}");
        }
    }

    #[test]
    fn unset_thresholds_are_scaled_to_few_step_runs_and_fit() {
        let none = PartialSwitch::default();
        for steps in 2..=60 {
            let r = resolve(none, none, None, steps);
            r.check(steps).unwrap();
            assert!(r.params.l_slope >= 2, "{steps}: {:?}", r.params);
            assert!(r.params.k >= 2 || steps < 3, "{steps}: {:?}", r.params);
            assert_eq!(r.derived.len(), 4);
        }
        // The paper's values at their own step count are unchanged.
        assert_eq!(resolve(none, none, None, 50).params, SwitchParams::SDXL);
        let p = resolve(none, none, None, 8).params;
        assert_eq!((p.l_slope, p.k, p.tau_cap), (2, 2, 2));
        assert!((p.eps_slope - 0.4e-3 * 50.0 / 8.0).abs() < 1e-12);
        // A model's recommendation for 20 steps, used at 20 and scaled to 4.
        let rec = PartialSwitch {
            l_slope: Some(4),
            eps_slope: Some(2e-3),
            k: Some(5),
            tau_cap: Some(15),
        };
        let p20 = resolve(none, rec, Some(20), 20).params;
        assert_eq!(p20, params(4, 2e-3, 5, 15));
        let p4 = resolve(none, rec, Some(20), 4).params;
        assert_eq!((p4.l_slope, p4.k, p4.tau_cap), (2, 2, 2));
        p4.check(4).unwrap();
        // Derived values fit around the flags that were given.
        let cap7 = PartialSwitch {
            tau_cap: Some(7),
            ..none
        };
        let r = resolve(cap7, rec, Some(20), 8);
        assert_eq!((r.params.k, r.params.tau_cap), (1, 7));
        r.check(8).unwrap();
        let k5 = PartialSwitch { k: Some(5), ..none };
        let err = resolve(k5, none, None, 4).check(4).unwrap_err().to_string();
        assert!(
            err.contains("use --k 3 or lower")
                && err.contains("derived for 4 steps: --l-slope, --eps-slope, --tau-cap"),
            "{err}"
        );
    }

    #[test]
    fn flags_are_kept_as_given_even_when_they_cannot_fit() {
        let flags = PartialSwitch {
            l_slope: None,
            eps_slope: None,
            k: Some(5),
            tau_cap: Some(15),
        };
        let r = resolve(flags, PartialSwitch::default(), None, 8);
        assert_eq!((r.params.k, r.params.tau_cap), (5, 15));
        assert!(r.params.check(8).is_err());
        let all = PartialSwitch {
            l_slope: Some(3),
            eps_slope: Some(0.05),
            k: Some(4),
            tau_cap: Some(10),
        };
        let r = resolve(all, PartialSwitch::default(), None, 20);
        assert_eq!(r.params, params(3, 0.05, 4, 10));
        assert!(r.derived.is_empty());
        assert!(!r.note.contains(" from "), "{}", r.note);
    }

    #[test]
    fn domains_are_checked_naming_the_source() {
        let ok = PartialSwitch {
            l_slope: Some(2),
            eps_slope: Some(0.0),
            k: Some(1),
            tau_cap: Some(1),
        };
        ok.check_domains(None).unwrap();
        for (bad, needle) in [
            (
                PartialSwitch {
                    l_slope: Some(1),
                    ..ok
                },
                "--l-slope 1",
            ),
            (
                PartialSwitch {
                    eps_slope: Some(f64::NAN),
                    ..ok
                },
                "--eps-slope NaN",
            ),
            (
                PartialSwitch {
                    eps_slope: Some(-1.0),
                    ..ok
                },
                "--eps-slope -1",
            ),
            (PartialSwitch { k: Some(0), ..ok }, "--k 0"),
            (
                PartialSwitch {
                    tau_cap: Some(0),
                    ..ok
                },
                "--tau-cap 0",
            ),
        ] {
            let err = bad.check_domains(None).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        }
        let err = PartialSwitch { k: Some(0), ..ok }
            .check_domains(Some(std::path::Path::new("m/hybridiff.json")))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("m/hybridiff.json: `k` = 0"), "{err}");
    }
}
