//! `train --devices`: data parallelism over the devices of one process on burn-collective's local
//! peers, here several CPU ranks in one process. The run must be the single-device run (each
//! optimizer step's micro-batches shared out, the gradients all-reduced once per step): losses,
//! gradient norms, held-out losses and the adapter within 1e-5. A rank that crashes or hangs
//! stops the run within the peer timeout, naming the rank and the last good checkpoint, and
//! the run resumed from it ends as the uninterrupted one.

mod common;

use std::time::{Duration, Instant};

use common::*;

use common::ranks::{args, assert_same_run, run};

#[test]
fn cpu_ranks_train_exactly_as_one_device() {
    let dir = scratch("parallel-equal");
    let one = dir.join("one");
    let o = run(&args(&one, &["--device", "cpu"], &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    // Two ranks take two micro-batches each; three take 2 + 1 + 1.
    for (name, devices) in [("two", "cpu,cpu"), ("three", "cpu,cpu,cpu")] {
        let out = dir.join(name);
        let o = run(&args(&out, &["--devices", devices], &[]));
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert_same_run(&one, &out);
        // The run reports what synchronising cost: one all-reduce per optimizer step of every
        // trainable value.
        let summary: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("summary.json")).unwrap()).unwrap();
        let sync = &summary["sync"];
        assert_eq!(sync["steps"], 6, "{name}: {sync}");
        assert_eq!(
            sync["values"], summary["trainable_params"],
            "{name}: {sync}"
        );
        assert!(
            sync["all_reduce_s"].as_f64().unwrap() > 0.0,
            "{name}: {sync}"
        );
        assert!(
            stderr(&o).contains("synchronising the ranks:"),
            "{name}: {}",
            stderr(&o)
        );
    }
    let single: serde_json::Value =
        serde_json::from_slice(&std::fs::read(one.join("summary.json")).unwrap()).unwrap();
    assert!(single.get("sync").is_none(), "{single}");
}

#[test]
fn nf4_base_and_packing_train_exactly_as_one_device() {
    let dir = scratch("parallel-nf4");
    // Two examples per micro-batch, packed into one row.
    let extra = ["--quant", "nf4", "--packing", "true", "--max-len", "1000"];
    let with_pairs = |mut a: Vec<String>| {
        let i = a.iter().position(|x| x == "--micro-batch").unwrap();
        a[i + 1] = "2".into();
        a
    };
    let one = dir.join("one");
    let o = run(&with_pairs(args(&one, &["--device", "cpu"], &extra)));
    assert!(o.status.success(), "{}", stderr(&o));
    let two = dir.join("two");
    let o = run(&with_pairs(args(&two, &["--devices", "cpu,cpu"], &extra)));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_run(&one, &two);
}

/// Runs `args` with a fault injected into one worker; returns its last stderr line and how long
/// the run took.
fn run_with_fault(args: &[String], fault: &str) -> (String, Duration) {
    let t = Instant::now();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_phitune"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("PHITUNE_TEST_FAULT", fault)
        .output()
        .expect("run phitune");
    let elapsed = t.elapsed();
    let err = stderr(&o);
    assert!(!o.status.success(), "{fault}: the run did not fail: {err}");
    assert_ne!(o.status.code(), Some(101), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let last = err.lines().last().unwrap_or_default().to_string();
    assert!(last.starts_with("error: "), "{err}");
    (last, elapsed)
}

#[test]
fn a_hung_rank_stops_the_run_in_bounded_time_and_resume_finishes_it() {
    let dir = scratch("parallel-hang");
    let one = dir.join("one");
    let o = run(&args(&one, &["--device", "cpu"], &[]));
    assert!(o.status.success(), "{}", stderr(&o));

    // Rank 1 goes silent at the all-reduce of step 3 (after the step-2 checkpoint).
    let two = dir.join("two");
    let a = args(&two, &["--devices", "cpu,cpu", "--peer-timeout", "2"], &[]);
    let (line, took) = run_with_fault(&a, "hang:1:3");
    let ckpt = two.join("checkpoints").join("step-00000002");
    for want in [
        "step 3",
        "timed out after 2 s",
        "rank 1 did not arrive",
        &format!("the last good checkpoint is {}", ckpt.display()),
    ] {
        assert!(line.contains(want), "{want:?} not in: {line}");
    }
    // Bounded: the 2 s timeout plus the steps before it, far from an endless wait.
    assert!(took < Duration::from_secs(60), "took {took:?}");

    let o = phitune(&[
        "train",
        "--out",
        two.to_str().unwrap(),
        "--resume",
        "--devices",
        "cpu,cpu",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_run(&one, &two);
}

#[test]
fn a_crashed_rank_stops_the_run_at_once() {
    let dir = scratch("parallel-crash");
    let out = dir.join("three");
    // A crashed rank is noticed without waiting for the (long) timeout.
    let a = args(
        &out,
        &["--devices", "cpu,cpu,cpu", "--peer-timeout", "600"],
        &[],
    );
    let (line, took) = run_with_fault(&a, "exit:2:1");
    for want in [
        "step 1",
        "rank 2 did not arrive",
        "it stopped",
        "there is no checkpoint yet",
    ] {
        assert!(line.contains(want), "{want:?} not in: {line}");
    }
    assert!(took < Duration::from_secs(300), "took {took:?}");
}

#[test]
fn bad_device_settings_are_refused() {
    let dir = scratch("parallel-bad");
    let out = dir.join("run");
    let cases: [(&[&str], &[&str], &str); 4] = [
        (
            &["--devices", "cpu,wgpu"],
            &[],
            "--devices mixes cpu and wgpu",
        ),
        (
            &["--devices", "cpu,cpu", "--device", "cpu"],
            &[],
            "cannot be used with",
        ),
        (
            &["--devices", "cpu,cpu,cpu"],
            &["--grad-accum", "2"],
            "grad_accum must be at least 3",
        ),
        (
            &["--devices", "cpu,cpu", "--peer-timeout", "0"],
            &[],
            "--peer-timeout must be at least 1",
        ),
    ];
    for (placement, extra, want) in cases {
        let mut a = args(&out, placement, &[]);
        if let [flag, value] = extra {
            let i = a.iter().position(|x| x == flag).unwrap();
            a[i + 1] = value.to_string();
        }
        assert_one_line_error(&run(&a), want);
        assert!(!out.exists(), "{want}: created {}", out.display());
    }
}
