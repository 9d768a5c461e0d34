//! The persona's reply, one rule for `chat`, `generate --persona` and `serve`: the prompt is the
//! training template's, trimmed from the oldest turns to fit ([`persona_prompt`]); a reply is
//! generated until eos, the newline that starts the next turn, a stop string or the token limit
//! ([`reply`]), and streamed as it grows, without the text a stop string or the trailing
//! whitespace will take back.

use std::time::Instant;

use anyhow::Result;
use phitune_model::Phi;
use phitune_model::PhiTokenizer;
use phitune_model::generate::{CachedContext, GenerationConfig, generate_cached};
use phitune_model::ops::Nf4Backend;
use phitune_model::tokenizer::TextStream;

use super::ModelSource;

/// The prompt budget: the run's length, within the model's positions.
pub fn budget(source: &ModelSource, max_len: usize) -> usize {
    max_len.min(source.checkpoint.config().max_position_embeddings)
}

/// A persona prompt fitted to `budget` with `reserve` tokens left for the reply: its ids and the
/// index of the first dialogue turn it kept.
pub fn persona_prompt(
    tok: &PhiTokenizer,
    template: phitune_data::Template,
    persona: &[String],
    dialogue: &[String],
    budget: usize,
    reserve: usize,
) -> Result<(Vec<u32>, usize)> {
    Ok(template.fitted_prompt(tok, persona, dialogue, budget, reserve)?)
}

/// The room the model's context leaves after a prompt of `prompt_len` tokens (at least one
/// position is needed for the reply).
pub fn room(positions: usize, prompt_len: usize) -> Option<usize> {
    positions.checked_sub(prompt_len).filter(|&r| r > 0)
}

/// What ends a reply.
#[derive(Debug, Clone, Default)]
pub struct StopRule {
    /// A persona reply: it ends at the newline that starts the next turn, its leading and
    /// trailing whitespace is dropped (the template puts a space after "Output:"). Off for a
    /// raw continuation, which is returned exactly.
    pub turn: bool,
    /// Strings that end the reply where they first appear (not included).
    pub stops: Vec<String>,
}

/// Why a reply ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The model's end-of-text token.
    Eos,
    /// The newline that starts the next turn.
    TurnEnd,
    /// One of the stop strings.
    StopString,
    /// The token limit (or the end of the model's context).
    Length,
    /// The receiver of the text stopped listening.
    Cancelled,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Finish::Length => "length",
            Finish::Cancelled => "cancelled",
            _ => "stop",
        }
    }
}

/// A finished reply.
#[derive(Debug, Clone)]
pub struct Reply {
    /// The text (what was streamed, in one piece).
    pub text: String,
    /// Every token generated, the one that ended the reply included.
    pub tokens: Vec<u32>,
    /// Seconds to the first new token (prompt processing included).
    pub first_token_s: f64,
    pub finish: Finish,
}

/// Generates one reply to the prompt `ids`, continuing `context` (the KV cache of the longest
/// common prefix is reused). `on_text` receives the text as it grows, after every token (an
/// empty piece when nothing can be shown yet); returning false cancels the reply.
#[allow(clippy::too_many_arguments)]
pub fn reply<B: Nf4Backend>(
    model: &Phi<B>,
    context: &mut CachedContext<B>,
    ids: &[u32],
    config: &GenerationConfig,
    rule: &StopRule,
    tok: &PhiTokenizer,
    device: &B::Device,
    mut on_text: impl FnMut(&str) -> bool,
) -> Result<Reply> {
    let t = Instant::now();
    let mut first = None;
    let mut stream = TextStream::new();
    let mut text = ReplyText::new(rule);
    let mut finish = None;
    let mut failed = None;
    let tokens = generate_cached(model, context, ids, config, device, |id| {
        first.get_or_insert_with(|| t.elapsed().as_secs_f64());
        if tok.is_eos(id) {
            finish = Some(Finish::Eos);
            return false;
        }
        let piece = match stream.push(tok, id) {
            Ok(piece) => piece.unwrap_or_default(),
            Err(e) => {
                failed = Some(e);
                return false;
            }
        };
        let ended = text.push(&piece);
        if !on_text(text.take_ready()) {
            finish = Some(Finish::Cancelled);
            return false;
        }
        if let Some(end) = ended {
            finish = Some(end);
            return false;
        }
        true
    });
    if let Some(e) = failed {
        return Err(e.into());
    }
    let finish = finish.unwrap_or(Finish::Length);
    if finish != Finish::Cancelled {
        on_text(text.finish());
    }
    Ok(Reply {
        text: text.text,
        tokens,
        first_token_s: first.unwrap_or_else(|| t.elapsed().as_secs_f64()),
        finish,
    })
}

/// The reply's text as it grows: where it ends, and how much of it can be shown already.
struct ReplyText<'a> {
    rule: &'a StopRule,
    /// The text so far (for a persona reply, without its leading whitespace).
    text: String,
    /// Bytes of `text` handed out.
    shown: usize,
    /// Bytes of `text` that are ready to be handed out.
    ready: usize,
    ended: bool,
}

impl<'a> ReplyText<'a> {
    fn new(rule: &'a StopRule) -> Self {
        Self {
            rule,
            text: String::new(),
            shown: 0,
            ready: 0,
            ended: false,
        }
    }

