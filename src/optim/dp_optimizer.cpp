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
  if (!clipper_->grad_sample_module().has_pass()) return;
  if (!clipper_->accumulating_) begin_noised_accumulation();
  clipper_->clip_and_accumulate();
}

void DPOptimizer::begin_noised_accumulation() {
  // Noise first: the accumulators start as N(0, σ²C²)/E[B] (÷ E[B] for "mean") and the clipped
  // sums are added with the same factor, so step() has nothing left to do to the gradients.
  const double scale = mean_loss() ? 1.0 / options_.expected_batch_size() : 1.0;
  const double stddev = noise_stddev() * scale;
  PerSampleGradientClipper::AccumulationStart start;
  start.fill = [this, stddev](const std::vector<torch::Tensor>& accumulators) {
    for (const auto& acc : accumulators) noise_->fill_gaussian_(acc, stddev);
  };
  start.scale = scale;
  clipper_->start_accumulation(start);
  noised_accumulation_ = clipper_->accumulation_id_;
}

bool DPOptimizer::mean_loss() const {
  return clipper_->grad_sample_module().options().loss_reduction() == LossReduction::kMean;
}

double DPOptimizer::noise_stddev() const {
  return gradient_sigma_ * clipper_->norm_clipper()->noise_scale_norm();
}

void DPOptimizer::step() {
  accumulate();
  auto& clipper = *clipper_;
  // Nothing accumulated (an empty batch): the step is the noise alone.
  if (!clipper.accumulating_) begin_noised_accumulation();
  const auto params = clipper.grad_sample_module().parameters();
  const bool noised = clipper.accumulation_id_ == noised_accumulation_;
  // An accumulation the clipper began itself (clip_and_accumulate() called directly) gets its
  // noise and division now.
  TORCH_CHECK(noised || (clipper.scale_ == 1 && !clipper.filled_),
              "DPOptimizer::step() found an accumulation begun by another optimizer; step "
              "with the optimizer that accumulated it");
  for (size_t k = 0; k < params.size(); ++k) {
    // The clipper's accumulator becomes the gradient without a copy.
    const auto& grad = clipper.summed_[k];
    if (!noised) {
      noise_->add_gaussian_(grad, noise_stddev());
      if (mean_loss()) grad.div_(options_.expected_batch_size());
    }
    params[k].mutable_grad() = grad.detach();
  }
  noised_accumulation_ = 0;
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
