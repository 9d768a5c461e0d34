//! GPU kernel preparation, visible and paid once. On a CubeCL device (CUDA, wgpu) every kernel
//! is compiled on first use (NVRTC on CUDA) and Burn's matmul autotuner compiles and times some
//! 25 candidates per class of shapes; on a fresh machine the first forward pass of phi-2 can
//! spend minutes there. This module
//!
//! - keeps CubeCL's caches in one per-user directory (`PHITUNE_CACHE`, default
//!   `~/.cache/phitune/cubecl`): the autotune results (per device and CubeCL version) and, on
//!   CUDA, the compiled kernels (PTX), so a second run on the same GPU starts from them,
//!   whatever its working directory (CubeCL's default is the `target/` of the enclosing Cargo
//!   project, or nothing); `PHITUNE_CACHE=off` leaves CubeCL's own settings alone;
//! - routes CubeCL's compilation and autotune messages through the `log` crate into counters,
//!   and shows them on stderr while kernels are being prepared ("preparing GPU kernels: ...",
//!   then the count of kernels compiled and shapes tuned), so a user never faces minutes of
//!   silence; a full-screen dashboard silences it ([`phitune_model::io::terminal_taken`]);
//! - says at the end how many kernels the process compiled and tuned (the cold-start figures in
//!   docs/performance.md come from that line).
//!
//! A `cubecl.toml` in the working directory (or `CUBECL_*` variables) still applies: its
//! settings are read first and only the cache locations and the log routing are changed.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// What CubeCL reported so far in this process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Kernels compiled (each one a compilation by NVRTC / the WGSL or SPIR-V compiler).
    pub compiled: usize,
    /// Autotune keys tuned (a class of shapes whose candidates were timed).
    pub tuned: usize,
    /// Autotune results read back from the cache directory.
    pub cached: usize,
}

static COMPILED: AtomicUsize = AtomicUsize::new(0);
static TUNED: AtomicUsize = AtomicUsize::new(0);
static CACHED: AtomicUsize = AtomicUsize::new(0);
/// Milliseconds since [`setup`] of the last compilation or tuning; 0 before the first.
static LAST_ACTIVITY_MS: AtomicU64 = AtomicU64::new(0);
static STARTED: OnceLock<Instant> = OnceLock::new();
static CACHE_DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
static REPORTED: AtomicBool = AtomicBool::new(false);

pub fn counts() -> Counts {
    Counts {
        compiled: COMPILED.load(Ordering::Relaxed),
        tuned: TUNED.load(Ordering::Relaxed),
        cached: CACHED.load(Ordering::Relaxed),
    }
}

/// The cache directory in use (None: CubeCL's own settings).
pub fn cache_dir() -> Option<PathBuf> {
    CACHE_DIR.get().cloned().flatten()
}

