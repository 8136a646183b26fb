//! A global allocator that counts this thread's allocations and reallocations (tests run on
//! several threads), for tests that check a hot path allocates nothing. Included with
//! `#[path]` by `tests/alloc.rs` and the library's `stats` unit tests: one per test binary.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

thread_local!(static N: Cell<u64> = const { Cell::new(0) });

/// This thread's allocations and reallocations so far.
pub fn get() -> u64 {
    N.with(|n| n.get())
}

struct Counting;

// SAFETY: every method forwards to the system allocator with the caller's arguments.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = N.try_with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded contract.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, s: usize) -> *mut u8 {
        let _ = N.try_with(|n| n.set(n.get() + 1));
        // SAFETY: forwarded contract.
        unsafe { System.realloc(p, l, s) }
    }
}

#[global_allocator]
static A: Counting = Counting;
