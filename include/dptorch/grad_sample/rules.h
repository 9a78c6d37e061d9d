#pragma once

#include <dptorch/common.h>

#include <torch/types.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

/// The per-sample gradient rules of docs/design.md §2: from what a layer recorded in forward and
/// backward, the per-sample squared norms, the weighted (clipped) sum, and on request the
/// materialised per-sample gradients. Stateless math is in free functions; the classes hold one
/// layer's tensors for one backward pass.
namespace dptorch::grad_sample {

// ---------------------------------------------------------------------------------------------
// Linear-like layers: activations a [B, T, G·d], output gradients g [B, T, G·p], G groups.
// Per sample and group, G_i = Σ_t g_t a_tᵀ ([p, d]).

/// ‖G_i‖² summed over groups, without forming G_i: Σ_{t,s} (a_t·a_s)(g_t·g_s) (Li et al. 2021).
[[nodiscard]] torch::Tensor ghost_norm_sq(const torch::Tensor& a, const torch::Tensor& g,
                                          int64_t groups);

/// G_i for every sample: [B, G·p, d].
[[nodiscard]] torch::Tensor materialize(const torch::Tensor& a, const torch::Tensor& g,
                                        int64_t groups);

/// Σ_i w_i G_i as one matmul over B·T rows: [G·p, d].
[[nodiscard]] torch::Tensor weighted_sum(const torch::Tensor& a, const torch::Tensor& g,
                                         const torch::Tensor& w, int64_t groups);

/// Whether materialising costs fewer flops than ghost norms: d·p <= T·(d + p) per group.
[[nodiscard]] bool materialize_is_cheaper(int64_t T, int64_t d, int64_t p);

/// Whether a convolution's (groups = 1, on the CPU) per-sample norms are cheaper by the fused
/// loop, which forms G_i tile by tile from the input (T·d·p multiply-adds at about twice the
/// speed of the ghost norms' batched Gram products, measured in bench/grad_sample_rules_bench),
/// than by ghost norms: d·p <= 2·T·(d + p).
[[nodiscard]] bool fused_conv_is_cheaper(int64_t T, int64_t d, int64_t p);

/// Unfolds a convolution input [B, C, S1..SD] into [B, T, C·k1..kD] patches, T = number of
/// output positions, columns in the order of the weight's [C, k1..kD] layout. Works for any D.
/// The result is a transposed view of a contiguous [B, C·k..., T] tensor (output positions
/// innermost). On the CPU, 1-D and 2-D float and double inputs take one gather loop; everything
/// else takes the device-generic torch operators.
[[nodiscard]] torch::Tensor unfold_patches(const torch::Tensor& input, at::IntArrayRef kernel,
                                           at::IntArrayRef stride, at::IntArrayRef padding,
                                           at::IntArrayRef dilation);

// ---------------------------------------------------------------------------------------------
// Embedding-like layers: N lookups, row index[n] of the table used by sample sample[n], with
// output gradient rows g [N, dim]. G_i = Σ_{n: sample[n]=i} e_{index[n]} g_nᵀ.

/// ‖G_i‖² = Σ_v ‖Σ_{n: sample[n]=i, index[n]=v} g_n‖² in O(N·dim) time and memory; never forms a
/// [B, vocab, dim] tensor.
[[nodiscard]] torch::Tensor embedding_norm_sq(const torch::Tensor& index,
                                              const torch::Tensor& sample, const torch::Tensor& g,
                                              int64_t batch_size, int64_t num_embeddings);

// ---------------------------------------------------------------------------------------------

/// Per-sample gradients of one layer's trainable parameters for one backward pass: the rule's
/// three answers (docs/design.md §2). Results are in the order of `names()`, for the gradient of
/// the loss as recorded (the caller rescales for the loss reduction).
class PerSampleGrads {
 public:
  virtual ~PerSampleGrads() = default;
  /// Local names of the parameters covered ("weight", "bias").
  [[nodiscard]] virtual std::vector<std::string> names() const = 0;
  /// Squared per-sample norms, [B] per parameter.
  [[nodiscard]] virtual std::vector<torch::Tensor> norm_sq() = 0;
  /// Σ_i w_i G_i per parameter, each with its own weights w [B].
  [[nodiscard]] virtual std::vector<torch::Tensor> weighted_sum(
      const std::vector<torch::Tensor>& w) = 0;
  /// Adds Σ_i w_i G_i into `out` (one tensor of each parameter's shape) in place. The default
  /// adds weighted_sum(); rules override it to write without a parameter-sized temporary.
  virtual void add_weighted_sum_to(const std::vector<torch::Tensor>& w,
                                   const std::vector<torch::Tensor>& out);
  /// The per-sample gradients [B, param shape...] per parameter (costly; on request only).
  [[nodiscard]] virtual std::vector<torch::Tensor> materialize() = 0;
};

/// Rule for Linear and Conv: weight [G·p, d] (viewed as the parameter's shape) and bias [G·p].
class LinearLikeGrads final : public PerSampleGrads {
 public:
  /// a [B, T, G·d], g [B, T, G·p]; `weight_shape` empty when the weight is frozen.
  LinearLikeGrads(torch::Tensor a, torch::Tensor g, int64_t groups,
                  std::vector<int64_t> weight_shape, bool has_bias, NormMethod method);
  std::vector<std::string> names() const override;
  std::vector<torch::Tensor> norm_sq() override;
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
  torch::Tensor weight_samples_;  // [B, G·p, d], formed once if needed
  torch::Tensor bias_samples_;    // [B, G·p]
};

/// How a convolution maps its (already padded) input to its output.
struct ConvGeometry {
  std::vector<int64_t> kernel, stride, padding, dilation;
  int64_t groups = 1;
};

/// Rule for convolutions. On the CPU (float or double, 1-D or 2-D, groups = 1) the weight's
/// per-sample norms come from a fused loop that forms each G_i one register tile at a time from
/// the sample's patches and never stores it, when fused_conv_is_cheaper (kAuto) or always
/// (kMaterialize). Otherwise they unfold the input a few samples at a time (each chunk's
/// temporaries stay near kChunkBytes), so the [B, T, C·k...] patch tensor is never formed whole.
/// The clipped sum is the convolution's own weight gradient of the per-sample weighted output
/// gradient, the same kernel the non-private backward runs.
class ConvGrads final : public PerSampleGrads {
 public:
  /// Bytes the temporaries of one chunk of samples aim at, by default.
  static constexpr int64_t kChunkBytes = int64_t{4} << 20;

