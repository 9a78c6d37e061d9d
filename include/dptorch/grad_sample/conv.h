#pragma once

#include <dptorch/common.h>
#include <dptorch/grad_sample/linear.h>
#include <dptorch/grad_sample/per_sample_grads.h>

#include <torch/types.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

/// The rule of convolutions: patches of the input against the output gradient, a few samples at a
/// time, with a fused CPU loop for the norms.
namespace dptorch::grad_sample {

// ---------------------------------------------------------------------------------------------
// Convolutions: unfolded to the linear-like form, T = output positions.

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

}  // namespace dptorch::grad_sample
