//! Hostile and mistaken input (issue 11): every bad file, flag or size is refused with a
//! message naming it, fast, before any large allocation; nothing is overwritten that
//! should not be, nothing half-made is left behind, nothing panics or hangs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

mod common;
use common::{
    edit_json, fails_with, fixture, linked_copy, mkfifo, run, run_env, s, stderr, succeeds,
};

/// Replaces the tensors of the safetensors file `rel` of a linked copy.
fn edit_tensors(root: &Path, rel: &str, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let p = root.join(rel);
    let mut t = candle_core::safetensors::load(&p, &Device::Cpu).unwrap();
    edit(&mut t);
    std::fs::remove_file(&p).unwrap();
    candle_core::safetensors::save(&t, &p).unwrap();
}

fn inputs_with(path: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut t = candle_core::safetensors::load(
        fixture("tiny-sdxl").join("inputs.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, path).unwrap();
}

fn denoise(model: &Path, inputs: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "denoise",
        "--model",
        s(model),
        "--inputs",
        s(inputs),
        "--out",
        s(out),
        "--steps",
        "2",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

fn tiny_inputs() -> PathBuf {
    fixture("tiny-sdxl").join("inputs.safetensors")
}

// 1. Outputs only ever replace regular files.

#[test]
fn outputs_onto_devices_and_fifos_are_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo.png");
    mkfifo(&fifo);
    // A link to /dev/null: the rename would replace the link, writing through it would
    // write the device; both are refused.
    let null = dir.path().join("null.png");
    std::os::unix::fs::symlink("/dev/null", &null).unwrap();
    let model = fixture("tiny-sdxl");
    let ok = dir.path().join("ok.safetensors");
    for (flag, target, kind) in [
        ("--out", &fifo, "FIFO"),
        ("--out", &null, "character device"),
        ("--trace", &fifo, "FIFO"),
        ("--decode", &null, "character device"),
    ] {
        let out = if flag == "--out" {
            target.clone()
        } else {
            ok.clone()
        };
        let mut extra = vec![];
        if flag != "--out" {
            extra = vec![flag, s(target)];
        }
        let o = denoise(&model, &tiny_inputs(), &out, &extra);
        fails_with(&o, &[flag, kind, "only replace regular files"]);
    }
    let o = run(&[
        "generate",
        "--model",
        s(&fixture("tiny-sdxl-pipeline")),
        "--prompt",
        "x",
        "--out",
        s(&null),
    ]);
    fails_with(&o, &["--out", "character device"]);
    assert!(std::fs::symlink_metadata(&null)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(!ok.exists());
    let o = run(&[
        "bench",
        "--model",
        s(&model),
        "--json",
        s(&fifo),
        "--repeats",
        "0",
    ]);
    fails_with(&o, &["--json", "FIFO"]);
}

#[test]
fn unwritable_outputs_are_refused_before_any_compute() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sdxl");
    let ok = dir.path().join("ok.safetensors");
    let slash = format!("{}/", s(&dir.path().join("newdir")));
    let o = denoise(&model, &tiny_inputs(), Path::new(&slash), &[]);
    fails_with(&o, &["--out", "ends with `/`"]);
    for bad in ["/proc/x.safetensors", "/sys/x.safetensors"] {
        let o = denoise(&model, &tiny_inputs(), &ok, &["--trace", bad]);
        fails_with(&o, &["--trace", "cannot write in the folder"]);
        assert!(!ok.exists());
    }
    // A read-only folder (root ignores permissions, so only checked as a user).
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    if tempfile::tempfile_in(&ro).is_err() {
        let o = denoise(&model, &tiny_inputs(), &ro.join("x.safetensors"), &[]);
        fails_with(&o, &["--out", "cannot write in the folder"]);
    }
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Batch outputs: each planned name is checked before the first image is made.
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "a\nb\n").unwrap();
    let batch = |out: &Path| {
        run(&[
            "generate",
            "--model",
            s(&fixture("tiny-sdxl-pipeline")),
            "--prompts",
            s(&prompts),
            "--steps",
            "1",
            "--out",
            s(out),
        ])
    };
    // (issue 28: a non-empty folder needs --force, which never replaces what is not ours).
    let imgs = dir.path().join("imgs");
    std::fs::create_dir(&imgs).unwrap();
    std::os::unix::fs::symlink("/dev/null", imgs.join("manifest.json")).unwrap();
    fails_with(&batch(&imgs), &["manifest.json", "not empty"]);
    let forced = |out: &Path| {
        run(&[
            "generate",
            "--model",
            s(&fixture("tiny-sdxl-pipeline")),
            "--prompts",
            s(&prompts),
            "--steps",
            "1",
            "--out",
            s(out),
            "--force",
        ])
    };
    fails_with(
        &forced(&imgs),
        &[
            "manifest.json (a symbolic link to /dev/null)",
            "does not write",
        ],
    );
    assert!(!imgs.join("0000.png").exists());
    std::fs::remove_file(imgs.join("manifest.json")).unwrap();
    mkfifo(&imgs.join("0001.png"));
    fails_with(&forced(&imgs), &["0001.png (a FIFO", "does not write"]);
    assert!(!imgs.join("0000.png").exists());
    fails_with(
        &batch(Path::new("/proc/imgs")),
        &["--out", "cannot write in the folder"],
    );
}

#[test]
fn outputs_that_are_symbolic_links_are_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sdxl");
    let target = dir.path().join("target.safetensors");
    std::fs::write(&target, "keep").unwrap();
    let link = dir.path().join("link.safetensors");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let dangling = dir.path().join("dangling.safetensors");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
    for l in [&link, &dangling] {
        let o = denoise(&model, &tiny_inputs(), l, &[]);
        fails_with(&o, &["--out", "symbolic link", "give the target's path"]);
        let ok = dir.path().join("ok.safetensors");
        let o = denoise(&model, &tiny_inputs(), &ok, &["--trace", s(l)]);
        fails_with(&o, &["--trace", "symbolic link"]);
        assert!(std::fs::symlink_metadata(l)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(!ok.exists());
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
    assert!(!dir.path().join("nowhere").exists());
}

#[test]
fn one_output_never_overwrites_another_or_an_input() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sdxl");
    let out = dir.path().join("x.out");
    let o = denoise(&model, &tiny_inputs(), &out, &["--decode", s(&out)]);
    fails_with(&o, &["--out", "--decode", "same file"]);
    let o = denoise(&model, &tiny_inputs(), &out, &["--trace", s(&out)]);
    fails_with(&o, &["--out", "--trace", "same file"]);
    // The same file by another name (a hard link) is the same file.
    let inputs = dir.path().join("inputs.safetensors");
    std::fs::copy(tiny_inputs(), &inputs).unwrap();
    let alias = dir.path().join("alias.safetensors");
    std::fs::hard_link(&inputs, &alias).unwrap();
    let before = std::fs::read(&inputs).unwrap();
    let o = denoise(&model, &inputs, &alias, &[]);
    fails_with(&o, &["--out", "--inputs", "destroy the input"]);
    assert_eq!(std::fs::read(&inputs).unwrap(), before);
    let md = dir.path().join("t.md");
    let o = run(&[
        "bench",
        "--model",
        s(&model),
        "--json",
        s(&md),
        "--markdown",
        s(&md),
    ]);
    fails_with(&o, &["--json", "--markdown", "same file"]);
}

#[test]
fn outputs_inside_the_model_folder_are_refused_and_the_weights_kept() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m2");
    linked_copy(&fixture("tiny-sdxl"), &model);
    let weights = model.join("unet/diffusion_pytorch_model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    std::fs::copy(
        fixture("tiny-sdxl").join("unet/diffusion_pytorch_model.safetensors"),
        &weights,
    )
    .unwrap();
    let before = std::fs::read(&weights).unwrap();
    let inputs = model.join("inputs.safetensors");
    let outside = dir.path().join("ok.safetensors");
    let o = denoise(&model, &inputs, &weights, &[]);
    fails_with(&o, &["--out", "inside --model"]);
    // By another spelling: `..` and a link to the model's folder.
    let alias = dir.path().join("alias");
    std::os::unix::fs::symlink(&model, &alias).unwrap();
    let sneaky = dir
        .path()
        .join("m2/../alias/unet/diffusion_pytorch_model.safetensors");
    let o = denoise(&model, &inputs, &sneaky, &[]);
    fails_with(&o, &["--out", "inside --model"]);
    let png = model.join("vae/new.png");
    let o = denoise(&model, &inputs, &outside, &["--decode", s(&png)]);
    fails_with(&o, &["--decode", "inside --model"]);
    let o = denoise(
        &model,
        &inputs,
        &outside,
        &["--trace", s(&model.join("t.json"))],
    );
    fails_with(&o, &["--trace", "inside --model"]);
    assert_eq!(std::fs::read(&weights).unwrap(), before);
    assert!(!outside.exists() && !png.exists());
    let o = run(&[
        "bench",
        "--model",
        s(&model),
        "--json",
        s(&model.join("unet/bench.json")),
        "--repeats",
        "0",
    ]);
    fails_with(&o, &["--json", "inside --model"]);
    let pipe = dir.path().join("p");
    linked_copy(&fixture("tiny-sdxl-pipeline"), &pipe);
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "a\n").unwrap();
    let batch_out = pipe.join("images");
    for extra in [vec!["--prompt", "x"], vec!["--prompts", s(&prompts)]] {
        let mut args = vec!["generate", "--model", s(&pipe), "--out", s(&batch_out)];
        args.extend(extra);
        fails_with(&run(&args), &["--out", "inside --model"]);
    }
    assert!(!batch_out.exists());
    // The default model's unpacked cache is a model folder too. A first run unpacks it
    // (and fails on its missing output folder).
    let cache = dir.path().join("cache");
    let env = [("HYBRIDIFF_CACHE", s(&cache))];
    let missing = dir.path().join("no/x.png");
    let args = ["generate", "--prompt", "x", "--out", s(&missing)];
    fails_with(&run_env(&args, &env, Duration::from_secs(60)), &["--out"]);
    let unpacked = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("default-")
        })
        .expect("an unpacked default model");
    let inside = unpacked.join("unet/diffusion_pytorch_model.safetensors");
    let args = ["generate", "--prompt", "x", "--out", s(&inside)];
    let o = run_env(&args, &env, Duration::from_secs(60));
    fails_with(&o, &["--out", "inside the default model's cache folder"]);
}

