//! `serve`: the persona over HTTP. An OpenAI-compatible API (`/v1/chat/completions`,
//! `/v1/completions`, `/v1/models`) and a chat page (`/`), on axum and tokio (both already in
//! our tree through burn-collective, so the server costs no new dependency).
//!
//! One thread owns the model and generates; the HTTP side (a small tokio runtime) checks each
//! request, builds its prompt with the rule `chat` and `generate --persona` use
//! ([`super::reply`]), and hands it to that thread through a bounded queue (full: 429). Replies
//! are generated one at a time, in arrival order, continuing one KV cache, so the longest prefix
//! a request shares with the one before (the persona, earlier turns) is not computed again. A
//! client that goes away cancels its reply (streamed: at the next token; waiting: before it
//! starts).

mod api;
mod http;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use phitune_model::PhiTokenizer;
use phitune_model::generate::{CachedContext, GenerationConfig};
use phitune_model::ops::Nf4Backend;
use phitune_model::sampling::SamplingConfig;
use tokio::sync::mpsc::UnboundedSender;

use super::ModelSource;
use super::reply::{Finish, StopRule, reply};
use crate::backend::{Job, dispatch};
use crate::cli::ServeArgs;

pub fn run(args: ServeArgs) -> Result<()> {
    let run = super::adapter_run(&args.model);
    let prompt = args.persona.resolve(run.as_ref())?;
    if args.max_new_tokens == 0 {
        bail!("--max-new-tokens must be at least 1");
    }
    let defaults = SamplingConfig {
        temperature: args.temperature,
        top_k: None,
        top_p: (args.top_p < 1.0).then_some(args.top_p),
        repetition_penalty: args.repetition_penalty,
        seed: args.seed,
    };
    defaults.validate().map_err(anyhow::Error::msg)?;
    let api_key = args
        .api_key
        .clone()
        .or_else(|| std::env::var("PHITUNE_API_KEY").ok())
        .filter(|k| !k.is_empty());
    let source = ModelSource::open(&super::with_run_quant(&args.model, run.as_ref()))?;
    let id = args.name.clone().unwrap_or_else(|| model_id(&args));
    // Bind before the model loads: a port in use is said at once.
    let listener = std::net::TcpListener::bind((args.host.as_str(), args.port))
        .with_context(|| format!("listening on {}:{}", args.host, args.port))?;
    listener
        .set_nonblocking(true)
        .context("setting up the listening socket")?;
    let (queue, requests) = std::sync::mpsc::sync_channel(args.max_queue);
    let state = Arc::new(State {
        id,
        created: now_unix(),
        tok: source.tokenizer.clone(),
        template: prompt.template,
        budget: super::reply::budget(&source, prompt.max_len),
        positions: source.checkpoint.config().max_position_embeddings,
        persona: prompt.persona,
        max_new_tokens: args.max_new_tokens,
        defaults,
        next_seed: AtomicU64::new(args.seed),
        api_key,
        queue,
        waiting: AtomicUsize::new(0),
        max_queue: args.max_queue,
        served: AtomicU64::new(0),
        requests: AtomicU64::new(0),
    });
    let (device, dtype) = args.model.device.resolve();
    dispatch(
        device,
        dtype,
        Serve {
            source: &source,
            state,
            listener,
            requests,
        },
    )
}

/// The id clients name: the adapter's directory name, else the model's (a hub id as given).
fn model_id(args: &ServeArgs) -> String {
    let name_of = |p: &std::path::Path| {
        std::fs::canonicalize(p)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
    };
    if let Some(a) = args.model.adapter.as_deref().and_then(name_of) {
        return a;
    }
    let model = std::path::Path::new(&args.model.model);
    if model.is_dir() {
        name_of(model).unwrap_or_else(|| args.model.model.clone())
    } else {
        args.model.model.clone()
    }
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What the HTTP side knows: the model's id, the tokenizer and prompt rules, the defaults, and
/// the queue to the generating thread.
pub struct State {
    pub id: String,
    pub created: u64,
    pub tok: PhiTokenizer,
    pub template: phitune_data::Template,
    /// Tokens a persona prompt and its reply are fitted to (older turns are dropped).
    pub budget: usize,
    /// The model's context.
    pub positions: usize,
    /// The persona of requests without a system message.
    pub persona: Vec<String>,
    pub max_new_tokens: usize,
    pub defaults: SamplingConfig,
    pub next_seed: AtomicU64,
    pub api_key: Option<String>,
    pub queue: SyncSender<Work>,
    /// Requests queued and not yet started.
    pub waiting: AtomicUsize,
    pub max_queue: usize,
    pub served: AtomicU64,
    /// Requests received (their ids).
    pub requests: AtomicU64,
}

/// One reply to generate.
pub struct Work {
    pub ids: Vec<u32>,
    pub config: GenerationConfig,
    pub rule: StopRule,
    pub events: UnboundedSender<Event>,
    /// For the log line: the endpoint and when the request arrived.
    pub path: &'static str,
    pub received: Instant,
}

/// What the generating thread tells the request's handler.
pub enum Event {
    Text(String),
    Done(Done),
    Failed(String),
}

pub struct Done {
    pub completion_tokens: usize,
    pub finish: Finish,
}

struct Serve<'a> {
    source: &'a ModelSource,
    state: Arc<State>,
    listener: std::net::TcpListener,
    requests: Receiver<Work>,
}

