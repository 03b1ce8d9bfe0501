//! How the process keeps memory that libtorch frees. libtorch takes every CPU tensor from
//! `malloc`; glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh mappings and
//! unmaps them on free, so each training step of 64 bags (several 256 MiB activations) would
//! fault in and zero gigabytes of new pages. Keeping freed blocks in the heap removes that cost
//! (measured by `hmil-flow bench epoch`); the price is that the process keeps its peak heap.

/// Serves large blocks from the heap and keeps up to 2 GiB of freed memory for reuse. Process-wide;
/// call once at start-up, before tensors are allocated. Does nothing on other C libraries.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // exists and its failure (return 0) leaves the defaults, which are correct, only slower.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}
