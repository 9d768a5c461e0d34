//! `chat`: an interactive session with the persona. The user types the other speaker's turns
//! (one per line, from a terminal or a pipe); each reply is rendered with the training
//! template from the persona and the dialogue so far, streamed token by token, and added to
//! the history. The oldest turns are dropped when the prompt would not fit the budget, and the
//! KV cache is kept between turns so only the new part of each prompt is computed.

use std::io::{BufRead, IsTerminal, Write};
use std::time::Instant;

use anyhow::{Result, bail};
use phitune_model::generate::{CachedContext, GenerationConfig};
use phitune_model::ops::Nf4Backend;
use phitune_model::sampling::SamplingConfig;
use serde_json::json;

use super::reply::{StopRule, budget, persona_prompt, reply};
use super::{ModelSource, PersonaPrompt};
use crate::backend::{Job, dispatch};
use crate::cli::ChatArgs;

pub fn run(args: ChatArgs) -> Result<()> {
    let run = super::adapter_run(&args.model);
    let prompt = args.persona.resolve(run.as_ref())?;
    if prompt.persona.is_empty() {
        bail!(
            "chat needs a persona: --persona FACT (repeatable), --persona-file FILE or --row FILE:INDEX"
        );
    }
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let sampling = SamplingConfig {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: (args.top_p < 1.0).then_some(args.top_p),
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    sampling.validate().map_err(anyhow::Error::msg)?;
    let source = ModelSource::open(&super::with_run_quant(&args.model, run.as_ref()))?;
    let (device, dtype) = args.model.device.resolve();
    dispatch(
        device,
        dtype,
        Chat {
            source: &source,
            prompt,
            config: GenerationConfig {
                max_new_tokens: args.max_new_tokens,
                sampling,
                stop_tokens: source.tokenizer.eos_token_ids.clone(),
            },
            json: args.json,
            reuse: !args.no_cache_reuse,
        },
    )
}

struct Chat<'a> {
    source: &'a ModelSource,
    prompt: PersonaPrompt,
    config: GenerationConfig,
    json: bool,
    reuse: bool,
}

const HELP: &str = "type a message and press enter; /reset clears the dialogue, /persona shows \
the persona (/persona FACT adds one), /quit (or end of input) leaves";

impl Job for Chat<'_> {
    type Output = ();
    fn run<B: Nf4Backend>(self, device: B::Device) -> Result<()> {
        let tok = &self.source.tokenizer;
        let interactive = std::io::stdin().is_terminal();
        let model = self.source.load::<B>(&device)?;
        let PersonaPrompt {
            mut persona,
            mut dialogue,
            template,
            max_len,
        } = self.prompt;
        let budget = budget(self.source, max_len);
        eprintln!("chat: {template} template, {budget}-token budget. {HELP}");
        if interactive {
            eprintln!("persona: {}", persona.join(" "));
        }
        let mut context = CachedContext::new(&model);
        let mut stdout = std::io::stdout().lock();
        let mut turn = 0usize;
        let mut lines = std::io::stdin().lock().lines();
        loop {
            if interactive {
                eprint!("you> ");
            }
            let Some(line) = lines.next() else { break };
            let line = line.map_err(|e| anyhow::anyhow!("reading stdin: {e}"))?;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(cmd) = line.strip_prefix('/') {
                let (name, rest) = cmd.split_once(' ').unwrap_or((cmd, ""));
                match name {
                    "quit" | "exit" => break,
                    "reset" => {
                        dialogue.clear();
                        context.clear();
                        eprintln!("(dialogue cleared)");
                    }
                    "persona" if rest.trim().is_empty() => {
                        eprintln!("persona: {}", persona.join(" "))
                    }
                    "persona" => {
                        persona.push(rest.trim().to_string());
                        eprintln!("persona: {}", persona.join(" "));
                    }
                    "help" => eprintln!("{HELP}"),
                    _ => eprintln!("unknown command /{name}; {HELP}"),
                }
                continue;
            }
            turn += 1;
            dialogue.push(line.to_string());
            let (ids, first_kept) = persona_prompt(
                tok,
                template,
                &persona,
                &dialogue,
                budget,
                self.config.max_new_tokens,
            )?;
            // Forget what no longer fits (it never comes back into the prompt).
            dialogue.drain(..first_kept.min(dialogue.len().saturating_sub(1)));
            if first_kept > 0 {
                eprintln!("(dropped the {first_kept} oldest turn(s) to fit {budget} tokens)");
            }
            if ids.len() + self.config.max_new_tokens > budget {
                eprintln!(
                    "(the persona and the last turn take {} tokens of the {budget}-token budget)",
                    ids.len()
                );
            }
            if !self.reuse {
                context.clear();
            }
            let mut config = self.config.clone();
            config.sampling.seed = config.sampling.seed.wrapping_add(turn as u64);
            let t = Instant::now();
            if interactive {
                eprint!("bot> ");
            }
            let rule = StopRule {
                turn: true,
                stops: Vec::new(),
            };
            let answer = reply(
                &model,
                &mut context,
                &ids,
                &config,
                &rule,
                tok,
                &device,
                |piece| {
                    if !self.json && !piece.is_empty() {
                        let _ = stdout.write_all(piece.as_bytes());
                        let _ = stdout.flush();
                    }
                    true
                },
            )?;
            let text = answer.text;
            let seconds = t.elapsed().as_secs_f64();
            if self.json {
                let line = json!({
                    "turn": turn,
                    "user": line,
                    "reply": text,
                    "prompt": template.prompt_text(&persona, &dialogue),
                    "prompt_tokens": ids.len(),
                    "reused_tokens": context.reused(),
                    "dropped_turns": first_kept,
                    "history_turns": dialogue.len(),
                    "new_tokens": answer.tokens.len(),
                    "first_token_s": answer.first_token_s,
                    "seconds": seconds,
                });
                writeln!(stdout, "{line}")?;
            } else {
                writeln!(stdout)?;
            }
            stdout.flush()?;
            dialogue.push(text);
        }
        if interactive {
            eprintln!();
        }
        Ok(())
    }
}
