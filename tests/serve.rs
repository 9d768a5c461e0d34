//! `serve` against a real HTTP client (ureq) on loopback, with the tiny model and a trained
//! adapter: replies equal `generate`'s token for token, streamed and not; usage; several
//! clients at once; the queue's 429; a client that leaves; every bad input's status and error
//! object; a graceful stop.

mod common;

#[path = "common/server.rs"]
mod server;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use common::{fixtures, phitune, stderr, stdout};
use phitune_data::Template;
use phitune_model::{Checkpoint, PhiTokenizer};
use serde_json::{Value, json};
use server::{Server, adapter, tiny};

fn tok() -> PhiTokenizer {
    let dir = fixtures().join("tiny-phi");
    PhiTokenizer::from_dir(&dir, Checkpoint::open(&dir).unwrap().config()).unwrap()
}

/// The adapter's persona reply from `phitune generate --json` (greedy, with serve's default
/// repetition penalty).
fn generate(persona: &[&str], dialogue: &[&str], extra: &[&str]) -> Value {
    let (tiny, adapter) = (tiny(), adapter());
    let mut args = vec![
        "generate",
        "--model",
        &tiny,
        "--adapter",
        &adapter,
        "--quant",
        "nf4",
        "--json",
        "--repetition-penalty",
        "1.1",
    ];
    for p in persona {
        args.extend(["--persona", p]);
    }
    for d in dialogue {
        args.extend(["--dialogue", d]);
    }
    args.extend(extra);
    let o = phitune(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).unwrap()
}

fn chat_body(persona: Option<&str>, dialogue: &[&str]) -> Value {
    let mut messages = Vec::new();
    if let Some(p) = persona {
        messages.push(json!({ "role": "system", "content": p }));
    }
    for (i, d) in dialogue.iter().enumerate() {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(json!({ "role": role, "content": d }));
    }
    json!({ "model": "ours-train-demo", "messages": messages, "temperature": 0 })
}

fn content(v: &Value) -> &str {
    v["choices"][0]["message"]["content"].as_str().unwrap()
}

const PERSONA: [&str; 2] = ["i like cats.", "i am a nurse."];

