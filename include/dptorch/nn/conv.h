#pragma once

#include <dptorch/nn/layer.h>

#include <torch/nn/modules/conv.h>

#include <array>
#include <memory>
#include <type_traits>
#include <vector>

/// The convolution family (its rule: grad_sample::ConvGrads).
namespace dptorch::nn {

namespace detail {
template <size_t D>
using TorchConv =
    std::conditional_t<D == 1, torch::nn::Conv1d,
                       std::conditional_t<D == 2, torch::nn::Conv2d, torch::nn::Conv3d>>;
}  // namespace detail

/// What a convolution saves per call: its input after explicit padding, and the padding left
/// to the convolution itself. A call whose per-sample gradients were formed while backward ran
/// holds them instead (weight: chunks [n, p, C/G, k...] of samples where the weight is
/// trainable; bias [B, p] where the bias is), and no input.
struct ConvSaved {
  torch::Tensor input;
  std::vector<int64_t> padding;
  bool reduced = false;
  std::vector<torch::Tensor> weight_samples;
  torch::Tensor bias_samples;
  /// ‖G_i‖² of the weight [B], formed with each chunk while it was fresh in the cache.
  torch::Tensor weight_norms_sq;
};

/// Twin of torch::nn::Conv1d/2d/3d: every stride, padding ("same" and "valid" included), padding
/// mode, dilation and group count; per-sample gradients unfold the input into patches.
template <size_t D>
class ConvImpl
    : public TwinLayer<ConvImpl<D>, detail::TorchConv<D>, ConvSaved, torch::nn::ConvOptions<D>> {
  using Base = TwinLayer<ConvImpl<D>, detail::TorchConv<D>, ConvSaved, torch::nn::ConvOptions<D>>;

 public:
  ConvImpl(int64_t in_channels, int64_t out_channels, torch::ExpandingArray<D> kernel_size)
      : ConvImpl(torch::nn::ConvOptions<D>(in_channels, out_channels, kernel_size)) {}
  explicit ConvImpl(const torch::nn::ConvOptions<D>& options);
  /// Applies the convolution to `input` [B, C, spatial...].
  torch::Tensor forward(const torch::Tensor& input);

  /// [out_channels, in_channels / groups, kernel...]
  torch::Tensor weight;
  /// [out_channels], undefined without bias.
  torch::Tensor bias;

 protected:
  friend Base;
  void adopt();
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(
      std::vector<Call<ConvSaved>> calls) override;

 private:
  // Padding per spatial dimension, resolved from the options ("same" may be asymmetric).
  std::array<int64_t, D> pad_left_{}, pad_right_{};
};
using Conv1dImpl = ConvImpl<1>;
using Conv2dImpl = ConvImpl<2>;
using Conv3dImpl = ConvImpl<3>;
TORCH_MODULE(Conv1d);
TORCH_MODULE(Conv2d);
TORCH_MODULE(Conv3d);

extern template class ConvImpl<1>;
extern template class ConvImpl<2>;
extern template class ConvImpl<3>;

}  // namespace dptorch::nn
