//! Text in and out: the `tokenizers` crate from `tokenizer.json`, or a byte-level BPE built
//! from a GGUF file's own metadata (vocabulary, merges, special tokens); chat templates
//! rendered with minijinja; and incremental decoding for streaming.

use std::path::Path;

use lemur_protocol::gguf::{GgufHeader, GgufValue};
use tokenizers::models::bpe::BPE;
use tokenizers::{AddedToken, Tokenizer};

use crate::error::WorkerError;

/// A model's tokenizer and its special tokens.
pub struct Tok {
    inner: Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for Tok {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tok").field("bos", &self.bos).field("eos", &self.eos).finish()
    }
}

fn tok_err(path: &Path, e: impl std::fmt::Display) -> WorkerError {
    WorkerError::File { path: path.display().to_string(), message: format!("tokenizer: {e}") }
}

impl Tok {
    /// From a Hugging Face directory: `tokenizer.json`, with special tokens and the chat
    /// template from `tokenizer_config.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self, WorkerError> {
        let path = dir.join("tokenizer.json");
        let inner = Tokenizer::from_file(&path).map_err(|e| tok_err(&path, e))?;
        let cfg: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or(serde_json::Value::Null);
        let token_id = |key: &str| {
            let v = &cfg[key];
            let s = v.as_str().or_else(|| v["content"].as_str())?;
            inner.token_to_id(s)
        };
        Ok(Self {
            bos: token_id("bos_token"),
            eos: token_id("eos_token"),
            add_bos: cfg["add_bos_token"].as_bool().unwrap_or(false),
            chat_template: cfg["chat_template"].as_str().map(str::to_string),
            inner,
        })
    }

    /// From a GGUF header: `tokenizer.ggml.*` (byte-level BPE, the `gpt2` model).
    pub fn from_gguf(header: &GgufHeader, path: &Path) -> Result<Self, WorkerError> {
        let model = header.get("tokenizer.ggml.model").and_then(GgufValue::as_str).unwrap_or("");
        if model != "gpt2" {
            return Err(tok_err(path, format!("tokenizer model `{model}` is not supported (gpt2 byte-level BPE is)")));
        }
        let strings = |key: &str| -> Result<Vec<String>, WorkerError> {
            header
                .get(key)
                .and_then(GgufValue::as_array)
                .ok_or_else(|| tok_err(path, format!("missing `{key}`")))?
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| tok_err(path, format!("`{key}` holds a non-string")))
                })
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .filter_map(|m| m.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())))
            .collect();
        let vocab: tokenizers::models::bpe::Vocab =
            tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| tok_err(path, e))?;
        let mut inner = Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true)));
        inner.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::default()));
        // Control tokens (type 3) are special: never split, skipped when decoding.
        if let Some(types) = header.get("tokenizer.ggml.token_type").and_then(GgufValue::as_array) {
            let specials: Vec<AddedToken> = types
                .iter()
                .zip(&tokens)
                .filter(|(t, _)| t.as_u64() == Some(3))
                .map(|(_, s)| AddedToken::from(s.clone(), true))
                .collect();
            inner.add_special_tokens(specials).map_err(|e| tok_err(path, e))?;
        }
        let id = |key: &str| header.get(key).and_then(GgufValue::as_u64).map(|v| v as u32);
        Ok(Self {
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos: header.get("tokenizer.ggml.add_bos_token").is_some_and(|v| matches!(v, GgufValue::Bool(true))),
            chat_template: header.get("tokenizer.chat_template").and_then(GgufValue::as_str).map(str::to_string),
            inner,
        })
    }

    /// Writes the tokenizer as a Hugging Face `tokenizer.json`.
    pub fn save(&self, path: &Path) -> Result<(), WorkerError> {
        self.inner.save(path, false).map_err(|e| tok_err(path, e))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>, WorkerError> {
        let enc =
            self.inner.encode(text, false).map_err(|e| WorkerError::Plan(format!("tokenizing the prompt: {e}")))?;
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String, WorkerError> {
        self.inner.decode(ids, true).map_err(|e| WorkerError::Plan(format!("decoding tokens: {e}")))
    }

    /// The prompt wrapped in the checkpoint's chat template as one user message.
    pub fn chat(&self, user: &str) -> Result<String, WorkerError> {
        self.chat_messages(&[("user".to_string(), user.to_string())])
    }

    /// A conversation of (role, content) turns in the checkpoint's chat template, ready
    /// for the assistant's answer.
    pub fn chat_messages(&self, turns: &[(String, String)]) -> Result<String, WorkerError> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| WorkerError::Request("the checkpoint has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        env.add_template("chat", template).map_err(|e| WorkerError::Plan(format!("chat template: {e}")))?;
        let tokens = |id: Option<u32>| id.and_then(|i| self.inner.id_to_token(i)).unwrap_or_default();
        let messages: Vec<_> =
            turns.iter().map(|(role, content)| minijinja::context! { role => role, content => content }).collect();
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => tokens(self.bos),
                    eos_token => tokens(self.eos),
                })
            })
            .map_err(|e| WorkerError::Request(format!("chat template: {e}")))
    }

    /// Tokens that end an answer: end of sequence, and the end-of-turn markers of common
    /// chat templates that this vocabulary has.
    pub fn stop_tokens(&self) -> Vec<u32> {
        let mut out: Vec<u32> = self.eos.into_iter().collect();
        for t in ["<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>"] {
            if let Some(id) = self.inner.token_to_id(t) {
                if !out.contains(&id) {
                    out.push(id);
                }
            }
        }
        out
    }

    /// Tokens in the vocabulary, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer of a checkpoint: its GGUF metadata, or `tokenizer.json` in its directory.
    pub fn from_checkpoint(model: &Path) -> Result<Self, WorkerError> {
        if let Some(file) = lemur_protocol::gguf::gguf_file_of(model) {
            let mut f = std::fs::File::open(&file).map_err(|e| tok_err(&file, e))?;
            let header = GgufHeader::read(&mut f).map_err(|e| tok_err(&file, e))?;
            return Self::from_gguf(&header, &file);
        }
        Self::from_dir(model)
    }
}

/// Turns a growing token sequence into text pieces as they become printable.
#[derive(Debug, Default)]
pub struct Streamer {
    ids: Vec<u32>,
    printed: usize,
}

impl Streamer {
    /// Adds a token; returns the new text that can be printed (nothing while a multi-byte
    /// character is incomplete).
    pub fn push(&mut self, tok: &Tok, id: u32) -> Result<String, WorkerError> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{fffd}') {
            return Ok(String::new());
        }
        match text.get(self.printed..) {
            Some(piece) => {
                let piece = piece.to_string();
                self.printed = text.len();
                Ok(piece)
            }
            None => Ok(String::new()),
        }
    }
}