  /// One input [B, C, S...] and output gradient [B, C_out, L...] per recorded call of the layer;
  /// `weight` is the layer's weight (read for its shape and dtype only), `train_weight` whether
  /// its per-sample gradients are wanted; `chunk_bytes` sizes the chunks of samples (at least one
  /// sample per chunk).
  ConvGrads(std::vector<torch::Tensor> inputs, std::vector<torch::Tensor> grad_outputs,
            torch::Tensor weight, bool train_weight, bool has_bias, ConvGeometry geometry,
            NormMethod method, int64_t chunk_bytes = kChunkBytes);
  std::vector<std::string> names() const override;
  std::vector<torch::Tensor> norm_sq() override;
  std::vector<torch::Tensor> weighted_sum(const std::vector<torch::Tensor>& w) override;
  std::vector<torch::Tensor> materialize() override;

 private:
  /// The linear-like rule of samples [begin, end): unfolded patches against output gradients.
  LinearLikeGrads chunk(int64_t begin, int64_t end, bool with_bias) const;
  /// The weight's per-sample result of every chunk's rule, concatenated over the batch.
  [[nodiscard]] torch::Tensor by_chunks(
      const std::function<torch::Tensor(LinearLikeGrads&)>& weight_result) const;
  /// Samples per chunk, from the per-sample sizes of the largest temporaries.
  [[nodiscard]] int64_t chunk_size() const;
  const torch::Tensor& bias_samples();

  std::vector<torch::Tensor> inputs_, grad_outputs_;
  torch::Tensor weight_;
  bool train_weight_, has_bias_;
  ConvGeometry geometry_;
  NormMethod method_;
  int64_t chunk_bytes_;
  torch::Tensor bias_samples_;  // [B, C_out]
};

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

/// Rule for parameters whose per-sample gradients are small enough to hold (norm layers'
/// affine parameters): they are formed once and everything else follows from them.
class MaterializedGrads final : public PerSampleGrads {
 public:
  /// One [B, param shape...] tensor per named parameter.
  MaterializedGrads(std::vector<std::string> names, std::vector<torch::Tensor> samples);
  std::vector<std::string> names() const override { return names_; }
  std::vector<torch::Tensor> norm_sq() override;
  std::vector<torch::Tensor> weighted_sum(const std::vector<torch::Tensor>& w) override;
  void add_weighted_sum_to(const std::vector<torch::Tensor>& w,
                           const std::vector<torch::Tensor>& out) override;
  std::vector<torch::Tensor> materialize() override { return samples_; }

 private:
  std::vector<std::string> names_;
  std::vector<torch::Tensor> samples_;
};

}  // namespace dptorch::grad_sample
