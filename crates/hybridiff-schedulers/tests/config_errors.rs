//! Config handling: unsupported values are refused with the file, key and
//! value named; unknown keys are ignored; kinds parse and print.

use std::io::Write;
use std::path::Path;

use candle_core::{Device, Tensor};
use hybridiff_schedulers::{build, Error, SchedulerConfig, SchedulerKind};
use serde_json::{json, Value};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures");

fn sdxl_config() -> Value {
    let path = Path::new(FIXTURES).join("tiny-sdxl/scheduler/scheduler_config.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn sd3_config() -> Value {
    let path = Path::new(FIXTURES).join("tiny-sd3/scheduler/scheduler_config.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Writes `value` to a real file so that errors carry a real path.
fn write_config(value: &Value) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler_config.json");
    let mut file = std::fs::File::create(&path).unwrap();
    file.write_all(value.to_string().as_bytes()).unwrap();
    (dir, path)
}

/// Every sampler of the DDPM-style training schedule.
fn sd_kinds() -> Vec<SchedulerKind> {
    SchedulerKind::ALL
        .into_iter()
        .filter(|k| *k != SchedulerKind::FlowEuler)
        .collect()
}

fn with(mut base: Value, key: &str, value: Value) -> Value {
    base[key] = value;
    base
}

/// Builds `kind` from `config` and expects an error naming the file, `key` and `shown`.
fn expect_rejected(config: Value, kind: SchedulerKind, key: &str, shown: &str) {
    let (_dir, path) = write_config(&config);
    let cfg = SchedulerConfig::from_file(&path).unwrap();
    let err = match build(&cfg, kind, 20) {
        Ok(_) => panic!("{kind} accepted {key} = {shown}"),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!(
        msg.contains(&path.display().to_string()),
        "no path in: {msg}"
    );
    assert!(msg.contains(&format!("`{key}`")), "no key in: {msg}");
    assert!(msg.contains(shown), "no value {shown} in: {msg}");
}

#[test]
fn unsupported_sd_values_name_file_key_and_value() {
    for kind in sd_kinds() {
        let cases = [
            ("prediction_type", json!("sample"), "\"sample\""),
            ("timestep_spacing", json!("karras"), "\"karras\""),
            ("beta_schedule", json!("sigmoid"), "\"sigmoid\""),
            ("rescale_betas_zero_snr", json!(true), "true"),
        ];
        for (key, value, shown) in cases {
            expect_rejected(with(sdxl_config(), key, value), kind, key, shown);
        }
    }
}

#[test]
fn unsupported_scheduler_specific_values_are_rejected() {
    use SchedulerKind::*;
    let cases = [
        (Ddim, "thresholding", json!(true), "true"),
        (Euler, "use_exponential_sigmas", json!(true), "true"),
        (Euler, "use_beta_sigmas", json!(true), "true"),
        (
            Euler,
            "interpolation_type",
            json!("log_linear"),
            "\"log_linear\"",
        ),
        (
            Euler,
            "final_sigmas_type",
            json!("denoise_to_zero"),
            "\"denoise_to_zero\"",
        ),
        (DpmPp2M, "solver_order", json!(3), "3"),
        (
            DpmPp2M,
            "algorithm_type",
            json!("sde-dpmsolver"),
            "\"sde-dpmsolver\"",
        ),
        (DpmPp2MSde, "solver_order", json!(3), "3"),
        (DpmPp2MSde, "use_lu_lambdas", json!(true), "true"),
        (UniPc, "solver_type", json!("heun2"), "\"heun2\""),
        (UniPc, "thresholding", json!(true), "true"),
        (UniPc, "use_flow_sigmas", json!(true), "true"),
        (UniPc, "solver_p", json!({"a": 1}), "{\"a\":1}"),
        (UniPc, "disable_corrector", json!("all"), "\"all\""),
        (Lcm, "thresholding", json!(true), "true"),
        (Lcm, "timestep_scaling", json!(-1.0), "-1"),
        (DpmPp2M, "solver_type", json!("heun"), "\"heun\""),
        (DpmPp2M, "use_beta_sigmas", json!(true), "true"),
        (DpmPp2M, "thresholding", json!(true), "true"),
        (
            DpmPp2M,
            "variance_type",
            json!("learned_range"),
            "\"learned_range\"",
        ),
    ];
    for (kind, key, value, shown) in cases {
        expect_rejected(with(sdxl_config(), key, value), kind, key, shown);
    }
    let flow_cases = [
        ("invert_sigmas", json!(true), "true"),
        ("stochastic_sampling", json!(true), "true"),
        ("use_exponential_sigmas", json!(true), "true"),
        ("time_shift_type", json!("cubic"), "\"cubic\""),
        ("shift_terminal", json!(0.02), "0.02"),
    ];
    for (key, value, shown) in flow_cases {
        expect_rejected(with(sd3_config(), key, value), FlowEuler, key, shown);
    }
}

#[test]
fn wrongly_typed_values_name_the_key() {
    expect_rejected(
        with(sdxl_config(), "num_train_timesteps", json!("many")),
        SchedulerKind::Ddim,
        "num_train_timesteps",
        "\"many\"",
    );
    expect_rejected(
        with(sd3_config(), "shift", json!([3])),
        SchedulerKind::FlowEuler,
        "shift",
        "[3]",
    );
}

#[test]
fn keys_of_other_schedulers_do_not_matter() {
    // DDIM's thresholding means nothing to Euler, as in diffusers' from_config.
    let cfg = with(sdxl_config(), "thresholding", json!(true));
    let cfg = SchedulerConfig::from_json_str(&cfg.to_string(), "cfg.json").unwrap();
    assert!(build(&cfg, SchedulerKind::Euler, 20).is_ok());
    let cfg = with(sdxl_config(), "some_future_key", json!({"nested": [1, 2]}));
    let cfg = SchedulerConfig::from_json_str(&cfg.to_string(), "cfg.json").unwrap();
    for kind in sd_kinds() {
        assert!(build(&cfg, kind, 20).is_ok(), "{kind}");
    }
}

#[test]
fn class_name_picks_the_default_kind() {
    let kinds = [
        ("DDIMScheduler", SchedulerKind::Ddim),
        ("EulerDiscreteScheduler", SchedulerKind::Euler),
        ("DPMSolverMultistepScheduler", SchedulerKind::DpmPp2M),
        ("FlowMatchEulerDiscreteScheduler", SchedulerKind::FlowEuler),
    ];
    for (class, kind) in kinds {
        let cfg = with(sdxl_config(), "_class_name", json!(class));
        let cfg = SchedulerConfig::from_json_str(&cfg.to_string(), "cfg.json").unwrap();
        assert_eq!(cfg.default_kind().unwrap(), kind);
    }

    let (_dir, path) = write_config(&with(sdxl_config(), "_class_name", json!("PNDMScheduler")));
    let cfg = SchedulerConfig::from_file(&path).unwrap();
    let msg = cfg.default_kind().unwrap_err().to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
    assert!(
        msg.contains("`_class_name`") && msg.contains("\"PNDMScheduler\""),
        "{msg}"
    );
    // An explicit kind still runs from that config.
    assert!(build(&cfg, SchedulerKind::Euler, 20).is_ok());

    let mut missing = sdxl_config();
    missing.as_object_mut().unwrap().remove("_class_name");
    let cfg = SchedulerConfig::from_json_str(&missing.to_string(), "cfg.json").unwrap();
    assert!(cfg
        .default_kind()
        .unwrap_err()
        .to_string()
        .contains("`_class_name`"));
}

#[test]
fn step_counts_outside_the_training_schedule_are_errors() {
    let cfg = SchedulerConfig::from_json_str(&sdxl_config().to_string(), "sdxl.json").unwrap();
    let sd3 = SchedulerConfig::from_json_str(&sd3_config().to_string(), "sd3.json").unwrap();
    for kind in sd_kinds() {
        for steps in [0, 1001] {
            let err = build(&cfg, kind, steps).err().expect("accepted");
            let named = matches!(err, Error::NumSteps { .. })
                // LCM refuses anything above its 50 original steps first.
                || (kind == SchedulerKind::Lcm && err.to_string().contains("original_inference_steps"));
            assert!(named, "{kind}: {err}");
            assert!(err.to_string().contains("sdxl.json"), "{kind}: {err}");
        }
        let most = match kind {
            SchedulerKind::Lcm => 50,
            // Leading spacing's n + 1 points with steps_offset 1 reach timestep 1000 at
            // 999 steps.
            SchedulerKind::UniPc => {
                let err = build(&cfg, kind, 999).err().expect("accepted");
                assert!(
                    matches!(err, Error::TimestepOutOfRange { timestep: 1000, .. }),
                    "{err}"
                );
                998
            }
            _ => 999,
        };
        assert!(build(&cfg, kind, most).is_ok(), "{kind}");
    }
    for steps in [0, 1001] {
        assert!(matches!(
            build(&sd3, SchedulerKind::FlowEuler, steps),
            Err(Error::NumSteps { .. })
        ));
    }
    // steps_offset 1 pushes DDIM's leading timestep for 1000 steps to 1000.
    let err = build(&cfg, SchedulerKind::Ddim, 1000)
        .err()
        .expect("accepted");
    assert!(
        matches!(err, Error::TimestepOutOfRange { timestep: 1000, .. }),
        "{err}"
    );
}

#[test]
fn unreadable_or_invalid_files_name_the_path() {
    let missing = Path::new("/nonexistent/scheduler_config.json");
    let msg = SchedulerConfig::from_file(missing).unwrap_err().to_string();
    assert!(msg.contains("/nonexistent/scheduler_config.json"), "{msg}");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler_config.json");
    std::fs::write(&path, "{ not json").unwrap();
    let msg = SchedulerConfig::from_file(&path).unwrap_err().to_string();
    assert!(msg.contains(&path.display().to_string()), "{msg}");
}

#[test]
fn python_non_finite_floats_parse() {
    // diffusers saves DPM-Solver's default lambda_min_clipped as a bare -Infinity.
    let text = r#"{"_class_name": "DPMSolverMultistepScheduler", "lambda_min_clipped": -Infinity,
                   "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#;
    let cfg = SchedulerConfig::from_json_str(text, "dpm.json").unwrap();
    let sched = build(&cfg, SchedulerKind::DpmPp2M, 10).unwrap();
    assert_eq!(sched.timesteps()[0], 999.0);
}

#[test]
fn dpm_lambda_min_clipped_drops_low_snr_timesteps() {
    let base = json!({"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace"});
    let cfg = SchedulerConfig::from_json_str(&base.to_string(), "a.json").unwrap();
    let full = build(&cfg, SchedulerKind::DpmPp2M, 10).unwrap();
    let clipped = with(base, "lambda_min_clipped", json!(-5.1));
    let cfg = SchedulerConfig::from_json_str(&clipped.to_string(), "b.json").unwrap();
    let clipped = build(&cfg, SchedulerKind::DpmPp2M, 10).unwrap();
    assert_eq!(full.timesteps()[0], 999.0);
    assert!(clipped.timesteps()[0] < 999.0, "{:?}", clipped.timesteps());
    assert!(clipped.sigmas().unwrap()[0] < full.sigmas().unwrap()[0]);
}

#[test]
fn kinds_parse_and_print() {
    for kind in SchedulerKind::ALL {
        assert_eq!(kind.to_string().parse::<SchedulerKind>().unwrap(), kind);
    }
    assert_eq!(
        "dpmpp-2m".parse::<SchedulerKind>().unwrap(),
        SchedulerKind::DpmPp2M
    );
    assert_eq!(
        "flow-euler".parse::<SchedulerKind>().unwrap(),
        SchedulerKind::FlowEuler
    );
    let err = "pndm".parse::<SchedulerKind>().unwrap_err();
    assert!(matches!(err, Error::UnknownKind { ref name, .. } if name == "pndm"));
}

#[test]
fn ddim_clip_sample_clamps_the_predicted_original() {
    // One element whose predicted x_0 lies far outside [-1, 1].
    let base = with(sdxl_config(), "clip_sample", json!(false));
    let clip = with(base.clone(), "clip_sample", json!(true));
    let sample = Tensor::new(&[[40.0f32]], &Device::Cpu).unwrap();
    let eps = Tensor::new(&[[0.1f32]], &Device::Cpu).unwrap();
    let step0 = |config: &Value| -> f32 {
        let cfg = SchedulerConfig::from_json_str(&config.to_string(), "c.json").unwrap();
        let mut s = build(&cfg, SchedulerKind::Ddim, 20).unwrap();
        let out = s.step(&eps, 0, &sample, None).unwrap();
        out.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
    };
    let cfg = SchedulerConfig::from_json_str(&base.to_string(), "c.json").unwrap();
    let ddim = hybridiff_schedulers::DDIMScheduler::new(&cfg, 20).unwrap();
    let ac = ddim.alphas_cumprod();
    let (a_t, a_prev) = (ac[951] as f64, ac[901] as f64);
    let x0 = (40.0 - (1.0 - a_t).sqrt() * 0.1) / a_t.sqrt();
    let expected = |x0: f64| a_prev.sqrt() * x0 + (1.0 - a_prev).sqrt() * 0.1;
    assert!((step0(&base) as f64 - expected(x0)).abs() < 1e-3 * expected(x0).abs());
    assert!((step0(&clip) as f64 - expected(1.0)).abs() < 1e-5);
}

#[test]
fn schedules_that_would_give_nan_or_huge_tables_are_refused_by_key() {
    for kind in sd_kinds() {
        // Each beta is a variance in [0, 1).
        expect_rejected(
            with(sdxl_config(), "beta_end", json!(1.5)),
            kind,
            "beta_end",
            "1.5",
        );
        expect_rejected(
            with(sdxl_config(), "beta_start", json!(-0.1)),
            kind,
            "beta_start",
            "-0.1",
        );
        expect_rejected(
            with(sdxl_config(), "beta_start", json!("NaN")),
            kind,
            "beta_start",
            "NaN",
        );
        // Valid betas whose product underflows to 0 in f32.
        expect_rejected(
            with(sdxl_config(), "beta_start", json!(0.5)),
            kind,
            "beta_start",
            "underflow",
        );
        let mut trained = vec![json!(0.01); 1000];
        trained[7] = json!("NaN");
        expect_rejected(
            with(sdxl_config(), "trained_betas", Value::Array(trained)),
            kind,
            "trained_betas",
            "beta 7",
        );
        // One f32 per training timestep: bounded.
        expect_rejected(
            with(sdxl_config(), "num_train_timesteps", json!(1e12)),
            kind,
            "num_train_timesteps",
            "1000000000000",
        );
    }
    let flow = SchedulerKind::FlowEuler;
    expect_rejected(
        with(sd3_config(), "shift", json!(-1.0)),
        flow,
        "shift",
        "-1",
    );
    expect_rejected(
        with(sd3_config(), "shift", json!("Infinity")),
        flow,
        "shift",
        "Infinity",
    );
    expect_rejected(
        with(sd3_config(), "num_train_timesteps", json!(2_000_000)),
        flow,
        "num_train_timesteps",
        "2000000",
    );
}

#[test]
fn folders_and_fifos_are_not_read_as_configs() {
    let dir = tempfile::tempdir().unwrap();
    let err = SchedulerConfig::from_file(dir.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a regular file"), "{err}");
    let fifo = dir.path().join("scheduler_config.json");
    let ok = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(ok.success());
    let err = SchedulerConfig::from_file(&fifo).unwrap_err().to_string();
    assert!(err.contains("not a regular file"), "{err}");
}
