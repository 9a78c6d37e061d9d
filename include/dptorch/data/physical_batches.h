#pragma once

#include <torch/data/example.h>
#include <torch/types.h>

#include <cstdint>
#include <vector>

namespace dptorch::data {

/// One physical chunk of a logical batch: rows [begin, begin + data.size(0)) of it.
struct PhysicalBatch {
  /// Inputs of the chunk, a view of the logical batch's data.
  torch::Tensor data;
  /// Targets of the chunk, a view of the logical batch's target.
  torch::Tensor target;
  /// Position of the chunk in the logical batch, from 0.
  int64_t index = 0;
  /// Whether this is the last chunk: run the optimiser step after its backward.
  bool is_last = false;
};

/// Splits a logical batch (rows along dimension 0 of data and target) into physical batches of
/// at most `max_physical_batch_size` rows, in order, without copying: the virtual steps of
/// docs/design.md §4, what Opacus's BatchMemoryManager does. An empty logical batch yields exactly
/// one empty chunk, so that the optimiser still steps (and adds its noise). Example:
///   for (const auto& chunk : dptorch::data::physical_batches(loader.next(), 128)) {
///     loss_fn(model->forward(chunk.data), chunk.target).backward();
///     clipper.clip_and_accumulate();
///     if (chunk.is_last) optimizer.step();
///   }
[[nodiscard]] std::vector<PhysicalBatch> physical_batches(const torch::data::Example<>& logical,
                                                          int64_t max_physical_batch_size);

}  // namespace dptorch::data