impl Job for Serve<'_> {
    type Output = ();
    fn run<B: Nf4Backend>(self, device: B::Device) -> Result<()> {
        let model = self.source.load::<B>(&device)?;
        let addr = self
            .listener
            .local_addr()
            .context("the listening address")?;
        let state = self.state.clone();
        let listener = self.listener;
        let server = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || http::run(listener, state))
            .context("starting the HTTP thread")?;
        let url = match addr {
            std::net::SocketAddr::V4(a) if a.ip().is_unspecified() => {
                format!("http://127.0.0.1:{}", a.port())
            }
            a => format!("http://{a}"),
        };
        eprintln!(
            "serve: {} on {url}/ (the chat page) and {url}/v1 (OpenAI API){}; Ctrl-C stops",
            self.state.id,
            if self.state.api_key.is_some() {
                ", API key required"
            } else {
                ""
            }
        );
        let delay = test_token_delay();
        let tok = &self.source.tokenizer;
        let mut context = CachedContext::new(&model);
        // Ends when the HTTP side is gone (shut down: every request answered).
        loop {
            let work = match self.requests.recv_timeout(Duration::from_millis(200)) {
                Ok(work) => work,
                Err(RecvTimeoutError::Timeout) if !server.is_finished() => continue,
                Err(_) => break,
            };
            self.state.waiting.fetch_sub(1, Ordering::SeqCst);
            if work.events.is_closed() {
                log_line(
                    work.path,
                    499,
                    "the client left before its turn",
                    work.received,
                );
                continue;
            }
            let started = Instant::now();
            let events = &work.events;
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                reply(
                    &model,
                    &mut context,
                    &work.ids,
                    &work.config,
                    &work.rule,
                    tok,
                    &device,
                    |piece| {
                        if let Some(d) = delay {
                            std::thread::sleep(d);
                        }
                        if piece.is_empty() {
                            !events.is_closed()
                        } else {
                            events.send(Event::Text(piece.to_string())).is_ok()
                        }
                    },
                )
            }));
            let reused = context.reused();
            match outcome {
                Ok(Ok(r)) => {
                    let seconds = started.elapsed().as_secs_f64();
                    let n = r.tokens.len();
                    let status = if r.finish == Finish::Cancelled {
                        499
                    } else {
                        200
                    };
                    log_line(
                        work.path,
                        status,
                        &format!(
                            "prompt {} tokens ({reused} reused), reply {n} tokens ({}), first token {:.2} s, {:.1} tokens/s",
                            work.ids.len(),
                            if status == 499 {
                                "cancelled: the client left"
                            } else {
                                r.finish.reason()
                            },
                            r.first_token_s,
                            n as f64 / seconds.max(1e-9)
                        ),
                        work.received,
                    );
                    self.state.served.fetch_add(1, Ordering::Relaxed);
                    let _ = events.send(Event::Done(Done {
                        completion_tokens: n,
                        finish: r.finish,
                    }));
                }
                Ok(Err(e)) => {
                    let msg = format!("generation failed: {e:#}");
                    log_line(work.path, 500, &msg, work.received);
                    let _ = events.send(Event::Failed(msg));
                }
                Err(_) => {
                    // The cache may be half-written: start the next request afresh.
                    context.clear();
                    let msg = "generation failed (internal error; the server goes on)".to_string();
                    log_line(work.path, 500, &msg, work.received);
                    let _ = events.send(Event::Failed(msg));
                }
            }
        }
        match server.join() {
            Ok(result) => result,
            Err(_) => bail!("the HTTP thread failed"),
        }?;
        eprintln!("serve: stopped");
        Ok(())
    }
}

/// Tests slow generation down to hold a request in flight (`PHITUNE_TEST_TOKEN_DELAY_MS`).
fn test_token_delay() -> Option<Duration> {
    std::env::var("PHITUNE_TEST_TOKEN_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
}

/// One line per request on stderr: UTC time, endpoint, status, and what happened.
pub fn log_line(path: &str, status: u16, what: &str, received: Instant) {
    eprintln!(
        "{} {path} {status} {what} [{:.2} s]",
        utc_time(SystemTime::now()),
        received.elapsed().as_secs_f64()
    );
}

/// `YYYY-MM-DDTHH:MM:SSZ`.
fn utc_time(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times_are_civil_dates() {
        let at = |s: u64| utc_time(UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(at(1_796_448_062), "2026-12-05T05:21:02Z");
    }
}
