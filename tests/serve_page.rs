//! `serve`'s chat page in a real browser: headless Chromium driven through chromedriver
//! (WebDriver, plain HTTP + JSON). The page loads, a persona is typed into it, two turns are
//! sent, each reply streams in piece by piece and ends equal to the API's answer for the same
//! persona and dialogue; a screenshot is written under the test's output directory.
//!
//! Needs `chromium` and `chromium-driver` (Debian/Ubuntu package names): built only with
//! `--features browser-tests` (CI installs both). `PHITUNE_CHROMEDRIVER` and
//! `PHITUNE_CHROMIUM` point at other binaries; `PHITUNE_SCREENSHOT` copies the screenshot.
#![cfg(feature = "browser-tests")]

mod common;
#[path = "common/server.rs"]
mod server;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use server::Server;

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    base: String,
    agent: ureq::Agent,
    session: String,
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Driver {
    fn start() -> Driver {
        let bin = std::env::var("PHITUNE_CHROMEDRIVER").unwrap_or_else(|_| "chromedriver".into());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(&bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start {bin} ({e}): install chromium and chromium-driver")
            });
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(60))
            .build();
        let base = format!("http://127.0.0.1:{port}");
        let t = Instant::now();
        while agent.get(&format!("{base}/status")).call().is_err() {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "chromedriver did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut d = Driver {
            child,
            base,
            agent,
            session: String::new(),
        };
        let chromium = std::env::var("PHITUNE_CHROMIUM").unwrap_or_else(|_| {
            // Debian's /usr/bin/chromium is a wrapper script around this binary.
            [
                "/usr/lib/chromium/chromium",
                "/usr/bin/chromium",
                "/usr/bin/chromium-browser",
            ]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("chromium")
            .to_string()
        });
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "goog:chromeOptions": {
                "binary": chromium,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1100,720"],
            }
        }}});
        let v = d.call("POST", "/session", Some(caps));
        d.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        d
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let r = self.agent.request(method, &url);
        let r = match body {
            Some(b) => r.send_json(b),
            None => r.call(),
        };
        match r {
            Ok(r) => r.into_json::<Value>().unwrap()["value"].clone(),
            Err(ureq::Error::Status(code, r)) => {
                panic!(
                    "WebDriver {method} {path}: {code} {}",
                    r.into_string().unwrap()
                )
            }
            Err(e) => panic!("WebDriver {method} {path}: {e}"),
        }
    }

    fn element(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            Some(json!({ "using": "css selector", "value": css })),
        );
        v[ELEMENT]
            .as_str()
            .unwrap_or_else(|| panic!("no element {css}: {v}"))
            .to_string()
    }

    fn clear_and_type(&self, css: &str, text: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/clear"), Some(json!({})));
        self.call(
            "POST",
            &format!("/element/{e}/value"),
            Some(json!({ "text": text })),
        );
    }

    fn click(&self, css: &str) {
        let e = self.element(css);
        self.call("POST", &format!("/element/{e}/click"), Some(json!({})));
    }

    fn script(&self, js: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            Some(json!({ "script": js, "args": [] })),
        )
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self
                .agent
                .delete(&format!("{}/session/{}", self.base, self.session))
                .call();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const PAGE_STATE: &str = "return { state: document.body.dataset.state, \
    replies: [...document.querySelectorAll('.msg.assistant')].map(e => e.textContent), \
    users: [...document.querySelectorAll('.msg.user')].map(e => e.textContent), \
    errors: [...document.querySelectorAll('.msg.error')].map(e => e.textContent), \
    stats: document.getElementById('stats').textContent };";

/// Waits for reply number `n` (1-based) to be complete; returns it and every partial text
/// seen on the way.
fn await_reply(d: &Driver, n: usize) -> (String, Vec<String>) {
    let t = Instant::now();
    let mut partial = Vec::new();
    loop {
        let s = d.script(PAGE_STATE);
        assert_eq!(s["errors"], json!([]), "{s}");
        let replies = s["replies"].as_array().unwrap();
        if replies.len() == n {
            let text = replies[n - 1].as_str().unwrap().to_string();
            if s["state"] == "idle" {
                return (text, partial);
            }
            if !text.is_empty() && partial.last() != Some(&text) {
                partial.push(text);
            }
        }
        assert!(t.elapsed() < Duration::from_secs(60), "no reply: {s}");
        std::thread::sleep(Duration::from_millis(30));
    }
}

#[test]
fn the_chat_page_streams_the_personas_replies_in_a_real_browser() {
    // 60 ms a token, so the page is seen mid-reply.
    let s = Server::start(
        &["--persona", "i have two dogs."],
        &[("PHITUNE_TEST_TOKEN_DELAY_MS", "60")],
    );
    let d = Driver::start();
    d.call("POST", "/url", Some(json!({ "url": s.url("/") })));
    // The server's persona is in the editor; the model's id is shown.
    let persona = d.script("return document.getElementById('persona').value;");
    assert_eq!(persona, "i have two dogs.");
    let shown = d.script("return document.getElementById('model').textContent;");
    assert_eq!(shown, "model: ours-train-demo");

    d.clear_and_type("#persona", "i like cats.\ni am a nurse.");
    d.clear_and_type("#temperature", "0");
    let turns = ["hello, how are you today?", "what do you do for fun?"];
    let mut dialogue: Vec<Value> =
        vec![json!({ "role": "system", "content": "i like cats.\ni am a nurse." })];
    for (i, turn) in turns.iter().enumerate() {
        d.clear_and_type("#input", turn);
        d.click("#send");
        let (reply, partial) = await_reply(&d, i + 1);
        // The API's answer to the same persona and dialogue.
        dialogue.push(json!({ "role": "user", "content": turn }));
        let want = s
            .post(
                "/v1/chat/completions",
                &json!({ "messages": dialogue, "temperature": 0, "max_tokens": 128 }),
            )
            .unwrap();
        let want = want["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(reply, want, "turn {i}");
        assert!(
            partial
                .iter()
                .any(|p| p.len() < reply.len() && reply.starts_with(p.as_str())),
            "the reply did not stream in: {partial:?}"
        );
        dialogue.push(json!({ "role": "assistant", "content": reply }));
    }
    let state = d.script(PAGE_STATE);
    assert_eq!(state["users"], json!(turns), "{state}");
    assert!(
        state["stats"].as_str().unwrap().contains("reply tokens"),
        "{state}"
    );

    let png = d.call("GET", "/screenshot", None);
    let png = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().unwrap())
        .unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let out = Server::dir_for_output("serve-page");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("serve-page.png"), &png).unwrap();
    if let Ok(copy) = std::env::var("PHITUNE_SCREENSHOT") {
        std::fs::write(copy, &png).unwrap();
    }
    eprintln!("screenshot: {}", out.join("serve-page.png").display());

    // Reset clears the dialogue.
    d.click("#reset");
    let state = d.script(PAGE_STATE);
    assert_eq!(state["replies"], json!([]), "{state}");
    assert_eq!(state["users"], json!([]), "{state}");
}
