//! The HTTP side of `serve`: routes, the API key, each endpoint's checks and prompt, the
//! queue, responses whole or streamed as server-sent events, and a graceful stop.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::TrySendError;
use std::time::Instant;

use anyhow::{Context, Result};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State as Shared};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use phitune_model::generate::GenerationConfig;
use phitune_model::sampling::SamplingConfig;
use serde_json::{Value, json};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

use super::api::{self, ApiError, Request};
use super::{Done, Event, State, Work, log_line, now_unix};
use crate::cmd::reply::{StopRule, persona_prompt, room};

type Ctx = Arc<State>;

/// Serves until Ctrl-C or SIGTERM, then finishes the requests in flight.
pub fn run(listener: std::net::TcpListener, state: Ctx) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the HTTP runtime")?;
    runtime.block_on(async move {
        let listener =
            tokio::net::TcpListener::from_std(listener).context("the listening socket")?;
        axum::serve(listener, router(state))
            .with_graceful_shutdown(stop_signal())
            .await
            .context("serving HTTP")
    })
}

fn router(state: Ctx) -> Router {
    Router::new()
        .route("/", get(page).fallback(wrong_method))
        .route("/health", get(health).fallback(wrong_method))
        .route("/v1/models", get(models).fallback(wrong_method))
        .route("/v1/models/{id}", get(model).fallback(wrong_method))
        .route(
            "/v1/chat/completions",
            post(chat_completions).fallback(wrong_method),
        )
        .route("/v1/completions", post(completions).fallback(wrong_method))
        .fallback(unknown_path)
        .with_state(state)
}

async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    eprintln!("serve: stopping: finishing the requests in flight (Ctrl-C again stops at once)");
    tokio::spawn(async {
        let _ = tokio::signal::ctrl_c().await;
        eprintln!("serve: stopped before the requests in flight were finished");
        std::process::exit(130);
    });
}

async fn wrong_method(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    let mut e = ApiError::invalid(format!("{method} is not served at {}", uri.path()));
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    log_line(uri.path(), 405, &e.message, Instant::now());
    e
}

async fn unknown_path(uri: axum::http::Uri) -> ApiError {
    log_line(uri.path(), 404, "no such endpoint", Instant::now());
    ApiError::not_found(
        format!(
            "no such endpoint: {} (POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /)",
            uri.path()
        ),
        "unknown_url",
    )
}

async fn health() -> axum::Json<Value> {
    axum::Json(json!({ "status": "ok" }))
}

