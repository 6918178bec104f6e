//! Tokenizers of a diffusers model folder, built with the `tokenizers` crate exactly as
//! transformers builds them, and padded/truncated as the diffusers pipelines ask
//! (`padding="max_length"`, `truncation=True`).

use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::replace::{Replace, ReplacePattern};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::normalizers::utils::{Lowercase, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{
    AddedToken, PostProcessor, SplitDelimiterBehavior, Tokenizer, TruncationDirection,
};

use crate::{Error, Result};

/// transformers' `CLIPTokenizer` pre-tokenizer pattern (the special tokens first, as the
/// original CLIP's `bpe` regex).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// `model_max_length` values above this are transformers' "no limit" sentinel
/// (`int(1e30)`), not a length.
const NO_LIMIT: u64 = 1 << 40;

/// Most tokens a tokenizer may pad to (CLIP uses 77, SD3's T5 256 or 512).
pub const MAX_LENGTH: usize = 1 << 16;

/// `text` cut for a message: its start and end around the number of characters left out.
pub fn shorten(text: &str, max_chars: usize) -> String {
    let n = text.chars().count();
    if n <= max_chars {
        return format!("{text:?}");
    }
    let head: String = text.chars().take(max_chars * 3 / 4).collect();
    let tail: String = text.chars().skip(n - max_chars / 4).collect();
    format!("{head:?} ... {tail:?} ({} characters in all)", n)
}

/// Token ids of one text, padded or truncated to a fixed length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Exactly the requested length (77 for CLIP): special tokens, text, then pads.
    pub ids: Vec<u32>,
    /// Whether the text had to be cut to fit (its end special token is kept).
    pub truncated: bool,
}

/// The CLIP BPE tokenizer of a `tokenizer*/` folder, as transformers' `CLIPTokenizer`.
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    dir: PathBuf,
    max_length: usize,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
}

/// The special tokens and limits of `tokenizer_config.json` (with
/// `special_tokens_map.json` as a fallback).
struct TokenizerConfig {
    bos: Option<String>,
    eos: Option<String>,
    unk: Option<String>,
    pad: Option<String>,
    model_max_length: Option<usize>,
    added: Vec<AddedToken>,
}

/// A special token entry: `"<pad>"` or `{"content": "<pad>", ...}` (transformers 4.x).
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = hybridiff_models::weights::read_text_bounded(
        path,
        hybridiff_models::weights::MAX_CONFIG_BYTES,
    )?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::config(path, e))
}

impl TokenizerConfig {
    fn read(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = read_json(&cfg_path)?.unwrap_or(Value::Null);
        let map = read_json(&dir.join("special_tokens_map.json"))?.unwrap_or(Value::Null);
        let get = |key: &str| token_string(cfg.get(key)).or_else(|| token_string(map.get(key)));
        let model_max_length = match cfg.get("model_max_length") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_f64() {
                Some(n) if n > MAX_LENGTH as f64 && n < NO_LIMIT as f64 => {
                    return Err(Error::config(
                        &cfg_path,
                        format!("`model_max_length` = {n}: expected at most {MAX_LENGTH} tokens"),
                    ))
                }
                Some(n) if n >= 1.0 && n < NO_LIMIT as f64 => Some(n as usize),
                Some(_) => None,
                None => {
                    return Err(Error::config(
                        &cfg_path,
                        format!("`model_max_length` must be a number, got {v}"),
                    ))
                }
            },
        };
        let mut added = Vec::new();
        if let Some(Value::Object(decoder)) = cfg.get("added_tokens_decoder") {
            for (id, entry) in decoder {
                let content = token_string(Some(entry)).ok_or_else(|| {
                    Error::config(
                        &cfg_path,
                        format!("`added_tokens_decoder.{id}` has no `content`"),
                    )
                })?;
                let flag = |k: &str, default: bool| {
                    entry.get(k).and_then(Value::as_bool).unwrap_or(default)
                };
                let special = flag("special", true);
                added.push(
                    AddedToken::from(content, special)
                        .single_word(flag("single_word", false))
                        .lstrip(flag("lstrip", false))
                        .rstrip(flag("rstrip", false))
                        .normalized(flag("normalized", !special)),
                );
            }
        }
        Ok(Self {
            bos: get("bos_token"),
            eos: get("eos_token"),
            unk: get("unk_token"),
            pad: get("pad_token"),
            model_max_length,
            added,
        })
    }
}

fn token_id(tok: &Tokenizer, dir: &Path, token: &str, role: &str) -> Result<u32> {
    tok.token_to_id(token).ok_or_else(|| {
        Error::tokenizer(
            dir,
            format!("the {role} token {token:?} is not in the vocabulary"),
        )
    })
}

