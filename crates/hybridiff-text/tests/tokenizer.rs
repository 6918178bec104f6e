//! Tokenizer parity with transformers' CLIPTokenizer and the T5 tokenizer.json path.

mod common;

use common::*;
use hybridiff_text::{ClipTokenizer, T5Tokenizer};
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    tokenizer: String,
    text: String,
    ids: Vec<u32>,
    truncated: bool,
}

fn sdxl_tokenizer(n: &str) -> ClipTokenizer {
    ClipTokenizer::from_dir(&fixtures().join("tiny-sdxl-pipeline").join(n)).unwrap()
}

#[test]
fn clip_matches_transformers_on_edge_cases() {
    let cases: Vec<Case> = serde_json::from_str(
        &std::fs::read_to_string(text_fixtures().join("clip_tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    assert!(cases.len() >= 30);
    let tokenizers = [
        ("tokenizer", sdxl_tokenizer("tokenizer")),
        ("tokenizer_2", sdxl_tokenizer("tokenizer_2")),
        (
            "clip-tokenizer-json",
            ClipTokenizer::from_dir(&text_fixtures().join("clip-tokenizer-json")).unwrap(),
        ),
    ];
    for case in &cases {
        let tok = &tokenizers
            .iter()
            .find(|(n, _)| *n == case.tokenizer)
            .unwrap()
            .1;
        let got = tok.encode(&case.text).unwrap();
        assert_eq!(
            got.ids, case.ids,
            "{}: ids of {:?}",
            case.tokenizer, case.text
        );
        assert_eq!(
            got.truncated, case.truncated,
            "{}: truncated flag of {:?}",
            case.tokenizer, case.text
        );
    }
    println!("{} tokenizer cases match transformers", cases.len());
}

#[test]
fn empty_prompt_is_bos_eos_then_pads() {
    for (name, pad) in [("tokenizer", 49407), ("tokenizer_2", 0)] {
        let tok = sdxl_tokenizer(name);
        assert_eq!(tok.pad_id(), pad, "{name}");
        assert_eq!((tok.bos_id(), tok.eos_id()), (49406, 49407));
        assert_eq!(tok.max_length(), 77);
        let e = tok.encode("").unwrap();
        assert_eq!(e.ids.len(), 77);
        assert_eq!(&e.ids[..2], &[49406, 49407], "{name}");
        assert!(e.ids[2..].iter().all(|&i| i == pad), "{name}: pads");
        assert!(!e.truncated);
    }
}

#[test]
fn long_prompt_is_truncated_keeping_eos() {
    let long = "a very long prompt about a cat ".repeat(20);
    for name in ["tokenizer", "tokenizer_2"] {
        let tok = sdxl_tokenizer(name);
        let e = tok.encode(&long).unwrap();
        assert!(e.truncated, "{name}: truncation flag");
        assert_eq!(e.ids.len(), 77);
        assert_eq!(e.ids[0], 49406);
        assert_eq!(e.ids[76], 49407, "{name}: EOS kept last");
        assert!(!e.ids[1..76].contains(&49407));
        // The kept part is the start of the text.
        assert!(long.starts_with(&tok.decode(&e.ids[1..76]).unwrap()));
    }
}

#[test]
fn pad_token_differs_between_sdxl_tokenizers() {
    let a = sdxl_tokenizer("tokenizer").encode("a cat").unwrap();
    let b = sdxl_tokenizer("tokenizer_2").encode("a cat").unwrap();
    assert_eq!(a.ids[..4], b.ids[..4]);
    assert_eq!(a.ids[4], 49407);
    assert_eq!(b.ids[4], 0);
    // "!" is tokenizer_2's pad token, hence a special token there: id 0, not "!</w>".
    let a = sdxl_tokenizer("tokenizer").encode("wow!").unwrap();
    let b = sdxl_tokenizer("tokenizer_2").encode("wow!").unwrap();
    assert_eq!(a.ids[2], 256);
    assert_eq!(b.ids[2], 0);
}

#[test]
fn missing_tokenizer_files_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let err = ClipTokenizer::from_dir(&tmp.path().join("tokenizer"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("tokenizer"), "{err}");
    std::fs::copy(
        fixtures().join("tiny-sdxl-pipeline/tokenizer/vocab.json"),
        tmp.path().join("vocab.json"),
    )
    .unwrap();
    let err = ClipTokenizer::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("merges.txt"), "{err}");
    let err = T5Tokenizer::from_dir(tmp.path()).unwrap_err().to_string();
    assert!(err.contains("tokenizer.json"), "{err}");
}

#[test]
fn t5_tokenizer_matches_transformers() {
    let dir = text_fixtures().join("tiny-sd3-text");
    let expected = load(&dir.join("expected/encode_prompt.safetensors"));
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("expected/encode_prompt.json")).unwrap(),
    )
    .unwrap();
    let prompt = meta["prompt"].as_str().unwrap();
    let tok = T5Tokenizer::from_dir(&dir.join("tokenizer_3")).unwrap();
    let e = tok.encode(prompt, 256).unwrap();
    assert_eq!(e.ids, ids(get(&expected, "input_ids_3")));
    assert!(e.truncated);
    assert_eq!(e.ids[255], 1, "</s> kept last");

    let short = tok.encode("a photo of the moon", 16).unwrap();
    assert!(!short.truncated);
    assert_eq!(short.ids.len(), 16);
    let eos = short.ids.iter().position(|&i| i == 1).unwrap();
    assert_eq!(eos, 5, "one piece per word, then </s>: {:?}", short.ids);
    assert!(short.ids[eos + 1..].iter().all(|&i| i == tok.pad_id()));
}

/// The CLIP vocabulary carried in the binary (for single-file checkpoints) tokenizes as the
/// published tokenizer folders do: transformers' ids on every edge case, for both pads.
#[test]
fn builtin_clip_tokenizer_equals_the_published_folders() {
    let cases: Vec<Case> = serde_json::from_str(
        &std::fs::read_to_string(text_fixtures().join("clip_tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    let label = std::path::Path::new("<built-in>");
    let builtin = [
        (
            "tokenizer",
            ClipTokenizer::builtin("<|endoftext|>", label).unwrap(),
        ),
        ("tokenizer_2", ClipTokenizer::builtin("!", label).unwrap()),
    ];
    let mut n = 0;
    for case in &cases {
        let Some((_, tok)) = builtin.iter().find(|(name, _)| *name == case.tokenizer) else {
            continue;
        };
        assert_eq!(
            tok.encode(&case.text).unwrap().ids,
            case.ids,
            "{}: ids of {:?}",
            case.tokenizer,
            case.text
        );
        n += 1;
    }
    assert!(n >= 20, "{n} cases");
    // Every token of the published vocabulary has the same id.
    let vocab: std::collections::HashMap<String, u32> = serde_json::from_str(
        &std::fs::read_to_string(
            fixtures()
                .join("tiny-sdxl-pipeline")
                .join("tokenizer")
                .join("vocab.json"),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(vocab.len(), 49408);
    let (b, f) = (&builtin[0].1, sdxl_tokenizer("tokenizer"));
    for (token, id) in &vocab {
        assert_eq!(b.token_id(token), Some(*id), "{token:?}");
    }
    assert_eq!((b.bos_id(), b.eos_id(), b.pad_id()), (49406, 49407, 49407));
    assert_eq!(builtin[1].1.pad_id(), 0);
    for text in [
        "a photo of an astronaut riding a horse on mars",
        "Ünïcödé 東京 🚀!!",
        "",
    ] {
        assert_eq!(b.encode(text).unwrap(), f.encode(text).unwrap(), "{text:?}");
    }
}