/// The chat page, with the model's id and the server's persona and defaults filled in.
async fn page(Shared(s): Shared<Ctx>) -> Response {
    let config = json!({
        "model": s.id,
        "persona": s.persona,
        "max_tokens": s.max_new_tokens,
        "temperature": s.defaults.temperature,
        "key_required": s.api_key.is_some(),
    });
    // Inside <script>: no "</script>" can close it early.
    let config = config.to_string().replace('<', "\\u003c");
    let html = include_str!("page.html").replace("/*CONFIG*/{}", &config);
    let mut response = Html(html).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// With `--api-key`, `/v1/` needs `Authorization: Bearer KEY`.
fn authorize(s: &State, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &s.api_key else {
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match given {
        None => Err(ApiError::unauthorized(
            "an API key is required: send Authorization: Bearer KEY",
        )),
        Some(g) if !constant_time_eq(g.as_bytes(), key.as_bytes()) => {
            Err(ApiError::unauthorized("the API key is not right"))
        }
        Some(_) => Ok(()),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn model_object(s: &State) -> Value {
    json!({ "id": s.id, "object": "model", "created": s.created, "owned_by": "phitune" })
}

async fn models(Shared(s): Shared<Ctx>, headers: HeaderMap) -> Response {
    answer("/v1/models", Instant::now(), async {
        authorize(&s, &headers)?;
        Ok(axum::Json(json!({ "object": "list", "data": [model_object(&s)] })).into_response())
    })
    .await
}

async fn model(Shared(s): Shared<Ctx>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    answer("/v1/models", Instant::now(), async {
        authorize(&s, &headers)?;
        check_model(&s, Some(&id))?;
        Ok(axum::Json(model_object(&s)).into_response())
    })
    .await
}

/// An endpoint's outcome; an error is logged and answered as OpenAI's error object.
async fn answer(
    path: &'static str,
    received: Instant,
    f: impl Future<Output = Result<Response, ApiError>>,
) -> Response {
    match f.await {
        Ok(r) => r,
        Err(e) => {
            log_line(path, e.status.as_u16(), &e.message, received);
            e.into_response()
        }
    }
}

fn check_model(s: &State, model: Option<&str>) -> Result<(), ApiError> {
    match model {
        Some(m) if m != s.id => Err(ApiError::not_found(
            format!(
                "the model {m:?} is not served here (this server serves {:?})",
                s.id
            ),
            "model_not_found",
        )),
        _ => Ok(()),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Endpoint {
    Chat,
    Completion,
}

impl Endpoint {
    fn path(self) -> &'static str {
        match self {
            Endpoint::Chat => "/v1/chat/completions",
            Endpoint::Completion => "/v1/completions",
        }
    }
}

async fn chat_completions(Shared(s): Shared<Ctx>, headers: HeaderMap, body: Bytes) -> Response {
    generation(s, headers, body, Endpoint::Chat).await
}

async fn completions(Shared(s): Shared<Ctx>, headers: HeaderMap, body: Bytes) -> Response {
    generation(s, headers, body, Endpoint::Completion).await
}

async fn generation(s: Ctx, headers: HeaderMap, body: Bytes, endpoint: Endpoint) -> Response {
    let received = Instant::now();
    answer(endpoint.path(), received, async {
        authorize(&s, &headers)?;
        let mut req: Request = api::parse(&body)?;
        check_model(&s, req.model.as_deref())?;
        req.check()?;
        let (ids, rule) = match endpoint {
            Endpoint::Chat => chat_prompt(&s, &mut req)?,
            Endpoint::Completion => completion_prompt(&s, &mut req)?,
        };
        let room = room_for(&s, ids.len())?;
        let config = GenerationConfig {
            max_new_tokens: req.max_tokens().unwrap_or(s.max_new_tokens).min(room),
            sampling: sampling(&s, &req),
            stop_tokens: s.tok.eos_token_ids.clone(),
        };
        let prompt_tokens = ids.len();
        let (events, rx) = unbounded_channel();
        enqueue(
            &s,
            Work {
                ids,
                config,
                rule,
                events,
                path: endpoint.path(),
                received,
            },
        )?;
        let reply = ReplyShape {
            endpoint,
            id: format!(
                "{}-{:x}{:04x}",
                if endpoint == Endpoint::Chat {
                    "chatcmpl"
                } else {
                    "cmpl"
                },
                s.created,
                s.requests.fetch_add(1, Ordering::Relaxed) & 0xffff
            ),
            model: s.id.clone(),
            created: now_unix(),
            prompt_tokens,
            include_usage: req.include_usage(),
        };
        if req.stream.unwrap_or(false) {
            Ok(stream(reply, rx))
        } else {
            whole(reply, rx).await
        }
    })
    .await
}

/// The persona (the request's system messages, else the server's), the dialogue, and the
/// prompt fitted to the budget with room for the reply.
fn chat_prompt(s: &State, req: &mut Request) -> Result<(Vec<u32>, StopRule), ApiError> {
    let messages = req.messages.take().ok_or_else(|| {
        ApiError::invalid_param("messages", "messages: missing (a chat needs its messages)")
    })?;
    let (persona, dialogue) = api::persona_and_dialogue(messages)?;
    let persona = persona.unwrap_or_else(|| s.persona.clone());
    let reserve = req.max_tokens().unwrap_or(s.max_new_tokens);
    let (ids, _) = persona_prompt(&s.tok, s.template, &persona, &dialogue, s.budget, reserve)
        .map_err(|e| ApiError::invalid(format!("messages: {e:#}")))?;
    Ok((
        ids,
        StopRule {
            turn: true,
            stops: req.stops()?,
        },
    ))
}

fn completion_prompt(s: &State, req: &mut Request) -> Result<(Vec<u32>, StopRule), ApiError> {
    let text = req
        .prompt
        .take()
        .ok_or_else(|| ApiError::invalid_param("prompt", "prompt: missing"))?
        .text()?;
    let ids = s
        .tok
        .encode(&text)
        .map_err(|e| ApiError::invalid_param("prompt", format!("prompt: {e}")))?;
    if ids.is_empty() {
        return Err(ApiError::invalid_param("prompt", "prompt: empty"));
    }
    Ok((
        ids,
        StopRule {
            turn: false,
            stops: req.stops()?,
        },
    ))
}

fn room_for(s: &State, prompt: usize) -> Result<usize, ApiError> {
    room(s.positions, prompt).ok_or_else(|| {
        ApiError::invalid(format!(
            "the prompt takes {prompt} tokens and the model's context is {} positions: shorten the persona or the last message",
            s.positions
        ))
        .with_code("context_length_exceeded")
    })
}

fn sampling(s: &State, req: &Request) -> SamplingConfig {
    let d = &s.defaults;
    SamplingConfig {
        temperature: req.temperature.unwrap_or(d.temperature),
        top_k: req.top_k.or(d.top_k).filter(|&k| k > 0),
        top_p: req.top_p.or(d.top_p).filter(|&p| p < 1.0),
        repetition_penalty: req.repetition_penalty.unwrap_or(d.repetition_penalty),
        seed: req
            .seed
            .unwrap_or_else(|| s.next_seed.fetch_add(1, Ordering::Relaxed)),
    }
}

fn enqueue(s: &State, work: Work) -> Result<(), ApiError> {
    let waiting = s.waiting.fetch_add(1, Ordering::SeqCst);
    match s.queue.try_send(work) {
        Ok(()) => Ok(()),
        Err(e) => {
            s.waiting.fetch_sub(1, Ordering::SeqCst);
            Err(match e {
                TrySendError::Full(_) => ApiError::busy(waiting.min(s.max_queue)),
                TrySendError::Disconnected(_) => ApiError::unavailable("the server is stopping"),
            })
        }
    }
}

/// How a reply is put: chat completion or completion, its id and counts.
struct ReplyShape {
    endpoint: Endpoint,
    id: String,
    model: String,
    created: u64,
    prompt_tokens: usize,
    include_usage: bool,
}

impl ReplyShape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => "chat.completion",
            (Endpoint::Chat, true) => "chat.completion.chunk",
            (Endpoint::Completion, _) => "text_completion",
        }
    }

    fn choice(&self, text: Option<&str>, finish: Option<&str>, chunk: bool) -> Value {
        let mut c = json!({ "index": 0, "logprobs": null, "finish_reason": finish });
        match (self.endpoint, chunk) {
            (Endpoint::Chat, false) => {
                c["message"] = json!({ "role": "assistant", "content": text.unwrap_or("") })
            }
            (Endpoint::Chat, true) => {
                c["delta"] = match text {
                    Some(t) => json!({ "content": t }),
                    None => json!({}),
                }
            }
            (Endpoint::Completion, _) => c["text"] = json!(text.unwrap_or("")),
        }
        c
    }

    fn envelope(&self, choices: Vec<Value>, chunk: bool) -> Value {
        json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "system_fingerprint": null,
            "choices": choices,
        })
    }

    fn usage(&self, done: &Done) -> Value {
        api::usage(self.prompt_tokens, done.completion_tokens)
    }
}

