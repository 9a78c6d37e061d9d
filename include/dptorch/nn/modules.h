#pragma once

#include <dptorch/nn/layer.h>

#include <torch/nn.h>

#include <array>
#include <ostream>
#include <type_traits>

/// Drop-in twins of torch::nn layers whose per-sample gradients dptorch computes. Each takes its
/// twin's options type and has the same parameter and buffer names, so state dicts interchange.
/// Detached from a tape a layer runs its twin's own forward (same results, same speed); attached
/// (by GradSampleModule) it records (input, grad_output) instead of forming parameter gradients.
///
/// Example:
///   auto model = torch::nn::Sequential(dptorch::nn::Linear(784, 128), torch::nn::ReLU(),
///                                      dptorch::nn::Linear(128, 10));
namespace dptorch::nn {

/// Twin of torch::nn::Linear: y = x Wᵀ + b over any leading dimensions.
class LinearImpl : public torch::nn::Cloneable<LinearImpl>, public PerSampleLayer {
 public:
  LinearImpl(int64_t in_features, int64_t out_features)
      : LinearImpl(torch::nn::LinearOptions(in_features, out_features)) {}
  explicit LinearImpl(const torch::nn::LinearOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  /// Applies the layer to `input` [*, in_features].
  torch::Tensor forward(const torch::Tensor& input);
  torch::nn::Module& as_module() override { return *this; }

  /// The options the layer was built with.
  torch::nn::LinearOptions options;
  /// [out_features, in_features]
  torch::Tensor weight;
  /// [out_features], undefined without bias.
  torch::Tensor bias;

 protected:
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(std::vector<Record> records) override;

 private:
  torch::nn::Linear twin_{nullptr};
};
TORCH_MODULE(Linear);

namespace detail {
template <size_t D>
using TorchConv =
    std::conditional_t<D == 1, torch::nn::Conv1d,
                       std::conditional_t<D == 2, torch::nn::Conv2d, torch::nn::Conv3d>>;
template <size_t D>
using TorchInstanceNorm = std::conditional_t<
    D == 1, torch::nn::InstanceNorm1d,
    std::conditional_t<D == 2, torch::nn::InstanceNorm2d, torch::nn::InstanceNorm3d>>;
}  // namespace detail

/// Twin of torch::nn::Conv1d/2d/3d: every stride, padding ("same" and "valid" included), padding
/// mode, dilation and group count; per-sample gradients unfold the input into patches.
template <size_t D>
class ConvImpl : public torch::nn::Cloneable<ConvImpl<D>>, public PerSampleLayer {
 public:
  ConvImpl(int64_t in_channels, int64_t out_channels, torch::ExpandingArray<D> kernel_size)
      : ConvImpl(torch::nn::ConvOptions<D>(in_channels, out_channels, kernel_size)) {}
  explicit ConvImpl(const torch::nn::ConvOptions<D>& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  /// Applies the convolution to `input` [B, C, spatial...].
  torch::Tensor forward(const torch::Tensor& input);
  torch::nn::Module& as_module() override { return *this; }

  /// The options the layer was built with.
  torch::nn::ConvOptions<D> options;
  /// [out_channels, in_channels / groups, kernel...]
  torch::Tensor weight;
  /// [out_channels], undefined without bias.
  torch::Tensor bias;

 protected:
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(std::vector<Record> records) override;

 private:
  detail::TorchConv<D> twin_{nullptr};
  // Padding per spatial dimension, resolved from the options ("same" may be asymmetric).
  std::array<int64_t, D> pad_left_{}, pad_right_{};
};
using Conv1dImpl = ConvImpl<1>;
using Conv2dImpl = ConvImpl<2>;
using Conv3dImpl = ConvImpl<3>;
TORCH_MODULE(Conv1d);
TORCH_MODULE(Conv2d);
TORCH_MODULE(Conv3d);

/// Twin of torch::nn::Embedding (padding_idx supported; max_norm and scale_grad_by_freq are
/// refused: the first rewrites the table in forward, the second mixes samples). Per-sample norms
/// never form a [B, num_embeddings, dim] tensor.
class EmbeddingImpl : public torch::nn::Cloneable<EmbeddingImpl>, public PerSampleLayer {
 public:
  EmbeddingImpl(int64_t num_embeddings, int64_t embedding_dim)
      : EmbeddingImpl(torch::nn::EmbeddingOptions(num_embeddings, embedding_dim)) {}
  explicit EmbeddingImpl(const torch::nn::EmbeddingOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  /// Looks up the rows `input` (integer tensor of any shape).
  torch::Tensor forward(const torch::Tensor& input);
  torch::nn::Module& as_module() override { return *this; }

  /// The options the layer was built with.
  torch::nn::EmbeddingOptions options;
  /// [num_embeddings, embedding_dim]
  torch::Tensor weight;

 protected:
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(std::vector<Record> records) override;

 private:
  torch::nn::Embedding twin_{nullptr};
};
TORCH_MODULE(Embedding);

/// Twin of torch::nn::EmbeddingBag in modes kSum and kMean (each bag is one sample), with
/// offsets, include_last_offset, padding_idx, and constant per_sample_weights in kSum.
class EmbeddingBagImpl : public torch::nn::Cloneable<EmbeddingBagImpl>, public PerSampleLayer {
 public:
  EmbeddingBagImpl(int64_t num_embeddings, int64_t embedding_dim)
      : EmbeddingBagImpl(torch::nn::EmbeddingBagOptions(num_embeddings, embedding_dim)) {}
  explicit EmbeddingBagImpl(const torch::nn::EmbeddingBagOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  /// Reduces the bags given by `input` ([B, L], or 1-D with `offsets`) to [B, embedding_dim].
  torch::Tensor forward(const torch::Tensor& input, const torch::Tensor& offsets = {},
                        const torch::Tensor& per_sample_weights = {});
  torch::nn::Module& as_module() override { return *this; }

  /// The options the layer was built with.
  torch::nn::EmbeddingBagOptions options;
  /// [num_embeddings, embedding_dim]
  torch::Tensor weight;

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())},
                           {2, torch::nn::AnyValue(torch::Tensor())})
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(std::vector<Record> records) override;

