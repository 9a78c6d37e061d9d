#include <dptorch/memory.h>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <climits>

namespace dptorch {

bool keep_freed_memory() noexcept {
#if defined(__GLIBC__)
  // mallopt returns 1 on success.
  return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1;
#else
  return false;
#endif
}

}  // namespace dptorch
