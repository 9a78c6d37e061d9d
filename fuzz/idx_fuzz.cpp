// The IDX reader on arbitrary bytes, as a plain file and as a ".gz" name (zlib reads both).
#include <dptorch/data/idx.h>

#include <c10/util/Exception.h>

#include "fuzz_util.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string path = dptorch::fuzz::scratch_file(data, size, ".idx");
  try {
    const auto tensor = dptorch::data::read_idx(path);
    (void)tensor.numel();
  } catch (const c10::Error&) {
  }
  return 0;
}
