//! The `train` command end to end on the tiny fixture and the bundled sample (CPU): learning,
//! outputs, exact resume, kills during checkpointing, NaN stop; and the schedule and clipping
//! against transformers/torch (expected.json["training"]).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use burn::backend::{Autodiff, NdArray};
use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use common::*;
use phitune_train::checkpoint;
use phitune_train::metrics::{self, Record};
use phitune_train::schedule::WarmupCosine;

const SAMPLE: &str = "data/samples/persona_chat_sample.jsonl";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A small run on the tiny fixture: 4 sequences per step.
fn base_args(out: &Path, max_steps: usize) -> Vec<String> {
    let tiny = fixtures().join("tiny-phi");
    [
        "train",
        "--model",
        tiny.to_str().unwrap(),
        "--data",
        root().join(SAMPLE).to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--device",
        "cpu",
        "--max-steps",
        &max_steps.to_string(),
        "--micro-batch",
        "2",
        "--grad-accum",
        "2",
        "--lr",
        "1e-3",
        "--valid-fraction",
        "0.1",
        "--grad-checkpointing",
        "false",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Progress lines may precede it, but the run ends with one error line and no panic.
fn assert_fails_with(o: &std::process::Output, want: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure: {err}");
    assert_ne!(o.status.code(), Some(101), "{err}");
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
    let last = err.lines().last().unwrap_or_default();
    assert!(last.starts_with("error: ") && last.contains(want), "{err}");
}

fn run(args: &[String]) -> std::process::Output {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    phitune(&a)
}

/// Replaces the value of `flag` (present in `args`).
fn set(mut args: Vec<String>, flag: &str, value: &str) -> Vec<String> {
    let i = args.iter().position(|a| a == flag).expect("flag present");
    args[i + 1] = value.into();
    args
}

fn with(mut args: Vec<String>, extra: &[&str]) -> Vec<String> {
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn train_losses(out: &Path) -> Vec<(usize, f64)> {
    metrics::read(&out.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.split == "train")
        .map(|r| (r.step, r.loss))
        .collect()
}

fn valid_records(out: &Path) -> Vec<Record> {
    metrics::read(&out.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.split == "valid")
        .collect()
}

#[test]
fn fine_tune_lowers_held_out_loss_and_leaves_a_usable_adapter() {
    let out = scratch("train-e2e").join("run");
    let args = with(
        set(base_args(&out, 30), "--micro-batch", "4"),
        &["--save-every", "10", "--eval-every", "10"],
    );
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["status"], "completed");
    assert_eq!(summary["steps"], 30);

    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "config.toml",
        "metrics.jsonl",
        "curves.svg",
        "summary.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let svg = std::fs::read_to_string(out.join("curves.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("polyline"),
        "curves.svg has no lines"
    );

    // Held-out loss: before training (step 0) vs after 30 steps.
    let valid = valid_records(&out);
    assert_eq!(
        valid.iter().map(|r| r.step).collect::<Vec<_>>(),
        [0, 10, 20, 30]
    );
    let (before, after) = (valid[0].loss, valid[3].loss);
    assert!(
        after < before - 0.1,
        "held-out loss {before} -> {after} did not go down"
    );
    // One train line per optimizer step, with the rate of that step.
    let steps: Vec<usize> = train_losses(&out).iter().map(|s| s.0).collect();
    assert_eq!(steps, (1..=30).collect::<Vec<_>>());

    // Checkpoints: the last 3 kept (10, 20, 30), each complete and usable as an adapter.
    let kept: Vec<usize> = checkpoint::list(&out).iter().map(|c| c.0).collect();
    assert_eq!(kept, [10, 20, 30]);
    assert!(
        checkpoint::list(&out)
            .iter()
            .all(|(_, d)| checkpoint::is_complete(d))
    );
    // The final adapter is the step-30 checkpoint's.
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(checkpoint::step_dir(&out, 30).join("adapter_model.safetensors")).unwrap()
    );

    // The adapter loads back through `score` and changes the model's predictions.
    let tiny = fixtures().join("tiny-phi");
    let text = "i love to go hiking with my dog on weekends.";
    let score = |adapter: Option<&Path>| -> f64 {
        let mut a = vec![
            "score",
            "--device",
            "cpu",
            "--model",
            tiny.to_str().unwrap(),
            "--text",
            text,
        ];
        if let Some(p) = adapter {
            a.extend(["--adapter", p.to_str().unwrap()]);
        }
        let o = phitune(&a);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["mean_nll"].as_f64().unwrap()
    };
    let (base, tuned) = (score(None), score(Some(&out)));
    assert!(
        (base - tuned).abs() > 1e-3,
        "adapter had no effect: {base} vs {tuned}"
    );

    // `eval` on the same held-out split reproduces the run's final held-out loss.
    let o = phitune(&[
        "eval",
        "--device",
        "cpu",
        "--model",
        tiny.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--data",
        root().join(SAMPLE).to_str().unwrap(),
        "--generate",
        "3",
        "--max-new-tokens",
        "8",
        "--out",
        out.join("eval").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        e["template"], "persona",
        "template taken from the run's config"
    );
    assert!(
        (e["loss"].as_f64().unwrap() - after).abs() < 1e-4,
        "eval loss {} vs the run's {after}",
        e["loss"]
    );
    assert_eq!(e["generated"], 3);
    let lines = std::fs::read_to_string(out.join("eval/generations.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 3);
    assert!(out.join("eval/summary.json").is_file());

    // The output directory is never reused by accident; --overwrite replaces the run.
    let o = run(&args);
    assert_one_line_error(&o, "is not empty");
    let o = run(&with(
        set(args.clone(), "--max-steps", "2"),
        &["--overwrite"],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(train_losses(&out).last().unwrap().0, 2);
    assert!(!out.join("eval").exists(), "the old run's files are gone");
}

#[test]
fn resumed_run_matches_the_uninterrupted_one_step_by_step() {
    let dir = scratch("train-resume");
    let (a, b) = (dir.join("a"), dir.join("b"));
    let extra = [
        "--save-every",
        "2",
        "--eval-every",
        "3",
        "--lora-dropout",
        "0.1",
    ];
    let o = run(&with(base_args(&a, 8), &extra));
    assert!(o.status.success(), "{}", stderr(&o));

    let o = run(&with(
        with(base_args(&b, 8), &extra),
        &["--stop-after", "5"],
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(train_losses(&b).len(), 5);
    assert!(
        checkpoint::step_dir(&b, 5).is_dir(),
        "no checkpoint at the stop"
    );
    // Changing the recipe on resume is refused.
    let o = phitune(&[
        "train",
        "--out",
        b.to_str().unwrap(),
        "--resume",
        "--lr",
        "5e-4",
    ]);
    assert_one_line_error(&o, "cannot change lr");
    let o = phitune(&[
        "train",
        "--out",
        b.to_str().unwrap(),
        "--resume",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    let (la, lb) = (train_losses(&a), train_losses(&b));
    assert_eq!(la.len(), 8);
    assert_eq!(
        la.iter().map(|s| s.0).collect::<Vec<_>>(),
        lb.iter().map(|s| s.0).collect::<Vec<_>>()
    );
    for ((step, x), (_, y)) in la.iter().zip(&lb) {
        assert!((x - y).abs() < 1e-5, "step {step}: {x} vs {y}");
    }
    let (va, vb) = (valid_records(&a), valid_records(&b));
    assert_eq!(va.len(), vb.len());
    for (x, y) in va.iter().zip(&vb) {
        assert_eq!(x.step, y.step);
        assert!(
            (x.loss - y.loss).abs() < 1e-5,
            "valid at {}: {} vs {}",
            x.step,
            x.loss,
            y.loss
        );
    }
    // The two final adapters agree.
    let w = |d: &Path| phitune_model::io::adapter::Adapter::read(d).unwrap();
    let (wa, wb) = (w(&a), w(&b));
    for (k, ma) in &wa.modules {
        let mb = &wb.modules[k];
        let diff =
            ma.b.iter()
                .zip(&mb.b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
        assert!(diff < 1e-5, "{k}: B differs by {diff}");
    }
}

#[test]
fn killed_while_checkpointing_always_leaves_a_resumable_run() {
    let dir = scratch("train-kill");
    let (clean, killed) = (dir.join("clean"), dir.join("killed"));
    let extra = [
        "--save-every",
        "1",
        "--eval-every",
        "0",
        "--keep-checkpoints",
        "2",
    ];
    let max_steps = 10;
    let o = run(&with(base_args(&clean, max_steps), &extra));
    assert!(o.status.success(), "{}", stderr(&o));

    // Kill at pseudo-random moments; each checkpoint stage is slowed down so the kills land
    // inside checkpoint writes and deletions as often as between them.
    let first = with(base_args(&killed, max_steps), &extra);
    let resume: Vec<String> = [
        "train",
        "--out",
        killed.to_str().unwrap(),
        "--resume",
        "--device",
        "cpu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut kills = 0;
    for attempt in 0..12 {
        let args = if attempt == 0 { &first } else { &resume };
        let mut child = Command::new(env!("CARGO_BIN_EXE_phitune"))
            .args(args)
            .env("HF_HUB_OFFLINE", "1")
            .env("PHITUNE_TEST_CHECKPOINT_DELAY_MS", "60")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let wait = Duration::from_millis(300 + rng % 1200);
        std::thread::sleep(wait);
        if child.try_wait().unwrap().is_some() {
            break; // finished before the kill
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        // Whatever the moment, every checkpoint directory present is complete.
        for (step, d) in checkpoint::list(&killed) {
            assert!(
                checkpoint::is_complete(&d),
                "step {step} checkpoint incomplete after a kill"
            );
        }
        assert!(killed.join("config.toml").is_file());
    }
    assert!(kills >= 3, "only {kills} kills landed");
    let o = run(&resume);
    assert!(o.status.success(), "final resume: {}", stderr(&o));

    let (lc, lk) = (train_losses(&clean), train_losses(&killed));
    assert_eq!(
        lk.iter().map(|s| s.0).collect::<Vec<_>>(),
        (1..=max_steps).collect::<Vec<_>>()
    );
    for ((step, x), (_, y)) in lc.iter().zip(&lk) {
        assert!((x - y).abs() < 1e-5, "step {step}: {x} vs {y}");
    }
}

#[test]
fn a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint() {
    let out = scratch("train-nan").join("run");
    // An absurd learning rate blows the adapters up within a few steps.
    let args = with(
        set(base_args(&out, 8), "--lr", "1e30"),
        &["--save-every", "1", "--eval-every", "0"],
    );
    let o = run(&args);
    assert!(!o.status.success());
    assert_ne!(o.status.code(), Some(101));
    // Progress lines, then one error line naming the step and the checkpoint kept.
    let err = stderr(&o);
    let last_line = err.lines().last().unwrap_or_default().to_string();
    assert!(
        last_line.starts_with("error: training stopped at step")
            && last_line.contains("is not finite"),
        "{err}"
    );
    assert!(
        !err.contains("panicked") && !err.contains("internal error"),
        "{err}"
    );
    let (last, dir) = checkpoint::latest(&out).expect("a checkpoint before the NaN");
    assert!(last_line.contains(&dir.display().to_string()), "{err}");
    let losses = train_losses(&out);
    assert_eq!(
        losses.last().unwrap().0,
        last,
        "no step after the last good one is logged"
    );
    assert!(losses.iter().all(|(_, l)| l.is_finite()));
}

#[test]
fn bad_training_input_gets_one_line() {
    let dir = scratch("train-bad");
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, "max_steps = 10\nlearnig_rate = 3\n").unwrap();
    let out = dir.join("o");
    let o = phitune(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "unknown key \"learnig_rate\"");
    assert!(!out.exists(), "nothing written for a bad config");
    let o = phitune(&["train", "--out", dir.to_str().unwrap(), "--resume"]);
    assert_one_line_error(&o, "has no config.toml");
    let o = phitune(&["train", "--max-steps", "0", "--out", out.to_str().unwrap()]);
    assert_one_line_error(&o, "max_steps must be at least 1");
    let o = phitune(&[
        "train",
        "--lora-r",
        "4",
        "--target-modules",
        "q_proj,gate",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "gate");
}

#[test]
fn schedule_matches_transformers_cosine_with_warmup() {
    let exp = expected();
    let cases = exp["training"]["schedule"].as_array().unwrap();
    assert!(cases.len() >= 3);
    for c in cases {
        let peak = c["peak"].as_f64().unwrap();
        let total = c["max_steps"].as_u64().unwrap() as usize;
        let ratio = c["warmup_ratio"].as_f64().unwrap();
        let mut cfg = phitune_train::TrainConfig::preset(phitune_train::Preset::Persona);
        cfg.max_steps = total;
        cfg.warmup_ratio = ratio;
        assert_eq!(
            cfg.warmup_steps() as u64,
            c["warmup_steps"].as_u64().unwrap()
        );
        let mut sched = WarmupCosine::new(peak, cfg.warmup_steps(), total);
        let all: Vec<f64> = (0..total)
            .map(|_| burn::lr_scheduler::LrScheduler::step(&mut sched))
            .collect();
        for (s, want) in c["steps"]
            .as_array()
            .unwrap()
            .iter()
            .zip(c["lr"].as_array().unwrap())
        {
            let (s, want) = (s.as_u64().unwrap() as usize, want.as_f64().unwrap());
            assert!(
                (all[s] - want).abs() <= 1e-12 * peak.max(1e-30) + 1e-18,
                "peak {peak} total {total}: step {s}: {} vs {want}",
                all[s]
            );
        }
    }
}

#[derive(Module, Debug)]
struct Three<B: burn::tensor::backend::Backend> {
    a: Param<Tensor<B, 2>>,
    b: Param<Tensor<B, 2>>,
    c: Param<Tensor<B, 2>>,
}

#[test]
fn global_norm_clipping_matches_torch() {
    type AB = Autodiff<NdArray<f32>>;
    let exp = expected();
    for case in exp["training"]["clip"].as_array().unwrap() {
        let device = Default::default();
        let grads: Vec<Vec<Vec<f32>>> = serde_json::from_value(case["grads"].clone()).unwrap();
        let t = |g: &Vec<Vec<f32>>| {
            let (r, c) = (g.len(), g[0].len());
            TensorData::new(g.iter().flatten().copied().collect::<Vec<_>>(), [r, c])
        };
        let p = |g: &Vec<Vec<f32>>| {
            Param::from_tensor(
                Tensor::<AB, 2>::zeros([g.len(), g[0].len()], &device).require_grad(),
            )
        };
        let m = Three::<AB> {
            a: p(&grads[0]),
            b: p(&grads[1]),
            c: p(&grads[2]),
        };
        let mut gp = GradientsParams::new();
        for (param, g) in [(&m.a, &grads[0]), (&m.b, &grads[1]), (&m.c, &grads[2])] {
            gp.register::<NdArray<f32>, 2>(param.id, Tensor::from_data(t(g), &device));
        }
        let max = case["max_norm"].as_f64().unwrap();
        let norm = phitune_train::clip::clip_global_norm::<AB, _>(&m, &mut gp, max);
        let want = case["total_norm"].as_f64().unwrap();
        assert!((norm - want).abs() < 1e-5, "norm {norm} vs {want}");
        let clipped: Vec<Vec<Vec<f32>>> = serde_json::from_value(case["clipped"].clone()).unwrap();
        for (param, want) in [
            (&m.a, &clipped[0]),
            (&m.b, &clipped[1]),
            (&m.c, &clipped[2]),
        ] {
            let got = gp
                .get::<NdArray<f32>, 2>(param.id)
                .unwrap()
                .into_data()
                .into_vec::<f32>()
                .unwrap();
            let want: Vec<f32> = want.iter().flatten().copied().collect();
            for (x, y) in got.iter().zip(&want) {
                assert!((x - y).abs() < 1e-6, "max_norm {max}: {x} vs {y}");
            }
        }
    }
}

/// An adapter written by `train` (the demo run, `configs/demo.toml`, committed under
/// tests/fixtures/adapters/ours-train-demo) loads in PEFT and scores the same there
/// (`make_fixtures.py --adapters-only` computed the references with PeftModel.from_pretrained).
#[test]
fn adapter_from_train_scores_the_same_in_peft() {
    let exp = expected();
    let entry = &exp["adapters"]["ours-train-demo"];
    assert!(
        entry["base_nll_delta_max"].as_f64().unwrap() > 0.1,
        "training must have changed the model"
    );
    let tiny = fixtures().join("tiny-phi");
    let adapter = fixtures().join("adapters/ours-train-demo");
    for case in entry["score"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let o = phitune(&[
            "score",
            "--device",
            "cpu",
            "--model",
            tiny.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--text",
            text,
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["tokens"], case["tokens"]);
        for (i, (got, want)) in v["nll"]
            .as_array()
            .unwrap()
            .iter()
            .zip(case["nll"].as_array().unwrap())
            .enumerate()
        {
            let (g, w) = (got.as_f64().unwrap(), want.as_f64().unwrap());
            assert!((g - w).abs() < 1e-3, "{text:?} token {i}: {g} vs PEFT {w}");
        }
    }
}

/// Activation checkpointing (Burn's balanced strategy) trades compute for memory without
/// changing the numbers.

#[path = "train/runs.rs"]
mod runs;
#[path = "train/signals.rs"]
mod signals;