#[test]
fn init_never_replaces_a_model_without_force_and_leaves_nothing_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = fixture("tiny-sdxl").join("unet/config.json");
    let m = dir.path().join("m");
    succeeds(&run(&[
        "init",
        "--config",
        s(&cfg),
        "--out",
        s(&m),
        "--seed",
        "1",
    ]));
    let w = m.join("unet/diffusion_pytorch_model.safetensors");
    let first = std::fs::read(&w).unwrap();
    let o = run(&["init", "--config", s(&cfg), "--out", s(&m), "--seed", "2"]);
    fails_with(&o, &["not empty", "--force"]);
    assert_eq!(std::fs::read(&w).unwrap(), first, "weights were replaced");
    succeeds(&run(&[
        "init",
        "--config",
        s(&cfg),
        "--out",
        s(&m),
        "--seed",
        "2",
        "--force",
    ]));
    assert_ne!(std::fs::read(&w).unwrap(), first);
    // Onto a file.
    let file = dir.path().join("file");
    std::fs::write(&file, "keep").unwrap();
    let o = run(&["init", "--config", s(&cfg), "--out", s(&file)]);
    fails_with(&o, &["not a folder"]);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    // A model too big for the memory limit: refused tensor by tensor, and no folder or
    // temporary folder is left.
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["block_out_channels"] = serde_json::json!([32, 64, 60000]);
    v["norm_num_groups"] = serde_json::json!(2);
    let big = dir.path().join("big.json");
    std::fs::write(&big, v.to_string()).unwrap();
    let new = dir.path().join("new");
    let o = run_env(
        &["init", "--config", s(&big), "--out", s(&new)],
        &[("HYBRIDIFF_MEMORY_LIMIT", "256M")],
        Duration::from_secs(60),
    );
    fails_with(&o, &["HYBRIDIFF_MEMORY_LIMIT", "tensor `"]);
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".hybridiff") || n == "new")
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

// 2. Sizes are checked before memory is allocated.

#[test]
fn sizes_too_big_for_memory_are_refused_with_the_estimate_and_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    let pipeline = fixture("tiny-sdxl-pipeline");
    let o = run(&[
        "generate",
        "--model",
        s(&pipeline),
        "--prompt",
        "x",
        "--height",
        "100000",
        "--width",
        "100000",
        "--steps",
        "2",
        "--out",
        s(&out),
    ]);
    fails_with(&o, &["needs an estimated", "attention", "available"]);
    let o = run(&[
        "bench",
        "--model",
        s(&fixture("tiny-sdxl")),
        "--latent-size",
        "100000",
        "--repeats",
        "0",
    ]);
    fails_with(&o, &["needs an estimated", "100000x100000 latents"]);
    // Big latents in an inputs file: 512x512 latents of the tiny U-Net need terabytes of
    // attention scores.
    let inputs = dir.path().join("big.safetensors");
    inputs_with(&inputs, |t| {
        t.insert(
            "latents".into(),
            Tensor::zeros((1, 4, 512, 512), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let o = denoise(&fixture("tiny-sdxl"), &inputs, &dir.path().join("o"), &[]);
    fails_with(&o, &["512x512 latents", "needs an estimated"]);
    // A limit set by the user: the tiny job itself no longer fits.
    let o = run_env(
        &[
            "denoise",
            "--model",
            s(&fixture("tiny-sdxl")),
            "--inputs",
            s(&tiny_inputs()),
            "--out",
            s(&dir.path().join("o")),
            "--steps",
            "2",
        ],
        &[("HYBRIDIFF_MEMORY_LIMIT", "64K")],
        Duration::from_secs(60),
    );
    fails_with(&o, &["64.0 KiB (HYBRIDIFF_MEMORY_LIMIT)"]);
    let o = run_env(
        &[
            "denoise",
            "--model",
            s(&fixture("tiny-sdxl")),
            "--inputs",
            s(&tiny_inputs()),
            "--out",
            s(&dir.path().join("o")),
        ],
        &[("HYBRIDIFF_MEMORY_LIMIT", "lots")],
        Duration::from_secs(60),
    );
    fails_with(&o, &["HYBRIDIFF_MEMORY_LIMIT=\"lots\""]);
}

#[test]
fn the_default_model_at_512_pixels_is_refused_under_8_gib() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let o = run_env(
        &[
            "generate",
            "--prompt",
            "a red circle",
            "--height",
            "512",
            "--width",
            "512",
            "--steps",
            "2",
            "--out",
            s(&dir.path().join("x.png")),
        ],
        &[
            ("HYBRIDIFF_CACHE", s(&cache)),
            ("HYBRIDIFF_MEMORY_LIMIT", "8G"),
        ],
        Duration::from_secs(60),
    );
    fails_with(&o, &["128x128 latents", "8.0 GiB (HYBRIDIFF_MEMORY_LIMIT)"]);
}

#[test]
fn the_address_space_limit_counts_as_a_memory_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    // `ulimit -v` in KiB: about 7.6 GiB, below the 512-pixel job's estimate.
    let script = format!(
        "ulimit -v 8000000 && exec {} generate --prompt x --height 512 --width 512 --steps 2 --out {}",
        env!("CARGO_BIN_EXE_hybridiff"),
        s(&dir.path().join("x.png"))
    );
    let o = Command::new("sh")
        .args(["-c", &script])
        .env("HYBRIDIFF_CACHE", &cache)
        .env_remove("HYBRIDIFF_MEMORY_LIMIT")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    fails_with(&o, &["128x128 latents", "ulimit -v"]);
}

#[test]
fn counts_from_configs_and_flags_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = fixture("tiny-sdxl").join("unet/config.json");
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    // Each edit of the U-Net config, checked by `init` before any weight is made.
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        ("sample_size", (-1).into(), "`sample_size`"),
        ("sample_size", 1e9.into(), "`sample_size`"),
        (
            "block_out_channels",
            serde_json::json!([32, 64, 100000]),
            "block_out_channels[2]",
        ),
        (
            "block_out_channels",
            serde_json::json!([32, 64, 0]),
            "block_out_channels[2]",
        ),
        ("norm_num_groups", 0.into(), "`norm_num_groups`"),
        ("layers_per_block", 0.into(), "`layers_per_block`"),
        ("layers_per_block", 100000.into(), "`layers_per_block`"),
        (
            "transformer_layers_per_block",
            100000.into(),
            "transformer_layers_per_block",
        ),
        ("cross_attention_dim", 0.into(), "`cross_attention_dim`"),
        ("attention_head_dim", 0.into(), "attention heads"),
        ("in_channels", 0.into(), "`in_channels`"),
        ("conv_in_kernel", 0.into(), "conv_in_kernel"),
        ("conv_in_kernel", 10001.into(), "conv_in_kernel"),
        ("downsample_padding", 5000.into(), "downsample_padding"),
        (
            "projection_class_embeddings_input_dim",
            40.into(),
            "projection_class_embeddings_input_dim",
        ),
        ("norm_eps", (-1.0).into(), "`norm_eps`"),
        ("norm_eps", 0.into(), "`norm_eps`"),
        ("mid_block_scale_factor", 0.into(), "mid_block_scale_factor"),
    ];
    let path = dir.path().join("config.json");
    for (key, value, needle) in cases {
        let mut v = base.clone();
        v[key] = value.clone();
        std::fs::write(&path, v.to_string()).unwrap();
        let out = dir.path().join("m");
        let o = run(&["init", "--config", s(&path), "--out", s(&out)]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(1), "{key} = {value}: {err}");
        assert!(!err.contains("panicked"), "{key} = {value}: {err}");
        assert!(
            err.contains(needle) && err.contains("config.json"),
            "{key} = {value}: {err}"
        );
        assert!(!out.exists());
    }
    // Scheduler counts, through a linked copy of the tiny model.
    let model = dir.path().join("model");
    linked_copy(&fixture("tiny-sdxl"), &model);
    for (key, value, needle) in [
        (
            "num_train_timesteps",
            serde_json::json!(1e12),
            "num_train_timesteps",
        ),
        (
            "num_train_timesteps",
            serde_json::json!(0),
            "num_train_timesteps",
        ),
    ] {
        edit_json(&model, "scheduler/scheduler_config.json", |v| {
            v[key] = value.clone()
        });
        let o = denoise(&model, &tiny_inputs(), &dir.path().join("o"), &[]);
        fails_with(&o, &[needle, "scheduler_config.json"]);
    }
    // Flags.
    let model = fixture("tiny-sdxl");
    let o = run(&[
        "denoise",
        "--model",
        s(&model),
        "--inputs",
        s(&tiny_inputs()),
        "--out",
        s(&dir.path().join("o")),
        "--steps",
        "100000",
    ]);
    fails_with(&o, &["--steps 100000", "at most"]);
    let o = run(&[
        "bench",
        "--model",
        s(&model),
        "--context-len",
        "0",
        "--repeats",
        "0",
    ]);
    fails_with(&o, &["--context-len 0"]);
}

// 3. No panics.

#[test]
fn integer_tensors_in_inputs_are_refused_by_name_and_float_ones_converted() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sdxl");
    let out = dir.path().join("o.safetensors");
    let bad = dir.path().join("ints.safetensors");
    for (name, dtype) in [
        ("latents", DType::I64),
        ("prompt_embeds", DType::I64),
        ("pooled_prompt_embeds", DType::U8),
        ("time_ids", DType::U32),
    ] {
        inputs_with(&bad, |t| {
            let src = t.get(name).cloned().unwrap_or_else(|| {
                Tensor::new(&[[128f32, 128., 0., 0., 128., 128.]], &Device::Cpu).unwrap()
            });
            t.insert(name.into(), src.to_dtype(dtype).unwrap());
        });
        let o = denoise(&model, &bad, &out, &[]);
        fails_with(
            &o,
            &[
                &format!("`{name}`"),
                "ints.safetensors",
                &format!("{dtype:?}"),
                "floating point",
            ],
        );
        assert!(!out.exists());
    }
    // f64 and f16 inputs are converted to f32 and run.
    inputs_with(&bad, |t| {
        for (_, v) in t.iter_mut() {
            *v = v.to_dtype(DType::F64).unwrap();
        }
        let l = t["latents"].to_dtype(DType::F16).unwrap();
        t.insert("latents".into(), l);
    });
    succeeds(&denoise(&model, &bad, &out, &[]));
}

