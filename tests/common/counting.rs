//! A global allocator that counts live heap bytes and the peak, for the memory tests (each its
//! own test binary with one test, so that nothing else allocates meanwhile):
//! `#[path = "common/counting.rs"] mod counting;`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(l) };
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Ordering::Relaxed) + l.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) };
        LIVE.fetch_sub(l.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Live heap bytes now.
pub fn live() -> usize {
    LIVE.load(Ordering::SeqCst)
}

/// Starts measuring: returns the live bytes, from which [`peak_since`] counts.
pub fn start() -> usize {
    let base = live();
    PEAK.store(base, Ordering::SeqCst);
    base
}

/// The peak heap growth since [`start`] returned `base`.
pub fn peak_since(base: usize) -> usize {
    PEAK.load(Ordering::SeqCst).saturating_sub(base)
}