#[test]
fn replies_equal_generate_token_for_token_streamed_and_not() {
    let s = Server::start(&["--persona", "i have two dogs."], &[]);
    let tok = tok();

    // /v1/models names the adapter.
    let models = s.get("/v1/models").unwrap();
    assert_eq!(models["data"][0]["id"], "ours-train-demo");
    assert_eq!(models["object"], "list");

    for dialogue in [
        &["hello, how are you today?"][..],
        &[
            "hi! what do you do?",
            "i work at a hospital.",
            "that must be hard work.",
        ],
    ] {
        let want = generate(&PERSONA, dialogue, &[]);
        let body = chat_body(Some("i like cats. i am a nurse."), dialogue);
        let got = s.post("/v1/chat/completions", &body).unwrap();
        assert_eq!(content(&got), want["text"], "{dialogue:?}");
        let tokens = want["tokens"].as_array().unwrap().len();
        assert!(tokens > 3, "a reply of a few tokens at least: {want}");
        let usage = &got["usage"];
        assert_eq!(usage["completion_tokens"], tokens);
        assert_eq!(usage["prompt_tokens"], want["prompt_tokens"]);
        // The prompt is the training template's, counted independently.
        let persona: Vec<String> = PERSONA.iter().map(|s| s.to_string()).collect();
        let turns: Vec<String> = dialogue.iter().map(|s| s.to_string()).collect();
        let ids = tok
            .encode(&Template::Persona.prompt_text(&persona, &turns))
            .unwrap();
        assert_eq!(usage["prompt_tokens"], ids.len());
        assert_eq!(usage["total_tokens"], ids.len() + tokens);
        assert_eq!(got["choices"][0]["finish_reason"], want["finish_reason"]);
        assert_eq!(got["object"], "chat.completion");
        assert_eq!(got["model"], "ours-train-demo");

        // Streamed: the same text, in more than one piece, then the finish and usage.
        let mut body = body.clone();
        body["stream"] = json!(true);
        body["stream_options"] = json!({ "include_usage": true });
        let chunks = s.stream("/v1/chat/completions", &body);
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        let pieces: Vec<&str> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .filter(|p| !p.is_empty())
            .collect();
        assert!(pieces.len() > 1, "{chunks:?}");
        assert_eq!(pieces.concat(), want["text"].as_str().unwrap());
        let finish = chunks
            .iter()
            .find_map(|c| c["choices"][0]["finish_reason"].as_str())
            .unwrap();
        assert_eq!(finish, want["finish_reason"]);
        let last = chunks.last().unwrap();
        assert_eq!(last["choices"].as_array().unwrap().len(), 0);
        assert_eq!(last["usage"], got["usage"]);
        assert!(
            chunks
                .iter()
                .all(|c| c["object"] == "chat.completion.chunk")
        );
    }

    // Without a system message the reply is the server's persona's.
    let want = generate(&["i have two dogs."], &["hey"], &[]);
    let got = s
        .post("/v1/chat/completions", &chat_body(None, &["hey"]))
        .unwrap();
    assert_eq!(content(&got), want["text"]);

    // The token limit: finish "length" after exactly max_tokens tokens.
    let want = generate(&PERSONA, &["hello, how are you today?"], &[]);
    let mut body = chat_body(
        Some("i like cats. i am a nurse."),
        &["hello, how are you today?"],
    );
    body["max_tokens"] = json!(3);
    let got = s.post("/v1/chat/completions", &body).unwrap();
    assert_eq!(got["choices"][0]["finish_reason"], "length");
    assert_eq!(got["usage"]["completion_tokens"], 3);
    let three: Vec<u32> = want["tokens"].as_array().unwrap()[..3]
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect();
    assert_eq!(content(&got), tok.decode(&three).unwrap().trim());

    // A stop string ends the reply before it.
    let full = want["text"].as_str().unwrap();
    let cut = full.char_indices().nth(full.chars().count() / 2).unwrap().0;
    let stop = &full[cut..cut + full[cut..].chars().next().unwrap().len_utf8() * 2];
    let mut body = chat_body(
        Some("i like cats. i am a nurse."),
        &["hello, how are you today?"],
    );
    body["stop"] = json!([stop]);
    let got = s.post("/v1/chat/completions", &body).unwrap();
    let before = &full[..full.find(stop).unwrap()];
    assert_eq!(content(&got), before.trim_end());
    assert_eq!(got["choices"][0]["finish_reason"], "stop");

    // /v1/completions continues a raw prompt as `generate --prompt` does.
    let (tiny, adapter) = (tiny(), adapter());
    let o = phitune(&[
        "generate",
        "--model",
        &tiny,
        "--adapter",
        &adapter,
        "--quant",
        "nf4",
        "--json",
        "--prompt",
        "Once upon a time",
        "--max-new-tokens",
        "12",
        "--repetition-penalty",
        "1.1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let ids: Vec<u32> = want["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .filter(|&t| !tok.is_eos(t))
        .collect();
    let body = json!({ "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0 });
    let got = s.post("/v1/completions", &body).unwrap();
    assert_eq!(got["object"], "text_completion");
    assert_eq!(got["choices"][0]["text"], tok.decode(&ids).unwrap());
    assert_eq!(
        got["usage"]["completion_tokens"],
        want["tokens"].as_array().unwrap().len()
    );
    assert_eq!(
        got["usage"]["prompt_tokens"],
        tok.encode("Once upon a time").unwrap().len()
    );
    let mut body = body;
    body["stream"] = json!(true);
    let chunks = s.stream("/v1/completions", &body);
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["text"].as_str())
        .collect();
    assert_eq!(text, tok.decode(&ids).unwrap());

    // The KV cache was reused between requests that share the persona.
    let log = s.log();
    assert!(
        log.iter()
            .any(|l| l.contains("reused)") && !l.contains("(0 reused)")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|l| l.contains("/v1/chat/completions 200 prompt")),
        "one line per request: {log:?}"
    );
}

#[test]
fn eight_clients_at_once_each_get_their_own_reply() {
    let s = Server::start(&[], &[]);
    let bodies: Vec<Value> = (0..8)
        .map(|i| {
            let persona = format!(
                "i have {} cats. my favorite color is {}.",
                i + 1,
                ["red", "blue", "green", "teal"][i % 4]
            );
            let mut b = chat_body(Some(&persona), &[&format!("hello, what do you like {i}?")]);
            // Sampled, each with its own seed: the replies differ, and each is reproducible.
            b["max_tokens"] = json!(24);
            b["temperature"] = json!(1.0);
            b["seed"] = json!(i);
            b
        })
        .collect();
    // One at a time first.
    let alone: Vec<String> = bodies
        .iter()
        .map(|b| content(&s.post("/v1/chat/completions", b).unwrap()).to_string())
        .collect();
    assert!(
        alone.iter().collect::<std::collections::HashSet<_>>().len() > 1,
        "different prompts, different replies: {alone:?}"
    );
    // Then all at once, half of them streamed.
    let replies: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = bodies
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let s = &s;
                scope.spawn(move || {
                    if i % 2 == 0 {
                        content(&s.post("/v1/chat/completions", b).unwrap()).to_string()
                    } else {
                        let mut b = b.clone();
                        b["stream"] = json!(true);
                        s.stream("/v1/chat/completions", &b)
                            .iter()
                            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
                            .collect()
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(replies, alone);
}

#[test]
fn a_full_queue_answers_429_and_a_client_that_leaves_frees_the_server() {
    // Each token takes 300 ms: a long reply holds the model while the others arrive.
    let s = Server::start(
        &["--max-queue", "1"],
        &[("PHITUNE_TEST_TOKEN_DELAY_MS", "300")],
    );
    let long =
        json!({ "prompt": "a b c d e f", "max_tokens": 200, "temperature": 0, "stream": true });
    // A: running (its first piece has arrived).
    let mut a = s.open_stream("/v1/completions", &long);
    let mut line = String::new();
    while !line.starts_with("data: ") {
        line.clear();
        a.read_line(&mut line).unwrap();
    }
    // B: queued (its headers arrive once it is in the queue).
    let short = json!({ "prompt": "x", "max_tokens": 2, "temperature": 0, "stream": true });
    let b = s.open_stream("/v1/completions", &short);
    // C: the queue is full.
    let t = Instant::now();
    let (status, retry, body) = s.post_raw("/v1/completions", &short.to_string(), None);
    assert_eq!(status, 429, "{body}");
    assert!(retry.is_some_and(|r| r.parse::<u64>().unwrap() >= 1));
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], "queue_full");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "429 is answered at once"
    );
    // A leaves: B is served next, long before A's 200 tokens would have ended.
    drop(a);
    let t = Instant::now();
    let chunks: Vec<String> = b
        .lines()
        .map(Result::unwrap)
        .filter(|l| l.starts_with("data: "))
        .collect();
    assert_eq!(chunks.last().unwrap(), "data: [DONE]");
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "B waited {:?}",
        t.elapsed()
    );
    // The server logged A as cancelled and serves the next request.
    s.wait_for_log("cancelled: the client left");
    let got = s
        .post(
            "/v1/completions",
            &json!({ "prompt": "y", "max_tokens": 1 }),
        )
        .unwrap();
    assert_eq!(got["usage"]["completion_tokens"], 1);
}

#[test]
fn bad_requests_get_the_openai_error_object_and_the_server_goes_on() {
    let s = Server::start(&["--api-key", "sekrit"], &[]);
    let ok = chat_body(Some("i like cats."), &["hi"]);
    let good = Some("sekrit");
    let long_persona = "i like very long sentences about nothing at all. ".repeat(400);
    // path, body, key, status, code, a word of the message
    type Case<'a> = (
        &'a str,
        String,
        Option<&'a str>,
        u16,
        Option<&'a str>,
        &'a str,
    );
    let cases: Vec<Case> = vec![
        ("/v1/chat/completions", ok.to_string(), None, 401, Some("invalid_api_key"), "API key"),
        ("/v1/chat/completions", ok.to_string(), Some("wrong"), 401, Some("invalid_api_key"), "not right"),
        ("/v1/chat/completions", "{\"messages\": [".into(), good, 400, None, "not valid JSON"),
        ("/v1/chat/completions", "{}".into(), good, 400, None, "messages"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).to_string(), good, 400, None, "temperature"),
        ("/v1/chat/completions", json!({"messages": [{"role": "user", "content": "hi"}], "n": 3}).to_string(), good, 400, None, "n:"),
        ("/v1/chat/completions", json!({"messages": [{"role": "wizard", "content": "hi"}]}).to_string(), good, 400, None, "role"),
        ("/v1/chat/completions", json!({"messages": [{"role": "system", "content": "only a persona"}]}).to_string(), good, 400, None, "user message"),
        ("/v1/chat/completions", json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}).to_string(), good, 404, Some("model_not_found"), "gpt-4o"),
        ("/v1/chat/completions", json!({"messages": [{"role": "system", "content": long_persona}, {"role": "user", "content": "hi"}]}).to_string(), good, 400, Some("context_length_exceeded"), "context"),
        ("/v1/completions", json!({"prompt": ""}).to_string(), good, 400, None, "prompt"),
        ("/v1/completions", json!({"prompt": ["a", "b"]}).to_string(), good, 400, None, "one prompt"),
        ("/v1/embeddings", "{}".into(), good, 404, Some("unknown_url"), "no such endpoint"),
    ];
    for (path, body, key, status, code, word) in cases {
        let (got, _, text) = s.post_raw(path, &body, key);
        assert_eq!(got, status, "{path} {body:.80}: {text}");
        let e: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
        let err = &e["error"];
        assert!(err["message"].as_str().unwrap().contains(word), "{text}");
        assert!(err["type"].is_string(), "{text}");
        if let Some(c) = code {
            assert_eq!(err["code"], c, "{text}");
        }
        // And the next good request is served.
        let (got, _, text) = s.post_raw("/v1/chat/completions", &ok.to_string(), good);
        assert_eq!(got, 200, "after {path} {body:.60}: {text}");
    }
    let (got, _, text) = s.get_raw("/v1/chat/completions", good);
    assert_eq!(got, 405, "{text}");
    let (got, _, text) = s.get_raw("/v1/models", None);
    assert_eq!(got, 401, "{text}");
    // The page itself needs no key, and knows one is required.
    let (got, _, page) = s.get_raw("/", None);
    assert_eq!(got, 200);
    assert!(page.contains("\"key_required\":true"), "{page:.200}");
    let log = s.log();
    assert!(log.iter().any(|l| l.contains(" 401 ")), "{log:?}");
}

