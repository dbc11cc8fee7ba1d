//! Tokenizers: GPT-2 style byte-level BPE built from GGUF metadata (tokenizer.ggml.*), or an HF
//! tokenizer.json; both behind [`Tok`] with the model's bos/eos ids.

use crate::error::{ModelError, Result};
use candle_core::quantized::gguf_file::Value;
use std::collections::HashMap;
use tokenizers::models::bpe::BPE;
use tokenizers::{AddedToken, Tokenizer};

/// A tokenizer with the ids kvq needs.
pub struct Tok {
    inner: Tokenizer,
    /// Beginning-of-sequence id.
    pub bos: Option<u32>,
    /// End-of-sequence ids.
    pub eos: Vec<u32>,
    /// Chat template (Jinja text) when the model ships one.
    pub chat_template: Option<String>,
}

fn strings(md: &HashMap<String, Value>, key: &str) -> Result<Vec<String>> {
    let v = md
        .get(key)
        .ok_or_else(|| ModelError::Tokenizer(format!("GGUF metadata '{key}' missing")))?;
    let arr = v
        .to_vec()
        .map_err(|_| ModelError::Tokenizer(format!("'{key}' is not an array")))?;
    arr.iter()
        .map(|x| {
            x.to_string()
                .cloned()
                .map_err(|_| ModelError::Tokenizer(format!("'{key}' holds a non-string")))
        })
        .collect()
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
        let tokens = strings(md, "tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings(md, "tokenizer.ggml.merges")?
            .into_iter()
            .filter_map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
            })
            .collect();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| {
                ModelError::Tokenizer(format!("cannot build BPE from GGUF metadata: {e}"))
            })?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(
            tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true),
        ));
        inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        // Control tokens (type 3) are matched whole, as llama.cpp does.
        if let Some(Ok(types)) = md.get("tokenizer.ggml.token_type").map(|v| v.to_vec()) {
            let specials: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(t, _)| t.to_i32().map(|x| x == 3).unwrap_or(false))
                .map(|(_, s)| AddedToken::from(s.clone(), true))
                .collect();
            inner.add_special_tokens(&specials);
        }
        let id = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        Ok(Self {
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id").into_iter().collect(),
            chat_template: md
                .get("tokenizer.chat_template")
                .and_then(|v| v.to_string().ok())
                .cloned(),
        })
    }

    /// Loads an HF tokenizer.json.
    pub fn from_file(path: &str, bos: Option<u32>, eos: Vec<u32>) -> Result<Self> {
        let inner = Tokenizer::from_file(path)
            .map_err(|e| ModelError::Tokenizer(format!("{path}: {e}")))?;
        Ok(Self {
            inner,
            bos,
            eos,
            chat_template: None,
        })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text` (no bos added).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let e = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(e.get_ids().to_vec())
    }

    /// Text of `ids` (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The id of a special token's text, if the vocabulary has it.
    pub fn token_id(&self, s: &str) -> Option<u32> {
        self.inner.token_to_id(s)
    }

    /// Wraps a user prompt in the ChatML turn markers when the vocabulary has them (SmolLM2, Qwen):
    /// kvq does not run Jinja; other templates are reported as unsupported.
    pub fn chat_prompt(&self, user: &str) -> Result<String> {
        if self.token_id("<|im_start|>").is_some() {
            Ok(format!(
                "<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
            ))
        } else {
            Err(ModelError::Input("--chat: this model's chat template is not ChatML; pass the formatted prompt yourself".into()))
        }
    }
}
