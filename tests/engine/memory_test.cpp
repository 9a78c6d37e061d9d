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

// A 64 MB block allocated and freed over and over (above glibc's largest mmap threshold, so by
// default mapped fresh every time: 16,384 faults of 4 KiB pages) is reused from the heap.
TEST(KeepFreedMemory, AFreedLargeBlockComesBackWithoutFreshPages) {
#if defined(__SANITIZE_ADDRESS__)
  GTEST_SKIP() << "the sanitizer's allocator replaces glibc's";
#elif defined(__GLIBC__)
  ASSERT_TRUE(keep_freed_memory());
  auto round = [] { (void)torch::ones({int64_t{16} << 20}); };
  for (int warm = 0; warm < 3; ++warm) round();
  const long before = minor_faults();
  round();
  EXPECT_LT(minor_faults() - before, 1000);
#else
  EXPECT_FALSE(keep_freed_memory());
#endif
}

}  // namespace
}  // namespace dptorch
