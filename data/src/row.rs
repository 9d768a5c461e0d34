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

/// How a row's `persona_b` was stored: Persona-Chat's own list of facts, or (as some
/// reformatted copies on the hub have it) one string of sentences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersonaForm {
    List,
    Text,
}

/// A persona stored as one string, split into facts at sentence ends (`.`, `!`, `?` followed
/// by white space or the end, a run of them such as `?!` or `...` kept together) and at line
/// breaks; each fact is trimmed and empty ones are dropped.
pub fn split_facts(text: &str) -> Vec<String> {
    let mut facts = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\n' || c == '\r' {
            push_fact(&mut facts, &mut current);
            continue;
        }
        current.push(c);
        if matches!(c, '.' | '!' | '?') {
            while let Some(&p) = chars.peek() {
                if !matches!(p, '.' | '!' | '?') {
                    break;
                }
                current.push(p);
                chars.next();
            }
            if chars.peek().is_none_or(|p| p.is_whitespace()) {
                push_fact(&mut facts, &mut current);
            }
        }
    }
    push_fact(&mut facts, &mut current);
    facts
}

fn push_fact(facts: &mut Vec<String>, current: &mut String) {
    let fact = current.trim();
    if !fact.is_empty() {
        facts.push(fact.to_string());
    }
    current.clear();
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

#[cfg(test)]
mod tests {
    use super::split_facts;

    #[test]
    fn a_persona_string_splits_into_facts_at_sentence_ends() {
        assert_eq!(
            split_facts(
                "i like to ski. my wife does not like me anymore!  i went to mexico 4 times? yes"
            ),
            [
                "i like to ski.",
                "my wife does not like me anymore!",
                "i went to mexico 4 times?",
                "yes"
            ]
        );
        // Decimals, abbreviations without a following space, runs of marks and line breaks.
        assert_eq!(
            split_facts("i earn 3.5 dollars an hour... really?! i live in the u.s.\nmy dog is old"),
            [
                "i earn 3.5 dollars an hour...",
                "really?!",
                "i live in the u.s.",
                "my dog is old"
            ]
        );
        assert_eq!(
            split_facts("  one fact without a stop  "),
            ["one fact without a stop"]
        );
        assert_eq!(split_facts(" . \n "), ["."]);
        assert!(split_facts("   ").is_empty());
    }
}
