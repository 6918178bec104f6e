//! Reading diffusers' `scheduler_config.json`.
//!
//! The file is kept as a JSON object and each scheduler reads the keys it
//! knows, with its own diffusers defaults, when it is built. That mirrors
//! diffusers' `from_config`, where a key means something only to the classes
//! whose `__init__` takes it (running Euler with a DDIM config ignores DDIM's
//! `clip_sample`).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::{Error, Result, SchedulerKind};

/// Largest scheduler config read, in bytes.
const MAX_CONFIG_BYTES: u64 = 16 << 20;

/// Most training timesteps: the schedule tables hold one f32 per timestep (diffusers'
/// configs say 1000).
pub const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

/// What a scheduler config says its model was trained for ([`SchedulerConfig::objective`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Objective {
    pub family: crate::Family,
    /// The prediction in words: `epsilon prediction`, `v-prediction`, `velocity (flow matching)`.
    pub prediction: String,
    /// The keys that say so, as `DDIMScheduler, prediction_type epsilon`.
    pub keys: String,
}

/// A parsed diffusers `scheduler_config.json`; keeps its path for error messages.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    path: PathBuf,
    values: Map<String, Value>,
}

impl SchedulerConfig {
    /// Reads and parses `path`. Keys are only checked when a scheduler is built.
    pub fn from_file(path: &Path) -> Result<Self> {
        // A FIFO or device would block or never end; a real config is a few hundred bytes
        // (a `trained_betas` list of 1000 values a few KiB).
        let meta = std::fs::metadata(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_file() || meta.len() > MAX_CONFIG_BYTES {
            return Err(Error::Io {
                path: path.to_path_buf(),
                source: std::io::Error::other(if meta.is_file() {
                    format!("larger than {MAX_CONFIG_BYTES} bytes; not a scheduler config")
                } else {
                    "not a regular file".to_string()
                }),
            });
        }
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        Self::from_json_str(text, path)
    }

    /// Parses config text; `path` is only used to name the source in errors.
    pub fn from_json_str(text: &str, path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        // Python's json module writes non-finite floats (e.g. DPM-Solver's
        // `lambda_min_clipped: -inf`) as bare tokens that strict JSON rejects.
        let text = quote_non_finite(text);
        let value: Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: path.clone(),
            source,
        })?;
        match value {
            Value::Object(values) => Ok(Self { path, values }),
            other => Err(Error::InvalidValue {
                path,
                key: "<root>".into(),
                value: short(&other),
                expected: "a JSON object",
            }),
        }
    }

    /// The file this config was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The value under `key`, if present (e.g. `prediction_type`).
    pub fn value(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// The diffusers class named by `_class_name`, if any.
    pub fn class_name(&self) -> Option<&str> {
        self.values.get("_class_name").and_then(Value::as_str)
    }

    /// The training objective this config declares, with the keys that say so, or `None`
    /// when it says nothing (no `_class_name` and no `prediction_type`): diffusers'
    /// flow-matching classes (`FlowMatch*`), `prediction_type: flow_prediction` or
    /// `use_flow_sigmas: true` mean flow matching; any other scheduler class, or an
    /// `epsilon`, `v_prediction` or `sample` prediction, means diffusion.
    pub fn objective(&self) -> Option<Objective> {
        let class = self.class_name();
        let prediction = self.values.get("prediction_type").and_then(Value::as_str);
        let flow_sigmas = self.values.get("use_flow_sigmas").and_then(Value::as_bool) == Some(true);
        let mut keys = Vec::new();
        if let Some(c) = class {
            keys.push(c.to_string());
        }
        if let Some(p) = prediction {
            keys.push(format!("prediction_type {p}"));
        }
        if flow_sigmas {
            keys.push("use_flow_sigmas true".into());
        }
        let family = if class.is_some_and(|c| c.starts_with("FlowMatch"))
            || prediction == Some("flow_prediction")
            || flow_sigmas
        {
            crate::Family::FlowMatching
        } else if class.is_some_and(|c| c.ends_with("Scheduler")) || prediction.is_some() {
            crate::Family::Diffusion
        } else {
            return None;
        };
        Some(Objective {
            family,
            prediction: match family {
                crate::Family::FlowMatching => "velocity (flow matching)".into(),
                crate::Family::Diffusion => match prediction.unwrap_or("epsilon") {
                    "v_prediction" => "v-prediction".into(),
                    p => format!("{p} prediction"),
                },
            },
            keys: keys.join(", "),
        })
    }

    /// The scheduler kind that `_class_name` names.
    pub fn default_kind(&self) -> Result<SchedulerKind> {
        let key = "_class_name";
        match self.values.get(key) {
            None | Some(Value::Null) => Err(Error::InvalidValue {
                path: self.path.clone(),
                key: key.into(),
                value: "absent".into(),
                expected: "a scheduler class name",
            }),
            Some(Value::String(s)) => match s.as_str() {
                "DDIMScheduler" => Ok(SchedulerKind::Ddim),
                "EulerDiscreteScheduler" => Ok(SchedulerKind::Euler),
                "DPMSolverMultistepScheduler" => Ok(SchedulerKind::DpmPp2M),
                "FlowMatchEulerDiscreteScheduler" => Ok(SchedulerKind::FlowEuler),
                _ => Err(self.unsupported(
                    key,
                    "implemented: DDIMScheduler, EulerDiscreteScheduler, \
                     DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler; \
                     name a kind explicitly to run one of those from this config",
                )),
            },
            Some(other) => Err(self.invalid(key, other, "a string")),
        }
    }

    /// An error saying that the value present under `key` is not implemented.
    pub(crate) fn unsupported(&self, key: &str, reason: &str) -> Error {
        let value = self
            .values
            .get(key)
            .map(short)
            .unwrap_or_else(|| "absent".into());
        self.unsupported_value(key, value, reason)
    }

    /// Like [`Self::unsupported`] for a value implied by a default.
    pub(crate) fn unsupported_value(&self, key: &str, value: String, reason: &str) -> Error {
        Error::Unsupported {
            path: self.path.clone(),
            key: key.into(),
            value,
            reason: reason.into(),
        }
    }

    fn invalid(&self, key: &str, value: &Value, expected: &'static str) -> Error {
        Error::InvalidValue {
            path: self.path.clone(),
            key: key.into(),
            value: short(value),
            expected,
        }
    }

    /// The value under `key`, treating JSON `null` like an absent key.
    fn present(&self, key: &str) -> Option<&Value> {
        self.values.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.present(key) {
            None => Ok(default),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(n as usize),
                // Hand-edited configs sometimes write integers as `1000.0`.
                None => match v.as_f64() {
                    Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 1e15 => Ok(f as usize),
                    _ => Err(self.invalid(key, v, "a non-negative integer")),
                },
            },
        }
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    /// Like [`Self::f64_or`], refusing NaN and infinities.
    pub(crate) fn finite_f64_or(&self, key: &str, default: f64) -> Result<f64> {
        let v = self.f64_or(key, default)?;
        if !v.is_finite() {
            return Err(self.invalid(key, &self.values[key], "a finite number"));
        }
        Ok(v)
    }

    /// The training timestep count, bounded by [`MAX_TRAIN_TIMESTEPS`].
    pub(crate) fn num_train_timesteps(&self) -> Result<usize> {
        let n = self.usize_or("num_train_timesteps", 1000)?;
        if n == 0 || n > MAX_TRAIN_TIMESTEPS {
            return Err(self.unsupported(
                "num_train_timesteps",
                &format!("expected 1 to {MAX_TRAIN_TIMESTEPS}"),
            ));
        }
        Ok(n)
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => number(v)
                .map(Some)
                .ok_or_else(|| self.invalid(key, v, "a number")),
        }
    }

    /// Booleans follow Python truthiness for `null`: it reads as false.
    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.values.get(key) {
            None => Ok(default),
            Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.invalid(key, v, "true or false")),
        }
    }

    pub(crate) fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.present(key) {
            None => Ok(default),
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.invalid(key, v, "a string")),
        }
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.invalid(key, v, "a string or null")),
        }
    }

    pub(crate) fn opt_f64_list(&self, key: &str) -> Result<Option<Vec<f64>>> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(number)
                .collect::<Option<Vec<f64>>>()
                .map(Some)
                .ok_or_else(|| self.invalid(key, &self.values[key], "a list of numbers")),
            Some(v) => Err(self.invalid(key, v, "a list of numbers or null")),
        }
    }
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => match s.as_str() {
            "Infinity" => Some(f64::INFINITY),
            "-Infinity" => Some(f64::NEG_INFINITY),
            "NaN" => Some(f64::NAN),
            _ => None,
        },
        _ => None,
    }
}

