//! A `phitune serve` process for the tests: started on an ephemeral port with the tiny model
//! and the trained demo adapter, its log collected, requests through ureq, killed on drop.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn tiny() -> String {
    crate::common::fixtures()
        .join("tiny-phi")
        .display()
        .to_string()
}

pub fn adapter() -> String {
    crate::common::fixtures()
        .join("adapters/ours-train-demo")
        .display()
        .to_string()
}

pub struct Server {
    child: Child,
    base: String,
    log: Arc<Mutex<Vec<String>>>,
    pub agent: ureq::Agent,
    key: Option<String>,
}

impl Server {
    /// `serve --model tiny-phi --adapter ours-train-demo --quant nf4 --port 0 EXTRA`, ready.
    pub fn start(extra: &[&str], env: &[(&str, &str)]) -> Server {
        let (tiny, adapter) = (tiny(), adapter());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_phitune"));
        cmd.args([
            "serve",
            "--model",
            &tiny,
            "--adapter",
            &adapter,
            "--quant",
            "nf4",
            "--port",
            "0",
        ])
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("PHITUNE_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start phitune serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let t = Instant::now();
        let base = loop {
            let found = log.lock().unwrap().iter().find_map(|l| {
                let rest = l.strip_prefix("serve: ")?;
                let at = rest.find("http://")?;
                let url = &rest[at..];
                Some(url[..url.find("/ ")?].to_string())
            });
            if let Some(url) = found {
                break url;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("serve exited ({status}): {:?}", log.lock().unwrap());
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "serve did not start: {:?}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let key = extra
            .iter()
            .position(|a| *a == "--api-key")
            .map(|i| extra[i + 1].to_string());
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(120))
            .build();
        Server {
            child,
            base,
            log,
            agent,
            key,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn with_key(&self, r: ureq::Request, key: Option<&str>) -> ureq::Request {
        match key {
            Some(k) => r.set("Authorization", &format!("Bearer {k}")),
            None => r,
        }
    }

    /// GET with the server's key; the JSON body of a 2xx answer, else the status and body.
    pub fn get(&self, path: &str) -> Result<Value, String> {
        let r = self.with_key(self.agent.get(&self.url(path)), self.key.as_deref());
        json_of(r.call())
    }

    /// POST a JSON body with the server's key.
    pub fn post(&self, path: &str, body: &Value) -> Result<Value, String> {
        let r = self.with_key(self.agent.post(&self.url(path)), self.key.as_deref());
        json_of(
            r.set("Content-Type", "application/json")
                .send_string(&body.to_string()),
        )
    }

    /// POST any body with this key (or none): status, Retry-After, body.
    pub fn post_raw(
        &self,
        path: &str,
        body: &str,
        key: Option<&str>,
    ) -> (u16, Option<String>, String) {
        let r = self.with_key(self.agent.post(&self.url(path)), key);
        raw(r.set("Content-Type", "application/json").send_string(body))
    }

    pub fn get_raw(&self, path: &str, key: Option<&str>) -> (u16, Option<String>, String) {
        raw(self.with_key(self.agent.get(&self.url(path)), key).call())
    }

    /// The server's stderr so far.
    pub fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    pub fn wait_for_log(&self, needle: &str) {
        let t = Instant::now();
        while !self.log().iter().any(|l| l.contains(needle)) {
            assert!(
                t.elapsed() < Duration::from_secs(30),
                "no {needle:?} in the log: {:?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ctrl-C.
    pub fn interrupt(&mut self) {
        let ok = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -INT");
    }

    /// The exit code once the process ends (None: still running after `timeout`).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let t = Instant::now();
        while t.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the log thread take the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn dir_for_output(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(name)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn json_of(r: Result<ureq::Response, ureq::Error>) -> Result<Value, String> {
    match r {
        Ok(r) => Ok(r.into_json().map_err(|e| e.to_string())?),
        Err(ureq::Error::Status(code, r)) => {
            Err(format!("{code}: {}", r.into_string().unwrap_or_default()))
        }
        Err(e) => Err(e.to_string()),
    }
}

fn raw(r: Result<ureq::Response, ureq::Error>) -> (u16, Option<String>, String) {
    let r = match r {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("request failed: {e}"),
    };
    let status = r.status();
    let retry = r.header("retry-after").map(String::from);
    (status, retry, r.into_string().unwrap_or_default())
}
