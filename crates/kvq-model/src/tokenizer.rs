//! Tokenizers: GPT-2 style byte-level BPE built from GGUF metadata (tokenizer.ggml.*), or an HF
//! tokenizer.json; both behind [`Tok`] with the model's bos/eos ids and whether prompts get a bos.

use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use std::path::Path;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// Llama 3's pre-tokenizer split (llama.cpp's `llama-bpe`), applied before the byte-level mapping.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A tokenizer with the ids kvq needs.
pub struct Tok {
    inner: Tokenizer,
    /// Beginning-of-sequence id.
    pub bos: Option<u32>,
    /// End-of-sequence ids.
    pub eos: Vec<u32>,
    /// Whether a prompt or evaluation window starts with `bos` (the tokenizer's own rule:
    /// `tokenizer.ggml.add_bos_token`, or what an HF tokenizer's post-processor does).
    pub add_bos: bool,
    /// Chat template (Jinja text) when the model ships one.
    pub chat_template: Option<String>,
}

fn strings(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    let v = md
        .get(key)
        .ok_or_else(|| ModelError::Tokenizer(format!("GGUF metadata '{key}' missing")))?;
    let arr = v
        .to_vec()
        .map_err(|_| ModelError::Tokenizer(format!("GGUF metadata '{key}' is not an array")))?;
    arr.iter()
        .map(|x| {
            x.to_string().cloned().map_err(|_| {
                ModelError::Tokenizer(format!("GGUF metadata '{key}' holds a non-string"))
            })
        })
        .collect()
}

/// The pre-tokenizer of a GGUF `tokenizer.ggml.pre` name, as llama.cpp defines them.
fn pre_tokenizer(pre: &str) -> Result<PreTokenizerWrapper> {
    let byte_level = ByteLevel::new(false, true, true);
    Ok(match pre {
        // Plain GPT-2 split.
        "" | "default" | "gpt2" | "gpt-2" => byte_level.into(),
        // Every digit its own piece, then the GPT-2 split (SmolLM, StarCoder).
        "smollm" | "starcoder" | "refact" | "codeshell" => {
            Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
        }
        "llama-bpe" | "llama3" => {
            let split = Split::new(SplitPattern::Regex(LLAMA3_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| ModelError::Tokenizer(format!("llama-bpe split: {e}")))?;
            Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
        other => {
            return Err(ModelError::Tokenizer(format!(
                "GGUF pre-tokenizer '{other}' is not supported (kvq knows gpt2, smollm/starcoder, llama-bpe)"
            )))
        }
    })
}

impl Tok {
    /// Builds the byte-level BPE described by a GGUF file's metadata.
    pub fn from_gguf(md: &HashMap<String, Value>) -> Result<Self> {
        let model = md
            .get("tokenizer.ggml.model")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "GGUF tokenizer model '{model}' is not supported (kvq reads gpt2 byte-level BPE)"
            )));
        }
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .cloned()
            .unwrap_or_default();
        let pre = pre_tokenizer(&pre)?;
        let tokens = strings(md, "tokenizer.ggml.tokens")?;
        let mut merges = Vec::new();
        for m in strings(md, "tokenizer.ggml.merges")? {
            let (a, b) = m.split_once(' ').ok_or_else(|| {
                ModelError::Tokenizer(format!(
                    "GGUF merge '{m}' is not two tokens separated by a space"
                ))
            })?;
            merges.push((a.to_string(), b.to_string()));
        }
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        if vocab.len() != tokens.len() {
            return Err(ModelError::Tokenizer(format!(
                "GGUF vocabulary has {} tokens but only {} distinct strings",
                tokens.len(),
                vocab.len()
            )));
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| {
                ModelError::Tokenizer(format!("cannot build BPE from GGUF metadata: {e}"))
            })?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre));
        inner.with_decoder(Some(ByteLevel::default()));
        // Control (3) and user-defined (4) tokens are matched whole, as llama.cpp does.
        if let Some(Ok(types)) = md.get("tokenizer.ggml.token_type").map(|v| v.to_vec()) {
            let specials: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(t, _)| t.to_i32().map(|x| x == 3 || x == 4).unwrap_or(false))
                .map(|(_, s)| AddedToken::from(s.clone(), true))
                .collect();
            inner.add_special_tokens(&specials);
        }
        let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let n = tokens.len() as u32;
        let bos = id("tokenizer.ggml.bos_token_id");
        let eos = id("tokenizer.ggml.eos_token_id");
        for (what, v) in [("bos", bos), ("eos", eos)] {
            if let Some(v) = v.filter(|&v| v >= n) {
                return Err(ModelError::Tokenizer(format!(
                    "GGUF {what} id {v} outside the vocabulary of {n} tokens"
                )));
            }
        }
        // llama.cpp's default for BPE vocabularies is no bos unless the metadata asks for it.
        let add_bos = md
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(false)
            && bos.is_some();
        Ok(Self {
            inner,
            bos,
            eos: eos.into_iter().collect(),
            add_bos,
            chat_template: md
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
        })
    }

    /// Loads an HF tokenizer.json; `tokenizer_config.json` beside it supplies the chat template and
    /// `add_bos_token` when present, otherwise the tokenizer's post-processor decides about bos.
    pub fn from_file(path: &str, bos: Option<u32>, eos: Vec<u32>) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{path}: {e}")))?;
        let cfg_path = Path::new(path).with_file_name("tokenizer_config.json");
        let cfg: Option<serde_json::Value> = std::fs::read_to_string(&cfg_path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let cfg_bool = cfg.as_ref().and_then(|c| c["add_bos_token"].as_bool());
        let add_bos = match (bos, cfg_bool) {
            (None, _) => false,
            (Some(_), Some(b)) => b,
            (Some(b), None) => inner
                .encode("a", true)
                .map(|e| e.get_ids().first() == Some(&b))
                .unwrap_or(false),
        };
        let chat_template = cfg
            .as_ref()
            .and_then(|c| c["chat_template"].as_str().map(String::from));
        Ok(Self {
            inner,
            bos,
            eos,
            add_bos,
            chat_template,
        })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let e = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(e.get_ids().to_vec())
    }

    /// Token ids of a prompt: bos first when the tokenizer adds one.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.bos.filter(|_| self.add_bos).into_iter().collect();
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The id of a token's text, if the vocabulary has it.
    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// The underlying `tokenizers` object (to save it as tokenizer.json).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }

    /// Wraps a user prompt in ChatML turn markers when the vocabulary has them (SmolLM2, Qwen). kvq
    /// does not run Jinja: the system turn is `system` if given, else the default system text that
    /// the model's template inserts (SmolLM2's), else none. Other templates are an error.
    pub fn chat_prompt(&self, user: &str, system: Option<&str>) -> Result<String> {
        if self.token_id("<|im_start|>").is_none() || self.token_id("<|im_end|>").is_none() {
            return Err(ModelError::Input(
                "--chat: this model's chat template is not ChatML; pass the formatted prompt yourself".into(),
            ));
        }
        let default_system = self.chat_template.as_deref().and_then(|t| {
            let start = "<|im_start|>system\n";
            let i = t.find(start)? + start.len();
            let j = t[i..].find("<|im_end|>")?;
            Some(t[i..i + j].to_string())
        });
        let mut s = String::new();
        if let Some(sys) = system.map(String::from).or(default_system) {
            s.push_str(&format!("<|im_start|>system\n{sys}<|im_end|>\n"));
        }
        s.push_str(&format!(
            "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
        ));
        Ok(s)
    }
}
