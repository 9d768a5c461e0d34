//! Talking to the persona: `chat` from a pipe (history, trimming, commands, KV-cache reuse,
//! reproducibility), persona-aware `generate` with the training run's template, and
//! `eval --compare-base`. All on the tiny fixture model.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{assert_one_line_error, fixtures, phitune, scratch, stderr, stdout};
use phitune_data::Template;
use phitune_model::{Checkpoint, PhiTokenizer};
use serde_json::Value;

const SAMPLE: &str = "data/samples/persona_chat_sample.jsonl";

fn tiny() -> String {
    fixtures().join("tiny-phi").display().to_string()
}

fn sample() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(SAMPLE)
        .display()
        .to_string()
}

fn tok() -> PhiTokenizer {
    let dir = fixtures().join("tiny-phi");
    PhiTokenizer::from_dir(&dir, Checkpoint::open(&dir).unwrap().config()).unwrap()
}

/// Runs `phitune chat ARGS` with `input` on stdin.
fn chat(args: &[&str], input: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_phitune"))
        .arg("chat")
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run phitune chat");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn json_lines(o: &Output) -> Vec<Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

const PERSONA: [&str; 2] = ["i like cats.", "i am a nurse."];

fn persona_args() -> Vec<&'static str> {
    PERSONA.iter().flat_map(|p| ["--persona", p]).collect()
}

#[test]
fn a_piped_session_keeps_history_in_the_training_template_trims_and_quits() {
    let (tiny, tok) = (tiny(), tok());
    let persona: Vec<String> = PERSONA.iter().map(|s| s.to_string()).collect();
    let turns = [
        "hello there! how is your day going so far?",
        "what do you do for a living these days?",
        "do you have any pets at home with you?",
        "/persona i have two brothers.",
        "that sounds lovely. what else do you enjoy?",
        "/reset",
        "hi",
        "/quit",
        "this line is never read",
    ];
    let (budget, max_new) = (110usize, 8usize);
    let mut args = vec!["--model", &tiny, "--json", "--max-len", "110"];
    args.extend(persona_args());
    args.extend(["--max-new-tokens", "8", "--temperature", "0"]);
    let o = chat(&args, &turns.join("\n"));
    assert!(o.status.success(), "{}", stderr(&o));
    let lines = json_lines(&o);
    assert_eq!(lines.len(), 5, "one JSON line per user turn before /quit");

    // Follow the session as the user sees it and check every prompt against the template.
    let mut persona = persona;
    let mut dialogue: Vec<String> = Vec::new();
    let mut dropped = 0;
    let mut lines = lines.iter();
    for (i, turn) in turns.iter().take_while(|t| **t != "/quit").enumerate() {
        if *turn == "/reset" {
            dialogue.clear();
            continue;
        }
        if let Some(fact) = turn.strip_prefix("/persona ") {
            persona.push(fact.to_string());
            continue;
        }
        let v = lines.next().unwrap();
        assert_eq!(v["user"], *turn);
        dialogue.push(turn.to_string());
        let d = v["dropped_turns"].as_u64().unwrap() as usize;
        dialogue.drain(..d);
        dropped += d;
        let prompt = Template::Persona.prompt_text(&persona, &dialogue);
        assert_eq!(v["prompt"], prompt.as_str(), "turn {i}");
        let ids = tok.encode(&prompt).unwrap();
        assert_eq!(v["prompt_tokens"], ids.len());
        assert_eq!(v["history_turns"], dialogue.len());
        // Trimmed prompts fit the budget with room for the reply (unless only the last turn
        // is left, which is always kept).
        if d > 0 && dialogue.len() > 1 {
            assert!(
                ids.len() + max_new <= budget,
                "turn {i}: {} tokens",
                ids.len()
            );
        }
        let reused = v["reused_tokens"].as_u64().unwrap() as usize;
        match *turn {
            // The first turn, and the first after /reset, start from an empty cache.
            t if t == turns[0] || t == "hi" => assert_eq!(reused, 0, "turn {i}"),
            // Later turns share at least the persona with what is cached.
            _ => assert!(
                reused > 20 && reused < ids.len(),
                "turn {i}: reused {reused}"
            ),
        }
        assert!(v["new_tokens"].as_u64().unwrap() as usize <= max_new);
        dialogue.push(v["reply"].as_str().unwrap().to_string());
    }
    assert!(
        dropped > 0,
        "the 110-token budget never trimmed the history"
    );
    let err = stderr(&o);
    assert!(err.contains("oldest turn"), "{err}");
    assert!(err.contains("dialogue cleared"), "{err}");
    assert!(err.contains("i have two brothers."), "{err}");
}

#[test]
fn the_session_ends_cleanly_at_end_of_input_and_is_reproducible_with_a_seed() {
    let tiny = tiny();
    let run = |seed: &str| {
        let mut args = vec!["--model", &tiny, "--max-new-tokens", "10", "--seed", seed];
        args.extend(persona_args());
        // No /quit: the input just ends (and has a blank line and an unknown command).
        let o = chat(&args, "hi, who are you?\n\n/dance\nwhat is your job?\n");
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains("unknown command /dance"));
        stdout(&o)
    };
    let a = run("7");
    assert_eq!(
        a.lines().count(),
        2,
        "one streamed reply line per turn: {a:?}"
    );
    assert_eq!(a, run("7"), "same seed, same session");
    assert_ne!(
        a,
        run("8"),
        "the default sampling (temperature 0.7) depends on the seed"
    );
}