 private:
  torch::nn::EmbeddingBag twin_{nullptr};
};
TORCH_MODULE(EmbeddingBag);

/// Twin of torch::nn::LayerNorm; the per-sample gradients of its affine parameters are formed
/// from the normalised input.
class LayerNormImpl : public torch::nn::Cloneable<LayerNormImpl>, public PerSampleLayer {
 public:
  LayerNormImpl(std::vector<int64_t> normalized_shape)
      : LayerNormImpl(torch::nn::LayerNormOptions(std::move(normalized_shape))) {}
  explicit LayerNormImpl(const torch::nn::LayerNormOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  /// Normalises the trailing `normalized_shape` dimensions of `input`.
  torch::Tensor forward(const torch::Tensor& input);
  torch::nn::Module& as_module() override { return *this; }

  /// The options the layer was built with.
  torch::nn::LayerNormOptions options;
  /// [normalized_shape], undefined without elementwise_affine.
  torch::Tensor weight;
  /// [normalized_shape], undefined without elementwise_affine.
  torch::Tensor bias;

 protected:
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(std::vector<Record> records) override;

 private:
  torch::nn::LayerNorm twin_{nullptr};
};
TORCH_MODULE(LayerNorm);

/// Twin of torch::nn::GroupNorm (the private replacement for BatchNorm).
class GroupNormImpl : public torch::nn::Cloneable<GroupNormImpl>, public PerSampleLayer {
 public:
  GroupNormImpl(int64_t num_groups, int64_t num_channels)
      : GroupNormImpl(torch::nn::GroupNormOptions(num_groups, num_channels)) {}
  explicit GroupNormImpl(const torch::nn::GroupNormOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  /// Normalises `input` [B, C, *] over groups of channels.
  torch::Tensor forward(const torch::Tensor& input);
  torch::nn::Module& as_module() override { return *this; }

  /// The options the layer was built with.
  torch::nn::GroupNormOptions options;
  /// [num_channels], undefined without affine.
  torch::Tensor weight;
  /// [num_channels], undefined without affine.
  torch::Tensor bias;

 protected:
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(std::vector<Record> records) override;

 private:
  torch::nn::GroupNorm twin_{nullptr};
};
TORCH_MODULE(GroupNorm);

/// Twin of torch::nn::InstanceNorm1d/2d/3d (affine and running statistics supported).
template <size_t D>
class InstanceNormImpl : public torch::nn::Cloneable<InstanceNormImpl<D>>, public PerSampleLayer {
 public:
  explicit InstanceNormImpl(int64_t num_features)
      : InstanceNormImpl(torch::nn::InstanceNormOptions(num_features)) {}
  explicit InstanceNormImpl(const torch::nn::InstanceNormOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  void train(bool on = true) override;
  /// Normalises each channel of each sample of `input` [B, C, spatial...].
  torch::Tensor forward(const torch::Tensor& input);
  torch::nn::Module& as_module() override { return *this; }

  /// The options the layer was built with.
  torch::nn::InstanceNormOptions options;
  /// [num_features], undefined without affine.
  torch::Tensor weight;
  /// [num_features], undefined without affine.
  torch::Tensor bias;
  /// Running statistics, undefined without track_running_stats.
  torch::Tensor running_mean, running_var, num_batches_tracked;

 protected:
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(std::vector<Record> records) override;

 private:
  detail::TorchInstanceNorm<D> twin_{nullptr};
};
using InstanceNorm1dImpl = InstanceNormImpl<1>;
using InstanceNorm2dImpl = InstanceNormImpl<2>;
using InstanceNorm3dImpl = InstanceNormImpl<3>;
TORCH_MODULE(InstanceNorm1d);
TORCH_MODULE(InstanceNorm2d);
TORCH_MODULE(InstanceNorm3d);

extern template class ConvImpl<1>;
extern template class ConvImpl<2>;
extern template class ConvImpl<3>;
extern template class InstanceNormImpl<1>;
extern template class InstanceNormImpl<2>;
extern template class InstanceNormImpl<3>;

}  // namespace dptorch::nn
