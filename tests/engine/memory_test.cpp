#include <dptorch/memory.h>

#include <gtest/gtest.h>
#include <sys/resource.h>
#include <torch/torch.h>

namespace dptorch {
namespace {

long minor_faults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

// Whether this build runs on glibc's own allocator (a sanitizer replaces it, and its mallopt
// refuses every setting).
#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__)
constexpr bool kGlibcMalloc = true;
#else
constexpr bool kGlibcMalloc = false;
#endif

// keep_freed_memory() takes effect exactly where glibc's allocator runs. There, a 64 MB block
// allocated and freed over and over (above glibc's largest mmap threshold, so by default mapped
// fresh every time: 16,384 faults of 4 KiB pages) is reused from the heap.
TEST(KeepFreedMemory, AFreedLargeBlockComesBackWithoutFreshPages) {
  ASSERT_EQ(keep_freed_memory(), kGlibcMalloc);
  if (!kGlibcMalloc) return;  // nothing changed, nothing to measure
  auto round = [] { (void)torch::ones({int64_t{16} << 20}); };
  for (int warm = 0; warm < 3; ++warm) round();
  const long before = minor_faults();
  round();
  EXPECT_LT(minor_faults() - before, 1000);
}

}  // namespace
}  // namespace dptorch
