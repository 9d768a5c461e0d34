//! `generate`: continue a prompt, streaming the text or printing JSON.

use std::io::Write;

use anyhow::{Result, bail};
use phitune_model::generate::{CachedContext, GenerationConfig, generate};
use phitune_model::ops::Nf4Backend;
use phitune_model::sampling::SamplingConfig;
use phitune_model::tokenizer::TextStream;
use serde_json::json;

use super::ModelSource;
use crate::backend::{Job, dispatch};
use crate::cli::{GenerateArgs, SamplingArgs};

impl SamplingArgs {
    pub fn to_config(&self, stop_tokens: Vec<u32>) -> Result<GenerationConfig> {
        let sampling = SamplingConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
        };
        sampling.validate().map_err(anyhow::Error::msg)?;
        Ok(GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            sampling,
            stop_tokens,
        })
    }
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.prompt.is_none() {
        return run_persona(args);
    }
    let source = ModelSource::open(&args.model)?;
    let prompt = source
        .tokenizer
        .encode(args.prompt.as_deref().unwrap_or_default())?;
    if prompt.is_empty() {
        bail!("--prompt is empty after tokenization");
    }
    let mut config = args
        .sampling
        .to_config(source.tokenizer.eos_token_ids.clone())?;
    fit_context(&mut config, prompt.len(), &source)?;
    let (device, dtype) = args.model.device.resolve();
    let tokens = dispatch(
        device,
        dtype,
        Generate {
            source: &source,
            prompt: &prompt,
            config: &config,
            stream: !args.json,
        },
    )?;
    if args.json {
        let text = source.tokenizer.decode(&tokens)?;
        println!("{}", json!({ "tokens": tokens, "text": text }));
    } else {
        println!();
    }
    Ok(())
}

/// `--persona ... --dialogue ...` (or `--row`): the reply of the persona to the last turn,
/// rendered with the run's template, and only the reply is printed.
fn run_persona(args: GenerateArgs) -> Result<()> {
    if !args.persona.given() {
        bail!(
            "give --prompt TEXT, or a persona (--persona FACT, --persona-file FILE or --row FILE:INDEX) and --dialogue TURN"
        );
    }
    let run = super::adapter_run(&args.model);
    let mut p = args.persona.resolve(run.as_ref())?;
    p.dialogue.extend(args.dialogue.iter().cloned());
    if p.dialogue.is_empty() {
        bail!("give the dialogue to answer: --dialogue TURN (repeatable, oldest first)");
    }
    let source = ModelSource::open(&super::with_run_quant(&args.model, run.as_ref()))?;
    let mut config = args
        .sampling
        .to_config(source.tokenizer.eos_token_ids.clone())?;
    let budget = super::reply::budget(&source, p.max_len);
    let (ids, first_kept) = super::reply::persona_prompt(
        &source.tokenizer,
        p.template,
        &p.persona,
        &p.dialogue,
        budget,
        config.max_new_tokens,
    )?;
    if first_kept > 0 {
        eprintln!("(dropped the {first_kept} oldest turn(s) to fit {budget} tokens)");
    }
    fit_context(&mut config, ids.len(), &source)?;
    let (device, dtype) = args.model.device.resolve();
    let answer = dispatch(
        device,
        dtype,
        PersonaReply {
            source: &source,
            prompt: &ids,
            config: &config,
            stream: !args.json,
        },
    )?;
    if args.json {
        let prompt = p
            .template
            .prompt_text(&p.persona, &p.dialogue[first_kept..]);
        println!(
            "{}",
            json!({
                "text": answer.text,
                "tokens": answer.tokens,
                "prompt": prompt,
                "prompt_tokens": ids.len(),
                "finish_reason": answer.finish.reason(),
                "template": p.template.to_string(),
            })
        );
    } else {
        println!();
    }
    Ok(())
}

/// Generation stops at the model's context (`max_position_embeddings`): `--max-new-tokens`
/// beyond it is lowered, and stderr says so.
fn fit_context(
    config: &mut GenerationConfig,
    prompt_len: usize,
    source: &ModelSource,
) -> Result<()> {
    let context = source.checkpoint.config().max_position_embeddings;
    if prompt_len >= context {
        bail!(
            "the prompt has {prompt_len} tokens but the model's context is {context} positions: shorten it"
        );
    }
    let room = context - prompt_len;
    if config.max_new_tokens > room {
        eprintln!(
            "--max-new-tokens {}: generating at most {room}, where the prompt ({prompt_len} tokens) and the reply fill the model's context of {context} positions",
            config.max_new_tokens
        );
        config.max_new_tokens = room;
    }
    Ok(())
}

struct PersonaReply<'a> {
    source: &'a ModelSource,
    prompt: &'a [u32],
    config: &'a GenerationConfig,
    stream: bool,
}

impl Job for PersonaReply<'_> {
    type Output = super::reply::Reply;
    fn run<B: Nf4Backend>(self, device: B::Device) -> Result<super::reply::Reply> {
        let model = self.source.load::<B>(&device)?;
        let mut context = CachedContext::new(&model);
        let mut stdout = std::io::stdout().lock();
        let rule = super::reply::StopRule {
            turn: true,
            stops: Vec::new(),
        };
        super::reply::reply(
            &model,
            &mut context,
            self.prompt,
            self.config,
            &rule,
            &self.source.tokenizer,
            &device,
            |piece| {
                if self.stream && !piece.is_empty() {
                    let _ = stdout.write_all(piece.as_bytes());
                    let _ = stdout.flush();
                }
                true
            },
        )
    }
}

struct Generate<'a> {
    source: &'a ModelSource,
    prompt: &'a [u32],
    config: &'a GenerationConfig,
    stream: bool,
}

impl Job for Generate<'_> {
    type Output = Vec<u32>;
    fn run<B: Nf4Backend>(self, device: B::Device) -> Result<Vec<u32>> {
        let model = self.source.load::<B>(&device)?;
        let tok = &self.source.tokenizer;
        let mut text = TextStream::new();
        let mut stdout = std::io::stdout().lock();
        let mut failed = None;
        let tokens = generate(&model, self.prompt, self.config, &device, |id| {
            if self.stream && !tok.is_eos(id) {
                match text.push(tok, id) {
                    Ok(Some(piece)) => {
                        let _ = stdout.write_all(piece.as_bytes());
                        let _ = stdout.flush();
                    }
                    Ok(None) => {}
                    Err(e) => {
                        failed = Some(e);
                        return false;
                    }
                }
            }
            true
        });
        if let Some(e) = failed {
            return Err(e.into());
        }
        Ok(tokens)
    }
}