/// Encodes `text` as transformers does with `padding="max_length", truncation=True,
/// max_length=max_len`: the text is cut so that it and the post-processor's special
/// tokens fit, then padded with `pad_id`. Returns the ids, and the cut-off text if any.
fn encode_fixed(
    tok: &Tokenizer,
    dir: &Path,
    text: &str,
    max_len: usize,
    pad_id: u32,
) -> Result<(Vec<u32>, Option<Vec<u32>>)> {
    let err = |e: tokenizers::Error| {
        Error::tokenizer(dir, format!("encoding {}: {e}", shorten(text, 80)))
    };
    let mut enc = tok.encode(text, false).map_err(err)?;
    let n_special = tok
        .get_post_processor()
        .map_or(0, |p| p.added_tokens(false));
    let keep = max_len.checked_sub(n_special).ok_or_else(|| {
        Error::tokenizer(
            dir,
            format!("max length {max_len} leaves no room for the {n_special} special tokens"),
        )
    })?;
    let removed = (enc.len() > keep).then(|| enc.get_ids()[keep..].to_vec());
    enc.truncate(keep, 0, TruncationDirection::Right);
    let enc = tok.post_process(enc, None, true).map_err(err)?;
    let mut ids = enc.get_ids().to_vec();
    if ids.len() > max_len {
        return Err(Error::tokenizer(
            dir,
            format!("{} ids after post-processing, over {max_len}", ids.len()),
        ));
    }
    ids.resize(max_len, pad_id);
    Ok((ids, removed))
}

fn tokenizer_error(path: &Path) -> impl Fn(tokenizers::Error) -> Error + '_ {
    move |e| Error::tokenizer(path, e)
}