/// Writes a safetensors file by hand (candle cannot write int8, bool or fp8): the tiny
/// inputs as f32, then `extra` `(name, dtype, shape, bytes)` tensors, replacing any of
/// the same name.
fn write_raw_inputs(path: &Path, extra: &[(&str, &str, Vec<usize>, Vec<u8>)]) {
    let t = candle_core::safetensors::load(tiny_inputs(), &Device::Cpu).unwrap();
    let mut all: Vec<(String, String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, v) in &t {
        if extra.iter().any(|e| e.0 == name) {
            continue;
        }
        let f: Vec<f32> = v
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let bytes = f.iter().flat_map(|x| x.to_le_bytes()).collect();
        all.push((name.clone(), "F32".into(), v.dims().to_vec(), bytes));
    }
    for (n, d, sh, b) in extra {
        all.push((n.to_string(), d.to_string(), sh.clone(), b.clone()));
    }
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (n, d, sh, b) in &all {
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": d, "shape": sh, "data_offsets": [data.len(), data.len() + b.len()]}),
        );
        data.extend_from_slice(b);
    }
    let h = serde_json::Value::Object(header).to_string().into_bytes();
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend(h);
    file.extend(data);
    std::fs::write(path, file).unwrap();
}

#[test]
fn unreadable_dtypes_are_named_and_unused_tensors_only_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sdxl");
    let t = candle_core::safetensors::load(tiny_inputs(), &Device::Cpu).unwrap();
    let n = t["latents"].elem_count();
    let shape = t["latents"].dims().to_vec();
    let out = dir.path().join("o.safetensors");
    for dtype in ["I8", "BOOL", "F8_E5M2"] {
        let p = dir.path().join(format!("{dtype}.safetensors"));
        write_raw_inputs(&p, &[("latents", dtype, shape.clone(), vec![0u8; n])]);
        let o = denoise(&model, &p, &out, &[]);
        fails_with(&o, &["`latents`", &format!("{dtype}.safetensors"), dtype]);
        // The same tensor given to generate --latents.
        let o = run(&[
            "generate",
            "--model",
            s(&fixture("tiny-sdxl-pipeline")),
            "--prompt",
            "x",
            "--latents",
            s(&p),
            "--out",
            s(&dir.path().join("x.png")),
        ]);
        fails_with(&o, &["`latents`", dtype]);
    }
    // Unused extra tensors of any dtype are skipped with a warning naming them.
    let p = dir.path().join("extra.safetensors");
    write_raw_inputs(
        &p,
        &[
            ("mask", "BOOL", vec![4], vec![1u8; 4]),
            ("add_time_ids", "F32", vec![1, 6], vec![0u8; 24]),
        ],
    );
    let err = succeeds(&denoise(&model, &p, &out, &[]));
    assert!(err.contains("`mask`") && err.contains("ignoring"), "{err}");
    assert!(
        err.contains("`add_time_ids`") && err.contains("`time_ids`"),
        "{err}"
    );
    assert!(out.exists());
}

#[test]
fn thread_and_rank_counts_are_bounded_by_the_cores() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sdxl");
    let out = dir.path().join("o");
    for (extra, needle) in [
        (
            vec!["--threads-per-rank", "10000"],
            "--threads-per-rank 10000",
        ),
        (
            vec!["--threads-per-rank", "0"],
            "--threads-per-rank must be at least 1",
        ),
        (
            vec!["--strategy", "async", "--world-size", "10000"],
            "--world-size 10000",
        ),
        (vec!["--world-size", "0"], "--world-size must be at least 1"),
    ] {
        let o = denoise(&model, &tiny_inputs(), &out, &extra);
        fails_with(&o, &[needle]);
    }
    for (flag, value) in [("--world-size", "10000"), ("--threads-per-rank", "10000")] {
        let o = run(&["bench", "--model", s(&model), flag, value, "--repeats", "0"]);
        fails_with(&o, &[&format!("{flag} {value}")]);
    }
}

// 4. No hangs.

#[test]
fn empty_and_odd_latent_sizes_fail_fast() {
    let model = fixture("tiny-sdxl");
    let o = run_env(
        &[
            "bench",
            "--model",
            s(&model),
            "--latent-size",
            "0",
            "--repeats",
            "1",
            "--steps",
            "1",
        ],
        &[],
        Duration::from_secs(20),
    );
    fails_with(&o, &["--latent-size 0x0"]);
    // Not a multiple of the U-Net's downsampling: an error (or a run), never a hang.
    let o = run_env(
        &[
            "bench",
            "--model",
            s(&model),
            "--latent-size",
            "3",
            "--repeats",
            "1",
            "--steps",
            "1",
        ],
        &[],
        Duration::from_secs(30),
    );
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

#[test]
fn comm_timeout_zero_blames_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let o = denoise(
        &fixture("tiny-sdxl"),
        &tiny_inputs(),
        &dir.path().join("o"),
        &["--comm-timeout", "0"],
    );
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("--comm-timeout"),
        "{err}"
    );
    assert!(!err.contains("rank"), "{err}");
}

// 5. Non-finite values are caught where they enter.

#[test]
fn nan_weights_are_refused_by_tensor_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    linked_copy(&fixture("tiny-sdxl"), &model);
    let poison = |t: &mut HashMap<String, Tensor>, name: &str| {
        let w = &t[name];
        let mut v = w
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        v[3] = f32::NAN;
        let nw = Tensor::from_vec(v, w.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(w.dtype())
            .unwrap();
        t.insert(name.into(), nw);
    };
    edit_tensors(&model, "unet/diffusion_pytorch_model.safetensors", |t| {
        poison(t, "conv_in.weight")
    });
    let out = dir.path().join("o.safetensors");
    let o = denoise(&model, &tiny_inputs(), &out, &[]);
    fails_with(&o, &["`conv_in.weight`", "unet", "non-finite", "index 3"]);
    // The VAE, read for --decode.
    let model2 = dir.path().join("model2");
    linked_copy(&fixture("tiny-sdxl"), &model2);
    edit_tensors(&model2, "vae/diffusion_pytorch_model.safetensors", |t| {
        poison(t, "decoder.conv_out.weight")
    });
    let png = dir.path().join("x.png");
    let o = denoise(&model2, &tiny_inputs(), &out, &["--decode", s(&png)]);
    fails_with(&o, &["`decoder.conv_out.weight`", "vae", "non-finite"]);
    assert!(!png.exists());
}

#[test]
fn a_failed_decode_writes_no_output_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    linked_copy(&fixture("tiny-sdxl"), &model);
    // Finite weights (they pass the load check) that overflow the decoded image to inf.
    edit_tensors(&model, "vae/diffusion_pytorch_model.safetensors", |t| {
        let w = t["decoder.conv_out.weight"].clone();
        t.insert(
            "decoder.conv_out.weight".into(),
            (w.ones_like().unwrap() * 3e38).unwrap(),
        );
    });
    let out = dir.path().join("o.safetensors");
    let trace = dir.path().join("t.json");
    let png = dir.path().join("x.png");
    let o = denoise(
        &model,
        &tiny_inputs(),
        &out,
        &["--trace", s(&trace), "--decode", s(&png)],
    );
    fails_with(&o, &["non-finite"]);
    assert!(!out.exists() && !trace.exists() && !png.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "only the model"
    );
}

/// Multiplies the tensor `name` so that its largest magnitude is 6e4: finite in f16 (whose
/// largest value is 65504), so the weights load in either dtype, but products with it
/// overflow f16, which f32 holds.
fn to_f16_edge(t: &mut HashMap<String, Tensor>, name: &str) {
    let w = t[name].to_dtype(DType::F32).unwrap();
    let max = w
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    t.insert(name.into(), (w * (6e4 / f64::from(max))).unwrap());
}

#[test]
fn a_denoiser_that_overflows_f16_names_the_step_and_the_flag_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    linked_copy(&fixture("tiny-sdxl"), &model);
    edit_tensors(&model, "unet/diffusion_pytorch_model.safetensors", |t| {
        to_f16_edge(t, "conv_in.weight")
    });
    let out = dir.path().join("o.safetensors");
    let trace = dir.path().join("t.json");
    let png = dir.path().join("x.png");
    let extra = ["--trace", s(&trace), "--decode", s(&png)];
    // The same model runs in f32: the failure below is f16's range, not the weights.
    let o = denoise(&model, &tiny_inputs(), &out, &extra);
    succeeds(&o);
    assert!(out.exists() && png.exists());
    for p in [&out, &trace, &png] {
        std::fs::remove_file(p).unwrap();
    }
    let o = denoise(
        &model,
        &tiny_inputs(),
        &out,
        &[&extra[..], &["--dtype", "f16"]].concat(),
    );
    fails_with(
        &o,
        &[
            "non-finite",
            "at step 1 of 2",
            "--dtype f16",
            "--dtype f32",
            "--dtype bf16",
            "no output was written",
        ],
    );
    assert!(!out.exists() && !trace.exists() && !png.exists());
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "only the model"
    );
}

#[test]
fn a_half_vae_decode_that_overflows_is_redone_in_f32_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    linked_copy(&fixture("tiny-sdxl"), &model);
    edit_tensors(&model, "vae/diffusion_pytorch_model.safetensors", |t| {
        to_f16_edge(t, "decoder.conv_in.weight")
    });
    let out = dir.path().join("o.safetensors");
    let png = dir.path().join("x.png");
    let run = |dtype: &str| {
        denoise(
            &model,
            &tiny_inputs(),
            &out,
            &["--decode", s(&png), "--dtype", dtype],
        )
    };
    // force_upcast true (the fixture's): decoded in f32 from the start, no retry.
    let err = succeeds(&run("f16"));
    assert!(!err.contains("force_upcast"), "{err}");
    let upcast = std::fs::read(&png).unwrap();
    // force_upcast false: decoded in f16, which overflows; redone in f32 and said so.
    edit_json(&model, "vae/config.json", |v| {
        v["force_upcast"] = serde_json::Value::Bool(false)
    });
    let err = succeeds(&run("f16"));
    for needle in [
        "VAE decode in F16",
        "NaN or inf",
        "again in F32",
        "force_upcast is false",
        "vae",
    ] {
        assert!(err.contains(needle), "stderr lacks {needle:?}: {err}");
    }
    // The same f32 decode of the same f16 latents: the same image.
    assert_eq!(std::fs::read(&png).unwrap(), upcast);
}

