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

/// How a convolution maps its (already padded) input to its output.
struct ConvGeometry {
  std::vector<int64_t> kernel, stride, padding, dilation;
  int64_t groups = 1;
};

/// The three ways to a convolution's per-sample weight norms. Each ends in the same clipped
/// sum Σ_i w_i G_i: from the kept G_i where kMaterialize could keep them, otherwise by the
/// convolution's own weight-gradient kernel on the per-sample weighted output gradient.
enum class ConvPath {
  /// G_i for a chunk of samples at a time by conv_weight_samples (the convolution's own kernel
  /// with the batch folded into the groups, or the register tile of kFused, which stores G_i).
  kMaterialize,
  /// ‖G_i‖² by a CPU loop that forms G_i one register tile at a time (groups 1, 1-D or 2-D, float
  /// or double, on the CPU); no memory beyond one sample's patches per thread.
  kFused,
  /// ‖G_i‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s) from the Gram matrices of patches and output gradients.
  kGhost,
};

/// The name of a path: "materialize", "fused", "ghost".
[[nodiscard]] const char* to_string(ConvPath path);

/// The kernel that forms per-sample weight gradients (conv_weight_samples).
enum class ConvSampleKernel {
  /// The cost model's choice for the call's shape (sample_kernel()).
  kAuto,
  /// The convolution's own weight-gradient kernel: one call with the batch folded into the
  /// groups, or, under 8 input channels per group, one call per sample with the samples spread
  /// over threads. It runs wherever the convolution runs (any device, dtype, 1-D to 3-D).
  kGrouped,
  /// The register tile of the fused norms, which stores each G_i as it forms it: on the CPU, in
  /// float or double, for groups 1 and 1-D or 2-D (fused_conv_available()); fastest where the
  /// grouped kernel is slow (few input channels, few output positions).
  kTiled,
};

/// The shape of one convolution call, as the cost model sees it.
struct ConvShape {
  int64_t batch = 0;         // B
  int64_t positions = 0;     // T: output positions
  int64_t patch = 0;         // d: C/G · k1·…·kD, one group's patch
  int64_t out_channels = 0;  // p, all groups
  int64_t groups = 1;        // G
  int64_t in_channels = 0;   // C, all groups
  int64_t input_size = 0;    // elements of one sample's input
  int64_t kernel_width = 1;  // the kernel's last dimension
  bool fused_available = false;
};

/// The cost model's estimates (ms, on one core of the machine it was calibrated on: see
/// docs/performance.md) of the norms plus the clipped sum by each path, and its choice.
struct ConvPlan {
  ConvPath path = ConvPath::kMaterialize;
  /// Whether kMaterialize keeps G_i for the clipped sum (it may when memory allows).
  bool keep = false;
  /// kMaterialize's kernel (kTiled or kGrouped).
  ConvSampleKernel kernel = ConvSampleKernel::kGrouped;
  double materialize_ms = 0, fused_ms = 0, ghost_ms = 0;
};

/// The shape of one call: `input` [B, C, S...], `grad_output` [B, p, L...], the layer's weight.
[[nodiscard]] ConvShape conv_shape(const torch::Tensor& input, const torch::Tensor& grad_output,
                                   const torch::Tensor& weight, const ConvGeometry& geometry);

/// Plans one call. `method` forces a path (kGhost; kMaterialize) or leaves it to the cost model
/// (kAuto); `may_keep` says whether memory allows keeping the B·p·d per-sample gradients.
[[nodiscard]] ConvPlan plan_conv(const ConvShape& shape, NormMethod method, bool may_keep);

/// Whether a convolution's weight norms can run in the fused CPU loop: groups 1, 1-D or 2-D,
/// float or double input on the CPU.
[[nodiscard]] bool fused_conv_available(const torch::Tensor& input, int64_t spatial_dims,
                                        int64_t groups);

/// The cost model's kernel for conv_weight_samples on a call of this shape: kTiled or kGrouped.
[[nodiscard]] ConvSampleKernel sample_kernel(const ConvShape& shape);

/// Per-sample weight gradients [B, p, C/G, k...] of a convolution: `input` [B, C, S...] (already
/// padded as the call saw it), `grad_output` [B, p, L...], `weight` the layer's weight (its shape
/// and dtype), by `kernel` (kTiled where it is not available is an error).
[[nodiscard]] torch::Tensor conv_weight_samples(const torch::Tensor& input,
                                                const torch::Tensor& grad_output,
                                                const torch::Tensor& weight,
                                                const ConvGeometry& geometry,
                                                ConvSampleKernel kernel = ConvSampleKernel::kAuto);

/// conv_weight_samples a chunk of samples at a time, each chunk's result [n, p, C/G, k...] near
/// `chunk_bytes` (at least one sample), so that the kernel's own temporaries stay small too.
/// Calls with the same batch size and weight are chunked alike. With `norms_sq`, ‖G_i‖² [B] too:
/// the tiled kernel forms them with G_i, the grouped one from each chunk while it is in cache.
[[nodiscard]] std::vector<torch::Tensor> conv_weight_sample_chunks(
    const torch::Tensor& input, const torch::Tensor& grad_output, const torch::Tensor& weight,
    const ConvGeometry& geometry, int64_t chunk_bytes,
    ConvSampleKernel kernel = ConvSampleKernel::kAuto, torch::Tensor* norms_sq = nullptr);

/// Unfolds a convolution input [B, C, S1..SD] into [B, T, C·k1..kD] patches, T = number of
/// output positions, columns in the order of the weight's [C, k1..kD] layout. Works for any D.
/// The result is a transposed view of a contiguous [B, C·k..., T] tensor (output positions
/// innermost). On the CPU, 1-D and 2-D float and double inputs take one gather loop; everything
/// else takes the device-generic torch operators.
[[nodiscard]] torch::Tensor unfold_patches(const torch::Tensor& input, at::IntArrayRef kernel,
                                           at::IntArrayRef stride, at::IntArrayRef padding,
                                           at::IntArrayRef dilation);

/// Rule for convolutions whose per-sample gradients were not kept while backward ran (see
/// nn::ConvImpl): the weight's norms by the path of `plan`, a chunk of samples at a time (each
/// chunk's temporaries stay near kChunkBytes); the clipped sum by the convolution's own weight
/// gradient of the per-sample weighted output gradient, the kernel the non-private backward runs.
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
  /// The same with the path given (kFused where unavailable falls back to kMaterialize).
  ConvGrads(std::vector<torch::Tensor> inputs, std::vector<torch::Tensor> grad_outputs,
            torch::Tensor weight, bool train_weight, bool has_bias, ConvGeometry geometry,
            ConvPath path, int64_t chunk_bytes = kChunkBytes);
  /// The path the weight's norms take.
  [[nodiscard]] ConvPath path() const { return path_; }
  /// The shape of the recorded calls (T summed over calls).
  [[nodiscard]] ConvShape shape() const;
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
  /// G_i of samples [begin, end), summed over the recorded calls.
  [[nodiscard]] torch::Tensor samples(int64_t begin, int64_t end) const;
  const torch::Tensor& bias_samples();

  std::vector<torch::Tensor> inputs_, grad_outputs_;
  torch::Tensor weight_;
  bool train_weight_, has_bias_;
  ConvGeometry geometry_;
  ConvPath path_;
  int64_t chunk_bytes_;
  torch::Tensor bias_samples_;  // [B, C_out]
};

}  // namespace dptorch::grad_sample
