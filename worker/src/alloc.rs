//! The allocator setting the worker-side binaries run with (`lemur-worker`, `lemur-serve`,
//! `lemur-profile`, whose global allocator is mimalloc).
//!
//! candle allocates every op's output and the quantized kernels their activation blocks and
//! partial results: megabytes per op in a prompt. mimalloc (v3) by default gives freed pages
//! back to the kernel after a delay, and a prompt's ops faulted them back in, zeroed, as
//! they went (a 512-token SmolLM2 prefill: 97,000 page faults in five runs, the kernel's
//! `clear_page` 18% of the profile). With purging off, the process keeps what it freed for
//! reuse: 1,000 faults, and resident memory stays at the run's high-water mark (7% above
//! the peak of that prefill with purging) instead of falling back between steps.

#![allow(unsafe_code)]

/// mimalloc's `mi_option_purge_delay` (its place in `mi_option_e`, mimalloc.h, v3).
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keep freed memory for reuse instead of returning it to the kernel. Call first thing in
/// `main`, before any other thread exists.
pub fn keep_freed_memory() {
    // SAFETY: mimalloc's options are plain integers read when it next purges; setting one
    // before other threads exist races with nothing.
    unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, -1) };
}

#[cfg(test)]
mod tests {
    /// The option is the one mimalloc calls `purge_delay` (its default in v3 is 1000 ms).
    #[test]
    fn the_option_is_purge_delay() {
        // SAFETY: reads an option.
        let before = unsafe { libmimalloc_sys::mi_option_get(super::PURGE_DELAY) };
        assert_eq!(before, 1000, "mimalloc's purge delay default moved: is option 15 still purge_delay?");
    }
}
