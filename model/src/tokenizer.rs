//! The checkpoint's own `tokenizer.json`, with bos/eos ids taken from `generation_config.json`
//! or `config.json` (never hard-coded).

use std::path::Path;

use crate::config::{PhiConfig, TokenIds};
use crate::error::{Error, Result};

const MAX_TOKENIZER_BYTES: u64 = 64 << 20;

#[derive(Clone)]
pub struct PhiTokenizer {
    inner: tokenizers::Tokenizer,
    /// Generation stops at any of these.
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
}

impl PhiTokenizer {
    pub fn from_dir(dir: &Path, config: &PhiConfig) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::Tokenizer {
                path: dir.to_path_buf(),
                msg: "no tokenizer.json in the model directory".into(),
            });
        }
        let text = crate::io::read_small_file(&path, MAX_TOKENIZER_BYTES)?;
        let inner: tokenizers::Tokenizer = text.parse().map_err(|e| Error::Tokenizer {
            path: path.clone(),
            msg: format!("invalid tokenizer.json: {e}"),
        })?;
        let (mut bos, mut eos) = (config.bos_token_id.clone(), config.eos_token_id.clone());
        let gen_path = dir.join("generation_config.json");
        if gen_path.is_file() {
            #[derive(serde::Deserialize)]
            struct Gen {
                bos_token_id: Option<TokenIds>,
                eos_token_id: Option<TokenIds>,
            }
            let g: Gen = serde_json::from_str(&crate::io::read_small_file(&gen_path, 1 << 20)?)
                .map_err(|e| Error::config(&gen_path, format!("invalid generation config: {e}")))?;
            bos = g.bos_token_id.or(bos);
            eos = g.eos_token_id.or(eos);
        }
        let eos_token_ids = eos.map(|e| e.ids()).unwrap_or_default();
        if eos_token_ids.is_empty() {
            return Err(Error::config(
                dir.join("config.json"),
                "no eos_token_id in generation_config.json or config.json",
            ));
        }
        let vocab = inner.get_vocab_size(true) as u32;
        for &id in &eos_token_ids {
            if id >= vocab.max(config.vocab_size as u32) {
                return Err(Error::config(
                    dir.join("config.json"),
                    format!("eos_token_id {id} is out of range"),
                ));
            }
        }
        Ok(Self {
            inner,
            eos_token_ids,
            bos_token_id: bos.and_then(|b| b.ids().first().copied()),
        })
    }

    /// Token ids of `text` as HF's `tokenizer(text)["input_ids"]` gives them.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| Error::Invalid(format!("tokenizing failed: {e}")))
    }

    /// Text of `ids`, skipping special tokens (like HF's `skip_special_tokens=True`).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| Error::Invalid(format!("decoding failed: {e}")))
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_token_ids.contains(&id)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

/// Turns a growing list of generated ids into text pieces as soon as they decode to whole
/// characters (a byte-level BPE token can end in the middle of a UTF-8 sequence).
pub struct TextStream {
    ids: Vec<u32>,
    emitted: usize,
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}

impl TextStream {
    pub fn new() -> Self {
        Self {
            ids: Vec::new(),
            emitted: 0,
        }
    }

    /// Adds a token; returns the newly completed text, if any.
    pub fn push(&mut self, tok: &PhiTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let text = tok.decode(&self.ids)?;
        if text.ends_with('\u{FFFD}')
            || text.len() <= self.emitted
            || !text.is_char_boundary(self.emitted)
        {
            return Ok(None);
        }
        let piece = text[self.emitted..].to_string();
        self.emitted = text.len();
        Ok(Some(piece))
    }
}