/// A JSON value rendered for an error message, cut short when long (e.g. `trained_betas`).
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        let head: String = s.chars().take(77).collect();
        format!("{head}...")
    } else {
        s
    }
}

/// Turns the bare `NaN`, `Infinity` and `-Infinity` tokens that Python's json
/// module emits into strings, leaving string contents alone.
fn quote_non_finite(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("Infinity") && !text.contains("NaN") {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 16);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else {
            // Outside strings valid JSON only has the lowercase literals, so these
            // prefixes cannot cut into another token.
            let token = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|t| rest.starts_with(t));
            if let Some(token) = token {
                out.push('"');
                out.push_str(token);
                out.push('"');
                rest = &rest[token.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_training_objective_comes_from_the_class_and_prediction_type() {
        use crate::Family::{Diffusion, FlowMatching};
        let family = |text: &str| {
            SchedulerConfig::from_json_str(text, "s.json")
                .unwrap()
                .objective()
                .map(|o| (o.family, o.prediction))
        };
        let eps = Some((Diffusion, "epsilon prediction".to_string()));
        assert_eq!(family(r#"{"_class_name": "DDIMScheduler"}"#), eps);
        assert_eq!(
            family(r#"{"_class_name": "PNDMScheduler", "prediction_type": "epsilon"}"#),
            eps
        );
        assert_eq!(
            family(
                r#"{"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction"}"#
            ),
            Some((Diffusion, "v-prediction".to_string()))
        );
        let flow = Some((FlowMatching, "velocity (flow matching)".to_string()));
        assert_eq!(
            family(r#"{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}"#),
            flow
        );
        assert_eq!(
            family(
                r#"{"_class_name": "UniPCMultistepScheduler", "prediction_type": "flow_prediction"}"#
            ),
            flow
        );
        assert_eq!(
            family(r#"{"_class_name": "UniPCMultistepScheduler", "use_flow_sigmas": true}"#),
            flow
        );
        // Nothing said: the denoiser decides (engine's check_scheduler_family).
        assert_eq!(family(r#"{"num_train_timesteps": 1000}"#), None);
        // Every sampler belongs to a family, and both families have samplers.
        for f in [Diffusion, FlowMatching] {
            assert!(crate::SchedulerKind::ALL.iter().any(|k| k.family() == f));
        }
    }

    #[test]
    fn non_finite_tokens_are_quoted_outside_strings_only() {
        let text = r#"{"a": -Infinity, "b": "NaN and -Infinity", "c": [NaN, Infinity]}"#;
        let cfg = SchedulerConfig::from_json_str(text, "x.json").unwrap();
        assert_eq!(cfg.f64_or("a", 0.0).unwrap(), f64::NEG_INFINITY);
        assert_eq!(cfg.str_or("b", "").unwrap(), "NaN and -Infinity");
        assert_eq!(cfg.values["c"], serde_json::json!(["NaN", "Infinity"]));
    }
}