#[test]
fn bad_scheduler_and_text_encoder_numbers_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    linked_copy(&fixture("tiny-sdxl"), &model);
    let sched = "scheduler/scheduler_config.json";
    let original = std::fs::read_to_string(fixture("tiny-sdxl").join(sched)).unwrap();
    for (key, value) in [
        ("beta_start", "NaN"),
        ("beta_end", "1.5"),
        ("beta_end", "-0.1"),
        ("beta_start", "Infinity"),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
        v[key] = serde_json::json!(0);
        // Python writes NaN and Infinity as bare tokens; so do we.
        let text = v
            .to_string()
            .replace(&format!("\"{key}\":0"), &format!("\"{key}\":{value}"));
        let p = model.join(sched);
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, text).unwrap();
        let o = denoise(&model, &tiny_inputs(), &dir.path().join("o"), &[]);
        fails_with(&o, &[key, "scheduler_config.json"]);
    }
    // DDIM reads clip_sample_range only when clip_sample is on.
    let mut v: serde_json::Value = serde_json::from_str(&original).unwrap();
    v["clip_sample"] = true.into();
    v["clip_sample_range"] = "NaN".into();
    let p = model.join(sched);
    std::fs::remove_file(&p).unwrap();
    std::fs::write(&p, v.to_string()).unwrap();
    let o = denoise(
        &model,
        &tiny_inputs(),
        &dir.path().join("o"),
        &["--scheduler", "ddim"],
    );
    fails_with(&o, &["clip_sample_range"]);
    // A VAE scale that would blow the latents up to infinity.
    let model3 = dir.path().join("model3");
    linked_copy(&fixture("tiny-sdxl"), &model3);
    edit_json(&model3, "vae/config.json", |v| {
        v["scaling_factor"] = (-1e-30).into()
    });
    let png = dir.path().join("x.png");
    let o = denoise(
        &model3,
        &tiny_inputs(),
        &dir.path().join("o3"),
        &["--decode", s(&png)],
    );
    fails_with(&o, &["`scaling_factor`", "vae"]);
    assert!(!png.exists());
    // A text encoder with a negative layer-norm epsilon.
    let pipe = dir.path().join("pipe");
    linked_copy(&fixture("tiny-sdxl-pipeline"), &pipe);
    edit_json(&pipe, "text_encoder/config.json", |v| {
        v["layer_norm_eps"] = (-1.0).into()
    });
    let o = run(&[
        "generate",
        "--model",
        s(&pipe),
        "--prompt",
        "x",
        "--steps",
        "2",
        "--out",
        s(&dir.path().join("x.png")),
    ]);
    fails_with(&o, &["`layer_norm_eps`", "text_encoder"]);
}

#[test]
fn config_numbers_far_outside_real_models_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let sd3 = fixture("tiny-sd3");
    for shift in [1e300, 1e-300] {
        let m = dir.path().join(format!("sd3-{shift:e}"));
        linked_copy(&sd3, &m);
        edit_json(&m, "scheduler/scheduler_config.json", |v| {
            v["shift"] = shift.into()
        });
        let o = denoise(
            &m,
            &sd3.join("inputs.safetensors"),
            &dir.path().join("o"),
            &[],
        );
        fails_with(&o, &["`shift`", "scheduler_config.json", "1e3"]);
    }
    for shift in [1e30, 1e38] {
        let m = dir.path().join(format!("vae-{shift:e}"));
        linked_copy(&fixture("tiny-sdxl"), &m);
        edit_json(&m, "vae/config.json", |v| v["shift_factor"] = shift.into());
        let png = dir.path().join("x.png");
        let o = denoise(
            &m,
            &tiny_inputs(),
            &dir.path().join("o"),
            &["--decode", s(&png)],
        );
        let err = fails_with(&o, &["shift_factor", "vae"]);
        assert!(!err.contains("scaling_factor"), "{err}");
        assert!(!png.exists());
    }
    let pipe = dir.path().join("pipe");
    linked_copy(&fixture("tiny-sdxl-pipeline"), &pipe);
    edit_json(&pipe, "text_encoder/config.json", |v| {
        v["layer_norm_eps"] = 1e30.into()
    });
    let o = run(&[
        "generate",
        "--model",
        s(&pipe),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--out",
        s(&dir.path().join("x.png")),
    ]);
    fails_with(&o, &["`layer_norm_eps`", "text_encoder", "at most 1e-1"]);
}

#[test]
fn huge_embeddings_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("huge.safetensors");
    for name in ["prompt_embeds", "negative_pooled_prompt_embeds", "latents"] {
        inputs_with(&bad, |t| {
            let e = &t[name];
            let v = (e.ones_like().unwrap() * 3e38).unwrap();
            t.insert(name.into(), v);
        });
        let o = denoise(&fixture("tiny-sdxl"), &bad, &dir.path().join("o"), &[]);
        fails_with(&o, &[&format!("`{name}`"), "huge.safetensors", "3.000e38"]);
    }
}

// 6. Weights the model does not use are reported; missing ones are errors.

#[test]
fn unexpected_weights_are_reported_and_missing_ones_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    linked_copy(&fixture("tiny-sdxl"), &model);
    edit_tensors(&model, "unet/diffusion_pytorch_model.safetensors", |t| {
        t.insert(
            "down_blocks.7.resnets.0.conv1.weight".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = succeeds(&denoise(&model, &tiny_inputs(), &dir.path().join("o"), &[]));
    assert!(
        err.contains("does not use") && err.contains("down_blocks.7.resnets.0.conv1.weight"),
        "{err}"
    );
    edit_tensors(&model, "unet/diffusion_pytorch_model.safetensors", |t| {
        t.remove("conv_out.bias");
    });
    let o = denoise(&model, &tiny_inputs(), &dir.path().join("o"), &[]);
    fails_with(&o, &["missing tensor `conv_out.bias`"]);
}

// 7. The --prompts format comes from the extension or a flag, never from the content.

#[test]
fn prompts_format_follows_the_extension_or_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sdxl-pipeline");
    let gen = |prompts: &Path, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            s(&model),
            "--prompts",
            s(prompts),
            "--steps",
            "1",
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        run(&args)
    };
    // A JSON object is not a prompt list.
    let obj = dir.path().join("p.json");
    std::fs::write(&obj, r#"{"prompt": "a red circle"}"#).unwrap();
    let out = dir.path().join("a");
    fails_with(&gen(&obj, &out, &[]), &["p.json", "JSON list"]);
    assert!(!out.exists(), "--out was created for a refused batch");
    // A plain-text file whose first prompt starts with `[`, with a byte-order mark.
    let txt = dir.path().join("p.txt");
    std::fs::write(&txt, "\u{feff}[draft] a red circle\r\na blue square\n").unwrap();
    succeeds(&gen(&txt, &out, &[]));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m[0]["prompt"], "[draft] a red circle");
    assert_eq!(m[1]["prompt"], "a blue square");
    // The flag wins over the extension; JSON lines work; unknown keys are refused.
    let list = dir.path().join("list.txt");
    std::fs::write(&list, r#"[{"prompt": "x", "seed": 4}]"#).unwrap();
    let out2 = dir.path().join("b");
    succeeds(&gen(&list, &out2, &["--prompts-format", "json"]));
    let lines = dir.path().join("p.jsonl");
    std::fs::write(
        &lines,
        "{\"prompt\": \"x\"}\n\n{\"prompt\": \"y\", \"sed\": 1}\n",
    )
    .unwrap();
    fails_with(
        &gen(&lines, &dir.path().join("c"), &[]),
        &["p.jsonl line 3", "sed"],
    );
}

// 8. Nothing half-made is left behind.

#[test]
fn batch_errors_of_the_whole_request_are_reported_once_and_make_no_folder() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "one\ntwo\nthree\n").unwrap();
    let out = dir.path().join("new");
    let o = run(&[
        "generate",
        "--model",
        s(&fixture("tiny-sdxl-pipeline")),
        "--prompts",
        s(&prompts),
        "--height",
        "0",
        "--out",
        s(&out),
    ]);
    let err = fails_with(&o, &["--height 0"]);
    assert_eq!(err.matches("--height 0").count(), 1, "{err}");
    assert!(!out.exists());
    // A model folder that does not load.
    let o = run(&[
        "generate",
        "--model",
        s(&dir.path().join("nowhere")),
        "--prompts",
        s(&prompts),
        "--out",
        s(&out),
    ]);
    fails_with(&o, &["nowhere"]);
    assert!(!out.exists());
}

#[test]
fn a_damaged_cached_default_model_is_unpacked_again() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let env = [("HYBRIDIFF_CACHE", s(&cache))];
    let out = dir.path().join("x.png");
    let args = [
        "generate",
        "--prompt",
        "x",
        "--height",
        "64",
        "--width",
        "64",
        "--steps",
        "1",
        "--out",
        s(&out),
    ];
    succeeds(&run_env(&args, &env, Duration::from_secs(120)));
    let unpacked = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("default-")
        })
        .expect("an unpacked default model");
    let weights = unpacked.join("unet/diffusion_pytorch_model.safetensors");
    let good = std::fs::read(&weights).unwrap();
    // Truncated, then the same length with one byte changed.
    std::fs::write(&weights, &good[..1000]).unwrap();
    std::fs::remove_file(&out).unwrap();
    succeeds(&run_env(&args, &env, Duration::from_secs(120)));
    assert!(out.exists());
    assert_eq!(std::fs::read(&weights).unwrap(), good);
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0xff;
    std::fs::write(&weights, &bad).unwrap();
    succeeds(&run_env(&args, &env, Duration::from_secs(120)));
    assert_eq!(std::fs::read(&weights).unwrap(), good);
    std::fs::remove_file(unpacked.join("model_index.json")).unwrap();
    succeeds(&run_env(&args, &env, Duration::from_secs(120)));
    assert!(unpacked.join("model_index.json").is_file());
}

