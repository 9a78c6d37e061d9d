#pragma once

// Shape helpers shared by the dp layer families (src/nn/*.cpp); not installed.

#include <dptorch/grad_sample/linear.h>
#include <dptorch/grad_sample/rules.h>
#include <dptorch/nn/layer.h>

#include <torch/nn/module.h>
#include <torch/types.h>
#include <torch/utils.h>

#include <memory>
#include <utility>
#include <vector>

namespace dptorch::nn::detail {

inline int64_t product(at::IntArrayRef sizes) {
  int64_t n = 1;
  for (auto s : sizes) n *= s;
  return n;
}

/// x with samples in dimension `batch_dim` and `trailing` feature dimensions -> [B, R, P], where
/// R collects every other leading dimension (sequence positions, extra dimensions).
inline torch::Tensor to_brp(const torch::Tensor& x, int64_t batch_dim, int64_t trailing) {
  auto y = x.movedim(batch_dim, 0);
  const auto sizes = y.sizes();
  const int64_t lead = y.dim() - trailing;
  return y.reshape({sizes[0], product(sizes.slice(1, lead - 1)), product(sizes.slice(lead))});
}

inline torch::Tensor cat_along(std::vector<torch::Tensor> parts, int64_t dim) {
  return parts.size() == 1 ? std::move(parts.front()) : torch::cat(parts, dim);
}

/// Copies the parameters (values and whether each is trainable) and buffers of the same names,
/// submodules included; a parameter of `from` that `to` lacks is an error.
inline void copy_state(const torch::nn::Module& from, torch::nn::Module& to) {
  torch::NoGradGuard no_grad;
  auto params = to.named_parameters(/*recurse=*/true);
  for (const auto& p : from.named_parameters(/*recurse=*/true)) {
    TORCH_CHECK(params.contains(p.key()), "copying ", from.name(), " into ", to.name(), ": ",
                to.name(), " has no parameter ", p.key());
    params[p.key()].copy_(p.value());
    params[p.key()].set_requires_grad(p.value().requires_grad());
  }
  auto buffers = to.named_buffers(/*recurse=*/true);
  for (const auto& b : from.named_buffers(/*recurse=*/true)) {
    if (buffers.contains(b.key())) buffers[b.key()].copy_(b.value());
  }
}

inline bool trainable(const torch::Tensor& p) { return p.defined() && p.requires_grad(); }

inline std::vector<int64_t> shape_if_trainable(const torch::Tensor& p) {
  return trainable(p) ? p.sizes().vec() : std::vector<int64_t>{};
}

/// The rule of a layer some of whose calls kept their per-sample gradients as backward filed them
/// (a payload with `reduced`, `weight_samples` in chunks, `bias_samples`, `weight_norms_sq`):
/// `reduce(call)` forms the other calls' gradients, chunked alike, and the chunks are added up.
/// The norms formed in backward serve when one call alone holds the weight's gradients.
template <typename Payload, typename Reduce>
std::unique_ptr<grad_sample::PerSampleGrads> kept_grads(std::vector<Call<Payload>>& calls,
                                                        bool train_weight, bool train_bias,
                                                        const Reduce& reduce) {
  std::vector<torch::Tensor> ws;
  torch::Tensor bs;
  for (auto& c : calls) {
    if (!c.saved.reduced) reduce(c);
    if (train_weight) {
      if (ws.empty()) {
        ws = std::move(c.saved.weight_samples);
      } else {
        for (size_t i = 0; i < ws.size(); ++i) ws[i].add_(c.saved.weight_samples.at(i));
      }
    }
    if (train_bias) bs = bs.defined() ? bs.add_(c.saved.bias_samples) : c.saved.bias_samples;
  }
  std::vector<std::string> names;
  std::vector<std::vector<torch::Tensor>> samples;
  std::vector<torch::Tensor> norms;
  if (train_weight) {
    names.emplace_back("weight");
    samples.push_back(std::move(ws));
    norms.push_back(calls.size() == 1 ? calls.front().saved.weight_norms_sq : torch::Tensor());
  }
  if (train_bias) {
    names.emplace_back("bias");
    samples.push_back({std::move(bs)});
    norms.emplace_back();
  }
  return std::make_unique<grad_sample::MaterializedGrads>(std::move(names), std::move(samples),
                                                          std::move(norms));
}

}  // namespace dptorch::nn::detail