    /// Adds a decoded piece; returns why the reply ends when it does.
    fn push(&mut self, piece: &str) -> Option<Finish> {
        // A persona reply ends at a newline (before its leading whitespace is dropped: a reply
        // that starts a new line at once is empty, as the model ended its turn).
        let (piece, turn_end) = match piece.find('\n') {
            Some(i) if self.rule.turn => (&piece[..i], true),
            _ => (piece, false),
        };
        let piece = if self.rule.turn && self.text.is_empty() {
            piece.trim_start()
        } else {
            piece
        };
        // A stop string may straddle the pieces: search from where one could start.
        let longest = self.rule.stops.iter().map(String::len).max().unwrap_or(0);
        let mut from = self.text.len().saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        self.text.push_str(piece);
        let stop = self
            .rule
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text[from..].find(s.as_str()))
            .min();
        let end = match stop {
            Some(i) => {
                self.text.truncate(from + i);
                Some(Finish::StopString)
            }
            None => turn_end.then_some(Finish::TurnEnd),
        };
        if end.is_some() {
            self.close();
            return end;
        }
        // Hold back what a stop string or the trimmed end may still take back. (A stop string
        // found later starts at or after `ready`: what came before it was no stop's start.)
        let mut ready = self.text.len() - self.held_for_stops();
        if self.rule.turn {
            ready = self.text[..ready].trim_end().len();
        }
        self.ready = ready.max(self.shown);
        None
    }

    /// The longest end of the text that is the start of a stop string.
    fn held_for_stops(&self) -> usize {
        let bytes = self.text.as_bytes();
        self.rule
            .stops
            .iter()
            .map(|s| {
                (1..s.len().min(bytes.len() + 1))
                    .rev()
                    .find(|&k| bytes.ends_with(&s.as_bytes()[..k]))
                    .unwrap_or(0)
            })
            .max()
            .unwrap_or(0)
    }

    fn close(&mut self) {
        if self.rule.turn {
            let trimmed = self.text.trim_end().len();
            self.text.truncate(trimmed);
        }
        self.ready = self.text.len();
        self.ended = true;
    }

    /// The text that became ready since the last call.
    fn take_ready(&mut self) -> &str {
        let out = &self.text[self.shown..self.ready];
        self.shown = self.ready;
        out
    }

    /// The rest of the text, once the reply ended.
    fn finish(&mut self) -> &str {
        if !self.ended {
            self.close();
        }
        self.take_ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds pieces; returns what was shown piece by piece, the final text and the finish.
    fn run(rule: &StopRule, pieces: &[&str]) -> (Vec<String>, String, Option<Finish>) {
        let mut t = ReplyText::new(rule);
        let mut shown = Vec::new();
        let mut end = None;
        for p in pieces {
            end = t.push(p);
            shown.push(t.take_ready().to_string());
            if end.is_some() {
                break;
            }
        }
        shown.push(t.finish().to_string());
        (shown, t.text, end)
    }

    fn persona(stops: &[&str]) -> StopRule {
        StopRule {
            turn: true,
            stops: stops.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn a_persona_reply_is_trimmed_and_ends_at_the_next_turn() {
        let (shown, text, end) = run(&persona(&[]), &[" hi", " there", " ", "you", "!\nno"]);
        assert_eq!(text, "hi there you!");
        assert_eq!(shown.concat(), text);
        // The space after "there" waits until more text follows it.
        assert_eq!(shown[..4], ["hi", " there", "", " you"]);
        assert_eq!(end, Some(Finish::TurnEnd));
        // Trailing whitespace at the end is never shown.
        let (shown, text, end) = run(&persona(&[]), &[" ok", "  "]);
        assert_eq!(
            (shown.concat(), text.as_str(), end),
            ("ok".into(), "ok", None)
        );
    }

    #[test]
    fn a_stop_string_across_pieces_ends_the_reply_and_is_never_shown() {
        let rule = persona(&["END", "xyz"]);
        let (shown, text, end) = run(&rule, &[" one E", "N", "D two"]);
        assert_eq!(text, "one");
        assert_eq!(shown.concat(), "one");
        assert_eq!(end, Some(Finish::StopString));
        // A prefix that turns out not to be a stop string is shown once it is known.
        let (shown, text, end) = run(&rule, &[" aE", "Nb", "c"]);
        assert_eq!(shown, ["a", "ENb", "c", ""]);
        assert_eq!((text.as_str(), end), ("aENbc", None));
        // Whitespace before a held-back prefix waits too (the stop may end the reply there).
        let rule = persona(&["i "]);
        let (shown, text, end) = run(&rule, &[" oh, cas,", " i", " walking"]);
        assert_eq!(
            (shown.concat(), text.as_str()),
            ("oh, cas,".into(), "oh, cas,")
        );
        assert_eq!(end, Some(Finish::StopString));
        let rule = persona(&["END", "xyz"]);
        // The earliest of a newline and a stop string wins.
        let (_, text, end) = run(&rule, &[" axyz\nb"]);
        assert_eq!((text.as_str(), end), ("a", Some(Finish::StopString)));
    }

    #[test]
    fn a_raw_continuation_is_returned_exactly() {
        let rule = StopRule {
            turn: false,
            stops: vec!["é!".into()],
        };
        let (shown, text, end) = run(&rule, &[" a\n", " b é", "é!"]);
        assert_eq!(text, " a\n b é");
        assert_eq!(shown.concat(), text);
        assert_eq!(end, Some(Finish::StopString));
    }
}