#[test]
fn stale_unpacks_of_the_default_model_are_removed_and_fresh_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let stale = cache.join(".default-stale1");
    let fresh = cache.join(".default-fresh1");
    for d in [&stale, &fresh] {
        std::fs::create_dir_all(d.join("unet")).unwrap();
        std::fs::write(d.join("unet/config.json"), "{").unwrap();
    }
    let old = std::time::SystemTime::now() - Duration::from_secs(2 * 3600);
    std::fs::File::open(&stale)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let o = run_env(
        &[
            "generate",
            "--prompt",
            "a red circle",
            "--steps",
            "1",
            "--out",
            s(&dir.path().join("x.png")),
        ],
        &[("HYBRIDIFF_CACHE", s(&cache))],
        Duration::from_secs(60),
    );
    succeeds(&o);
    assert!(!stale.exists(), "a stale unpack was kept");
    assert!(
        fresh.exists(),
        "a recent unpack (maybe in progress) was removed"
    );
}

// 9. Messages that name what is wrong.

#[test]
fn inputs_that_are_folders_or_fifos_are_named_as_such_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sdxl");
    let out = dir.path().join("o");
    let o = denoise(&model, dir.path(), &out, &[]);
    fails_with(&o, &["is a folder"]);
    let fifo = dir.path().join("in.safetensors");
    mkfifo(&fifo);
    let o = run_env(
        &[
            "denoise",
            "--model",
            s(&model),
            "--inputs",
            s(&fifo),
            "--out",
            s(&out),
            "--steps",
            "2",
        ],
        &[],
        Duration::from_secs(20),
    );
    fails_with(&o, &["in.safetensors", "FIFO"]);
    // A FIFO in place of a config file.
    let m = dir.path().join("model");
    linked_copy(&model, &m);
    std::fs::remove_file(m.join("unet/config.json")).unwrap();
    mkfifo(&m.join("unet/config.json"));
    let o = run_env(
        &[
            "denoise",
            "--model",
            s(&m),
            "--inputs",
            s(&tiny_inputs()),
            "--out",
            s(&out),
        ],
        &[],
        Duration::from_secs(20),
    );
    fails_with(&o, &["config.json", "FIFO"]);
}

#[test]
fn negative_numbers_and_dash_prompts_are_values_not_flags() {
    let dir = tempfile::tempdir().unwrap();
    let o = denoise(
        &fixture("tiny-sdxl"),
        &tiny_inputs(),
        &dir.path().join("o"),
        &["--guidance", "-5"],
    );
    assert!(
        !stderr(&o).contains("unexpected argument"),
        "{}",
        stderr(&o)
    );
    let o = run(&[
        "generate",
        "--model",
        s(&fixture("tiny-sdxl-pipeline")),
        "--prompt",
        "-a dash first",
        "--negative-prompt",
        "-blurry",
        "--steps",
        "1",
        "--out",
        s(&dir.path().join("x.png")),
    ]);
    succeeds(&o);
}

#[test]
fn the_truncation_warning_shows_the_dropped_part_shortened() {
    let dir = tempfile::tempdir().unwrap();
    // About 100 KB: one argument may hold at most 128 KiB on Linux.
    let prompt = "red circle ".repeat(9_000);
    let o = run(&[
        "generate",
        "--model",
        s(&fixture("tiny-sdxl-pipeline")),
        "--prompt",
        &prompt,
        "--steps",
        "1",
        "--out",
        s(&dir.path().join("x.png")),
    ]);
    let err = succeeds(&o);
    assert!(
        err.contains("truncated") && err.contains("characters in all"),
        "{err}"
    );
    assert!(err.len() < 4_000, "{} bytes of warnings", err.len());
}

#[test]
fn a_long_batch_prompt_is_echoed_shortened_and_kept_whole_in_the_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = "red circle ".repeat(9_000);
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, format!("{}\n", prompt.trim())).unwrap();
    let out = dir.path().join("imgs");
    let o = run(&[
        "generate",
        "--model",
        s(&fixture("tiny-sdxl-pipeline")),
        "--prompts",
        s(&prompts),
        "--steps",
        "1",
        "--out",
        s(&out),
    ]);
    succeeds(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        stdout.contains("0000.png: ") && stdout.contains("characters in all"),
        "{stdout}"
    );
    assert!(stdout.len() < 1_000, "{} bytes on stdout", stdout.len());
    let manifest = std::fs::read_to_string(out.join("manifest.json")).unwrap();
    assert!(manifest.contains(prompt.trim()));
}

// 10. compare.

#[test]
fn compare_refuses_images_below_the_ssim_window_and_reports_unpaired_files() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let img = image::RgbImage::from_fn(16, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 9, 7]));
    img.save(a.join("x.png")).unwrap();
    img.save(b.join("x.png")).unwrap();
    img.save(a.join("only-a.png")).unwrap();
    img.save(b.join("only-b.png")).unwrap();
    let o = run(&["compare", s(&a), s(&b), "--json"]);
    let err = succeeds(&o);
    assert!(
        err.contains("only-a.png") && err.contains("only-b.png"),
        "{err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["only_in_a"], serde_json::json!(["only-a.png"]));
    assert_eq!(v["only_in_b"], serde_json::json!(["only-b.png"]));
    assert_eq!(v["images"].as_array().unwrap().len(), 1);
    for (w, h) in [(6, 16), (16, 6), (1, 1)] {
        let small = image::RgbImage::new(w, h);
        small.save(a.join("x.png")).unwrap();
        small.save(b.join("x.png")).unwrap();
        let o = run(&["compare", s(&a), s(&b)]);
        fails_with(&o, &["x.png", &format!("{w}x{h}"), "7x7"]);
        assert!(!String::from_utf8_lossy(&o.stdout).contains("NaN"));
    }
}

#[test]
fn a_pipeline_whose_parts_do_not_fit_together_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("pipe");
    linked_copy(&fixture("tiny-sdxl-pipeline"), &pipe);
    // Without its first text encoder the SDXL pipeline's embeddings are too narrow.
    edit_json(&pipe, "model_index.json", |v| {
        v.as_object_mut().unwrap().remove("text_encoder");
    });
    let out = dir.path().join("x.png");
    let o = run(&[
        "generate",
        "--model",
        s(&pipe),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--out",
        s(&out),
    ]);
    fails_with(
        &o,
        &["pipe", "32-wide embeddings", "takes 64", "model_index.json"],
    );
    assert!(!out.exists());
}