/// Where the caches go: `PHITUNE_CACHE`, else `$XDG_CACHE_HOME/phitune/cubecl`, else
/// `~/.cache/phitune/cubecl`; None for `PHITUNE_CACHE=off` (or no home directory).
fn cache_root() -> Option<PathBuf> {
    match std::env::var_os("PHITUNE_CACHE") {
        Some(v) if v == "off" => None,
        Some(v) if !v.is_empty() => Some(PathBuf::from(v)),
        _ => std::env::var_os("XDG_CACHE_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .map(|c| c.join("phitune").join("cubecl")),
    }
}

/// Sets CubeCL up for this process (once; before any GPU client exists) and starts the
/// progress reporter.
pub fn setup() -> Result<()> {
    if CACHE_DIR.get().is_some() {
        return Ok(());
    }
    let root = cache_root();
    if let Some(root) = &root {
        std::fs::create_dir_all(root).with_context(|| {
            format!(
                "cannot create the GPU kernel cache {} (set PHITUNE_CACHE to another directory, or to off)",
                root.display()
            )
        })?;
    }
    let _ = CACHE_DIR.set(root.clone());
    STARTED.get_or_init(Instant::now);
    configure_cubecl(root);
    if log::set_boxed_logger(Box::new(CubeclLog)).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    std::thread::Builder::new()
        .name("gpu-kernels".into())
        .spawn(report)
        .context("starting the GPU kernel reporter")?;
    Ok(())
}

#[cfg(any(feature = "cuda-backend", feature = "wgpu"))]
fn configure_cubecl(root: Option<PathBuf>) {
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::compilation::CompilationLogLevel;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    // The user's cubecl.toml and CUBECL_* variables first, as CubeCL itself would read them.
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if let Some(root) = root {
        config.autotune.cache = CacheConfig::File(root.clone());
        config.compilation.cache = Some(CacheConfig::File(root));
    }
    if matches!(
        config.compilation.logger.level,
        CompilationLogLevel::Disabled
    ) {
        config.compilation.logger.level = CompilationLogLevel::Basic;
    }
    // Also to the `log` crate at level info (cubecl-common's `LogCrateLevel`, which cubecl does
    // not re-export; named through its serde form).
    config.compilation.logger.log = serde_json::from_str("\"info\"").ok();
    config.autotune.logger.log = serde_json::from_str("\"info\"").ok();
    // Only possible before CubeCL has read its configuration (`set` panics after): `setup` runs
    // before any device exists, so this is the first time.
    let unread = CubeClRuntimeConfig::storage().lock().is_none();
    if unread {
        CubeClRuntimeConfig::set(config);
    }
}

#[cfg(not(any(feature = "cuda-backend", feature = "wgpu")))]
fn configure_cubecl(_: Option<PathBuf>) {}

fn now_ms() -> u64 {
    STARTED
        .get()
        .map_or(0, |s| s.elapsed().as_millis() as u64)
        .max(1)
}

/// Counts CubeCL's messages; everything else logged through `log` is dropped, as it was before
/// a logger existed.
struct CubeclLog;

impl log::Log for CubeclLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.target().starts_with("cubecl")
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let msg = record.args().to_string();
        if msg.starts_with("[Compiling kernel]") || msg.starts_with("[START_KERNEL_COMPILATION]") {
            COMPILED.fetch_add(1, Ordering::Relaxed);
        } else if msg.starts_with("Fastest result") {
            TUNED.fetch_add(1, Ordering::Relaxed);
        } else if let Some(n) = msg
            .strip_prefix("Loaded ")
            .and_then(|r| r.strip_suffix(" autotune cached entries"))
            .and_then(|n| n.parse::<usize>().ok())
        {
            CACHED.fetch_add(n, Ordering::Relaxed);
            return;
        } else {
            return;
        }
        LAST_ACTIVITY_MS.store(now_ms(), Ordering::Relaxed);
    }

    fn flush(&self) {}
}

/// The reporter: once CubeCL has been compiling or tuning for 2 s, a status on stderr (one line
/// rewritten in a terminal, a line every 10 s otherwise), and a summary line once it has been
/// quiet for 3 s. Shorter bursts (a kernel or two for a new shape) pass silently.
fn report() {
    let tty = std::io::stderr().is_terminal();
    let mut burst: Option<u64> = None;
    let mut announced = false;
    let mut last_line = 0u64;
    let mut base = Counts::default();
    loop {
        std::thread::sleep(Duration::from_millis(250));
        let last = LAST_ACTIVITY_MS.load(Ordering::Relaxed);
        if last == 0 {
            continue;
        }
        let (now, c) = (now_ms(), counts());
        let active = now.saturating_sub(last) < 3000;
        let quiet = phitune_model::io::terminal_taken();
        let since = *burst.get_or_insert(now);
        if !active {
            if announced && !quiet {
                if tty {
                    eprint!("\r\x1b[2K");
                }
                eprintln!(
                    "GPU kernels ready: {} compiled, {} shapes tuned in {:.0} s",
                    c.compiled - base.compiled,
                    c.tuned - base.tuned,
                    (last.saturating_sub(since)) as f64 / 1000.0
                );
            }
            (burst, announced, base) = (None, false, c);
            continue;
        }
        if !announced && now - since >= 2000 && !quiet {
            let first = !REPORTED.swap(true, Ordering::Relaxed) && c.cached == 0;
            let dir = cache_dir().map_or("not kept: PHITUNE_CACHE=off".into(), |d| {
                d.display().to_string()
            });
            if first {
                eprintln!(
                    "preparing GPU kernels: compiling and tuning, first run on this GPU only (cache: {dir})"
                );
            } else {
                eprintln!(
                    "preparing GPU kernels: compiling and tuning for shapes not met before (cache: {dir})"
                );
            }
            (announced, last_line) = (true, now);
        } else if announced && !quiet && (tty || now - last_line >= 10_000) {
            let line = format!(
                "  {} kernels compiled, {} shapes tuned ({:.0} s)",
                c.compiled - base.compiled,
                c.tuned - base.tuned,
                (now - since) as f64 / 1000.0
            );
            if tty {
                eprint!("\r\x1b[2K{line}");
                let _ = std::io::stderr().flush();
            } else {
                eprintln!("{line}");
            }
            last_line = now;
        }
    }
}
