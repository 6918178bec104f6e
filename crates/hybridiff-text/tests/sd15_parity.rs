//! SD 1.5 prompt encoding against diffusers' `StableDiffusionPipeline.encode_prompt`,
//! and `CLIPTextModel` with the legacy `eos_token_id` 2 against transformers, on
//! tests/fixtures/text/tiny-sd15-text.

mod common;

use candle_core::{DType, Device};
use common::*;
use hybridiff_text::{ClipTextModel, PipelineKind, PromptEncoder};

const REL: f32 = 1e-4;

fn pipeline() -> std::path::PathBuf {
    text_fixtures().join("tiny-sd15-text")
}

#[test]
fn sd15_encode_prompt_matches_diffusers() {
    let expected = load(&pipeline().join("expected/encode_prompt.safetensors"));
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(pipeline().join("expected/encode_prompt.json")).unwrap(),
    )
    .unwrap();
    let prompt = meta["prompt"].as_str().unwrap();
    let enc = PromptEncoder::load(&pipeline(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(enc.kind(), PipelineKind::StableDiffusion);
    // diffusers' default negative prompt (None) is encoded as "" for SD 1.x.
    let out = enc.encode(prompt, "").unwrap();
    assert_eq!(out.input_ids, vec![ids(get(&expected, "input_ids"))]);
    assert!(out.pooled_prompt_embeds.is_none());
    assert!(out.negative_pooled_prompt_embeds.is_none());
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
}

#[test]
fn sd15_encode_prompt_in_f16_is_near_the_f32_reference() {
    let expected = load(&pipeline().join("expected/encode_prompt.safetensors"));
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(pipeline().join("expected/encode_prompt.json")).unwrap(),
    )
    .unwrap();
    let prompt = meta["prompt"].as_str().unwrap();
    let enc = PromptEncoder::load(&pipeline(), DType::F16, &Device::Cpu).unwrap();
    let out = enc.encode(prompt, "").unwrap();
    for (name, t) in [
        ("prompt_embeds", &out.prompt_embeds),
        ("negative_prompt_embeds", &out.negative_prompt_embeds),
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
fn clip_text_model_legacy_eos_matches_transformers() {
    let expected = load(&pipeline().join("expected/encode_prompt.safetensors"));
    let model =
        ClipTextModel::load(&pipeline().join("text_encoder"), DType::F32, &Device::Cpu).unwrap();
    assert!(!model.has_projection());
    let input = get(&expected, "input_ids").to_dtype(DType::U32).unwrap();
    let out = model.forward(&input).unwrap();
    assert!(out.text_embeds.is_none());
    let hs = get(&expected, "hidden_states");
    assert_eq!(out.hidden_states.len(), 4);
    for (i, h) in out.hidden_states.iter().enumerate() {
        assert_close(
            &format!("hidden_states[{i}]"),
            &h.squeeze(0).unwrap(),
            &hs.get(i).unwrap(),
            REL,
        );
    }
    assert_close(
        "last_hidden_state",
        &out.last_hidden_state,
        get(&expected, "last_hidden_state"),
        REL,
    );
    // eos_token_id 2: pooled at the argmax of the ids (the EOS, id 913), not at the
    // (absent) id 2.
    assert_close(
        "pooler_output",
        &out.pooler_output,
        get(&expected, "pooler_output"),
        REL,
    );
}