#[test]
fn ctrl_c_finishes_the_reply_in_flight_and_exits() {
    let mut s = Server::start(&[], &[("PHITUNE_TEST_TOKEN_DELAY_MS", "100")]);
    let body = json!({ "prompt": "Hello", "max_tokens": 12, "temperature": 0, "stream": true });
    let mut reader = s.open_stream("/v1/completions", &body);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    s.interrupt();
    let rest: Vec<String> = reader.lines().map(Result::unwrap).collect();
    assert_eq!(
        rest.iter().rev().find(|l| !l.is_empty()).unwrap(),
        "data: [DONE]"
    );
    let code = s.wait_exit(Duration::from_secs(20));
    assert_eq!(code, Some(0));
    let log = s.log();
    assert!(
        log.iter().any(|l| l.contains("/v1/completions 200")),
        "{log:?}"
    );
    assert!(log.iter().any(|l| l == "serve: stopped"), "{log:?}");
}

#[test]
fn serve_refuses_bad_flags_with_one_line() {
    let tiny = tiny();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let o = phitune(&["serve", "--model", &tiny, "--port", &port]);
    common::assert_one_line_error(&o, &port);
    let o = phitune(&[
        "serve",
        "--model",
        &tiny,
        "--adapter",
        "no/such/adapter",
        "--port",
        "0",
    ]);
    common::assert_one_line_error(&o, "no/such/adapter");
    let o = phitune(&["serve", "--model", &tiny, "--temperature=-1", "--port", "0"]);
    common::assert_one_line_error(&o, "temperature");
}

