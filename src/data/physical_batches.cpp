#include "dptorch/data/physical_batches.h"
#include <dptorch/common.h>

#include <algorithm>

namespace dptorch::data {

std::vector<PhysicalBatch> physical_batches(const torch::data::Example<>& logical,
                                            int64_t max_physical_batch_size) {
  dptorch::detail::check_at_least("max_physical_batch_size", max_physical_batch_size, 1);
  TORCH_CHECK_VALUE(logical.data.defined() && logical.target.defined(),
                    "the logical batch needs defined data and target tensors");
  TORCH_CHECK_VALUE(logical.data.dim() >= 1 && logical.target.dim() >= 1,
                    "the logical batch needs its rows in dimension 0, but data has shape ",
                    logical.data.sizes(), " and target has shape ", logical.target.sizes());
  const int64_t rows = logical.data.size(0);
  TORCH_CHECK_VALUE(logical.target.size(0) == rows, "the logical batch's data has ", rows,
                    " rows but its target has ", logical.target.size(0),
                    "; both need the same rows in dimension 0");

  const int64_t count =
      std::max<int64_t>(1, (rows + max_physical_batch_size - 1) / max_physical_batch_size);
  std::vector<PhysicalBatch> chunks;
  chunks.reserve(static_cast<size_t>(count));
  for (int64_t i = 0; i < count; ++i) {
    const int64_t begin = i * max_physical_batch_size;
    const int64_t length = std::min(max_physical_batch_size, rows - begin);
    chunks.push_back({logical.data.narrow(0, begin, length),
                      logical.target.narrow(0, begin, length), i, i == count - 1});
  }
  return chunks;
}

}  // namespace dptorch::data
