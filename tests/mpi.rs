//! `train` across processes on MPI (`--features mpi`; Open MPI's `mpirun` on 127.0.0.1, which
//! `.ci/run` installs): 2 and 3 ranks train exactly as one process (losses, gradient norms,
//! held-out losses and the adapter within 1e-5; NF4 base, padded and packed); a rank killed or
//! hung ends the job within the timeout naming the rank and the last good checkpoint, and the
//! run resumed (on another number of ranks) finishes as the uninterrupted one; SIGTERM stops
//! every rank at the same step with a checkpoint; a rank started with other settings or other
//! data is refused at the start, naming the setting.
#![cfg(feature = "mpi")]

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::ranks::{args, assert_same_run, run};
use common::*;

/// `mpirun` with what a root account in a container needs, on shared memory; `apps` are the
/// (ranks, arguments) of each application context (several: ranks started differently).
fn mpirun_apps(
    apps: &[(usize, Vec<String>)],
    env: &[(&str, &str)],
    limit: Duration,
) -> (Output, Duration) {
    let bin = env!("CARGO_BIN_EXE_phitune");
    let mut cmd = Command::new("mpirun");
    cmd.args(["--allow-run-as-root", "--oversubscribe"])
        // Containers often forbid the cross-memory attach of the shared-memory transport.
        .args(["--mca", "btl_vader_single_copy_mechanism", "none"]);
    for (k, _) in env {
        cmd.args(["-x", k]);
    }
    for (i, (n, a)) in apps.iter().enumerate() {
        if i > 0 {
            cmd.arg(":");
        }
        cmd.args(["-np", &n.to_string(), bin]).args(a);
    }
    cmd.env("HF_HUB_OFFLINE", "1")
        .env(
            "HF_HOME",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("hf-home-empty"),
        )
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let child = cmd
        .spawn()
        .expect("mpirun (install Open MPI: apt-get install openmpi-bin)");
    // Bounded: a job that outlives `limit` is killed and the test fails on its output.
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(200));
            if !Path::new(&format!("/proc/{pid}")).exists() {
                return false;
            }
        }
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        true
    });
    let out = child.wait_with_output().expect("mpirun output");
    let took = t.elapsed();
    let killed = watchdog.join().unwrap_or(false);
    assert!(!killed, "the job outlived {limit:?}: {}", stderr(&out));
    (out, took)
}

fn mpirun(n: usize, a: &[String]) -> Output {
    mpirun_apps(&[(n, a.to_vec())], &[], Duration::from_secs(300)).0
}

#[test]
fn mpi_ranks_train_exactly_as_one_process() {
    let dir = scratch("mpi-equal");
    let one = dir.join("one");
    let o = run(&args(&one, &["--device", "cpu"], &[]));
    assert!(o.status.success(), "{}", stderr(&o));
    // Two processes take two micro-batches each; three take 2 + 1 + 1.
    for (name, n) in [("two", 2), ("three", 3)] {
        let out = dir.join(name);
        let o = mpirun(n, &args(&out, &["--device", "cpu"], &[]));
        assert!(o.status.success(), "{name}: {}", stderr(&o));
        assert_same_run(&one, &out);
        // What synchronising cost: every trainable value summed once per optimizer step.
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
        // Rank 0 alone wrote; no other rank left files behind.
        let err = stderr(&o);
        assert_eq!(err.matches("completed: 6 steps").count(), 1, "{err}");
    }
}

#[test]
fn mpi_ranks_with_an_nf4_base_and_packing_train_exactly_as_one_process() {
    let dir = scratch("mpi-packed");
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
    let o = mpirun(2, &with_pairs(args(&two, &["--device", "cpu"], &extra)));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_same_run(&one, &two);
}