impl ClipTokenizer {
    /// Loads the tokenizer of a diffusers `tokenizer*/` folder: `tokenizer.json` when
    /// present, else `vocab.json` + `merges.txt` (the published SD, SDXL and SD3 folders),
    /// with the special tokens and `model_max_length` (77 if absent) of
    /// `tokenizer_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(dir, "tokenizer folder not found"));
        }
        let cfg = TokenizerConfig::read(dir)?;
        let unk = cfg.unk.clone().unwrap_or_else(|| "<|endoftext|>".into());
        let json = dir.join("tokenizer.json");
        let (tokenizer, from_json) = if json.is_file() {
            (
                Tokenizer::from_file(&json).map_err(tokenizer_error(&json))?,
                true,
            )
        } else {
            (Self::build_bpe(dir, &unk)?, false)
        };
        Self::finish(tokenizer, from_json, cfg, dir)
    }

    /// The CLIP tokenizer of OpenAI's CLIP and OpenCLIP (SD 1.x, 2.x and SDXL), built from
    /// the merge list this binary carries (`data/clip_merges.txt.gz`, from the
    /// `open_clip_torch` wheel, MIT licence): for single-file checkpoints, which hold no
    /// tokenizer. `pad` is the pad token: `<|endoftext|>` for SD 1.x and SDXL's first
    /// tokenizer, `!` for SD 2.x and SDXL's second (OpenCLIP pads with id 0), as the
    /// published diffusers folders set it. `label` names it in messages.
    pub fn builtin(pad: &str, label: &Path) -> Result<Self> {
        let (vocab, merges) = builtin_vocab().map_err(|e| Error::tokenizer(label, e))?;
        let unk = "<|endoftext|>";
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(unk.into())
            .fuse_unk(false)
            .build()
            .map_err(tokenizer_error(label))?;
        let tokenizer = Self::clip_pipeline(Tokenizer::new(bpe), label)?;
        let cfg = TokenizerConfig {
            bos: Some("<|startoftext|>".into()),
            eos: Some("<|endoftext|>".into()),
            unk: Some(unk.into()),
            pad: Some(pad.into()),
            model_max_length: Some(77),
            added: Vec::new(),
        };
        Self::finish(tokenizer, false, cfg, label)
    }

    fn finish(
        mut tokenizer: Tokenizer,
        from_json: bool,
        cfg: TokenizerConfig,
        dir: &Path,
    ) -> Result<Self> {
        let bos = cfg.bos.clone().unwrap_or_else(|| "<|startoftext|>".into());
        let eos = cfg.eos.clone().unwrap_or_else(|| "<|endoftext|>".into());
        let unk = cfg.unk.clone().unwrap_or_else(|| "<|endoftext|>".into());
        let pad = cfg.pad.clone().unwrap_or_else(|| "<|endoftext|>".into());
        tokenizer
            .with_truncation(None)
            .map_err(tokenizer_error(dir))?
            .with_padding(None);
        // transformers registers every special token of the config (and those of
        // `added_tokens_decoder`) as an added token: they match before normalisation and
        // are never split, which is why SDXL's second tokenizer maps a literal "!" to its
        // pad id 0 rather than to "!</w>".
        let mut specials: Vec<AddedToken> = [&bos, &eos, &unk, &pad]
            .into_iter()
            .map(|t| AddedToken::from(t.clone(), true))
            .collect();
        specials.extend(cfg.added.iter().filter(|t| t.special).cloned());
        tokenizer
            .add_special_tokens(specials)
            .map_err(tokenizer_error(dir))?;
        let normal: Vec<AddedToken> = cfg.added.iter().filter(|t| !t.special).cloned().collect();
        if !normal.is_empty() {
            tokenizer.add_tokens(normal).map_err(tokenizer_error(dir))?;
        }
        let bos_id = token_id(&tokenizer, dir, &bos, "bos")?;
        let eos_id = token_id(&tokenizer, dir, &eos, "eos")?;
        let pad_id = token_id(&tokenizer, dir, &pad, "pad")?;
        if !from_json {
            tokenizer.with_post_processor(Some(
                RobertaProcessing::new((eos.clone(), eos_id), (bos.clone(), bos_id))
                    .trim_offsets(false)
                    .add_prefix_space(false),
            ));
        }
        Ok(Self {
            tokenizer,
            dir: dir.to_path_buf(),
            max_length: cfg.model_max_length.unwrap_or(77),
            bos_id,
            eos_id,
            pad_id,
        })
    }

    /// transformers' `CLIPTokenizer` pipeline over `vocab.json` + `merges.txt`.
    fn build_bpe(dir: &Path, unk: &str) -> Result<Tokenizer> {
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        for f in [&vocab, &merges] {
            if !f.is_file() {
                return Err(Error::io(
                    f,
                    "not found: a CLIP tokenizer folder needs tokenizer.json, or vocab.json and merges.txt",
                ));
            }
        }
        let (v, m) =
            BPE::read_file(&vocab.to_string_lossy(), &merges.to_string_lossy()).map_err(|e| {
                Error::tokenizer(
                    dir,
                    format!("reading {} and {}: {e}", vocab.display(), merges.display()),
                )
            })?;
        let bpe = BPE::builder()
            .vocab_and_merges(v, m)
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".into())
            .unk_token(unk.into())
            .fuse_unk(false)
            .build()
            .map_err(tokenizer_error(dir))?;
        Self::clip_pipeline(Tokenizer::new(bpe), dir)
    }

    /// transformers' `CLIPTokenizer` normaliser, pre-tokeniser and decoder around `bpe`.
    fn clip_pipeline(mut tokenizer: Tokenizer, dir: &Path) -> Result<Tokenizer> {
        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ")
                .map_err(tokenizer_error(dir))?
                .into(),
            Lowercase.into(),
        ]);
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(tokenizer_error(dir))?;
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(tokenizer_error(dir))?;
        tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        tokenizer.with_decoder(Some(ByteLevel::default()));
        Ok(tokenizer)
    }

    /// Token ids of `text`: BOS, the text (cut to fit), EOS, then pads up to
    /// `model_max_length`. Warns, as diffusers does, when the text was cut.
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let (ids, removed) = encode_fixed(
            &self.tokenizer,
            &self.dir,
            text,
            self.max_length,
            self.pad_id,
        )?;
        if let Some(removed) = &removed {
            // diffusers echoes the whole dropped text; a long prompt would flood the log.
            tracing::warn!(
                "The following part of your input was truncated because CLIP can only handle \
                 sequences up to {} tokens ({} tokens dropped): {}",
                self.max_length,
                removed.len(),
                shorten(&self.decode(removed).unwrap_or_default(), 80)
            );
        }
        Ok(Encoded {
            ids,
            truncated: removed.is_some(),
        })
    }

    /// Text of `ids` without special tokens, words separated by spaces.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let text = self
            .tokenizer
            .decode(ids, true)
            .map_err(tokenizer_error(&self.dir))?;
        // transformers' CLIPTokenizer turns the end-of-word suffix into spaces.
        Ok(text.replace("</w>", " ").trim().to_owned())
    }

    /// The id of `token` in the vocabulary, if it has one.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// `model_max_length` (77 for every SD-family CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id of `<|startoftext|>` (or the configured `bos_token`).
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// The id of `<|endoftext|>` (or the configured `eos_token`).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// The id of the configured `pad_token` (`<|endoftext|>`, or `!` for SDXL's
    /// and SD3's second tokenizer).
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The folder this tokenizer was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

/// The T5 tokenizer of SD3's `tokenizer_3/` folder (`tokenizer.json`, as
/// `T5TokenizerFast` saves it).
#[derive(Debug, Clone)]
pub struct T5Tokenizer {
    tokenizer: Tokenizer,
    dir: PathBuf,
    pad_id: u32,
}

