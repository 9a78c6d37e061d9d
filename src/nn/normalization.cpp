#include <dptorch/nn/normalization.h>

#include <torch/torch.h>

#include "grad_sample/cpu_kernels.h"
#include "grad_sample/rules_internal.h"
#include "nn/layers_internal.h"

#include <functional>

namespace dptorch::nn {
namespace {

using grad_sample::PerSampleGrads;

// Per-sample affine gradients of one call, from its normalised input and output gradient, both
// seen as [B, R, P] by `to_brp_layout` (summed over R, P the parameters' elements): formed when
// backward files the call, which then holds [B, P] results instead of two activations.
using BrpLayout = std::function<torch::Tensor(const torch::Tensor&, int64_t)>;
FileHook<NormSaved> reduce_affine(BrpLayout to_brp_layout) {
  return [to_brp_layout = std::move(to_brp_layout)](Call<NormSaved>& call) {
    auto& saved = call.saved;
    if (!saved.normalized.defined() || !call.grad_outputs.at(0).defined()) return;
    auto xh = to_brp_layout(saved.normalized, saved.batch_dim);
    auto g = to_brp_layout(call.grad_outputs.at(0), saved.batch_dim);
    saved.weight_samples = (g * xh).sum(1);
    saved.bias_samples = g.sum(1);
    saved.normalized = torch::Tensor();
    call.grad_outputs.clear();
  };
}

// Affine rule of a norm layer: the calls' per-sample results added up, shaped as the parameters.
std::unique_ptr<PerSampleGrads> affine_grads(const std::vector<Call<NormSaved>>& calls,
                                             const torch::Tensor& weight,
                                             const torch::Tensor& bias) {
  torch::Tensor gw, gb;
  for (const auto& c : calls) {
    TORCH_INTERNAL_ASSERT(c.saved.weight_samples.defined(), "a norm layer's call was not reduced");
    gw = gw.defined() ? gw + c.saved.weight_samples : c.saved.weight_samples;
    gb = gb.defined() ? gb + c.saved.bias_samples : c.saved.bias_samples;
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
  NormSaved saved;
  saved.normalized = xhat.detach();
  saved.batch_dim = batch_dim(leading);
  const int64_t B = input.size(saved.batch_dim);
  const auto w = weight.detach();
  const auto trailing = static_cast<int64_t>(shape.size());
  return record(
      xhat, {weight, bias}, [&] { return affine(xhat, weight, bias); },
      [w](const torch::Tensor& g) { return w.defined() ? g * w : g; }, std::move(saved), B,
      reduce_affine([trailing](const torch::Tensor& x, int64_t bd) {
        return detail::to_brp(x, bd, trailing);
      }));
}

std::unique_ptr<PerSampleGrads> LayerNormImpl::make_grads(std::vector<Call<NormSaved>> calls) {
  return affine_grads(calls, weight, bias);
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
  const int64_t N = input.size(0), C = input.size(1), G = options.num_groups();
  TORCH_CHECK(C == options.num_channels(), "dptorch::nn::GroupNorm expected ",
              options.num_channels(), " channels, but got input of shape ", input.sizes());
  const int64_t HxW = N * C > 0 ? input.numel() / (N * C) : 1;
  const double eps = options.eps();
  const auto x = input.contiguous();
  // The fused kernel torch::group_norm runs, keeping its statistics: backward needs only the
  // input (which autograd would hold anyway), the mean and 1/std of each (sample, group).
  // The per-sample affine gradients come from one pass over input and output gradient on the
  // CPU; the input gradient then from them in a second pass (the two passes of torch's own
  // backward). Where the input needs no gradient, the file hook forms them alone.
  struct Stats {
    torch::Tensor mean, rstd;
    torch::Tensor weight_samples, bias_samples;  // formed with the input gradient
  };
  auto stats = std::make_shared<Stats>();
  const auto xd = x.detach();
  const auto wd = weight.defined() ? weight.detach().contiguous() : weight;
  auto cpu_path = [xd, stats](const torch::Tensor& g) {
    return grad_sample::detail::cpu_kernel_dtype(xd) && g.scalar_type() == xd.scalar_type() &&
           stats->mean.scalar_type() == xd.scalar_type();
  };
  auto affine_samples = [xd, stats, N, C, HxW, G](const torch::Tensor& g) {
    stats->weight_samples = torch::empty({N, C}, xd.options());
    stats->bias_samples = torch::empty({N, C}, xd.options());
    const auto mean = stats->mean.contiguous(), rstd = stats->rstd.contiguous();
    AT_DISPATCH_FLOATING_TYPES(xd.scalar_type(), "group_norm_affine_samples", [&] {
      grad_sample::cpu::group_norm_affine_samples(
          g.data_ptr<scalar_t>(), xd.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
          rstd.data_ptr<scalar_t>(), N * C, HxW, C, C / G,
          stats->weight_samples.data_ptr<scalar_t>(), stats->bias_samples.data_ptr<scalar_t>());
    });
  };
  auto input_grad = [xd, wd, stats, N, C, HxW, G, cpu_path,
                     affine_samples](const torch::Tensor& grad) {
    const auto g = grad.contiguous();
    if (!cpu_path(g) || (wd.defined() && wd.scalar_type() != xd.scalar_type())) {
      return std::get<0>(at::native_group_norm_backward(g, xd, stats->mean, stats->rstd, wd, N, C,
                                                        HxW, G, {true, false, false}));
    }
    affine_samples(g);
    auto dx = torch::empty_like(xd, at::MemoryFormat::Contiguous);
    const auto mean = stats->mean.contiguous(), rstd = stats->rstd.contiguous();
    AT_DISPATCH_FLOATING_TYPES(xd.scalar_type(), "group_norm_input_grad", [&] {
      grad_sample::cpu::group_norm_input_grad(
          g.data_ptr<scalar_t>(), xd.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
          rstd.data_ptr<scalar_t>(), wd.defined() ? wd.data_ptr<scalar_t>() : nullptr,
          stats->weight_samples.data_ptr<scalar_t>(), stats->bias_samples.data_ptr<scalar_t>(), N,
          HxW, C, C / G, dx.data_ptr<scalar_t>());
    });
    return dx;
  };
  FileHook<NormSaved> on_file = [xd, stats, N, C, HxW, G, cpu_path,
                                 affine_samples](Call<NormSaved>& call) {
    if (!call.grad_outputs.at(0).defined()) return;
    const auto g = call.grad_outputs.at(0).contiguous();
    auto& saved = call.saved;
    if (cpu_path(g)) {
      if (!stats->weight_samples.defined()) affine_samples(g);
      saved.weight_samples = std::move(stats->weight_samples);
      saved.bias_samples = std::move(stats->bias_samples);
    } else {
      const auto xhat = ((xd.reshape({N, G, -1}) - stats->mean.reshape({N, G, 1})) *
                         stats->rstd.reshape({N, G, 1}))
                            .reshape({N, C, HxW});
      const auto g3 = g.reshape({N, C, HxW});
      saved.weight_samples = (g3 * xhat.to(g3.scalar_type())).sum(2);
      saved.bias_samples = g3.sum(2);
    }
    call.grad_outputs.clear();
  };
  return record(
      x, {weight, bias},
      [&] {
        auto [y, mean, rstd] = at::native_group_norm(x, weight, bias, N, C, HxW, G, eps);
        stats->mean = mean;
        stats->rstd = rstd;
        return y;
      },
      std::move(input_grad), NormSaved{}, N, std::move(on_file));
}

std::unique_ptr<PerSampleGrads> GroupNormImpl::make_grads(std::vector<Call<NormSaved>> calls) {
  return affine_grads(calls, weight, bias);
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
  NormSaved saved;
  saved.normalized = xhat.detach();
  return this->record(
      xhat, {weight, bias}, [&] { return affine(xhat, w, b); },
      [wd](const torch::Tensor& g) { return wd.defined() ? g * wd : g; }, saved, input.size(0),
      reduce_affine(channels_last_brp));
}

template <size_t D>
std::unique_ptr<PerSampleGrads> InstanceNormImpl<D>::make_grads(
    std::vector<Call<NormSaved>> calls) {
  return affine_grads(calls, weight, bias);
}

template class InstanceNormImpl<1>;
template class InstanceNormImpl<2>;
template class InstanceNormImpl<3>;

}  // namespace dptorch::nn
