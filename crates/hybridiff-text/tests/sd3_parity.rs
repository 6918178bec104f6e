//! SD3 prompt encoding against diffusers' `StableDiffusion3Pipeline.encode_prompt`, and
//! the CLIP-L / CLIP-G / T5 encoders against transformers, on
//! tests/fixtures/text/tiny-sd3-text.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use hybridiff_text::{ClipTextModel, PipelineKind, PromptEncoder, T5EncoderModel};

const REL: f32 = 1e-4;

fn pipeline() -> std::path::PathBuf {
    text_fixtures().join("tiny-sd3-text")
}

fn prompts() -> (String, String) {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(pipeline().join("expected/encode_prompt.json")).unwrap(),
    )
    .unwrap();
    (
        meta["prompt"].as_str().unwrap().to_owned(),
        meta["negative_prompt"].as_str().unwrap().to_owned(),
    )
}

fn check(
    expected: &std::collections::HashMap<String, Tensor>,
    out: &hybridiff_text::EncodedPrompts,
    suffix: &str,
) {
    check_within(expected, out, suffix, REL)
}

fn check_within(
    expected: &std::collections::HashMap<String, Tensor>,
    out: &hybridiff_text::EncodedPrompts,
    suffix: &str,
    rel: f32,
) {
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
        let key = format!("{name}{suffix}");
        assert_close(
            &format!("{key} ({:?})", t.dtype()),
            t,
            get(expected, &key),
            rel,
        );
    }
}

#[test]
fn sd3_encode_prompt_matches_diffusers() {
    let expected = load(&pipeline().join("expected/encode_prompt.safetensors"));
    let (prompt, negative) = prompts();
    let enc = PromptEncoder::load(&pipeline(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(enc.kind(), PipelineKind::StableDiffusion3);
    let out = enc.encode(&prompt, &negative).unwrap();
    assert_eq!(out.input_ids.len(), 3);
    assert_eq!(out.input_ids[0], ids(get(&expected, "input_ids")));
    assert_eq!(out.input_ids[1], ids(get(&expected, "input_ids_2")));
    assert_eq!(out.input_ids[2], ids(get(&expected, "input_ids_3")));
    assert_eq!(out.prompt_embeds.dims(), &[1, 77 + 256, 32]);
    check(&expected, &out, "");
}

#[test]
fn sd3_encode_prompt_in_f16_is_near_the_f32_reference() {
    // CLIP-L, CLIP-G and T5 (its `wo` kept in f32, as transformers does) in f16.
    let expected = load(&pipeline().join("expected/encode_prompt.safetensors"));
    let (prompt, negative) = prompts();
    let enc = PromptEncoder::load(&pipeline(), DType::F16, &Device::Cpu).unwrap();
    let out = enc.encode(&prompt, &negative).unwrap();
    assert_eq!(out.prompt_embeds.dtype(), DType::F16);
    assert_eq!(
        out.pooled_prompt_embeds.as_ref().unwrap().dtype(),
        DType::F16
    );
    check_within(&expected, &out, "", TEXT_F16_REL);
}

#[test]
fn sd3_without_t5_uses_zeros_like_diffusers() {
    let expected = load(&pipeline().join("expected/encode_prompt.safetensors"));
    let (prompt, negative) = prompts();
    let tmp = linked_copy(&pipeline(), &["text_encoder_3", "tokenizer_3"], |index| {
        let null = serde_json::json!([null, null]);
        index["text_encoder_3"] = null.clone();
        index["tokenizer_3"] = null;
    });
    let enc = PromptEncoder::load(tmp.path(), DType::F32, &Device::Cpu).unwrap();
    let out = enc.encode(&prompt, &negative).unwrap();
    assert_eq!(out.input_ids.len(), 2);
    check(&expected, &out, "_no_t5");
    let t5_part = out.prompt_embeds.narrow(1, 77, 256).unwrap();
    assert_zeros("T5 part", &t5_part);
}

#[test]
fn clip_encoders_match_transformers() {
    let expected = load(&pipeline().join("expected/encode_prompt.safetensors"));
    for (folder, ids_key, prefix) in [
        ("text_encoder", "input_ids", "clip_l"),
        ("text_encoder_2", "input_ids_2", "clip_g"),
    ] {
        let model =
            ClipTextModel::load(&pipeline().join(folder), DType::F32, &Device::Cpu).unwrap();
        assert!(model.has_projection());
        let input = get(&expected, ids_key).to_dtype(DType::U32).unwrap();
        let out = model.forward(&input).unwrap();
        let hs = get(&expected, &format!("{prefix}_hidden_states"));
        assert_eq!(out.hidden_states.len(), hs.dim(0).unwrap());
        for (i, h) in out.hidden_states.iter().enumerate() {
            assert_close(
                &format!("{prefix} hidden_states[{i}]"),
                &h.squeeze(0).unwrap(),
                &hs.get(i).unwrap(),
                REL,
            );
        }
        assert_close(
            &format!("{prefix} last_hidden_state"),
            &out.last_hidden_state,
            get(&expected, &format!("{prefix}_last_hidden_state")),
            REL,
        );
        assert_close(
            &format!("{prefix} text_embeds"),
            out.text_embeds.as_ref().unwrap(),
            get(&expected, &format!("{prefix}_text_embeds")),
            REL,
        );
    }
}

#[test]
fn t5_in_pipeline_matches_transformers() {
    let expected = load(&pipeline().join("expected/encode_prompt.safetensors"));
    let model =
        T5EncoderModel::load(&pipeline().join("text_encoder_3"), DType::F32, &Device::Cpu).unwrap();
    let input = get(&expected, "input_ids_3").to_dtype(DType::U32).unwrap();
    let out = model.forward(&input).unwrap();
    assert_close(
        "t5 last_hidden_state (256 tokens)",
        &out,
        get(&expected, "t5_last_hidden_state"),
        REL,
    );
}
