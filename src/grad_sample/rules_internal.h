#pragma once

// Internals of the per-sample gradient rules, shared by grad_sample/*.cpp, the tests and the
// benchmark:
// the public API is dptorch/grad_sample/rules.h.

#include <torch/types.h>

#include <cstdint>
#include <vector>

namespace dptorch::grad_sample::detail {

// ‖x_i‖² over every dimension but the first, without forming x².
inline torch::Tensor row_norm_sq(const torch::Tensor& x) {
  return at::linalg_vector_norm(x.flatten(1), 2, {1}).square();
}

// Per-sample weights w [B] broadcast over a [B, ...] tensor.
inline torch::Tensor broadcast_weights(const torch::Tensor& w, const torch::Tensor& like) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape[0] = w.size(0);
  return w.to(like.scalar_type()).view(shape);
}

// Whether the CPU loops of cpu_kernels.h take a tensor: on the CPU, float or double.
inline bool cpu_kernel_dtype(const torch::Tensor& t) {
  return t.device().is_cpu() &&
         (t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kDouble);
}

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
