#pragma once

/// Process-wide memory settings that a DP training program may want (opt-in: a library must not
/// change the allocator of the process it is linked into on its own).
namespace dptorch {

/// Makes the C library's allocator keep freed memory for reuse: every block is served from the
/// heap (no per-allocation mmap) and the heap is never trimmed. A DP step allocates and frees
/// the same large temporaries every step (per-sample norms' inputs, the layers' recorded output
/// gradients); with glibc's defaults these come back as fresh pages each step, and on virtual
/// machines a fresh page costs 12–16 µs (docs/performance.md). The cost: the process keeps its
/// peak heap size until it exits. Call it once at the start of main(), before other threads run.
/// Returns whether it took effect (glibc only; elsewhere it does nothing and returns false).
bool keep_freed_memory() noexcept;

}  // namespace dptorch