#[test]
fn bench_checks_its_runs_before_the_timed_forwards() {
    let model = fixture("tiny-sdxl");
    for (flags, needle) in [
        (&["--steps", "0"][..], "--steps"),
        (
            &["--strategies", "async", "--world-size", "1"],
            "--world-size 1",
        ),
        (
            &["--strategies", "hybrid", "--world-size", "3"],
            "--world-size 3",
        ),
    ] {
        let mut args = vec!["bench", "--model", s(&model), "--repeats", "3"];
        args.extend_from_slice(flags);
        let o = run(&args);
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        assert!(
            !o.status.success() && err.contains(needle),
            "{flags:?}: {err}"
        );
        assert!(
            !out.contains("denoiser forward"),
            "timed before failing: {out}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Round 3 (issue 28): outputs that overwrite or mix, Ctrl-C in a batch, numbers from
// impossible traces and images, schedulers that do not fit, flags that would be ignored.

/// `bench` on the tiny SDXL U-Net, 1 step, no timed forwards: quick enough to run for real.
fn quick_bench(extra: &[&str]) -> Output {
    let model = fixture("tiny-sdxl");
    let mut args = vec![
        "bench",
        "--model",
        s(&model),
        "--steps",
        "1",
        "--repeats",
        "0",
        "--threads-per-rank",
        "1",
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// A batch on the tiny SDXL pipeline.
fn quick_batch(prompts: &Path, out: &Path, extra: &[&str]) -> Output {
    let model = fixture("tiny-sdxl-pipeline");
    let mut args = vec![
        "generate",
        "--model",
        s(&model),
        "--prompts",
        s(prompts),
        "--steps",
        "1",
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// The names in a folder, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// The `file` entries of a batch's manifest (which must be a JSON list).
fn manifest_files(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("manifest.json")).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("manifest not JSON ({e}): {text}"));
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["file"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn no_output_overwrites_another_output_or_an_input_whatever_its_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bt = d.join("bt");
    // The issue's example, and its siblings: a summary onto a per-strategy trace.
    for (flag, name) in [
        ("--json", "cfg.json"),
        ("--markdown", "serial.json"),
        ("--json", "SERIAL.json"),
        ("--markdown", "./cfg.json"),
    ] {
        let target = format!("{}/{name}", s(&bt));
        let o = quick_bench(&[
            "--strategies",
            "serial,cfg",
            "--trace-dir",
            s(&bt),
            flag,
            &target,
        ]);
        fails_with(&o, &[flag, "--trace-dir (", "same file"]);
        assert!(
            !bt.exists(),
            "{flag} {name}: made the folder before refusing"
        );
    }
    // Two summaries by other spellings of one path.
    let sub = d.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let o = quick_bench(&[
        "--json",
        s(&d.join("x.json")),
        "--markdown",
        &format!("{}/../x.json", s(&sub)),
    ]);
    fails_with(&o, &["--json", "--markdown", "same file"]);
    // A link to the folder and a hard link to a file are the same file.
    std::os::unix::fs::symlink(d, d.join("alias")).unwrap();
    let model = fixture("tiny-sdxl");
    let o = denoise(
        &model,
        &tiny_inputs(),
        &d.join("o.safetensors"),
        &[
            "--trace",
            s(&d.join("t.json")),
            "--decode",
            s(&d.join("alias/T.json")),
        ],
    );
    fails_with(&o, &["--trace", "--decode", "same file"]);
    let inputs = d.join("in.safetensors");
    std::fs::copy(tiny_inputs(), &inputs).unwrap();
    std::fs::hard_link(&inputs, d.join("in2.safetensors")).unwrap();
    let o = denoise(&model, &inputs, &d.join("in2.safetensors"), &[]);
    fails_with(&o, &["--out", "--inputs", "destroy the input"]);
    // A batch's per-prompt names against its inputs: the prompts file named like an image.
    let b = d.join("b");
    std::fs::create_dir(&b).unwrap();
    let prompts = b.join("0001.png");
    std::fs::write(&prompts, "a\nb\n").unwrap();
    let o = quick_batch(&prompts, &b, &["--prompts-format", "text"]);
    fails_with(&o, &["--out (0001.png)", "--prompts", "destroy the input"]);
    assert_eq!(std::fs::read_to_string(&prompts).unwrap(), "a\nb\n");
    // A single image and its trace.
    let o = run(&[
        "generate",
        "--model",
        s(&fixture("tiny-sdxl-pipeline")),
        "--prompt",
        "x",
        "--out",
        s(&d.join("i.png")),
        "--trace",
        s(&d.join("I.PNG")),
    ]);
    fails_with(&o, &["--out", "--trace", "same file"]);
}

#[test]
fn image_outputs_are_png_by_name_and_nothing_goes_to_a_file_named_dash() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = fixture("tiny-sdxl");
    let pipe = fixture("tiny-sdxl-pipeline");
    let gen = |out: &str| {
        run(&[
            "generate",
            "--model",
            s(&pipe),
            "--prompt",
            "x",
            "--steps",
            "1",
            "--out",
            out,
        ])
    };
    for bad in ["x.jpg", "x.JPEG", "x.webp", "x", "x.png.tmp"] {
        let p = d.join(bad);
        fails_with(&gen(s(&p)), &["--out", "PNG images only", ".png"]);
        let o = denoise(
            &model,
            &tiny_inputs(),
            &d.join("o.st"),
            &["--decode", s(&p)],
        );
        fails_with(&o, &["--decode", "PNG images only"]);
    }
    // Non-image outputs with an image's name.
    let o = denoise(&model, &tiny_inputs(), &d.join("o.png"), &[]);
    fails_with(&o, &["--out", "safetensors, not an image"]);
    let o = denoise(
        &model,
        &tiny_inputs(),
        &d.join("o.st"),
        &["--trace", s(&d.join("t.jpg"))],
    );
    fails_with(&o, &["--trace", "JSON, not an image"]);
    let o = quick_bench(&["--markdown", s(&d.join("t.png"))]);
    fails_with(&o, &["--markdown", "Markdown, not an image"]);
    // `-` everywhere: refused, and no file named `-` appears.
    let cwd = tempfile::tempdir().unwrap();
    let in_cwd = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_hybridiff"))
            .args(args)
            .current_dir(cwd.path())
            .output()
            .unwrap()
    };
    let prompts = d.join("p.txt");
    std::fs::write(&prompts, "a\n").unwrap();
    let cfg = model.join("unet/config.json");
    for (args, flag) in [
        (
            vec![
                "generate",
                "--model",
                s(&pipe),
                "--prompt",
                "x",
                "--out",
                "-",
            ],
            "--out -",
        ),
        (
            vec![
                "generate",
                "--model",
                s(&pipe),
                "--prompts",
                s(&prompts),
                "--out",
                "-",
            ],
            "--out",
        ),
        (
            vec![
                "denoise",
                "--model",
                s(&model),
                "--inputs",
                s(&tiny_inputs()),
                "--out",
                "-",
            ],
            "--out -",
        ),
        (
            vec![
                "denoise",
                "--model",
                s(&model),
                "--inputs",
                s(&tiny_inputs()),
                "--out",
                "o.st",
                "--trace",
                "-",
            ],
            "--trace -",
        ),
        (
            vec!["bench", "--model", s(&model), "--json", "-"],
            "--json -",
        ),
        (
            vec!["bench", "--model", s(&model), "--markdown", "-"],
            "--markdown -",
        ),
        (
            vec!["bench", "--model", s(&model), "--trace-dir", "-"],
            "--trace-dir",
        ),
        (vec!["init", "--config", s(&cfg), "--out", "-"], "--out"),
        (vec!["parity", "--json", "-"], "--json -"),
    ] {
        let o = in_cwd(&args);
        fails_with(&o, &[flag, "standard output"]);
        assert!(
            !cwd.path().join("-").exists(),
            "{args:?} wrote a file named -"
        );
    }
    // `./-` is a file named `-`.
    let o = in_cwd(&[
        "bench",
        "--model",
        s(&model),
        "--steps",
        "1",
        "--repeats",
        "0",
        "--strategies",
        "serial",
        "--json",
        "./-",
    ]);
    succeeds(&o);
    assert!(cwd.path().join("-").is_file());
}

#[test]
fn output_folders_are_new_empty_or_forced_and_never_hold_two_runs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let prompts = d.join("p.txt");
    std::fs::write(&prompts, "a\nb\nc\n").unwrap();
    let b = d.join("nested/b");
    succeeds(&quick_batch(&prompts, &b, &[]));
    assert_eq!(
        names_in(&b),
        ["0000.png", "0001.png", "0002.png", "manifest.json"]
    );
    // Again without --force: refused, nothing touched.
    let before = std::fs::read(b.join("0002.png")).unwrap();
    std::fs::write(&prompts, "d\n").unwrap();
    let o = quick_batch(&prompts, &b, &[]);
    fails_with(&o, &["--out", "not empty", "0000.png", "--force"]);
    assert_eq!(std::fs::read(b.join("0002.png")).unwrap(), before);
    // With --force: the old run's files go, even those the new run does not write.
    succeeds(&quick_batch(&prompts, &b, &["--force"]));
    assert_eq!(names_in(&b), ["0000.png", "manifest.json"]);
    assert_eq!(manifest_files(&b), ["0000.png"]);
    // Something a batch does not write is never deleted: refused, kept.
    std::fs::write(b.join("notes.txt"), "mine").unwrap();
    mkfifo(&b.join("0007.png"));
    let o = quick_batch(&prompts, &b, &["--force"]);
    fails_with(&o, &["notes.txt", "does not write", "0007.png (a FIFO"]);
    assert_eq!(
        std::fs::read_to_string(b.join("notes.txt")).unwrap(),
        "mine"
    );
    // bench --trace-dir: created when missing; a stale trace is refused, then replaced.
    let bt = d.join("bt");
    succeeds(&quick_bench(&[
        "--strategies",
        "serial,cfg",
        "--trace-dir",
        s(&bt),
    ]));
    assert_eq!(names_in(&bt), ["cfg.json", "serial.json"]);
    let o = quick_bench(&["--strategies", "serial", "--trace-dir", s(&bt)]);
    fails_with(&o, &["--trace-dir", "not empty", "--force"]);
    succeeds(&quick_bench(&[
        "--strategies",
        "serial",
        "--trace-dir",
        s(&bt),
        "--force",
    ]));
    assert_eq!(
        names_in(&bt),
        ["serial.json"],
        "a cfg trace of the old run was left"
    );
    // init --force: a U-Net folder made into an MMDiT one keeps no unet/.
    let m = d.join("m");
    let unet_cfg = fixture("tiny-sdxl").join("unet/config.json");
    let dit_cfg = fixture("tiny-sd3").join("transformer/config.json");
    succeeds(&run(&["init", "--config", s(&unet_cfg), "--out", s(&m)]));
    succeeds(&run(&[
        "init",
        "--config",
        s(&dit_cfg),
        "--out",
        s(&m),
        "--force",
    ]));
    assert_eq!(
        names_in(&m),
        ["model_index.json", "scheduler", "transformer"]
    );
    std::fs::create_dir(m.join("vae")).unwrap();
    let o = run(&["init", "--config", s(&unet_cfg), "--out", s(&m), "--force"]);
    fails_with(&o, &["vae", "does not write"]);
    assert!(m.join("transformer").is_dir());
}

/// Makes `p` look `secs` seconds old.
fn age(p: &Path, secs: u64) {
    let f = std::fs::File::options().write(true).open(p).unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(secs))
        .unwrap();
}

#[test]
fn temporary_files_a_killed_run_left_are_removed_by_the_next_and_live_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let b = d.join("b");
    std::fs::create_dir(&b).unwrap();
    // Left by killed runs: unlocked and old. One a live writer holds: locked.
    for name in [".hybridiff-aaaaaa.tmp", ".hybridiff-probe-bbbbbb.tmp"] {
        std::fs::write(b.join(name), "partial").unwrap();
        age(&b.join(name), 60);
        std::fs::write(d.join(name), "partial").unwrap();
        age(&d.join(name), 60);
    }
    let live = d.join(".hybridiff-cccccc.tmp");
    std::fs::write(&live, "in progress").unwrap();
    age(&live, 60);
    let held = std::fs::File::open(&live).unwrap();
    use std::os::fd::AsRawFd;
    assert_eq!(unsafe { libc::flock(held.as_raw_fd(), libc::LOCK_EX) }, 0);
    // Not ours (no .tmp suffix, or no prefix): never touched.
    std::fs::write(d.join(".hybridiff-notes"), "mine").unwrap();
    let prompts = d.join("p.txt");
    std::fs::write(&prompts, "a\n").unwrap();
    // The leftovers do not make the folder count as non-empty.
    succeeds(&quick_batch(&prompts, &b, &[]));
    assert_eq!(names_in(&b), ["0000.png", "manifest.json"]);
    let model = fixture("tiny-sdxl");
    succeeds(&denoise(
        &model,
        &tiny_inputs(),
        &d.join("o.safetensors"),
        &[],
    ));
    let left: Vec<String> = names_in(d)
        .into_iter()
        .filter(|n| n.starts_with(".hybridiff"))
        .collect();
    assert_eq!(left, [".hybridiff-cccccc.tmp", ".hybridiff-notes"]);
    drop(held);
}

/// Sends `sig` to a child process.
fn signal(child: &std::process::Child, sig: i32) {
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Starts a batch of `n` prompts on the tiny pipeline, slow enough per image (many steps)
/// to be interrupted in the middle of one.
fn start_batch(dir: &Path, n: usize) -> (std::process::Child, PathBuf) {
    let prompts = dir.join("p.txt");
    let text: String = (0..n).map(|i| format!("prompt {i}\n")).collect();
    std::fs::write(&prompts, text).unwrap();
    let out = dir.join("b");
    let child = Command::new(env!("CARGO_BIN_EXE_hybridiff"))
        .args([
            "generate",
            "--model",
            s(&fixture("tiny-sdxl-pipeline")),
            "--prompts",
            s(&prompts),
            "--steps",
            "40",
            "--out",
            s(&out),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    (child, out)
}

/// Waits (at most a minute) until the batch's manifest lists `n` entries.
fn wait_for_entries(out: &Path, n: usize) -> u64 {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(out.join("manifest.json")) {
            if let Ok(serde_json::Value::Array(v)) = serde_json::from_str(&text) {
                if v.len() >= n {
                    use std::os::unix::fs::MetadataExt;
                    return std::fs::metadata(out.join("manifest.json")).unwrap().ino();
                }
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no {n} entries in a minute"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The folder and its manifest agree: every PNG is listed, every listed file exists, and no
/// temporary file is left.
#[track_caller]
fn folder_agrees_with_manifest(out: &Path, temporaries_allowed: bool) -> Vec<String> {
    let listed = manifest_files(out);
    let pngs: Vec<String> = names_in(out)
        .into_iter()
        .filter(|n| n.ends_with(".png"))
        .collect();
    assert_eq!(
        pngs, listed,
        "the folder's images and the manifest disagree"
    );
    if !temporaries_allowed {
        let tmp: Vec<String> = names_in(out)
            .into_iter()
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
    }
    listed
}

#[test]
fn ctrl_c_in_a_batch_stops_at_the_next_step_and_leaves_folder_and_manifest_agreeing() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, out) = start_batch(dir.path(), 40);
    let inode = wait_for_entries(&out, 1);
    let asked = Instant::now();
    signal(&child, libc::SIGINT);
    let o = wait_with_limit(&mut child, Duration::from_secs(30));
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted") && !err.contains("panicked"),
        "{err}"
    );
    // Cancelled within the running image, not after the rest of the batch.
    assert!(
        asked.elapsed() < Duration::from_secs(20),
        "took {:?}",
        asked.elapsed()
    );
    let listed = folder_agrees_with_manifest(&out, false);
    assert!((1..40).contains(&listed.len()), "{listed:?}");
    // Entries were appended to one file, never rewritten by rename.
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(out.join("manifest.json")).unwrap().ino(),
        inode
    );
}

#[test]
fn a_second_ctrl_c_exits_at_once_and_the_next_run_cleans_up() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, out) = start_batch(dir.path(), 40);
    wait_for_entries(&out, 1);
    signal(&child, libc::SIGINT);
    std::thread::sleep(Duration::from_millis(20));
    signal(&child, libc::SIGINT);
    let o = wait_with_limit(&mut child, Duration::from_secs(10));
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    // Whatever the moment: a complete list, naming exactly the images there.
    folder_agrees_with_manifest(&out, true);
    // Leftover temporary files (aged past the live-writer margin) go with the next run.
    for n in names_in(&out).into_iter().filter(|n| n.ends_with(".tmp")) {
        age(&out.join(n), 60);
    }
    let prompts = dir.path().join("p.txt");
    std::fs::write(&prompts, "again\n").unwrap();
    succeeds(&quick_batch(&prompts, &out, &["--force"]));
    assert_eq!(folder_agrees_with_manifest(&out, false), ["0000.png"]);
}

fn wait_with_limit(child: &mut std::process::Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("still running {limit:?} after Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut o = Output {
        status: child.wait().unwrap(),
        stdout: Vec::new(),
        stderr: Vec::new(),
    };
    use std::io::Read;
    child
        .stdout
        .take()
        .unwrap()
        .read_to_end(&mut o.stdout)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_end(&mut o.stderr)
        .unwrap();
    o
}

#[test]
fn bench_from_trace_reads_only_possible_numbers_and_names_the_file_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good");
    succeeds(&quick_bench(&[
        "--strategies",
        "serial,cfg",
        "--trace-dir",
        s(&good),
    ]));
    let from = |d: &Path| run(&["bench", "--from-trace", s(d), "--simulate-link", "pcie4"]);
    succeeds(&from(&good));
    // One edit per case, on a copy of the good folder.
    type Edit = fn(&mut serde_json::Value);
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "cfg.json",
            |v| v["steps"][0]["rank_compute_seconds"][0] = (-0.5).into(),
            "steps[0].rank_compute_seconds[0]` = -0.5",
        ),
        (
            "cfg.json",
            |v| v["steps"][0]["rank_compute_seconds"][1] = 1e300.into(),
            "rank_compute_seconds[1]",
        ),
        (
            "serial.json",
            |v| v["total_seconds"] = 0.into(),
            "`total_seconds` = 0",
        ),
        (
            "serial.json",
            |v| v["total_seconds"] = (-1.0).into(),
            "`total_seconds` = -1",
        ),
        (
            "cfg.json",
            |v| v["world_size"] = 3.into(),
            "one per rank (3)",
        ),
        (
            "cfg.json",
            |v| v["world_size"] = 0.into(),
            "`world_size` = 0",
        ),
        (
            "serial.json",
            |v| v["world_size"] = 2.into(),
            "`world_size` = 2",
        ),
        (
            "cfg.json",
            |v| v["strategy"] = "cfg | evil".into(),
            "`strategy`",
        ),
        (
            "cfg.json",
            |v| v["rank_devices"] = serde_json::json!(["cpu", "cpu|<b>"]),
            "rank_devices[1]",
        ),
        (
            "cfg.json",
            |v| v["transfer"] = "fast\n| x |".into(),
            "`transfer`",
        ),
        ("cfg.json", |v| v["num_steps"] = 5.into(), "`num_steps` = 5"),
        (
            "cfg.json",
            |v| v["bytes_sent"] = 1.into(),
            "`bytes_sent` = 1",
        ),
        (
            "cfg.json",
            |v| v["steps"][0]["wall_seconds"] = (-1.0).into(),
            "wall_seconds",
        ),
        ("cfg.json", |v| v["guidance"] = 9.into(), "`guidance` = 9"),
        (
            "cfg.json",
            |v| v["steps"][0]["index"] = 4.into(),
            "steps[0].index",
        ),
    ];
    for (i, (file, edit, needle)) in cases.into_iter().enumerate() {
        let d = dir.path().join(format!("case{i}"));
        std::fs::create_dir(&d).unwrap();
        for f in ["serial.json", "cfg.json"] {
            std::fs::copy(good.join(f), d.join(f)).unwrap();
        }
        let p = d.join(file);
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(&mut v);
        std::fs::write(&p, v.to_string()).unwrap();
        let o = from(&d);
        let err = stderr(&o);
        assert!(
            !o.status.success(),
            "case {i} ({needle}) exited 0: {}",
            String::from_utf8_lossy(&o.stdout)
        );
        assert!(err.contains(needle), "case {i}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // Exactly one serial baseline.
    let two = dir.path().join("two");
    std::fs::create_dir(&two).unwrap();
    for f in ["serial.json", "cfg.json"] {
        std::fs::copy(good.join(f), two.join(f)).unwrap();
    }
    std::fs::copy(good.join("serial.json"), two.join("serial-again.json")).unwrap();
    fails_with(&from(&two), &["2 serial traces", "serial-again.json"]);
    std::fs::remove_file(two.join("serial.json")).unwrap();
    std::fs::remove_file(two.join("serial-again.json")).unwrap();
    fails_with(&from(&two), &["no serial trace"]);
    // A file name is a Markdown cell.
    std::fs::copy(good.join("serial.json"), two.join("serial.json")).unwrap();
    std::fs::rename(two.join("cfg.json"), two.join("a|b.json")).unwrap();
    fails_with(&from(&two), &["a|b.json", "Markdown"]);
    // Flags that describe a run do not go with --from-trace.
    let o = run(&[
        "bench",
        "--from-trace",
        s(&good),
        "--simulate-link",
        "pcie4",
        "--steps",
        "9",
    ]);
    fails_with(&o, &["--steps", "--from-trace"]);
}

/// A PNG file of `w x h` RGBA8 pixels filled by `f`.
fn write_rgba(p: &Path, w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 4]) {
    image::RgbaImage::from_fn(w, h, |x, y| image::Rgba(f(x, y)))
        .save(p)
        .unwrap();
}

