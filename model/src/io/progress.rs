//! Progress bars for long work (downloads, loading, merging).

/// A progress bar on stderr (hidden automatically when stderr is not a terminal).
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ({elapsed})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

static TERMINAL_TAKEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Marks the terminal as drawn by a full-screen view (the training dashboard) or released:
/// background status lines (the GPU kernel reporter) stay silent meanwhile.
pub fn set_terminal_taken(taken: bool) {
    TERMINAL_TAKEN.store(taken, std::sync::atomic::Ordering::Relaxed)
}

/// See [`set_terminal_taken`].
pub fn terminal_taken() -> bool {
    TERMINAL_TAKEN.load(std::sync::atomic::Ordering::Relaxed)
}
