#pragma once

#include <dptorch/nn/layer.h>

#include <torch/nn/modules/embedding.h>

#include <memory>
#include <vector>

/// The embedding family (its rule: grad_sample::EmbeddingGrads). Per-sample norms never form a
/// [B, num_embeddings, dim] tensor.
namespace dptorch::nn {

/// What Embedding saves per call: the looked-up indices and their batch dimension.
struct EmbeddingSaved {
  torch::Tensor input;
  int64_t batch_dim = 0;
};

/// Twin of torch::nn::Embedding (padding_idx supported; max_norm and scale_grad_by_freq are
/// refused: the first rewrites the table in forward, the second mixes samples).
class EmbeddingImpl : public TwinLayer<EmbeddingImpl, torch::nn::Embedding, EmbeddingSaved> {
 public:
  EmbeddingImpl(int64_t num_embeddings, int64_t embedding_dim)
      : EmbeddingImpl(torch::nn::EmbeddingOptions(num_embeddings, embedding_dim)) {}
  explicit EmbeddingImpl(const torch::nn::EmbeddingOptions& options);
  /// Looks up the rows `input` (integer tensor of any shape).
  torch::Tensor forward(const torch::Tensor& input);

  /// [num_embeddings, embedding_dim]
  torch::Tensor weight;

 protected:
  friend class TwinLayer<EmbeddingImpl, torch::nn::Embedding, EmbeddingSaved>;
  void adopt();
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(
      std::vector<Call<EmbeddingSaved>> calls) override;
};
TORCH_MODULE(Embedding);

/// What EmbeddingBag saves per call: per lookup, the row, the bag (sample) it belongs to, and
/// the factor the row enters its bag with.
struct EmbeddingBagSaved {
  torch::Tensor index, sample, factor;
};

/// Twin of torch::nn::EmbeddingBag in modes kSum and kMean (each bag is one sample), with
/// offsets, include_last_offset, padding_idx, and constant per_sample_weights in kSum.
class EmbeddingBagImpl
    : public TwinLayer<EmbeddingBagImpl, torch::nn::EmbeddingBag, EmbeddingBagSaved> {
 public:
  EmbeddingBagImpl(int64_t num_embeddings, int64_t embedding_dim)
      : EmbeddingBagImpl(torch::nn::EmbeddingBagOptions(num_embeddings, embedding_dim)) {}
  explicit EmbeddingBagImpl(const torch::nn::EmbeddingBagOptions& options);
  /// Reduces the bags given by `input` ([B, L], or 1-D with `offsets`) to [B, embedding_dim].
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& offsets = {},
                        const torch::Tensor& per_sample_weights = {});

  /// [num_embeddings, embedding_dim]
  torch::Tensor weight;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())},
                           {2, torch::nn::AnyValue(torch::Tensor())})
  friend class TwinLayer<EmbeddingBagImpl, torch::nn::EmbeddingBag, EmbeddingBagSaved>;
  void adopt();
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(
      std::vector<Call<EmbeddingBagSaved>> calls) override;
};
TORCH_MODULE(EmbeddingBag);

}  // namespace dptorch::nn
