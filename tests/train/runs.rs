//! Runs that must equal each other: with and without gradient checkpointing, padded to a
//! multiple of 64, packed; and a resume that refuses changed data.

use super::*;

#[test]
fn gradient_checkpointing_gives_the_same_run() {
    let dir = scratch("train-ckpt");
    let (a, b) = (dir.join("plain"), dir.join("recompute"));
    let extra = ["--eval-every", "0", "--save-every", "3"];
    let o = run(&with(base_args(&a, 3), &extra));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&with(
        set(base_args(&b, 3), "--grad-checkpointing", "true"),
        &extra,
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    let cfg = std::fs::read_to_string(b.join("config.toml")).unwrap();
    assert!(cfg.contains("grad_checkpointing = true"), "{cfg}");
    let (la, lb) = (train_losses(&a), train_losses(&b));
    assert_eq!(la.len(), 3);
    for ((step, x), (_, y)) in la.iter().zip(&lb) {
        assert!((x - y).abs() < 1e-5, "step {step}: {x} vs {y}");
    }
}

/// A copy of tiny-phi without dropout (dropout masks follow the layout: a wider or packed
/// micro-batch draws other masks).
fn tiny_without_dropout(name: &str) -> std::path::PathBuf {
    let tiny = copy_fixture("tiny-phi", name);
    let cfg = tiny.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    for k in ["resid_pdrop", "embd_pdrop", "attention_dropout"] {
        c[k] = 0.0.into();
    }
    std::fs::write(&cfg, c.to_string()).unwrap();
    tiny
}

/// The runs in `a` and `b` logged the same records (train steps and evaluations): losses within
/// 1e-5, the same real tokens and examples (never padding or rows). Returns `a`'s records.
fn assert_same_run(a: &Path, b: &Path, names: (&str, &str)) -> Vec<Record> {
    let records = |d: &Path| metrics::read(&d.join("metrics.jsonl")).unwrap();
    let (ra, rb) = (records(a), records(b));
    assert_eq!(ra.len(), rb.len());
    for (x, y) in ra.iter().zip(&rb) {
        assert_eq!((&x.split, x.step), (&y.split, y.step));
        assert!(
            (x.loss - y.loss).abs() < 1e-5,
            "{} at {}: {} {}, {} {}",
            x.split,
            x.step,
            x.loss,
            names.0,
            y.loss,
            names.1
        );
        assert_eq!(
            (x.tokens, x.sequences),
            (y.tokens, y.sequences),
            "real tokens and examples, never padding or rows"
        );
    }
    ra
}

/// GPU runs widen every micro-batch to a multiple of 64 positions (fewer shapes to compile and
/// tune for); the extra positions are padding, which the mask and the loss ignore: the run is
/// the unwidened one, step by step, held-out evaluations included (here on the CPU, where the
/// flag works the same).
#[test]
fn padding_micro_batches_to_a_multiple_of_64_changes_nothing() {
    let tiny = tiny_without_dropout("train-pad64-model");
    let dir = scratch("train-pad64");
    let (a, b) = (dir.join("exact"), dir.join("wide"));
    let args = |out: &Path| {
        with(
            set(base_args(out, 3), "--model", tiny.to_str().unwrap()),
            &[
                "--lora-dropout",
                "0",
                "--eval-every",
                "3",
                "--save-every",
                "3",
            ],
        )
    };
    let o = run(&args(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&with(args(&b), &["--pad-to-multiple", "64"]));
    assert!(o.status.success(), "{}", stderr(&o));
    let ra = assert_same_run(&a, &b, ("as is", "widened to 64"));
    assert_eq!(ra.iter().filter(|r| r.split == "train").count(), 3);
    assert!(ra.iter().any(|r| r.split == "valid" && r.step == 3));
    let o = run(&with(args(&dir.join("zero")), &["--pad-to-multiple", "0"]));
    assert_fails_with(&o, "--pad-to-multiple");
}

/// `--packing` lays each micro-batch's examples end to end in rows, each example on its own
/// (positions, attention, loss): without dropout (whose masks follow the layout) the run is the
/// padded one, step by step, evaluation included, also when stopped and resumed.
#[test]
fn a_packed_run_is_the_padded_run_and_resumes() {
    let tiny = tiny_without_dropout("train-packing-model");
    let dir = scratch("train-packing");
    let (a, b) = (dir.join("padded"), dir.join("packed"));
    let args = |out: &Path| {
        with(
            set(
                set(
                    set(base_args(out, 4), "--model", tiny.to_str().unwrap()),
                    "--micro-batch",
                    "4",
                ),
                "--grad-accum",
                "1",
            ),
            &[
                "--max-len",
                "1000",
                "--lora-dropout",
                "0",
                "--eval-every",
                "2",
                "--save-every",
                "2",
            ],
        )
    };
    let o = run(&args(&a));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("padded: "), "{}", stderr(&o));

    let o = run(&with(args(&b), &["--packing", "--stop-after", "2"]));
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    // "... packed into rows of up to 1000 tokens: 2.29 examples per row, ..."
    let per_row: f64 = err
        .split(" examples per row")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no packing line: {err}"));
    assert!(per_row > 1.2, "{err}");
    let config = std::fs::read_to_string(b.join("config.toml")).unwrap();
    assert!(config.contains("packing = true"), "{config}");
    let o = phitune(&[
        "train",
        "--out",
        b.to_str().unwrap(),
        "--resume",
        "--device",
        "cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    let ra = assert_same_run(&a, &b, ("padded", "packed"));
    assert_eq!(ra.iter().filter(|r| r.split == "train").count(), 4);
    assert!(ra.iter().filter(|r| r.split == "valid").count() >= 2);
}

/// Resuming on data that changed since the checkpoint would silently train on other examples.
#[test]
fn resume_refuses_changed_data() {
    let dir = scratch("train-data-changed");
    let data = dir.join("rows.jsonl");
    std::fs::copy(root().join(SAMPLE), &data).unwrap();
    let out = dir.join("run");
    let args = with(
        set(base_args(&out, 3), "--data", data.to_str().unwrap()),
        &["--eval-every", "0", "--stop-after", "1"],
    );
    let o = run(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&data).unwrap();
    let fewer: Vec<&str> = text.lines().skip(1).collect();
    std::fs::write(&data, fewer.join("\n")).unwrap();
    let o = phitune(&[
        "train",
        "--out",
        out.to_str().unwrap(),
        "--resume",
        "--device",
        "cpu",
    ]);
    assert_fails_with(&o, "the training data differ");
}
