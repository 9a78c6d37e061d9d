#pragma once

#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

namespace dptorch::testing {

/// A model, how to run it, and a batch: the unit the per-sample gradient tests work on.
struct Scenario {
  std::shared_ptr<torch::nn::Module> model;
  /// Runs the model on a batch.
  std::function<torch::Tensor(const torch::Tensor&)> forward;
  /// The batch; samples along `batch_dim` (of the input and of the output).
  torch::Tensor input;
  int64_t batch_dim = 0;
  /// Output for sample i alone (a batch of one); defaults to forward(input.narrow(batch_dim, i,
  /// 1)).
  std::function<torch::Tensor(int64_t)> forward_one;
  /// Samples in the batch; defaults to input.size(batch_dim).
  int64_t batch_size = -1;

  int64_t samples() const { return batch_size >= 0 ? batch_size : input.size(batch_dim); }
  torch::Tensor output_of(int64_t i) const {
    return forward_one ? forward_one(i) : forward(input.narrow(batch_dim, i, 1));
  }
};

/// Per-sample loss ℓ_i = Σ (o_i ⊙ R_i) + ½ Σ o_i²: nonlinear in the output, different per sample.
inline torch::Tensor per_sample_loss(const torch::Tensor& out, const torch::Tensor& r) {
  return (out * r).sum() + 0.5 * out.square().sum();
}

/// The trainable parameters of a model, by name.
inline std::vector<std::pair<std::string, torch::Tensor>> trainable(torch::nn::Module& model) {
  std::vector<std::pair<std::string, torch::Tensor>> out;
  for (const auto& p : model.named_parameters()) {
    if (p.value().requires_grad()) out.emplace_back(p.key(), p.value());
  }
  return out;
}

/// Ground truth: for each sample alone, the gradient of ℓ_i by plain autograd. Returns, per
/// trainable parameter, [B, param shape...].
inline std::vector<torch::Tensor> reference_grad_samples(const Scenario& s,
                                                         const torch::Tensor& r) {
  const auto params = trainable(*s.model);
  std::vector<torch::Tensor> tensors;
  for (const auto& p : params) tensors.push_back(p.second);
  std::vector<std::vector<torch::Tensor>> per_param(params.size());
  for (int64_t i = 0; i < s.samples(); ++i) {
    auto out = s.output_of(i);
    auto loss = per_sample_loss(out, r.narrow(s.batch_dim, i, 1));
    auto grads = torch::autograd::grad({loss}, tensors, {}, false, false, /*allow_unused=*/true);
    for (size_t k = 0; k < params.size(); ++k) {
      per_param[k].push_back(grads[k].defined() ? grads[k] : torch::zeros_like(tensors[k]));
    }
  }
  std::vector<torch::Tensor> out;
  for (size_t k = 0; k < params.size(); ++k) {
    out.push_back(per_param[k].empty() ? torch::zeros({0}) : torch::stack(per_param[k]));
  }
  return out;
}

}  // namespace dptorch::testing