#[test]
fn stream_pieces_never_show_what_a_stop_string_takes_back() {
    let s = Server::start(&[], &[]);
    let mut body = chat_body(
        Some("i like cats. i am a nurse."),
        &["hello, how are you today?"],
    );
    let full = content(&s.post("/v1/chat/completions", &body).unwrap()).to_string();
    // Every two-character window of the reply as a stop string: streamed == whole, and both
    // end before the stop's first appearance.
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    for w in chars.windows(2).step_by(3) {
        let stop = &full[w[0].0..w[1].0 + w[1].1.len_utf8()];
        body["stop"] = json!(stop);
        body["stream"] = json!(false);
        let whole = content(&s.post("/v1/chat/completions", &body).unwrap()).to_string();
        assert_eq!(
            whole,
            full[..full.find(stop).unwrap()].trim_end(),
            "stop {stop:?}"
        );
        body["stream"] = json!(true);
        let streamed: String = s
            .stream("/v1/chat/completions", &body)
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(streamed, whole, "stop {stop:?}");
    }
}

/// Reads a stream to its end; the chunks as JSON ([DONE] checked, not returned).
impl Server {
    fn stream(&self, path: &str, body: &Value) -> Vec<Value> {
        let reader = self.open_stream(path, body);
        let lines: Vec<String> = reader
            .lines()
            .map(Result::unwrap)
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(
            lines.last().map(String::as_str),
            Some("data: [DONE]"),
            "{lines:?}"
        );
        lines[..lines.len() - 1]
            .iter()
            .map(|l| {
                let data = l.strip_prefix("data: ").unwrap_or_else(|| panic!("{l}"));
                serde_json::from_str(data).unwrap()
            })
            .collect()
    }

    fn open_stream(
        &self,
        path: &str,
        body: &Value,
    ) -> BufReader<Box<dyn std::io::Read + Send + Sync>> {
        let r = self
            .agent
            .post(&self.url(path))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(r.header("content-type"), Some("text/event-stream"));
        BufReader::new(r.into_reader())
    }
}