/// A PNG that is only a header claiming `w x h` pixels (8-bit RGB) and an end chunk.
fn png_header_only(p: &Path, w: u32, h: u32) {
    fn crc(bytes: &[u8]) -> u32 {
        let mut c = 0xffff_ffffu32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let chunk = |kind: &[u8], data: &[u8]| {
        let mut v = (data.len() as u32).to_be_bytes().to_vec();
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        v.extend_from_slice(&body);
        v.extend_from_slice(&crc(&body).to_be_bytes());
        v
    };
    let mut ihdr = w.to_be_bytes().to_vec();
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    let mut bytes = b"\x89PNG\r\n\x1a\n".to_vec();
    bytes.extend(chunk(b"IHDR", &ihdr));
    bytes.extend(chunk(b"IEND", &[]));
    std::fs::write(p, bytes).unwrap();
}

#[test]
fn compare_sees_alpha_and_16_bit_differences_and_bounds_pixels_before_decoding() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    let rgb = |x: u32, y: u32| [(x * 20) as u8, (y * 20) as u8, 100];
    // The same colours, different transparency.
    write_rgba(&a.join("alpha.png"), 9, 9, |x, y| {
        let [r, g, bl] = rgb(x, y);
        [r, g, bl, 255]
    });
    write_rgba(&b.join("alpha.png"), 9, 9, |x, y| {
        let [r, g, bl] = rgb(x, y);
        [r, g, bl, (x * 25) as u8]
    });
    // 16-bit images that differ below the 8th bit.
    let img16 = |lo: u16| {
        image::ImageBuffer::<image::Rgb<u16>, Vec<u16>>::from_fn(9, 9, |x, _| {
            image::Rgb([(x as u16) * 4096 + lo, 1000, 2000])
        })
    };
    img16(0).save(a.join("deep.png")).unwrap();
    img16(7).save(b.join("deep.png")).unwrap();
    // An RGB image against itself stays identical.
    write_rgba(&a.join("same.png"), 9, 9, |x, y| {
        let [r, g, bl] = rgb(x, y);
        [r, g, bl, 255]
    });
    std::fs::copy(a.join("same.png"), b.join("same.png")).unwrap();
    let o = run(&["compare", s(&a), s(&b), "--json"]);
    succeeds(&o);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let pair = |name: &str| {
        v["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["file"] == name)
            .unwrap()
            .clone()
    };
    assert!(
        pair("alpha.png")["psnr_db"].is_number(),
        "alpha ignored: {v}"
    );
    assert_eq!(pair("alpha.png")["channels"], "RGBA");
    assert!(pair("alpha.png")["ssim"].as_f64().unwrap() < 1.0);
    assert!(
        pair("deep.png")["psnr_db"].is_number(),
        "low bits ignored: {v}"
    );
    assert_eq!(pair("deep.png")["bits"], 16);
    assert!(pair("same.png")["psnr_db"].is_null());
    assert_eq!(v["identical"], 1);
    // A 140-byte file claiming 12000 x 12000 pixels: refused from its header, at once.
    let (c, e) = (dir.path().join("c"), dir.path().join("e"));
    std::fs::create_dir(&c).unwrap();
    std::fs::create_dir(&e).unwrap();
    png_header_only(&c.join("big.png"), 12000, 12000);
    png_header_only(&e.join("big.png"), 12000, 12000);
    let start = Instant::now();
    let o = run(&["compare", s(&c), s(&e)]);
    fails_with(&o, &["big.png", "12000x12000", "at most 16777216 pixels"]);
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_scheduler_of_the_other_training_objective_is_refused_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    // The issue's example: flow matching on the default (epsilon) model.
    let o = run_env(
        &[
            "generate",
            "--prompt",
            "a red circle on a white background",
            "--seed",
            "1",
            "--scheduler",
            "flow-euler",
            "--out",
            s(&dir.path().join("x.png")),
        ],
        &[("HYBRIDIFF_CACHE", s(&dir.path().join("cache")))],
        Duration::from_secs(60),
    );
    fails_with(
        &o,
        &[
            "--scheduler flow-euler",
            "flow matching",
            "epsilon prediction",
            "DDIMScheduler",
            "--scheduler ddim",
        ],
    );
    assert!(!dir.path().join("x.png").exists());
    // The other way round: a diffusion sampler on SD3 (flow matching).
    let sd3 = fixture("tiny-sd3");
    let o = run(&[
        "denoise",
        "--model",
        s(&sd3),
        "--inputs",
        s(&sd3.join("inputs.safetensors")),
        "--out",
        s(&dir.path().join("o.st")),
        "--steps",
        "2",
        "--scheduler",
        "dpmpp-2m",
    ]);
    fails_with(
        &o,
        &[
            "--scheduler dpmpp-2m",
            "diffusion",
            "FlowMatchEulerDiscreteScheduler",
            "--scheduler flow-euler",
        ],
    );
    // A v-prediction model is a diffusion model; a config that says nothing falls back to
    // the denoiser (an MMDiT is flow matching).
    let v = dir.path().join("v");
    linked_copy(&fixture("tiny-sdxl"), &v);
    edit_json(&v, "scheduler/scheduler_config.json", |c| {
        c["prediction_type"] = "v_prediction".into()
    });
    let o = denoise(
        &v,
        &tiny_inputs(),
        &dir.path().join("o.st"),
        &["--scheduler", "flow-euler"],
    );
    fails_with(&o, &["v-prediction", "--scheduler ddim"]);
    let bare = dir.path().join("bare");
    linked_copy(&sd3, &bare);
    edit_json(&bare, "scheduler/scheduler_config.json", |c| {
        let m = c.as_object_mut().unwrap();
        m.remove("_class_name");
        m.remove("prediction_type");
    });
    let o = run(&[
        "denoise",
        "--model",
        s(&bare),
        "--inputs",
        s(&sd3.join("inputs.safetensors")),
        "--out",
        s(&dir.path().join("o.st")),
        "--steps",
        "2",
        "--scheduler",
        "euler",
    ]);
    fails_with(&o, &["SD3Transformer2DModel", "flow matching"]);
    // bench too.
    let o = quick_bench(&["--scheduler", "flow-euler"]);
    fails_with(&o, &["--scheduler flow-euler", "flow matching"]);
}

#[test]
fn strategy_flags_a_run_would_ignore_are_refused_naming_who_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sdxl");
    let out = dir.path().join("o.st");
    for (strategy, flag, value, reader) in [
        ("cfg", "--stages", "auto", "async and hybrid"),
        ("serial", "--warmup", "2", "async"),
        ("hybrid", "--warmup", "2", "async"),
        ("serial", "--patch-mode", "sync", "patch, cfg"),
        ("async", "--patch-mode", "sync", "patch, cfg"),
        ("cfg", "--stride", "2", "async"),
        ("patch", "--pipeline-layout", "per-branch", "hybrid"),
        ("hybrid", "--no-cfg-split", "", "patch"),
        ("cfg", "--k", "3", "hybrid"),
        ("async", "--l-slope", "3", "hybrid"),
        ("patch", "--eps-slope", "0.1", "hybrid"),
        ("serial", "--tau-cap", "3", "hybrid"),
        ("async", "--pipelined-guidance", "reuse", "hybrid"),
        ("serial", "--comm-timeout", "30", "all but serial"),
    ] {
        let mut extra = vec!["--strategy", strategy, flag];
        if !value.is_empty() {
            extra.push(value);
        }
        let o = denoise(&model, &tiny_inputs(), &out, &extra);
        fails_with(
            &o,
            &[
                flag,
                &format!("--strategy {strategy} does not use it"),
                reader,
            ],
        );
        // generate shares the flags.
        let mut args = vec![
            "generate",
            "--model",
            "no-such-model",
            "--prompt",
            "x",
            "--out",
            "x.png",
        ];
        args.extend_from_slice(&extra);
        fails_with(&run(&args), &[flag, "does not use it"]);
    }
    // --warmup with patch in sync mode: every step is synchronous, nothing to warm up.
    let o = denoise(
        &model,
        &tiny_inputs(),
        &out,
        &[
            "--strategy",
            "patch",
            "--patch-mode",
            "sync",
            "--warmup",
            "2",
        ],
    );
    fails_with(&o, &["--warmup", "patch with --patch-mode displaced"]);
    // bench: against the whole --strategies list; a list with a reader is fine.
    let o = run(&[
        "bench",
        "--model",
        "no-such-model",
        "--strategies",
        "serial,cfg",
        "--k",
        "3",
    ]);
    fails_with(&o, &["--k", "--strategies serial,cfg does not use it"]);
    let o = run(&[
        "bench",
        "--model",
        "no-such-model",
        "--strategies",
        "serial,hybrid",
        "--k",
        "3",
    ]);
    fails_with(&o, &["no-such-model"]);
    assert!(!stderr(&o).contains("does not use"), "{}", stderr(&o));
    for (extra, needle) in [
        (
            &["--strategies", "serial", "--world-size", "4"][..],
            "--world-size",
        ),
        (&["--strategies", "cfg,cfg"], "listed twice"),
        (
            &["--inputs", s(&tiny_inputs()), "--latent-size", "8"],
            "--latent-size",
        ),
        (&["--repeats", "0", "--only-batch", "1"], "--only-batch"),
    ] {
        let mut args = vec!["bench", "--model", s(&model)];
        args.extend_from_slice(extra);
        fails_with(&run(&args), &[needle]);
    }
    // A negative prompt with guidance off, and a base seed every prompt overrides.
    let pipe = fixture("tiny-sdxl-pipeline");
    let o = run(&[
        "generate",
        "--model",
        s(&pipe),
        "--prompt",
        "x",
        "--guidance",
        "1",
        "--negative-prompt",
        "blurry",
        "--out",
        s(&dir.path().join("x.png")),
    ]);
    fails_with(&o, &["--negative-prompt", "guidance 1", "not be used"]);
    let p = dir.path().join("p.json");
    std::fs::write(
        &p,
        r#"[{"prompt": "a", "seed": 1}, {"prompt": "b", "seed": 2}]"#,
    )
    .unwrap();
    let o = quick_batch(&p, &dir.path().join("b"), &["--seed", "5"]);
    fails_with(&o, &["--seed", "sets its own `seed`"]);
}

