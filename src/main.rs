//! `phitune`: fine-tune Phi-2 on persona-grounded dialogue with QLoRA, on Burn. The binary parses
//! the command line (`cli.rs`), picks the backend and device (`backend.rs`, `gpu_kernels.rs` for
//! CubeCL's compile cache and progress) and runs one command from `cmd/`; the work itself lives
//! in the `phitune-model`, `phitune-data` and `phitune-train` crates. See ARCHITECTURE.md for the
//! map of the workspace.

// `unsafe` only where each use is named and justified: mimalloc's option call.
#![deny(unsafe_code)]

mod backend;
mod cli;
mod cmd;
mod gpu_kernels;

use std::process::ExitCode;

use clap::Parser;

// Training allocates and frees the same large tensors (logits, activations) every step; glibc
// returns blocks over 32 MiB to the kernel on free, so each step paid page faults to map them
// again. mimalloc keeps and reuses them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (v2's option enum; checked against its default below).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory mapped instead of purging it 10 ms later: the next step reuses it, and the
/// peak (what the process holds anyway) does not change.
fn keep_freed_memory() {
    // SAFETY: both calls only read or write one of mimalloc's global option slots; an option
    // index is range-checked by mimalloc itself.
    #[allow(unsafe_code)]
    unsafe {
        if libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) == 10 {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

fn main() -> ExitCode {
    keep_freed_memory();
    // A panic is a bug, but the user still gets one line, not a backtrace.
    std::panic::set_hook(Box::new(|info| {
        let msg = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        phitune_model::error::print_error_line(&format!(
            "internal error: {}{at} (please report this)",
            msg.lines().next().unwrap_or("")
        ));
    }));

    let cli = match cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind::*;
            if matches!(
                e.kind(),
                DisplayHelp | DisplayVersion | DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                let _ = e.print();
                return if e.kind() == DisplayHelpOnMissingArgumentOrSubcommand {
                    ExitCode::from(2)
                } else {
                    ExitCode::SUCCESS
                };
            }
            // clap's message up to the usage block, folded onto one line.
            let rendered = e.render().to_string();
            let msg: Vec<&str> = rendered
                .lines()
                .take_while(|l| !l.starts_with("Usage:"))
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with("tip:"))
                .collect();
            eprintln!("{} (see --help)", msg.join(" "));
            return ExitCode::from(2);
        }
    };
    match std::panic::catch_unwind(|| cmd::run(cli.command)) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            phitune_model::error::print_error_line(&one_line(&e));
            ExitCode::FAILURE
        }
        Err(_) => ExitCode::from(101),
    }
}

/// The error and its causes on one line, without repeating a cause already in the message.
pub(crate) fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let s = cause.to_string();
        if out.contains(&s) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&s);
    }
    out.replace('\n', " ")
}
