#pragma once

#include <torch/nn/modules/container/sequential.h>

namespace dptorch::nn {

/// Converts a Sequential of torch::nn layers into one of dptorch::nn twins, weights and buffers
/// copied (the result shares nothing with `model`). Linear, Conv1d/2d/3d, Embedding,
/// EmbeddingBag, LayerNorm, GroupNorm and InstanceNorm1d/2d/3d are converted; nested Sequentials
/// are converted recursively; modules without parameters (activations, pooling, dropout, ...)
/// are cloned as they are. Anything else with parameters is refused, naming its path.
///
/// Example:
///   auto model = dptorch::nn::convert(torch::nn::Sequential(torch::nn::Linear(4, 2)));
[[nodiscard]] torch::nn::Sequential convert(const torch::nn::Sequential& model);

}  // namespace dptorch::nn
