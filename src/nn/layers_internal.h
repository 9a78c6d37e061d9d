#pragma once

// Shape helpers shared by the dp layer families (src/nn/*.cpp); not installed.

#include <dptorch/grad_sample/rules.h>

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

}  // namespace dptorch::nn::detail
