//! SDXL prompt encoding against diffusers' `StableDiffusionXLPipeline.encode_prompt` on
//! tests/fixtures/tiny-sdxl-pipeline.

mod common;

use candle_core::{DType, Device};
use common::*;
use hybridiff_text::{PipelineKind, PromptEncoder};

const REL: f32 = 1e-4;

fn pipeline() -> std::path::PathBuf {
    fixtures().join("tiny-sdxl-pipeline")
}

fn prompts() -> (String, String) {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(pipeline().join("expected/t2i.json")).unwrap(),
    )
    .unwrap();
    (
        meta["prompt"].as_str().unwrap().to_owned(),
        meta["negative_prompt"].as_str().unwrap().to_owned(),
    )
}

#[test]
fn sdxl_encode_prompt_matches_diffusers() {
    let expected = load(&pipeline().join("expected/t2i.safetensors"));
    let (prompt, negative) = prompts();
    let enc = PromptEncoder::load(&pipeline(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(enc.kind(), PipelineKind::StableDiffusionXl);
    let out = enc.encode(&prompt, &negative).unwrap();

    // input_ids / input_ids_2 are the prompt's ids for tokenizer / tokenizer_2.
    assert_eq!(out.input_ids.len(), 2);
    assert_eq!(out.input_ids[0], ids(get(&expected, "input_ids")));
    assert_eq!(out.input_ids[1], ids(get(&expected, "input_ids_2")));
    assert_eq!(out.negative_input_ids.len(), 2);

    assert_close(
        "prompt_embeds",
        &out.prompt_embeds,
        get(&expected, "prompt_embeds"),
        REL,
    );
    assert_close(
        "negative_prompt_embeds",
        &out.negative_prompt_embeds,
        get(&expected, "negative_prompt_embeds"),
        REL,
    );
    assert_close(
        "pooled_prompt_embeds",
        out.pooled_prompt_embeds.as_ref().unwrap(),
        get(&expected, "pooled_prompt_embeds"),
        REL,
    );
    assert_close(
        "negative_pooled_prompt_embeds",
        out.negative_pooled_prompt_embeds.as_ref().unwrap(),
        get(&expected, "negative_pooled_prompt_embeds"),
        REL,
    );
}

#[test]
fn sdxl_encode_prompt_in_f16_is_near_the_f32_reference() {
    let expected = load(&pipeline().join("expected/t2i.safetensors"));
    let (prompt, negative) = prompts();
    let enc = PromptEncoder::load(&pipeline(), DType::F16, &Device::Cpu).unwrap();
    let out = enc.encode(&prompt, &negative).unwrap();
    for (name, t) in [
        ("prompt_embeds", &out.prompt_embeds),
        ("negative_prompt_embeds", &out.negative_prompt_embeds),
        (
            "pooled_prompt_embeds",
            out.pooled_prompt_embeds.as_ref().unwrap(),
        ),
        (
            "negative_pooled_prompt_embeds",
            out.negative_pooled_prompt_embeds.as_ref().unwrap(),
        ),
    ] {
        assert_eq!(t.dtype(), DType::F16, "{name}: the pipeline's dtype");
        assert_close(
            &format!("{name} f16"),
            t,
            get(&expected, name),
            TEXT_F16_REL,
        );
    }
}

#[test]
fn sdxl_empty_negative_prompt_gives_zeros() {
    let (prompt, _) = prompts();
    let enc = PromptEncoder::load(&pipeline(), DType::F32, &Device::Cpu).unwrap();
    let out = enc.encode(&prompt, "").unwrap();
    assert_zeros("negative_prompt_embeds", &out.negative_prompt_embeds);
    assert_zeros(
        "negative_pooled_prompt_embeds",
        out.negative_pooled_prompt_embeds.as_ref().unwrap(),
    );
    assert_eq!(out.negative_prompt_embeds.dims(), out.prompt_embeds.dims());
    assert!(out.negative_input_ids.is_empty());

    // diffusers zeroes only for `negative_prompt=None`; an explicit "" is encoded.
    let explicit = enc.encode_opt(&prompt, Some("")).unwrap();
    let (d, _) = diff(
        &explicit.negative_prompt_embeds,
        &out.negative_prompt_embeds,
    );
    assert!(d > 0.0);
    assert_eq!(&explicit.negative_input_ids[1][..3], &[49406, 49407, 0]);
}

#[test]
fn sdxl_without_force_zeros_encodes_the_empty_string() {
    let tmp = linked_copy(&pipeline(), &[], |index| {
        index["force_zeros_for_empty_prompt"] = serde_json::Value::Bool(false);
    });
    let (prompt, _) = prompts();
    let enc = PromptEncoder::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    let out = enc.encode(&prompt, "").unwrap();
    let (d, _) = diff(&out.negative_prompt_embeds, &out.prompt_embeds);
    assert!(d > 0.0);
    assert_eq!(out.negative_input_ids[0][..3], [49406, 49407, 49407]);
}

#[test]
fn missing_component_folder_is_named() {
    let tmp = linked_copy(&pipeline(), &["text_encoder_2"], |_| {});
    let err = PromptEncoder::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("text_encoder_2"), "{err}");

    let tmp = linked_copy(&pipeline(), &["tokenizer"], |_| {});
    let err = PromptEncoder::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("tokenizer"), "{err}");

    let tmp = tempfile::tempdir().unwrap();
    let err = PromptEncoder::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model_index.json"), "{err}");
}

/// The encoder remembers its last texts: a batch that repeats prompts (and the negative
/// prompt of every image) gets, from one encoder, what a fresh encoder gives for each,
/// bit for bit, including after more distinct texts than it remembers.
#[test]
fn remembered_encodings_equal_fresh_ones() {
    let bits = |t: &candle_core::Tensor| -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    };
    let shared = PromptEncoder::load(&pipeline(), DType::F32, &Device::Cpu).unwrap();
    let texts: Vec<String> = (0..20).map(|i| format!("prompt number {i}")).collect();
    let order = [
        0, 1, 0, 2, 1, 0, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 0, 1,
    ];
    for (k, &i) in order.iter().enumerate() {
        let negative = if k % 3 == 0 {
            ""
        } else {
            texts[(i + 1) % 20].as_str()
        };
        let got = shared.encode(&texts[i], negative).unwrap();
        let fresh = PromptEncoder::load(&pipeline(), DType::F32, &Device::Cpu)
            .unwrap()
            .encode(&texts[i], negative)
            .unwrap();
        assert_eq!(bits(&got.prompt_embeds), bits(&fresh.prompt_embeds), "{k}");
        assert_eq!(
            bits(&got.negative_prompt_embeds),
            bits(&fresh.negative_prompt_embeds),
            "{k}"
        );
        assert_eq!(
            bits(got.pooled_prompt_embeds.as_ref().unwrap()),
            bits(fresh.pooled_prompt_embeds.as_ref().unwrap()),
            "{k}"
        );
        assert_eq!(got.input_ids, fresh.input_ids, "{k}");
        assert_eq!(got.negative_input_ids, fresh.negative_input_ids, "{k}");
    }
}
