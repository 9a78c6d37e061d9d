#pragma once

#include <dptorch/common.h>
#include <dptorch/grad_sample/per_sample_grads.h>

#include <torch/types.h>

#include <memory>
#include <string>
#include <vector>

/// The rule of embedding lookups (Embedding, EmbeddingBag): norms that never form a
/// [B, num_embeddings, dim] tensor.
namespace dptorch::grad_sample {

// ---------------------------------------------------------------------------------------------
// Embedding-like layers: N lookups, row index[n] of the table used by sample sample[n], with
// output gradient rows g [N, dim]. G_i = Σ_{n: sample[n]=i} e_{index[n]} g_nᵀ.

/// ‖G_i‖² = Σ_v ‖Σ_{n: sample[n]=i, index[n]=v} g_n‖² in O(N·dim) time and memory; never forms a
/// [B, vocab, dim] tensor.
[[nodiscard]] torch::Tensor embedding_norm_sq(const torch::Tensor& index,
                                              const torch::Tensor& sample, const torch::Tensor& g,
                                              int64_t batch_size, int64_t num_embeddings);

/// Rule for Embedding and EmbeddingBag: weight [num_embeddings, dim].
class EmbeddingGrads final : public PerSampleGrads {
 public:
  /// index [N] rows used, sample [N] their samples, g the gradient rows: [N, dim], or
  /// [B, T, dim] with any strides over B and T (N = B·T, row n = g[n / T][n % T]; an output
  /// gradient expanded over the positions is read without a copy on the CPU).
  EmbeddingGrads(torch::Tensor index, torch::Tensor sample, torch::Tensor g, int64_t batch_size,
                 int64_t num_embeddings);
  std::vector<std::string> names() const override;
  std::vector<torch::Tensor> norm_sq() override;
  std::vector<torch::Tensor> weighted_sum(const std::vector<torch::Tensor>& w) override;
  void add_weighted_sum_to(const std::vector<torch::Tensor>& w,
                           const std::vector<torch::Tensor>& out) override;
  std::vector<torch::Tensor> materialize() override;

 private:
  torch::Tensor index_, sample_, g_;
  int64_t batch_size_, num_embeddings_;
};

}  // namespace dptorch::grad_sample
