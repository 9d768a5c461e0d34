//! Ctrl-C and failed checkpoint writes: what a user's interruption or a full disk leaves behind.

use super::*;

/// Starts `phitune ARGS` in the background (offline, output captured).
fn spawn(args: &[String], checkpoint_delay_ms: u64) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_phitune"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env(
            "PHITUNE_TEST_CHECKPOINT_DELAY_MS",
            checkpoint_delay_ms.to_string(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn send_sigint(child: &std::process::Child) {
    let ok = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -INT failed");
}

/// Waits (up to a minute) until the run has logged `n` training steps.
fn wait_for_steps(out: &Path, n: usize) {
    let t = std::time::Instant::now();
    while metrics::read(&out.join("metrics.jsonl"))
        .map(|r| r.iter().filter(|r| r.split == "train").count())
        .unwrap_or(0)
        < n
    {
        assert!(t.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn resume_args(out: &Path) -> Vec<String> {
    [
        "train",
        "--out",
        out.to_str().unwrap(),
        "--resume",
        "--device",
        "cpu",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn ctrl_c_finishes_the_step_writes_a_checkpoint_and_exits_cleanly() {
    let out = scratch("train-sigint").join("run");
    // No checkpoint would be due for 1000 steps: the one found after Ctrl-C is Ctrl-C's.
    let args = with(
        base_args(&out, 500),
        &["--save-every", "1000", "--eval-every", "0"],
    );
    let child = spawn(&args, 0);
    wait_for_steps(&out, 2);
    send_sigint(&child);
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("Ctrl-C: finishing the current step and writing a checkpoint"),
        "{err}"
    );
    let steps = train_losses(&out);
    let last = steps.last().unwrap().0;
    assert!((2..500).contains(&last), "stopped at {last}");
    let (step, dir) = checkpoint::latest(&out).expect("a checkpoint");
    assert_eq!(step, last, "the checkpoint is of the last logged step");
    assert!(checkpoint::is_complete(&dir));
    let summary = std::fs::read_to_string(out.join("summary.json")).unwrap();
    assert!(summary.contains("interrupted (Ctrl-C)"), "{summary}");
    assert!(out.join("adapter_model.safetensors").is_file());
    // The run continues from there.
    let next = (last + 2).to_string();
    let o = run(&with(resume_args(&out), &["--stop-after", &next]));
    assert!(o.status.success(), "{}", stderr(&o));
    let resumed = train_losses(&out);
    assert_eq!(resumed.last().unwrap().0, last + 2);
    assert_eq!(&resumed[..steps.len()], &steps[..]);
}

#[test]
fn a_second_ctrl_c_quits_at_once_and_leaves_a_resumable_run() {
    let out = scratch("train-sigint-twice").join("run");
    let args = with(
        base_args(&out, 500),
        &[
            "--save-every",
            "1",
            "--eval-every",
            "0",
            "--keep-checkpoints",
            "2",
        ],
    );
    // Slow checkpoint stages, so the second Ctrl-C lands while the first one's checkpoint is
    // being written.
    let child = spawn(&args, 150);
    wait_for_steps(&out, 2);
    send_sigint(&child);
    std::thread::sleep(Duration::from_millis(200));
    send_sigint(&child);
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("quitting now"), "{err}");
    for (step, d) in checkpoint::list(&out) {
        assert!(checkpoint::is_complete(&d), "step {step} incomplete");
    }
    let (step, _) = checkpoint::latest(&out).expect("an earlier checkpoint");
    let next = (step + 1).to_string();
    let o = run(&with(resume_args(&out), &["--stop-after", &next]));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(train_losses(&out).last().unwrap().0, step + 1);
}

#[test]
fn a_failed_checkpoint_write_is_reported_and_the_previous_one_stays_usable() {
    let out = scratch("train-disk-full").join("run");
    let args = with(
        base_args(&out, 6),
        &[
            "--save-every",
            "1",
            "--eval-every",
            "0",
            "--keep-checkpoints",
            "2",
        ],
    );
    let o = Command::new(env!("CARGO_BIN_EXE_phitune"))
        .args(&args)
        .env("HF_HUB_OFFLINE", "1")
        .env("PHITUNE_TEST_CHECKPOINT_FAIL_STEP", "3")
        .output()
        .unwrap();
    assert_fails_with(&o, "writing the step 3 checkpoint failed");
    let err = stderr(&o);
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains("step-00000002"),
        "names the last good one: {err}"
    );
    // Nothing half-written counts or is left behind; step 2 is intact.
    let (step, dir) = checkpoint::latest(&out).unwrap();
    assert_eq!(step, 2);
    assert!(checkpoint::is_complete(&dir));
    let leftovers: Vec<_> = std::fs::read_dir(out.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // Once there is space again, the run resumes from step 2 and finishes.
    let o = run(&resume_args(&out));
    assert!(o.status.success(), "{}", stderr(&o));
    let steps: Vec<usize> = train_losses(&out).iter().map(|s| s.0).collect();
    assert_eq!(steps, (1..=6).collect::<Vec<_>>());
}
