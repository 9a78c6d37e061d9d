#pragma once

// Internals of the per-sample gradient rules, shared by rules.cpp, the tests and the benchmark:
// the public API is dptorch/grad_sample/rules.h.

#include <torch/types.h>

#include <cstdint>

namespace dptorch::grad_sample::detail {

/// The device-generic implementations (torch operators only) behind unfold_patches and
/// embedding_norm_sq, which take them wherever their CPU loops do not apply; exposed so that
/// tests can hold the two paths to the same results.
[[nodiscard]] torch::Tensor unfold_patches_generic(const torch::Tensor& input,
                                                   at::IntArrayRef kernel, at::IntArrayRef stride,
                                                   at::IntArrayRef padding,
                                                   at::IntArrayRef dilation);
[[nodiscard]] torch::Tensor embedding_norm_sq_generic(const torch::Tensor& index,
                                                      const torch::Tensor& sample,
                                                      const torch::Tensor& g, int64_t batch_size,
                                                      int64_t num_embeddings);

}  // namespace dptorch::grad_sample::detail
