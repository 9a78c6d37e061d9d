#pragma once

#include <dptorch/nn/layer.h>

#include <torch/nn/modules/instancenorm.h>
#include <torch/nn/modules/normalization.h>

#include <memory>
#include <type_traits>
#include <vector>

/// The normalization family: LayerNorm, GroupNorm, InstanceNorm. Their affine parameters'
/// per-sample gradients are small; they are formed from the normalised input
/// (grad_sample::MaterializedGrads). BatchNorm has no per-sample gradients (it mixes samples);
/// GroupNorm replaces it.
namespace dptorch::nn {

namespace detail {
template <size_t D>
using TorchInstanceNorm = std::conditional_t<
    D == 1, torch::nn::InstanceNorm1d,
    std::conditional_t<D == 2, torch::nn::InstanceNorm2d, torch::nn::InstanceNorm3d>>;
}  // namespace detail

/// What a norm layer saves per call: the normalised input and its batch dimension.
struct NormSaved {
  torch::Tensor normalized;
  int64_t batch_dim = 0;
  /// Per-sample gradients of the affine weight and bias (flattened to [B, params]), formed when
  /// backward files the call; `normalized` is then dropped.
  torch::Tensor weight_samples, bias_samples;
};

/// Twin of torch::nn::LayerNorm.
class LayerNormImpl : public TwinLayer<LayerNormImpl, torch::nn::LayerNorm, NormSaved> {
 public:
  LayerNormImpl(std::vector<int64_t> normalized_shape)
      : LayerNormImpl(torch::nn::LayerNormOptions(std::move(normalized_shape))) {}
  explicit LayerNormImpl(const torch::nn::LayerNormOptions& options);
  /// Normalises the trailing `normalized_shape` dimensions of `input`.
  torch::Tensor forward(const torch::Tensor& input);

  /// [normalized_shape], undefined without elementwise_affine.
  torch::Tensor weight;
  /// [normalized_shape], undefined without elementwise_affine.
  torch::Tensor bias;

 protected:
  friend class TwinLayer<LayerNormImpl, torch::nn::LayerNorm, NormSaved>;
  void adopt();
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(
      std::vector<Call<NormSaved>> calls) override;
};
TORCH_MODULE(LayerNorm);

/// Twin of torch::nn::GroupNorm (the private replacement for BatchNorm).
class GroupNormImpl : public TwinLayer<GroupNormImpl, torch::nn::GroupNorm, NormSaved> {
 public:
  GroupNormImpl(int64_t num_groups, int64_t num_channels)
      : GroupNormImpl(torch::nn::GroupNormOptions(num_groups, num_channels)) {}
  explicit GroupNormImpl(const torch::nn::GroupNormOptions& options);
  /// Normalises `input` [B, C, *] over groups of channels.
  torch::Tensor forward(const torch::Tensor& input);

  /// [num_channels], undefined without affine.
  torch::Tensor weight;
  /// [num_channels], undefined without affine.
  torch::Tensor bias;

 protected:
  friend class TwinLayer<GroupNormImpl, torch::nn::GroupNorm, NormSaved>;
  void adopt();
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(
      std::vector<Call<NormSaved>> calls) override;
};
TORCH_MODULE(GroupNorm);

/// Twin of torch::nn::InstanceNorm1d/2d/3d (affine and running statistics supported).
template <size_t D>
class InstanceNormImpl
    : public TwinLayer<InstanceNormImpl<D>, detail::TorchInstanceNorm<D>, NormSaved> {
  using Base = TwinLayer<InstanceNormImpl<D>, detail::TorchInstanceNorm<D>, NormSaved>;

 public:
  explicit InstanceNormImpl(int64_t num_features)
      : InstanceNormImpl(torch::nn::InstanceNormOptions(num_features)) {}
  explicit InstanceNormImpl(const torch::nn::InstanceNormOptions& options);
  /// Normalises each channel of each sample of `input` [B, C, spatial...].
  torch::Tensor forward(const torch::Tensor& input);

  /// [num_features], undefined without affine.
  torch::Tensor weight;
  /// [num_features], undefined without affine.
  torch::Tensor bias;
  /// Running statistics, undefined without track_running_stats.
  torch::Tensor running_mean, running_var, num_batches_tracked;

 protected:
  friend Base;
  void adopt();
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(
      std::vector<Call<NormSaved>> calls) override;
};
using InstanceNorm1dImpl = InstanceNormImpl<1>;
using InstanceNorm2dImpl = InstanceNormImpl<2>;
using InstanceNorm3dImpl = InstanceNormImpl<3>;
TORCH_MODULE(InstanceNorm1d);
TORCH_MODULE(InstanceNorm2d);
TORCH_MODULE(InstanceNorm3d);

extern template class InstanceNormImpl<1>;
extern template class InstanceNormImpl<2>;
extern template class InstanceNormImpl<3>;

}  // namespace dptorch::nn
