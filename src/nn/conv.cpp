#include <dptorch/nn/conv.h>

#include <torch/torch.h>

#include "nn/layers_internal.h"

#include <algorithm>

namespace dptorch::nn {

namespace F = torch::nn::functional;
using grad_sample::PerSampleGrads;

namespace {

// Forms a call's per-sample gradients (the weight's in chunks, each chunk's norms taken while it
// is fresh in the cache; the bias's as [B, p]) and drops its input and output gradient.
void reduce_call(Call<ConvSaved>& call, const torch::Tensor& weight,
                 const grad_sample::ConvGeometry& geometry, bool train_weight, bool train_bias) {
  auto& saved = call.saved;
  const auto& g = call.grad_outputs.at(0);
  if (train_weight) {
    saved.weight_samples = grad_sample::conv_weight_sample_chunks(
        saved.input, g, weight, geometry, grad_sample::ConvGrads::kChunkBytes,
        grad_sample::ConvSampleKernel::kAuto, &saved.weight_norms_sq);
  }
  if (train_bias) saved.bias_samples = g.flatten(2).sum(2);
  saved.reduced = true;
  saved.input = torch::Tensor();
  call.grad_outputs.clear();
}

}  // namespace

template <size_t D>
ConvImpl<D>::ConvImpl(const torch::nn::ConvOptions<D>& options_)
    : Base("dptorch::nn::Conv" + std::to_string(D) + "d", options_) {
  this->reset();
}

template <size_t D>
void ConvImpl<D>::adopt() {
  weight = this->adopt_parameter("weight", this->twin().weight);
  bias = this->adopt_parameter("bias", this->twin().bias);
  const auto& options = this->options;
  const auto& kernel = *options.kernel_size();
  const auto& dilation = *options.dilation();
  for (size_t d = 0; d < D; ++d) {
    if (const auto* p = c10::get_if<torch::ExpandingArray<D>>(&options.padding())) {
      pad_left_[d] = pad_right_[d] = (**p)[d];
    } else if (c10::get_if<torch::enumtype::kValid>(&options.padding())) {
      pad_left_[d] = pad_right_[d] = 0;
    } else {  // "same": the odd one out goes to the right, as in torch
      const int64_t total = dilation[d] * (kernel[d] - 1);
      pad_left_[d] = total / 2;
      pad_right_[d] = total - pad_left_[d];
    }
  }
}

template <size_t D>
torch::Tensor ConvImpl<D>::forward(const torch::Tensor& input) {
  if (!this->recording({&weight, &bias})) return this->twin().forward(input);
  const auto& options = this->options;
  TORCH_CHECK(input.dim() == static_cast<int64_t>(D) + 2, this->name(),
              " records per-sample gradients of batched input [B, C, ", D,
              " spatial dims], but got shape ", input.sizes());
  torch::Tensor x = input;
  std::vector<int64_t> conv_pad(pad_left_.begin(), pad_left_.end());
  const bool zeros = c10::get_if<torch::enumtype::kZeros>(&options.padding_mode()) != nullptr;
  if (!zeros || pad_left_ != pad_right_) {
    // Pad explicitly (autograd differentiates it) and convolve without padding.
    std::vector<int64_t> pads;
    for (int64_t d = D - 1; d >= 0; --d) {
      pads.push_back(pad_left_[d]);
      pads.push_back(pad_right_[d]);
    }
    F::PadFuncOptions::mode_t mode = torch::kConstant;
    if (c10::get_if<torch::enumtype::kReflect>(&options.padding_mode())) mode = torch::kReflect;
    if (c10::get_if<torch::enumtype::kReplicate>(&options.padding_mode())) mode = torch::kReplicate;
    if (c10::get_if<torch::enumtype::kCircular>(&options.padding_mode())) mode = torch::kCircular;
    x = F::pad(x, F::PadFuncOptions(pads).mode(mode));
    std::fill(conv_pad.begin(), conv_pad.end(), 0);
  }
  const std::vector<int64_t> stride(options.stride()->begin(), options.stride()->end());
  const std::vector<int64_t> dilation(options.dilation()->begin(), options.dilation()->end());
  const std::vector<int64_t> output_padding(D, 0);
  const int64_t groups = options.groups();
  ConvSaved record;
  record.input = x.detach();
  record.padding = conv_pad;
  const int64_t B = x.size(0);
  const auto w = weight.detach();
  const auto saved = record.input;
  // When backward files the call, the cost model decides whether to form the per-sample
  // gradients now and keep them (freeing the input and output gradient) or to leave the call
  // to the rule after backward.
  grad_sample::ConvGeometry geometry{at::IntArrayRef(options.kernel_size()).vec(), stride, conv_pad,
                                     dilation, groups};
  FileHook<ConvSaved> on_file =
      [geometry, w, train_weight = detail::trainable(weight), train_bias = detail::trainable(bias),
       method = this->norm_method(),
       tape = std::weak_ptr<detail::Tape>(this->tape())](Call<ConvSaved>& call) {
        const auto& g = call.grad_outputs.at(0);
        const auto& input = call.saved.input;
        if (!g.defined()) return;
        const auto shape = grad_sample::conv_shape(input, g, w, geometry);
        const int64_t bytes = (train_weight ? w.numel() : 0) * shape.batch * w.element_size();
        const auto t = tape.lock();
        const bool may_keep = t && t->may_keep(bytes);
        const auto plan = grad_sample::plan_conv(shape, method, may_keep);
        if (train_weight && !(plan.keep && t->try_keep(bytes))) return;
        reduce_call(call, w, geometry, train_weight, train_bias);
      };
  return this->record(
      x, {weight, bias},
      [&] {
        return at::convolution(x, weight, bias, stride, conv_pad, dilation, false, output_padding,
                               groups);
      },
      [=](const torch::Tensor& g) {
        return std::get<0>(at::convolution_backward(g, saved, w, c10::nullopt, stride, conv_pad,
                                                    dilation, false, output_padding, groups,
                                                    {true, false, false}));
      },
      std::move(record), B, std::move(on_file));
}

template <size_t D>
std::unique_ptr<PerSampleGrads> ConvImpl<D>::make_grads(std::vector<Call<ConvSaved>> calls) {
  const auto& options = this->options;
  // Every call pads alike: the padding passed to the convolution is the first call's.
  grad_sample::ConvGeometry geometry;
  geometry.kernel = at::IntArrayRef(options.kernel_size()).vec();
  geometry.stride = at::IntArrayRef(options.stride()).vec();
  geometry.padding = calls.front().saved.padding;
  geometry.dilation = at::IntArrayRef(options.dilation()).vec();
  geometry.groups = options.groups();
  const bool train_weight = detail::trainable(weight), train_bias = detail::trainable(bias);
  bool any_reduced = false;
  for (const auto& c : calls) any_reduced = any_reduced || c.saved.reduced;
  if (!any_reduced) {
    std::vector<torch::Tensor> inputs, grad_outputs;
    for (auto& c : calls) {
      inputs.push_back(std::move(c.saved.input));
      grad_outputs.push_back(std::move(c.grad_outputs.at(0)));
    }
    return std::make_unique<grad_sample::ConvGrads>(std::move(inputs), std::move(grad_outputs),
                                                    weight.detach(), train_weight, train_bias,
                                                    std::move(geometry), this->norm_method());
  }
  // Some call kept its per-sample gradients: form the others' too.
  return detail::kept_grads(calls, train_weight, train_bias, [&](Call<ConvSaved>& c) {
    reduce_call(c, weight.detach(), geometry, train_weight, train_bias);
  });
}

template class ConvImpl<1>;
template class ConvImpl<2>;
template class ConvImpl<3>;

}  // namespace dptorch::nn
