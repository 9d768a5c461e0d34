//! One Persona-Chat example: the answering speaker's persona, the dialogue so far, and the
//! gold next reply.

use serde::{Deserialize, Serialize};

/// Longest string accepted in any field (a real row's fields are a few hundred characters).
pub const MAX_FIELD_CHARS: usize = 64 * 1024;
/// Most items accepted in a persona or dialogue list.
pub const MAX_ITEMS: usize = 256;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PersonaRow {
    pub conv_id: String,
    /// Persona facts of the speaker who answers.
    pub persona_b: Vec<String>,
    /// The turns so far, alternating, starting with the other speaker.
    pub dialogue: Vec<String>,
    /// The gold next reply of persona B.
    pub reference: String,
}

impl PersonaRow {
    /// Checks the row's contents; the error names the column.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |col: &str, msg: &str| Err((col.to_string(), msg.to_string()));
        if self.conv_id.trim().is_empty() {
            return err("conv_id", "is empty");
        }
        for (col, items) in [("persona_b", &self.persona_b), ("dialogue", &self.dialogue)] {
            if items.is_empty() {
                return err(col, "is an empty list");
            }
            if items.len() > MAX_ITEMS {
                return err(
                    col,
                    &format!("has {} items (more than {MAX_ITEMS})", items.len()),
                );
            }
            if items.iter().all(|s| s.trim().is_empty()) {
                return err(col, "has only empty strings");
            }
        }
        if self.reference.trim().is_empty() {
            return err("reference", "is empty");
        }
        let too_long = |s: &String| s.chars().count() > MAX_FIELD_CHARS;
        for (col, bad) in [
            ("conv_id", too_long(&self.conv_id)),
            ("persona_b", self.persona_b.iter().any(too_long)),
            ("dialogue", self.dialogue.iter().any(too_long)),
            ("reference", too_long(&self.reference)),
        ] {
            if bad {
                return err(
                    col,
                    &format!("has a string longer than {MAX_FIELD_CHARS} characters"),
                );
            }
        }
        Ok(())
    }
}
