#include <dptorch/nn/normalization.h>

#include <torch/torch.h>

#include "nn/layers_internal.h"

#include <functional>

namespace dptorch::nn {
namespace {

using grad_sample::PerSampleGrads;

// Affine rule of a norm layer: per-sample gradients from the normalised input and grad_output,
// both as [B, R, P] (sum over R) with the parameters shaped `param_shape`.
std::unique_ptr<PerSampleGrads> affine_grads(
    const std::vector<Call<NormSaved>>& calls, const torch::Tensor& weight,
    const torch::Tensor& bias,
    const std::function<torch::Tensor(const torch::Tensor&, int64_t)>& to_brp_layout) {
  torch::Tensor gw, gb;
  for (const auto& c : calls) {
    auto xh = to_brp_layout(c.saved.normalized, c.saved.batch_dim);
    auto g = to_brp_layout(c.grad_outputs.at(0), c.saved.batch_dim);
    auto w = (g * xh).sum(1), b = g.sum(1);
    gw = gw.defined() ? gw + w : w;
    gb = gb.defined() ? gb + b : b;
  }
  std::vector<std::string> names;
  std::vector<torch::Tensor> samples;
  const int64_t B = calls.front().batch_size;
  auto shaped = [B](const torch::Tensor& s, const torch::Tensor& param) {
    std::vector<int64_t> shape{B};
    for (auto d : param.sizes()) shape.push_back(d);
    return s.reshape(shape);
  };
  if (detail::trainable(weight)) {
    names.emplace_back("weight");
    samples.push_back(shaped(gw, weight));
  }
  if (detail::trainable(bias)) {
    names.emplace_back("bias");
    samples.push_back(shaped(gb, bias));
  }
  return std::make_unique<grad_sample::MaterializedGrads>(std::move(names), std::move(samples));
}

// [B, C, spatial...] -> [B, spatial, C]: the layout of per-channel affine parameters.
torch::Tensor channels_last_brp(const torch::Tensor& x, int64_t /*batch_dim*/) {
  return x.reshape({x.size(0), x.size(1), detail::product(x.sizes().slice(2))}).transpose(1, 2);
}

// A per-channel parameter [C] viewed to broadcast over [B, C, spatial...].
torch::Tensor per_channel(const torch::Tensor& p, int64_t input_dim) {
  if (!p.defined()) return p;
  std::vector<int64_t> shape(input_dim - 1, 1);
  shape[0] = p.size(0);
  return p.view(shape);
}

torch::Tensor affine(const torch::Tensor& xhat, const torch::Tensor& w, const torch::Tensor& b) {
  auto y = w.defined() ? xhat * w : xhat.clone();
  return b.defined() ? y + b : y;
}

}  // namespace

// ----------------------------------------------------------------------------------- LayerNorm

LayerNormImpl::LayerNormImpl(const torch::nn::LayerNormOptions& options_)
    : TwinLayer("dptorch::nn::LayerNorm", options_) {
  this->reset();
}

void LayerNormImpl::adopt() {
  weight = adopt_parameter("weight", twin().weight);
  bias = adopt_parameter("bias", twin().bias);
}

torch::Tensor LayerNormImpl::forward(const torch::Tensor& input) {
  if (!recording({&weight, &bias})) return twin().forward(input);
  const auto& shape = options.normalized_shape();
  const int64_t leading = input.dim() - static_cast<int64_t>(shape.size());
  TORCH_CHECK(leading >= 1, "dptorch::nn::LayerNorm needs a batch dimension before the ",
              "normalized shape to record per-sample gradients, but got shape ", input.sizes());
  auto xhat = torch::layer_norm(input, shape, {}, {}, options.eps());
  NormSaved saved{xhat.detach(), batch_dim(leading)};
  const int64_t B = input.size(saved.batch_dim);
  const auto w = weight.detach();
  return record(
      xhat, {weight, bias}, [&] { return affine(xhat, weight, bias); },
      [w](const torch::Tensor& g) { return w.defined() ? g * w : g; }, std::move(saved), B);
}

std::unique_ptr<PerSampleGrads> LayerNormImpl::make_grads(std::vector<Call<NormSaved>> calls) {
  const auto trailing = static_cast<int64_t>(options.normalized_shape().size());
  return affine_grads(calls, weight, bias, [trailing](const torch::Tensor& x, int64_t bd) {
    return detail::to_brp(x, bd, trailing);
  });
}

// ----------------------------------------------------------------------------------- GroupNorm

GroupNormImpl::GroupNormImpl(const torch::nn::GroupNormOptions& options_)
    : TwinLayer("dptorch::nn::GroupNorm", options_) {
  this->reset();
}

void GroupNormImpl::adopt() {
  weight = adopt_parameter("weight", twin().weight);
  bias = adopt_parameter("bias", twin().bias);
}

torch::Tensor GroupNormImpl::forward(const torch::Tensor& input) {
  if (!recording({&weight, &bias})) return twin().forward(input);
  TORCH_CHECK(input.dim() >= 2, "dptorch::nn::GroupNorm needs input [B, C, *], got shape ",
              input.sizes());
  auto xhat = torch::group_norm(input, options.num_groups(), {}, {}, options.eps());
  const auto w = per_channel(weight, input.dim()), b = per_channel(bias, input.dim());
  const auto wd = w.defined() ? w.detach() : w;
  return record(
      xhat, {weight, bias}, [&] { return affine(xhat, w, b); },
      [wd](const torch::Tensor& g) { return wd.defined() ? g * wd : g; },
      NormSaved{xhat.detach(), 0}, input.size(0));
}

std::unique_ptr<PerSampleGrads> GroupNormImpl::make_grads(std::vector<Call<NormSaved>> calls) {
  return affine_grads(calls, weight, bias, channels_last_brp);
}

// ----------------------------------------------------------------------------------- InstanceNorm

template <size_t D>
InstanceNormImpl<D>::InstanceNormImpl(const torch::nn::InstanceNormOptions& options_)
    : Base("dptorch::nn::InstanceNorm" + std::to_string(D) + "d", options_) {
  this->reset();
}

template <size_t D>
void InstanceNormImpl<D>::adopt() {
  auto& twin = this->twin();
  weight = this->adopt_parameter("weight", twin.weight);
  bias = this->adopt_parameter("bias", twin.bias);
  running_mean = this->adopt_buffer("running_mean", twin.running_mean);
  running_var = this->adopt_buffer("running_var", twin.running_var);
  num_batches_tracked = this->adopt_buffer("num_batches_tracked", twin.num_batches_tracked);
}

template <size_t D>
torch::Tensor InstanceNormImpl<D>::forward(const torch::Tensor& input) {
  if (!this->recording({&weight, &bias})) return this->twin().forward(input);
  TORCH_CHECK(input.dim() == static_cast<int64_t>(D) + 2, this->name(),
              " records per-sample gradients of batched input [B, C, ", D,
              " spatial dims], but got shape ", input.sizes());
  const auto& options = this->options;
  const bool use_input_stats = this->is_training() || !options.track_running_stats();
  auto xhat = torch::instance_norm(input, {}, {}, running_mean, running_var, use_input_stats,
                                   options.momentum(), options.eps(), false);
  const auto w = per_channel(weight, input.dim()), b = per_channel(bias, input.dim());
  const auto wd = w.defined() ? w.detach() : w;
  return this->record(
      xhat, {weight, bias}, [&] { return affine(xhat, w, b); },
      [wd](const torch::Tensor& g) { return wd.defined() ? g * wd : g; },
      NormSaved{xhat.detach(), 0}, input.size(0));
}

template <size_t D>
std::unique_ptr<PerSampleGrads> InstanceNormImpl<D>::make_grads(
    std::vector<Call<NormSaved>> calls) {
  return affine_grads(calls, weight, bias, channels_last_brp);
}

template class InstanceNormImpl<1>;
template class InstanceNormImpl<2>;
template class InstanceNormImpl<3>;

}  // namespace dptorch::nn
