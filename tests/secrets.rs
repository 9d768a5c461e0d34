//! The HF token (`HF_TOKEN`, or the cache's `token` file) never appears in anything the tool
//! prints or writes: a training run, evaluation, generation and failing hub look-ups are run with
//! a recognisable token set both ways, and every byte of their output is searched for it.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{fixtures, scratch, stderr};

const SECRET: &str = "hf_SeCrEtToKeN0123456789abcdefXYZ";

fn phitune(hf_home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_phitune"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", hf_home)
        .env("HF_TOKEN", SECRET)
        .output()
        .expect("run phitune")
}

fn contains(haystack: &[u8]) -> bool {
    haystack
        .windows(SECRET.len())
        .any(|w| w == SECRET.as_bytes())
}

/// Every file under `dir`, recursively.
fn files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn the_hf_token_is_never_printed_logged_or_written() {
    let dir = scratch("secrets");
    let hf_home = dir.join("hf-home");
    std::fs::create_dir_all(&hf_home).unwrap();
    std::fs::write(hf_home.join("token"), SECRET).unwrap();
    let tiny = fixtures().join("tiny-phi").display().to_string();
    let sample = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("data/samples/persona_chat_sample.jsonl")
        .display()
        .to_string();
    let run = dir.join("run");
    let runs = run.display().to_string();
    let evals = dir.join("eval").display().to_string();
    let merged = dir.join("merged").display().to_string();
    // (arguments, whether the command succeeds)
    let commands: Vec<(Vec<&str>, bool)> = vec![
        (
            vec![
                "train",
                "--model",
                &tiny,
                "--data",
                &sample,
                "--out",
                &runs,
                "--max-steps",
                "3",
                "--micro-batch",
                "2",
                "--grad-accum",
                "1",
                "--valid-fraction",
                "0.1",
                "--save-every",
                "2",
                "--eval-every",
                "2",
                "--no-dashboard",
            ],
            true,
        ),
        (
            vec![
                "eval",
                "--model",
                &tiny,
                "--adapter",
                &runs,
                "--data",
                &sample,
                "--generate",
                "2",
                "--max-new-tokens",
                "4",
                "--out",
                &evals,
            ],
            true,
        ),
        (
            vec![
                "merge",
                "--model",
                &tiny,
                "--adapter",
                &runs,
                "--out",
                &merged,
            ],
            true,
        ),
        (
            vec![
                "generate",
                "--model",
                &tiny,
                "--prompt",
                "hi",
                "--max-new-tokens",
                "4",
            ],
            true,
        ),
        // Hub look-ups that fail (offline, nothing cached): the error names the id, not the token.
        (
            vec![
                "generate",
                "--model",
                "someone/private-model",
                "--prompt",
                "hi",
            ],
            false,
        ),
        (
            vec!["eval", "--model", &tiny, "--data", "someone/private-data"],
            false,
        ),
        (
            vec![
                "train",
                "--model",
                "someone/private-model",
                "--data",
                &sample,
                "--out",
                &runs,
            ],
            false,
        ),
    ];
    for (args, succeeds) in &commands {
        let o = phitune(&hf_home, args);
        assert!(
            !contains(&o.stdout) && !contains(&o.stderr),
            "{args:?} printed the token: {}",
            stderr(&o)
        );
        assert_eq!(o.status.success(), *succeeds, "{args:?}: {}", stderr(&o));
    }
    let mut written = Vec::new();
    for d in [&run, &dir.join("eval"), &dir.join("merged")] {
        files(d, &mut written);
    }
    assert!(written.len() > 10, "{written:?}");
    for f in written {
        assert!(
            !contains(&std::fs::read(&f).unwrap()),
            "{} holds the token",
            f.display()
        );
    }
}