#[test]
fn step_counts_a_schedule_cannot_run_blame_steps_and_say_what_fits() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("tiny-sdxl");
    let out = dir.path().join("o.st");
    // DPM-Solver++ at 999 of 1000 training steps gives NaN in diffusers too; it used to be
    // blamed on the weights at step 2.
    let with = |scheduler: &str, steps: &str| {
        run(&[
            "denoise",
            "--model",
            s(&model),
            "--inputs",
            s(&tiny_inputs()),
            "--out",
            s(&out),
            "--scheduler",
            scheduler,
            "--steps",
            steps,
        ])
    };
    let err = fails_with(
        &with("dpmpp-2m", "999"),
        &["--steps 999", "dpmpp-2m", "use --steps 998 or fewer"],
    );
    assert!(!err.contains("weights"), "{err}");
    // DDIM at 1000 steps with steps_offset 1: a timestep past the schedule; said as --steps.
    fails_with(
        &with("ddim", "1000"),
        &["--steps 1000", "use --steps 999 or fewer"],
    );
    // hybrid: no "smaller --k" at --k 1.
    let o = denoise(
        &model,
        &tiny_inputs(),
        &out,
        &["--strategy", "hybrid", "--k", "1", "--tau-cap", "2"],
    );
    let err = fails_with(
        &o,
        &[
            "--tau-cap 2",
            "--k 1",
            "use --tau-cap 1 or lower",
            "--steps 3 or more",
        ],
    );
    assert!(!err.contains("smaller --k"), "{err}");
    assert!(!out.exists());
}
