#pragma once

#include <dptorch/common.h>
#include <dptorch/grad_sample/per_sample_grads.h>

#include <torch/types.h>

#include <memory>
#include <string>
#include <vector>

/// The rule of linear-like layers (Linear, and every product y = a Wᵀ + b): ghost norms or
/// materialisation, by cost, and the clipped sum as one matmul over B·T rows.
namespace dptorch::grad_sample {

// Linear-like layers: activations a [B, T, G·d], output gradients g [B, T, G·p], G groups.
// Per sample and group, G_i = Σ_t g_t a_tᵀ ([p, d]).

/// Gram matrices [B·G, T, T] of activations or output gradients [B, T, G·c]: those of the
/// `shared` tensors are formed once and kept, so that rules over the same tensor reuse them (a
/// recurrent layer's input and hidden products share the gates' output gradient); any other is
/// formed on each request. Tensors are matched by identity.
class GramCache {
 public:
  explicit GramCache(std::vector<torch::Tensor> shared) : shared_(std::move(shared)) {}
  torch::Tensor gram(const torch::Tensor& x, int64_t groups);

 private:
  std::vector<torch::Tensor> shared_;
  struct Entry {
    torch::Tensor x;
    int64_t groups;
    torch::Tensor gram;
  };
  std::vector<Entry> entries_;
};

/// ‖G_i‖² summed over groups, without forming G_i: Σ_{t,s} (a_t·a_s)(g_t·g_s) (Li et al. 2021).
/// With `cache`, the Gram matrices come from it.
[[nodiscard]] torch::Tensor ghost_norm_sq(const torch::Tensor& a, const torch::Tensor& g,
                                          int64_t groups, GramCache* cache = nullptr);

/// G_i for every sample: [B, G·p, d]. With `norms_sq`, also ‖G_i‖² summed over groups ([B]),
/// formed with G_i tile by tile where the processor's register tile outruns the batched matmul
/// (AVX-512; groups 1, float or double on the CPU), otherwise by one pass over G_i.
[[nodiscard]] torch::Tensor materialize(const torch::Tensor& a, const torch::Tensor& g,
                                        int64_t groups, torch::Tensor* norms_sq = nullptr);

/// Σ_i w_i G_i as one matmul over B·T rows: [G·p, d].
[[nodiscard]] torch::Tensor weighted_sum(const torch::Tensor& a, const torch::Tensor& g,
                                         const torch::Tensor& w, int64_t groups);

/// Whether materialising costs fewer flops than ghost norms: d·p <= T·(d + p) per group.
[[nodiscard]] bool materialize_is_cheaper(int64_t T, int64_t d, int64_t p);

/// Whether forming G_i [p, d] as backward files a product over T positions and keeping them
/// (two passes over B·p·d values: norms, clipped sum) costs less than the rule after backward
/// (norms by the cheaper of Gram matrices and materialisation, then the clipped sum by a matmul
/// of the weight gradient's size, unless the norms materialised G_i). A single position never
/// gains: its sum's matmul is as cheap as a pass over G_i.
bool keep_is_cheaper(int64_t T, int64_t d, int64_t p);

/// Rule for Linear and Conv: weight [G·p, d] (viewed as the parameter's shape) and bias [G·p].
class LinearLikeGrads final : public PerSampleGrads {
 public:
  /// a [B, T, G·d], g [B, T, G·p]; `weight_shape` empty when the weight is frozen.
  LinearLikeGrads(torch::Tensor a, torch::Tensor g, int64_t groups,
                  std::vector<int64_t> weight_shape, bool has_bias, NormMethod method);
  std::vector<std::string> names() const override;
  std::vector<torch::Tensor> norm_sq() override;
  /// norm_sq(), its ghost norms' Gram matrices from `cache` (shared with other rules).
  std::vector<torch::Tensor> norm_sq(GramCache* cache);
  std::vector<torch::Tensor> weighted_sum(const std::vector<torch::Tensor>& w) override;
  void add_weighted_sum_to(const std::vector<torch::Tensor>& w,
                           const std::vector<torch::Tensor>& out) override;
  std::vector<torch::Tensor> materialize() override;
  /// Whether the weight's norms are computed by materialising (after the cost model).
  [[nodiscard]] bool materializes() const { return materialize_; }
  /// add_weighted_sum_to() scales the output gradient of this many bytes of samples at a time.
  static constexpr int64_t kSumChunkBytes = int64_t{1} << 20;

 private:
  const torch::Tensor& weight_samples();
  const torch::Tensor& bias_samples();

  torch::Tensor a_, g_;
  int64_t groups_;
  std::vector<int64_t> weight_shape_;
  bool has_bias_;
  bool materialize_;
  torch::Tensor weight_samples_;   // [B, G·p, d], formed once if needed
  torch::Tensor weight_norms_sq_;  // [B], formed with weight_samples_
  torch::Tensor bias_samples_;     // [B, G·p]
};

}  // namespace dptorch::grad_sample
