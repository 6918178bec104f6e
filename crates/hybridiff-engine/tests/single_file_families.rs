//! Single-file checkpoints of the real families' names and shapes, without their gigabytes:
//! a safetensors header listing every tensor of a full-size SD 1.x, SD 2.x or SDXL base
//! file (tests/fixtures/single-file/families, tools/make_family_headers.py: diffusers names
//! the family and its own conversion maps the names back) over a sparse file of the full
//! size. Resolving one must find the family, map every tensor to the diffusers name and
//! shape the model expects, and read nothing but the header; files of other families and
//! kinds are refused naming what they are.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hybridiff_engine::source::ModelSpec;

mod common;
use common::fixture;

/// A tensor of a header: name, shape, safetensors dtype.
type Entry = (String, Vec<usize>, String);

struct Family {
    tensors: Vec<Entry>,
    diffusers: serde_json::Value,
}

fn family(name: &str) -> Family {
    let path = fixture("single-file")
        .join("families")
        .join(format!("{name}.json.gz"));
    let mut text = String::new();
    flate2::read::GzDecoder::new(std::fs::File::open(path).unwrap())
        .read_to_string(&mut text)
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let tensors = v["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t[0].as_str().unwrap().to_string(),
                t[1].as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
                t[2].as_str().unwrap().to_string(),
            )
        })
        .collect();
    Family {
        tensors,
        diffusers: v["diffusers"].clone(),
    }
}

/// Writes a safetensors file with these tensors whose data is a hole: the file has its
/// full size but takes no disk. Returns its size.
fn sparse_file(path: &Path, tensors: &[Entry]) -> u64 {
    let mut header = serde_json::Map::new();
    let mut offset = 0u64;
    for (name, shape, dtype) in tensors {
        let size = match dtype.as_str() {
            "F16" | "BF16" => 2,
            "F32" => 4,
            "I64" => 8,
            other => panic!("{other}"),
        };
        let n: u64 = shape.iter().map(|&d| d as u64).product::<u64>() * size;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut text = serde_json::Value::Object(header).to_string();
    while !text.len().is_multiple_of(8) {
        text.push(' ');
    }
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&(text.len() as u64).to_le_bytes()).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    let len = 8 + text.len() as u64 + offset;
    f.set_len(len).unwrap();
    len
}

/// Bytes this process has read through read() and friends so far.
fn bytes_read() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Resident file-backed memory: pages of a mapped file that were touched.
fn rss_file_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("RssFile:"))
        .map(|v| v.trim().trim_end_matches("kB").trim().parse().unwrap())
        .unwrap_or(0)
}

fn shapes(v: &serde_json::Value) -> BTreeMap<String, Vec<usize>> {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, s)| {
            (
                k.clone(),
                s.as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap() as usize)
                    .collect(),
            )
        })
        .collect()
}

/// Equal maps, or a short account of the names and shapes that differ.
fn same(got: &BTreeMap<String, Vec<usize>>, want: &BTreeMap<String, Vec<usize>>, what: &str) {
    let only_got: Vec<_> = got
        .keys()
        .filter(|k| !want.contains_key(*k))
        .take(5)
        .collect();
    let only_want: Vec<_> = want
        .keys()
        .filter(|k| !got.contains_key(*k))
        .take(5)
        .collect();
    let shapes: Vec<_> = got
        .iter()
        .filter(|(k, s)| want.get(*k).is_some_and(|w| w != *s))
        .take(5)
        .collect();
    assert!(
        only_got.is_empty() && only_want.is_empty() && shapes.is_empty(),
        "{what}: mapped but not expected {only_got:?}; expected but not mapped {only_want:?}; other shapes {shapes:?}"
    );
}

fn resolve(path: &Path) -> hybridiff_engine::Result<hybridiff_engine::source::ResolvedModel> {
    ModelSpec {
        model: path.to_path_buf(),
        ..ModelSpec::default()
    }
    .resolve(true)
}