#[test]
fn a_killed_or_hung_rank_ends_the_job_and_the_resumed_run_finishes_it() {
    let dir = scratch("mpi-faults");
    let one = dir.join("one");
    let o = run(&args(&one, &["--device", "cpu"], &[]));
    assert!(o.status.success(), "{}", stderr(&o));

    // Rank 1 is killed (SIGKILL) at step 3, after the step-2 checkpoint; the launcher ends the
    // job at once, and rank 0 says where the run stands.
    let killed = dir.join("killed");
    let a = args(&killed, &["--device", "cpu", "--peer-timeout", "10"], &[]);
    let (o, took) = mpirun_apps(
        &[(2, a)],
        &[("PHITUNE_TEST_FAULT", "kill:1:3")],
        Duration::from_secs(120),
    );
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    let ckpt = killed.join("checkpoints").join("step-00000002");
    for want in [
        "process rank 1".to_string(),
        format!("the last good checkpoint is {}", ckpt.display()),
    ] {
        assert!(err.contains(&want), "{want:?} not in: {err}");
    }
    assert!(took < Duration::from_secs(60), "took {took:?}");

    // Rank 2 of three stops answering at step 3: rank 0 names it within the 3 s timeout.
    let hung = dir.join("hung");
    let a = args(&hung, &["--device", "cpu", "--peer-timeout", "3"], &[]);
    let (o, took) = mpirun_apps(
        &[(3, a)],
        &[("PHITUNE_TEST_FAULT", "hang:2:3")],
        Duration::from_secs(120),
    );
    let err = stderr(&o);
    assert!(!o.status.success(), "{err}");
    let ckpt = hung.join("checkpoints").join("step-00000002");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    for want in [
        "rank 2 did not reach the gradient sum of step 3 within 3 s".to_string(),
        format!("the last good checkpoint is {}", ckpt.display()),
    ] {
        assert!(line.contains(&want), "{want:?} not in: {line}");
    }
    assert!(took < Duration::from_secs(60), "took {took:?}");

    // Both resume, on another number of ranks, and end as the uninterrupted run.
    for (out, n) in [(&killed, 3), (&hung, 2)] {
        let resume: Vec<String> = [
            "train",
            "--out",
            out.to_str().unwrap(),
            "--resume",
            "--device",
            "cpu",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let o = mpirun(n, &resume);
        assert!(o.status.success(), "{}: {}", out.display(), stderr(&o));
        assert_same_run(&one, out);
    }
}

#[test]
fn ranks_started_with_other_settings_or_data_are_refused() {
    let dir = scratch("mpi-refused");
    let sample =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/samples/persona_chat_sample.jsonl");
    let fewer = dir.join("fewer.jsonl");
    let text = std::fs::read_to_string(&sample).unwrap();
    let rows: Vec<&str> = text.lines().collect();
    std::fs::write(&fewer, rows[..rows.len() - 10].join("\n")).unwrap();
    let out = dir.join("run");
    let base = args(&out, &["--device", "cpu"], &[]);
    let with = |flag: &str, value: &str| {
        let mut a = base.clone();
        match a.iter().position(|x| x == flag) {
            Some(i) => a[i + 1] = value.into(),
            None => a.extend([flag.to_string(), value.to_string()]),
        }
        a
    };
    let cases = [
        (
            with("--lora-r", "8"),
            "rank 1 was started with other settings than rank 0: lora_r is 8 here, 4 on rank 0",
        ),
        (
            with("--data", fewer.to_str().unwrap()),
            "rank 1's training data",
        ),
    ];
    for (other, want) in cases {
        let (o, _) = mpirun_apps(
            &[(1, base.clone()), (1, other)],
            &[],
            Duration::from_secs(120),
        );
        let err = stderr(&o);
        assert!(!o.status.success(), "{err}");
        let ours: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
        assert_eq!(ours.len(), 1, "one line, from rank 0: {err}");
        assert!(ours[0].contains(want), "{want:?} not in: {err}");
        assert!(!out.exists(), "{want}: created {}", out.display());
    }
}

/// A stop signal (what Slurm's `scancel` sends every task; a user's `kill`): every rank gets
/// SIGTERM, here rank 1 a moment before rank 0, so they see it at different steps; they agree to
/// stop at the same step, rank 0 writes a checkpoint there and the run ends "interrupted".
#[test]
fn sigterm_to_the_ranks_stops_them_together_with_a_checkpoint() {
    let dir = scratch("mpi-sigterm");
    let out = dir.join("run");
    let mut a = args(&out, &["--device", "cpu"], &["--no-dashboard"]);
    let i = a.iter().position(|x| x == "--max-steps").unwrap();
    a[i + 1] = "400".into();
    let child = Command::new("mpirun")
        .args(["--allow-run-as-root", "--oversubscribe"])
        .args(["--mca", "btl_vader_single_copy_mechanism", "none"])
        .args(["-np", "2", env!("CARGO_BIN_EXE_phitune")])
        .args(&a)
        .env("HF_HUB_OFFLINE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mpirun");
    let logged = || {
        phitune_train::metrics::read(&out.join("metrics.jsonl"))
            .map(|r| r.iter().filter(|r| r.split == "train").count())
            .unwrap_or(0)
    };
    let start = Instant::now();
    while logged() < 3 {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The ranks are mpirun's children, in rank order.
    let ranks = Command::new("pgrep")
        .args(["-P", &child.id().to_string(), "phitune"])
        .output()
        .unwrap();
    let mut pids: Vec<u32> = String::from_utf8_lossy(&ranks.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect();
    pids.sort();
    assert_eq!(pids.len(), 2, "ranks: {pids:?}");
    for pid in pids.iter().rev() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        std::thread::sleep(Duration::from_millis(300));
    }
    let t = Instant::now();
    let o = child.wait_with_output().unwrap();
    let err = stderr(&o);
    assert!(t.elapsed() < Duration::from_secs(60), "{err}");
    assert!(o.status.success(), "{err}");
    assert!(err.contains("interrupted ("), "{err}");
    let steps = logged();
    let ckpt = out.join("checkpoints").join(format!("step-{steps:08}"));
    assert!(
        ckpt.is_dir(),
        "no checkpoint at the last step ({steps}): {err}"
    );
    assert!(steps < 400, "{err}");
}