#[test]
fn cache_reuse_changes_only_the_cost_not_the_replies() {
    let tiny = tiny();
    let input = "hello!\nwhat do you do?\nnice. any hobbies?\n";
    let run = |extra: Option<&str>| {
        let mut args = vec!["--model", &tiny, "--json", "--temperature", "0"];
        args.extend(persona_args());
        args.extend(extra);
        let o = chat(&args, input);
        assert!(o.status.success(), "{}", stderr(&o));
        json_lines(&o)
    };
    let (reused, fresh) = (run(None), run(Some("--no-cache-reuse")));
    for (a, b) in reused.iter().zip(&fresh) {
        assert_eq!(a["reply"], b["reply"]);
        assert_eq!(b["reused_tokens"], 0);
    }
    assert!(reused[2]["reused_tokens"].as_u64().unwrap() > 0);
}

fn generate(args: &[&str]) -> Value {
    let mut all = vec!["generate", "--model"];
    let tiny = tiny();
    all.push(&tiny);
    all.extend(args);
    all.extend(["--max-new-tokens", "6", "--json"]);
    let o = phitune(&all);
    assert!(o.status.success(), "{}", stderr(&o));
    serde_json::from_str(stdout(&o).trim()).unwrap()
}

/// A 2-step run of the seed recipe (template `seed`), for its adapter and config.toml.
fn seed_run() -> PathBuf {
    let out = scratch("chat-seed-run").join("run");
    let tiny = tiny();
    let sample = sample();
    let o = phitune(&[
        "train",
        "--preset",
        "seed",
        "--model",
        &tiny,
        "--data",
        &sample,
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        "2",
        "--micro-batch",
        "2",
        "--grad-accum",
        "1",
        "--valid-fraction",
        "0.1",
        "--no-dashboard",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    out
}

#[test]
fn generate_renders_the_persona_with_the_adapters_training_template() {
    let (p, d) = (
        PERSONA.map(String::from),
        ["hi!".to_string(), "what do you do?".into()],
    );
    let mut args = persona_args();
    args.extend(["--dialogue", "hi!", "--dialogue", "what do you do?"]);
    // No adapter: the persona template.
    let v = generate(&args);
    assert_eq!(v["template"], "persona");
    assert_eq!(v["prompt"], Template::Persona.prompt_text(&p, &d).as_str());
    // An adapter from a seed-recipe run: its template, without being told.
    let run = seed_run();
    let mut with = args.clone();
    with.extend(["--adapter", run.to_str().unwrap()]);
    let v = generate(&with);
    assert_eq!(v["template"], "seed");
    assert_eq!(v["prompt"], Template::Seed.prompt_text(&p, &d).as_str());
    // --row takes the persona and the dialogue from a data file.
    let rows = phitune_data::load::load_path(Path::new(&sample()), Default::default()).unwrap();
    let row = &rows.rows[3];
    let spec = format!("{}:3", sample());
    let v = generate(&["--row", &spec]);
    assert_eq!(
        v["prompt"],
        Template::Persona
            .prompt_text(&row.persona_b, &row.dialogue)
            .as_str()
    );
}

#[test]
fn persona_input_errors_are_one_line() {
    let tiny = tiny();
    let o = chat(&["--model", &tiny], "hi\n");
    assert_one_line_error(&o, "chat needs a persona");
    let bad_row = format!("{}:999", sample());
    let o = phitune(&["generate", "--model", &tiny, "--row", &bad_row]);
    assert_one_line_error(&o, "rows (indices 0..");
    let o = phitune(&["generate", "--model", &tiny, "--row", "nope"]);
    assert_one_line_error(&o, "expected FILE:INDEX");
    let o = phitune(&["generate", "--model", &tiny]);
    assert_one_line_error(&o, "give --prompt TEXT");
    let o = phitune(&["generate", "--model", &tiny, "--persona", "i like cats."]);
    assert_one_line_error(&o, "--dialogue");
    let missing = scratch("chat-missing").join("facts.txt");
    let o = phitune(&[
        "generate",
        "--model",
        &tiny,
        "--persona-file",
        missing.to_str().unwrap(),
        "--dialogue",
        "hi",
    ]);
    assert_one_line_error(&o, "facts.txt");
}

#[test]
fn eval_compare_base_puts_the_base_replies_next_to_the_adapters() {
    let (tiny, sample) = (tiny(), sample());
    let adapter = fixtures().join("adapters/ours-train-demo");
    let dir = scratch("chat-compare");
    let eval = |extra: &[&str], out: &str| {
        let out = dir.join(out);
        let mut args = vec![
            "eval",
            "--model",
            &tiny,
            "--quant",
            "nf4",
            "--data",
            &sample,
            "--valid-fraction",
            "0.1",
            "--generate",
            "3",
            "--max-new-tokens",
            "8",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend(extra);
        let o = phitune(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let gens: Vec<Value> = std::fs::read_to_string(out.join("generations.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let summary: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        (gens, summary, stderr(&o))
    };
    let a = adapter.to_str().unwrap();
    let (both, summary, err) = eval(&["--adapter", a, "--compare-base"], "both");
    let (base, base_summary, _) = eval(&[], "base");
    let (adapted, _, _) = eval(&["--adapter", a], "adapted");
    assert_eq!(both.len(), 3);
    for ((b, base), adapted) in both.iter().zip(&base).zip(&adapted) {
        assert_eq!(b["base_reply"], base["reply"]);
        assert_eq!(b["base_f1"], base["f1"]);
        assert_eq!(b["reply"], adapted["reply"]);
        assert!(err.contains(&format!("reference: {}", b["reference"].as_str().unwrap())));
    }
    assert_eq!(summary["base_f1"], base_summary["f1"]);
    assert!(err.contains("base:") && err.contains("adapter:"), "{err}");
    let o = phitune(&[
        "eval",
        "--model",
        &tiny,
        "--compare-base",
        "--data",
        &sample,
    ]);
    assert!(!o.status.success() && stderr(&o).contains("--adapter"));
}
