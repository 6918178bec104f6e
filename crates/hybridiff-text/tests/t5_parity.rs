//! T5EncoderModel against transformers on tests/fixtures/text/tiny-t5.

mod common;

use candle_core::{DType, Device};
use common::*;
use hybridiff_text::t5::relative_position_bucket;
use hybridiff_text::T5EncoderModel;

fn dir() -> std::path::PathBuf {
    text_fixtures().join("tiny-t5")
}

#[test]
fn relative_position_buckets_match_transformers() {
    let expected = load(&dir().join("expected.safetensors"));
    let rp = ids_i64(get(&expected, "relative_position"));
    for (key, bidirectional) in [
        ("buckets_bidirectional", true),
        ("buckets_unidirectional", false),
    ] {
        let want = ids_i64(get(&expected, key));
        for (r, w) in rp.iter().zip(&want) {
            assert_eq!(
                relative_position_bucket(*r, bidirectional, 32, 128) as i64,
                *w,
                "{key}: relative position {r}"
            );
        }
    }
}

fn ids_i64(t: &candle_core::Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

#[test]
fn t5_encoder_matches_transformers_f32() {
    let expected = load(&dir().join("expected.safetensors"));
    let model = T5EncoderModel::load(&dir(), DType::F32, &Device::Cpu).unwrap();
    let input = get(&expected, "input_ids").to_dtype(DType::U32).unwrap();
    let out = model.forward(&input).unwrap();
    assert_eq!(out.dtype(), DType::F32);
    assert_close(
        "t5 last_hidden_state f32",
        &out,
        get(&expected, "last_hidden_state"),
        1e-4,
    );
}

#[test]
fn t5_encoder_matches_transformers_f16() {
    // transformers keeps `wo` in float32 for float16 T5s; the reference was computed so.
    let expected = load(&dir().join("expected.safetensors"));
    let model = T5EncoderModel::load(&dir(), DType::F16, &Device::Cpu).unwrap();
    let input = get(&expected, "input_ids").to_dtype(DType::U32).unwrap();
    let out = model.forward(&input).unwrap();
    assert_eq!(out.dtype(), DType::F16);
    assert_close(
        "t5 last_hidden_state f16",
        &out,
        get(&expected, "last_hidden_state_f16"),
        2e-3,
    );
}

#[test]
fn t5_missing_weights_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(dir().join("config.json"), tmp.path().join("config.json")).unwrap();
    let err = T5EncoderModel::load(tmp.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&tmp.path().display().to_string()), "{err}");
}
