//! Prompt templates: one builder used by training, evaluation and generation alike (a template
//! mismatch between training and testing was a defect of the original project).
//!
//! - `seed`: exactly the original recipe: persona items and dialogue turns joined by spaces,
//!   each cut to its first 256 characters, `Instruct: ... Output: {reference}` tokenized as one
//!   text, truncated/padded to 128 tokens with pad = eos, loss on every non-pad token, no eos.
//! - `persona` (default): the same framing, the dialogue one turn per line keeping the most
//!   recent turns that fit the token budget, the reference never truncated (the example is
//!   dropped if it cannot fit), eos appended and trained, loss on the response only.

use phitune_model::PhiTokenizer;
use serde::{Deserialize, Serialize};

use crate::row::PersonaRow;

/// Label of positions that carry no loss (PyTorch's ignore_index).
pub const IGNORE: i64 = -100;
/// The seed recipe's per-field character cut and sequence length.
pub const SEED_CHARS: usize = 256;
pub const SEED_LEN: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Template {
    Seed,
    Persona,
}

impl std::str::FromStr for Template {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "seed" => Ok(Template::Seed),
            "persona" => Ok(Template::Persona),
            _ => Err(format!("unknown template \"{s}\" (seed, persona)")),
        }
    }
}

impl std::fmt::Display for Template {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Template::Seed => "seed",
            Template::Persona => "persona",
        })
    }
}

/// A tokenized training example.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// Same length as `input_ids`; [`IGNORE`] where no loss is taken.
    pub labels: Vec<i64>,
    /// Real (non-padding) tokens; the rest are padding.
    pub len: usize,
    /// Something was cut to fit (dialogue turns dropped, or the seed's 128-token truncation).
    pub truncated: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Encoded {
    Kept(Example),
    /// The reference (plus the last turn and the framing) cannot fit in the budget.
    Dropped,
}

fn first_chars(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

impl Template {
    /// The prompt-only text (what generation continues) for a persona and dialogue.
    pub fn prompt_text(self, persona: &[String], dialogue: &[String]) -> String {
        match self {
            Template::Seed => format!(
                "Instruct: Given this persona: {}\nand this dialogue: {}\ngenerate a response.\nOutput:",
                first_chars(&persona.join(" "), SEED_CHARS),
                first_chars(&dialogue.join(" "), SEED_CHARS)
            ),
            Template::Persona => format!(
                "Instruct: Given this persona: {}\nand this dialogue:\n{}\ngenerate a response.\nOutput:",
                persona.join(" "),
                dialogue.join("\n")
            ),
        }
    }

    /// The response text that follows the prompt.
    pub fn response_text(self, reference: &str) -> String {
        format!(" {reference}")
    }

    /// Prompt token ids for generation: for `persona`, the most recent turns that leave
    /// `reserve` tokens of `max_len` free for the reply (at least the last turn is kept).
    pub fn prompt_ids(
        self,
        tok: &PhiTokenizer,
        persona: &[String],
        dialogue: &[String],
        max_len: usize,
        reserve: usize,
    ) -> phitune_model::Result<Vec<u32>> {
        Ok(self
            .fitted_prompt(tok, persona, dialogue, max_len, reserve)?
            .0)
    }

    /// [`Template::prompt_ids`] and the index of the first dialogue turn it kept (the turns
    /// before it were dropped to fit).
    pub fn fitted_prompt(
        self,
        tok: &PhiTokenizer,
        persona: &[String],
        dialogue: &[String],
        max_len: usize,
        reserve: usize,
    ) -> phitune_model::Result<(Vec<u32>, usize)> {
        match self {
            Template::Seed => Ok((tok.encode(&self.prompt_text(persona, dialogue))?, 0)),
            Template::Persona => {
                let budget = max_len.saturating_sub(reserve);
                for start in 0..dialogue.len() {
                    let ids = tok.encode(&self.prompt_text(persona, &dialogue[start..]))?;
                    if ids.len() <= budget || start + 1 == dialogue.len() {
                        return Ok((ids, start));
                    }
                }
                Ok((tok.encode(&self.prompt_text(persona, &[]))?, dialogue.len()))
            }
        }
    }

    /// Tokenizes a training example. `max_len` applies to `persona` (the seed template always
    /// uses 128).
    pub fn encode(
        self,
        tok: &PhiTokenizer,
        row: &PersonaRow,
        max_len: usize,
    ) -> phitune_model::Result<Encoded> {
        let eos = tok.eos_token_ids[0];
        match self {
            Template::Seed => {
                let text = format!(
                    "{}{}",
                    self.prompt_text(&row.persona_b, &row.dialogue),
                    self.response_text(&row.reference)
                );
                let mut ids = tok.encode(&text)?;
                let truncated = ids.len() > SEED_LEN;
                ids.truncate(SEED_LEN);
                let len = ids.len();
                let mut labels: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
                ids.resize(SEED_LEN, eos);
                labels.resize(SEED_LEN, IGNORE);
                Ok(Encoded::Kept(Example {
                    input_ids: ids,
                    labels,
                    len,
                    truncated,
                }))
            }
            Template::Persona => {
                let response = tok.encode(&self.response_text(&row.reference))?;
                let need = response.len() + 1; // + eos
                for start in 0..row.dialogue.len() {
                    let prompt =
                        tok.encode(&self.prompt_text(&row.persona_b, &row.dialogue[start..]))?;
                    if prompt.len() + need <= max_len {
                        let mut ids = prompt.clone();
                        ids.extend_from_slice(&response);
                        ids.push(eos);
                        let mut labels = vec![IGNORE; prompt.len()];
                        labels.extend(response.iter().map(|&t| t as i64));
                        labels.push(eos as i64);
                        let len = ids.len();
                        return Ok(Encoded::Kept(Example {
                            input_ids: ids,
                            labels,
                            len,
                            truncated: start > 0,
                        }));
                    }
                }
                Ok(Encoded::Dropped)
            }
        }
    }
}