impl T5Tokenizer {
    /// Loads `dir/tokenizer.json`; the pad token comes from `tokenizer_config.json`
    /// (`<pad>` if absent).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::io(dir, "tokenizer folder not found"));
        }
        let json = dir.join("tokenizer.json");
        if !json.is_file() {
            return Err(Error::io(
                &json,
                "not found: the T5 tokenizer is read from tokenizer.json (T5TokenizerFast)",
            ));
        }
        let mut tokenizer = Tokenizer::from_file(&json).map_err(tokenizer_error(&json))?;
        tokenizer
            .with_truncation(None)
            .map_err(tokenizer_error(&json))?
            .with_padding(None);
        let cfg = TokenizerConfig::read(dir)?;
        let pad = cfg.pad.unwrap_or_else(|| "<pad>".into());
        let pad_id = token_id(&tokenizer, dir, &pad, "pad")?;
        Ok(Self {
            tokenizer,
            dir: dir.to_path_buf(),
            pad_id,
        })
    }

    /// Token ids of `text` with the closing `</s>`, cut or padded to `max_length`
    /// (diffusers' SD3 `max_sequence_length`, 256 by default). Warns when cut.
    pub fn encode(&self, text: &str, max_length: usize) -> Result<Encoded> {
        let (ids, removed) =
            encode_fixed(&self.tokenizer, &self.dir, text, max_length, self.pad_id)?;
        if let Some(removed) = &removed {
            tracing::warn!(
                "The following part of your input was truncated because `max_sequence_length` \
                 is set to {max_length} tokens ({} tokens dropped): {}",
                removed.len(),
                shorten(
                    &self.tokenizer.decode(removed, true).unwrap_or_default(),
                    80
                )
            );
        }
        Ok(Encoded {
            ids,
            truncated: removed.is_some(),
        })
    }

    /// The id of the pad token.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }
}

/// The merge list of OpenAI's CLIP tokenizer (see [`ClipTokenizer::builtin`]).
const CLIP_MERGES_GZ: &[u8] = include_bytes!("../data/clip_merges.txt.gz");

/// GPT-2's reversible byte -> character table that CLIP's BPE works on: printable bytes
/// stand for themselves, the others for characters from U+0100 on.
fn bytes_to_unicode() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut chars: Vec<u32> = (0..256).filter(|&b| printable(b)).collect();
    let mut n = 0;
    for b in 0..256 {
        if !printable(b) {
            chars.push(256 + n);
            n += 1;
        }
    }
    chars
        .into_iter()
        .map(|c| char::from_u32(c).expect("valid code point"))
        .collect()
}

/// CLIP's vocabulary and merges from the carried merge list, as CLIP's `SimpleTokenizer`
/// builds them: the byte symbols, the same with `</w>`, each merge joined, then
/// `<|startoftext|>` and `<|endoftext|>` (49408 tokens).
fn builtin_vocab() -> std::result::Result<(Vocab, Merges), String> {
    use std::io::Read;
    let mut text = String::new();
    flate2::read::GzDecoder::new(CLIP_MERGES_GZ)
        .read_to_string(&mut text)
        .map_err(|e| format!("the built-in CLIP merge list cannot be read: {e}"))?;
    let mut merges = Vec::with_capacity(48894);
    for line in text.lines().skip(1) {
        if line.is_empty() {
            continue;
        }
        let (a, b) = line
            .split_once(' ')
            .ok_or_else(|| format!("the built-in CLIP merge list has a bad line {line:?}"))?;
        merges.push((a.to_string(), b.to_string()));
    }
    let symbols = bytes_to_unicode();
    let mut tokens: Vec<String> = symbols.iter().map(|c| c.to_string()).collect();
    tokens.extend(symbols.iter().map(|c| format!("{c}</w>")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push("<|startoftext|>".into());
    tokens.push("<|endoftext|>".into());
    let vocab = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    Ok((vocab, merges))
}

#[cfg(test)]
mod tests {
    use super::shorten;

    #[test]
    fn long_text_is_shown_by_its_ends_and_length() {
        assert_eq!(shorten("short", 80), "\"short\"");
        let long = format!("{}{}", "a".repeat(1_000_000), "END");
        let s = shorten(&long, 80);
        assert!(s.len() < 200, "{s}");
        assert!(
            s.contains("END\"") && s.contains("1000003 characters in all"),
            "{s}"
        );
        // Cut by characters, never inside one.
        let wide = "é".repeat(500);
        assert!(shorten(&wide, 10).starts_with("\"ééééééé\""));
    }
}