fn temp_file(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

#[test]
fn full_size_families_map_every_tensor_from_the_header_alone() {
    let dir = tempfile::tempdir().unwrap();
    for (name, what, texts) in [
        ("sd1", "SD 1.x", vec!["text_encoder"]),
        ("sd2", "SD 2.x", vec!["text_encoder"]),
        ("sdxl", "SDXL base", vec!["text_encoder", "text_encoder_2"]),
    ] {
        let fam = family(name);
        let path = temp_file(&dir, &format!("{name}.safetensors"));
        let len = sparse_file(&path, &fam.tensors);
        assert!(len > 1 << 30, "{name}: a full-size file ({len} bytes)");
        let (read0, rss0) = (bytes_read(), rss_file_kib());
        let r = resolve(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (read, rss) = (bytes_read() - read0, rss_file_kib().saturating_sub(rss0));
        // The header (a few hundred KB) and the built-in configs; never the gigabytes.
        assert!(read < 8 << 20, "{name}: read {read} bytes to resolve");
        assert!(
            rss < 64 << 10,
            "{name}: {rss} KiB of the file became resident"
        );
        assert!(r.description.contains(what), "{name}: {}", r.description);
        let den = r.denoiser.source().tensor_shapes().unwrap();
        same(
            &den,
            &shapes(&fam.diffusers["unet"]),
            &format!("{name}: unet"),
        );
        let vae = r.vae.as_ref().unwrap().tensor_shapes().unwrap();
        same(
            &vae,
            &shapes(&fam.diffusers["vae"]),
            &format!("{name}: vae"),
        );
        let text = r.text.as_ref().unwrap();
        assert_eq!(text.clips.len(), texts.len());
        for (clip, slot) in text.clips.iter().zip(&texts) {
            assert_eq!(&clip.slot, slot);
            let got = clip.encoder.tensor_shapes().unwrap();
            same(
                &got,
                &shapes(&fam.diffusers[*slot]),
                &format!("{name}: {slot}"),
            );
        }
        // SD 2.x files default to v-prediction (SD 2.1 768), as diffusers assumes.
        let pred = r
            .scheduler
            .value("prediction_type")
            .unwrap()
            .as_str()
            .unwrap();
        let want = if name == "sd2" {
            "v_prediction"
        } else {
            "epsilon"
        };
        assert_eq!(pred, want, "{name}");
    }
}

#[test]
fn v_prediction_follows_a_sidecar_yaml_or_a_v_pred_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let fam = family("sd2");
    let path = temp_file(&dir, "v2-1_512-ema-pruned.safetensors");
    sparse_file(&path, &fam.tensors);
    std::fs::write(
        path.with_extension("yaml"),
        "model:\n  params:\n    parameterization: \"eps\"\n",
    )
    .unwrap();
    let r = resolve(&path).unwrap();
    assert_eq!(r.scheduler.value("prediction_type").unwrap(), "epsilon");
    assert!(r.description.contains("epsilon"), "{}", r.description);
    let mut fam = family("sdxl");
    fam.tensors.push(("v_pred".into(), vec![], "F32".into()));
    let path = temp_file(&dir, "noob-vpred.safetensors");
    sparse_file(&path, &fam.tensors);
    let r = resolve(&path).unwrap();
    assert_eq!(
        r.scheduler.value("prediction_type").unwrap(),
        "v_prediction"
    );
}

fn refused(path: &Path) -> String {
    match resolve(path) {
        Ok(r) => panic!("{}: resolved as {}", path.display(), r.description),
        Err(e) => e.to_string(),
    }
}

#[test]
fn other_families_and_kinds_are_refused_naming_what_they_are() {
    let dir = tempfile::tempdir().unwrap();
    for (name, says) in [
        ("sd1_inpainting", "inpainting"),
        ("sdxl_refiner", "SDXL refiner"),
    ] {
        let path = temp_file(&dir, &format!("{name}.safetensors"));
        sparse_file(&path, &family(name).tensors);
        let e = refused(&path);
        assert!(
            e.contains(says) && e.contains(&path.display().to_string()),
            "{e}"
        );
    }
    let t = |n: &str, s: &[usize]| (n.to_string(), s.to_vec(), "F16".to_string());
    let cases: Vec<(&str, Vec<Entry>, &str)> = vec![
        (
            "lora.safetensors",
            vec![
                t(
                    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                    &[4, 320],
                ),
                t(
                    "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight",
                    &[320, 4],
                ),
            ],
            "--lora",
        ),
        (
            "unet.safetensors",
            vec![
                t("conv_in.weight", &[320, 4, 3, 3]),
                t("down_blocks.0.resnets.0.conv1.weight", &[320, 320, 3, 3]),
                t("up_blocks.0.resnets.0.conv1.weight", &[320, 320, 3, 3]),
            ],
            "pipeline folder",
        ),
        (
            "vae.safetensors",
            vec![t("decoder.up.0.block.0.conv1.weight", &[128, 128, 3, 3])],
            "--vae",
        ),
        (
            "sd3.safetensors",
            vec![
                t(
                    "model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias",
                    &[9216],
                ),
                t("model.diffusion_model.pos_embed", &[1, 36864, 1536]),
            ],
            "SD3",
        ),
        (
            "other.safetensors",
            vec![t("encoder.layer.0.weight", &[4, 4])],
            "neither a diffusers folder nor a single-file",
        ),
    ];
    for (file, tensors, says) in cases {
        let path = temp_file(&dir, file);
        sparse_file(&path, &tensors);
        let e = refused(&path);
        assert!(e.contains(says), "{file}: {e}");
    }
    // Not safetensors at all: a pickle (by name or by content), text, a truncated header.
    let ckpt = temp_file(&dir, "model.ckpt");
    std::fs::write(&ckpt, b"\x80\x02}q\x00.").unwrap();
    let e = refused(&ckpt);
    assert!(
        e.contains("pickle") && e.contains("runs any code") && e.contains("safetensors"),
        "{e}"
    );
    let zipped = temp_file(&dir, "renamed.safetensors");
    std::fs::write(&zipped, b"PK\x03\x04rest of a torch.save zip").unwrap();
    assert!(refused(&zipped).contains("pickle"));
    let text = temp_file(&dir, "notes.safetensors");
    std::fs::write(&text, b"hello, this is not a model at all").unwrap();
    assert!(refused(&text).contains("not a safetensors file"));
    let short = temp_file(&dir, "cut.safetensors");
    let fam = family("sd1");
    sparse_file(&short, &fam.tensors);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&short)
        .unwrap();
    f.set_len(1000).unwrap();
    assert!(refused(&short).contains("not a safetensors file"));
}

#[test]
fn a_checkpoint_of_another_size_asks_for_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut fam = family("sd1");
    let key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight";
    for t in fam.tensors.iter_mut().filter(|t| t.0 == key) {
        t.1 = vec![49408, 1024];
    }
    let path = temp_file(&dir, "wide.safetensors");
    sparse_file(&path, &fam.tensors);
    let e = refused(&path);
    assert!(
        e.contains(key)
            && e.contains("[49408, 1024]")
            && e.contains("[49408, 768]")
            && e.contains("--config"),
        "{e}"
    );
}
