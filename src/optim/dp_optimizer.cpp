#include <dptorch/optim/dp_optimizer.h>

#include <torch/torch.h>

#include <cmath>

namespace dptorch::optim {

DPOptimizer::DPOptimizer(std::shared_ptr<torch::optim::Optimizer> inner,
                         std::shared_ptr<PerSampleGradientClipper> clipper,
                         DPOptimizerOptions options, std::shared_ptr<NoiseSource> noise,
                         std::shared_ptr<accounting::Accountant> accountant)
    : inner_(std::move(inner)),
      clipper_(std::move(clipper)),
      options_(std::move(options)),
      noise_(std::move(noise)),
      accountant_(std::move(accountant)) {
  TORCH_CHECK_VALUE(inner_ != nullptr, "DPOptimizer needs an inner torch::optim optimizer");
  TORCH_CHECK_VALUE(clipper_ != nullptr, "DPOptimizer needs a PerSampleGradientClipper");
  TORCH_CHECK_VALUE(noise_ != nullptr, "DPOptimizer needs a noise source");
  dptorch::detail::check_non_negative("noise_multiplier", options_.noise_multiplier());
  dptorch::detail::check_positive("expected_batch_size", options_.expected_batch_size());
  const double q = options_.sample_rate();
  TORCH_CHECK_VALUE(q >= 0 && q <= 1, "sample_rate must be in [0, 1], but is ", q);
  gradient_sigma_ = options_.noise_multiplier();
  adaptive_ = std::dynamic_pointer_cast<AdaptiveClipper>(clipper_->norm_clipper());
  if (adaptive_) {
    // Andrew et al. 2021, Thm 1: σ⁻² = σ_Δ⁻² + (2σ_b)⁻², so σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2).
    const double sigma = options_.noise_multiplier();
    const double sigma_b = adaptive_->options().unclipped_num_std();
    TORCH_CHECK_VALUE(
        sigma < 2 * sigma_b, "adaptive clipping needs noise_multiplier < 2·unclipped_num_std (",
        2 * sigma_b, "), but noise_multiplier is ", sigma, "; raise unclipped_num_std");
    gradient_sigma_ =
        sigma == 0 ? 0 : std::pow(std::pow(sigma, -2) - std::pow(2 * sigma_b, -2), -0.5);
  }
  // Parameters the inner optimiser updates but no dp layer covers would be stepped without
  // privacy: refuse them.
  const auto covered = clipper_->grad_sample_module().parameters();
  for (const auto& group : inner_->param_groups()) {
    for (const auto& p : group.params()) {
      if (!p.requires_grad()) continue;
      bool found = false;
      for (const auto& c : covered) found = found || c.is_same(p);
      TORCH_CHECK_VALUE(found, "the inner optimizer updates a trainable parameter of shape ",
                        p.sizes(),
                        " that the clipper's module does not cover; build the "
                        "optimizer from the same model's parameters");
    }
  }
}

void DPOptimizer::accumulate() {
  if (clipper_->grad_sample_module().has_pass()) clipper_->clip_and_accumulate();
}

void DPOptimizer::step() {
  accumulate();
  const auto params = clipper_->grad_sample_module().parameters();
  const auto& sums = clipper_->accumulated();
  const double C = clipper_->norm_clipper()->noise_scale_norm();
  const double stddev = gradient_sigma_ * C;
  const bool mean =
      clipper_->grad_sample_module().options().loss_reduction() == LossReduction::kMean;
  for (size_t k = 0; k < params.size(); ++k) {
    const auto& p = params[k];
    // The clipper's accumulator becomes the gradient without a copy; the noise goes into it.
    auto grad = sums.empty() ? torch::zeros_like(p) : sums[k];
    noise_->add_gaussian_(grad, stddev);
    if (mean) grad.div_(options_.expected_batch_size());
    p.mutable_grad() = grad.detach();
  }
  if (adaptive_) {
    const double count_noise = noise_
                                   ->gaussian({1}, adaptive_->options().unclipped_num_std(),
                                              torch::TensorOptions().dtype(torch::kDouble))
                                   .item<double>();
    adaptive_->update(count_noise, options_.expected_batch_size());
  }
  clipper_->reset_accumulation();
  inner_->step();
  ++steps_;
  if (accountant_ && options_.sample_rate() > 0) {
    accountant_->step(options_.noise_multiplier(), options_.sample_rate());
  }
}

void DPOptimizer::zero_grad() {
  clipper_->zero_grad();
  inner_->zero_grad();
}

}  // namespace dptorch::optim
