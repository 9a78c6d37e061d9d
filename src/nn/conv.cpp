#include <dptorch/nn/conv.h>

#include <torch/torch.h>

#include "nn/layers_internal.h"

namespace dptorch::nn {

namespace F = torch::nn::functional;
using grad_sample::PerSampleGrads;

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
  ConvSaved record{x.detach(), conv_pad};
  const int64_t B = x.size(0);
  const auto w = weight.detach();
  const auto saved = record.input;
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
      std::move(record), B);
}

template <size_t D>
std::unique_ptr<PerSampleGrads> ConvImpl<D>::make_grads(std::vector<Call<ConvSaved>> calls) {
  const auto& options = this->options;
  std::vector<torch::Tensor> inputs, grad_outputs;
  // Every call pads alike: the padding passed to the convolution is the first call's.
  const auto pad = calls.front().saved.padding;
  for (auto& c : calls) {
    inputs.push_back(std::move(c.saved.input));
    grad_outputs.push_back(std::move(c.grad_outputs.at(0)));
  }
  grad_sample::ConvGeometry geometry;
  geometry.kernel = at::IntArrayRef(options.kernel_size()).vec();
  geometry.stride = at::IntArrayRef(options.stride()).vec();
  geometry.padding = pad;
  geometry.dilation = at::IntArrayRef(options.dilation()).vec();
  geometry.groups = options.groups();
  return std::make_unique<grad_sample::ConvGrads>(
      std::move(inputs), std::move(grad_outputs), weight.detach(), detail::trainable(weight),
      detail::trainable(bias), std::move(geometry), this->norm_method());
}

template class ConvImpl<1>;
template class ConvImpl<2>;
template class ConvImpl<3>;

}  // namespace dptorch::nn