fn finish_reason(done: &Done) -> &'static str {
    done.finish.reason()
}

/// The whole reply as one JSON object, once it is generated.
async fn whole(shape: ReplyShape, mut rx: UnboundedReceiver<Event>) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(done)) => {
                let mut body = shape.envelope(
                    vec![shape.choice(Some(&text), Some(finish_reason(&done)), false)],
                    false,
                );
                body["usage"] = shape.usage(&done);
                return Ok(axum::Json(body).into_response());
            }
            Some(Event::Failed(msg)) => return Err(ApiError::internal(msg)),
            None => return Err(ApiError::unavailable("the server stopped")),
        }
    }
}

/// The reply as server-sent events: OpenAI's chunks, then `data: [DONE]`.
fn stream(shape: ReplyShape, rx: UnboundedReceiver<Event>) -> Response {
    struct Sse {
        shape: ReplyShape,
        rx: UnboundedReceiver<Event>,
        out: VecDeque<Bytes>,
        ended: bool,
    }
    fn frame(v: &Value) -> Bytes {
        Bytes::from(format!("data: {v}\n\n"))
    }
    let mut first = VecDeque::new();
    if shape.endpoint == Endpoint::Chat {
        let mut choice = shape.choice(Some(""), None, true);
        choice["delta"]["role"] = json!("assistant");
        first.push_back(frame(&shape.envelope(vec![choice], true)));
    }
    let sse = Sse {
        shape,
        rx,
        out: first,
        ended: false,
    };
    let body = futures_util::stream::unfold(sse, |mut sse| async move {
        loop {
            if let Some(b) = sse.out.pop_front() {
                return Some((Ok::<_, Infallible>(b), sse));
            }
            if sse.ended {
                return None;
            }
            let shape = &sse.shape;
            match sse.rx.recv().await {
                Some(Event::Text(t)) => {
                    let chunk = shape.envelope(vec![shape.choice(Some(&t), None, true)], true);
                    sse.out.push_back(frame(&chunk));
                }
                Some(Event::Done(done)) => {
                    let last = shape.choice(None, Some(finish_reason(&done)), true);
                    sse.out.push_back(frame(&shape.envelope(vec![last], true)));
                    if shape.include_usage {
                        let mut u = shape.envelope(vec![], true);
                        u["usage"] = shape.usage(&done);
                        sse.out.push_back(frame(&u));
                    }
                    sse.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    sse.ended = true;
                }
                Some(Event::Failed(msg)) => {
                    sse.out.push_back(frame(&ApiError::internal(msg).body()));
                    sse.out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                    sse.ended = true;
                }
                None => {
                    sse.out
                        .push_back(frame(&ApiError::unavailable("the server stopped").body()));
                    sse.ended = true;
                }
            }
        }
    });
    let mut response = Response::new(Body::from_stream(body));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
