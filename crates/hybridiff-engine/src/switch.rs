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

    /// Rejects parameters that cannot fit `steps` steps, before any compute.
    pub fn check(&self, steps: usize) -> Result<()> {
        if self.l_slope == 0 {
            return Err(Error::Options("--l-slope must be at least 1".into()));
        }
        if self.k == 0 {
            return Err(Error::Options("--k must be at least 1".into()));
        }
        if self.tau_cap == 0 {
            return Err(Error::Options("--tau-cap must be at least 1".into()));
        }
        if self.tau_cap + self.k > steps {
            return Err(Error::Options(format!(
                "--tau-cap {} + --k {} = {} exceeds --steps {steps}: the fallback switch would run past the last step; lower --tau-cap or --k",
                self.tau_cap,
                self.k,
                self.tau_cap + self.k
            )));
        }
        Ok(())
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
        assert!(params(12, 0.4e-3, 5, 15).check(20).is_ok());
    }
}
