#include <dptorch/optim/dp_optimizer.h>

#include <dptorch/distributed/group.h>

#include <torch/torch.h>

#include <cmath>
#include <sstream>

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
  dptorch::detail::check_in_range("sample_rate", options_.sample_rate(), 0, 1,
                                  dptorch::detail::Bounds::kClosed);
  adaptive_ = std::dynamic_pointer_cast<AdaptiveClipper>(clipper_->norm_clipper());
  (void)gradient_noise_multiplier();  // checks the first step's σ
  TORCH_CHECK_VALUE(!options_.group() || clipper_->norm_clipper()->thresholds_fixed(),
                    "a distributed DPOptimizer needs clipping thresholds fixed for each step "
                    "(flat, per-layer, adaptive or automatic clipping): thresholds computed from "
                    "each rank's own data would differ between the ranks");
  TORCH_CHECK_VALUE(
      options_.sampling() == data::Sampling::kPoisson || accountant_ == nullptr,
      "DPOptimizer: batches drawn as shuffled fixed-size batches (ShuffledSampler) are not what "
      "dptorch's accountants analyse (each assumes Poisson sampling, where every example joins a "
      "batch independently with probability q), so the epsilon they reported would not hold: "
      "draw batches with a PoissonSampler (as PrivacyEngine does), or pass no accountant");
  if (options_.clipping_schedule()) {
    TORCH_CHECK_VALUE(clipper_->norm_clipper()->scalable(),
                      "a clipping schedule scales the clipper's own thresholds, but this clipper "
                      "moves them itself (dynamic or adaptive clipping); use flat, per-layer or "
                      "automatic clipping with a clipping schedule");
    apply_clipping_schedule();  // checks the first step's factor
  }
  if (const auto& audit = options_.audit()) {
    TORCH_CHECK_VALUE(options_.sample_rate() > 0 && clipper_->norm_clipper()->thresholds_fixed(),
                      "an audited DPOptimizer needs a sample rate (its canaries are sampled as "
                      "any example is) and clipping thresholds fixed for each step (flat, "
                      "per-layer, adaptive or automatic clipping)");
    if (!audit->attached()) audit->attach(clipper_->grad_sample_module().parameters());
  }
  if (const auto& budget = options_.budget()) {
    accounting::check_budget(*budget);
    TORCH_CHECK_VALUE(accountant_ != nullptr && options_.sample_rate() > 0,
                      "a DPOptimizer with a privacy budget needs an accountant and a sample rate "
                      "(DPOptimizerOptions::sample_rate) to measure what each step spends");
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

double DPOptimizer::noise_multiplier() const {
  if (!options_.noise_schedule()) return options_.noise_multiplier();
  const double sigma = options_.noise_schedule()(steps_);
  TORCH_CHECK_VALUE(std::isfinite(sigma) && sigma >= 0, "the noise schedule gave step ", steps_,
                    " the noise multiplier ", sigma, "; it must be finite and >= 0");
  return sigma;
}

void DPOptimizer::set_steps(int64_t steps) {
  steps_ = steps;
  apply_clipping_schedule();
}

void DPOptimizer::apply_clipping_schedule() {
  if (!options_.clipping_schedule()) return;
  const double factor = options_.clipping_schedule()(steps_);
  TORCH_CHECK_VALUE(std::isfinite(factor) && factor > 0, "the clipping schedule gave step ", steps_,
                    " the threshold factor ", factor, "; it must be finite and > 0");
  clipper_->norm_clipper()->set_threshold_factor(factor);
}

double DPOptimizer::gradient_sigma(double sigma) const {
  if (!adaptive_) return sigma;
  // Andrew et al. 2021, Thm 1: σ⁻² = σ_Δ⁻² + (2σ_b)⁻², so σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2).
  const double sigma_b = adaptive_->options().unclipped_num_std();
  TORCH_CHECK_VALUE(sigma < 2 * sigma_b,
                    "adaptive clipping needs noise_multiplier < 2·unclipped_num_std (", 2 * sigma_b,
                    "), but noise_multiplier is ", sigma, "; raise unclipped_num_std");
  return sigma == 0 ? 0 : std::pow(std::pow(sigma, -2) - std::pow(2 * sigma_b, -2), -0.5);
}

double DPOptimizer::gradient_noise_multiplier() const { return gradient_sigma(noise_multiplier()); }

int64_t DPOptimizer::steps_within_budget() {
  const auto& budget = options_.budget();
  if (!budget) return -1;
  // Counted at the next step's σ: a schedule that changes σ asks again.
  const double sigma = noise_multiplier();
  if (budget_allowance_ < 0 || accountant_->version() != budget_version_ ||
      sigma != budget_sigma_) {
    budget_allowance_ =
        accounting::steps_within_budget(*accountant_, sigma, options_.sample_rate(), *budget);
    budget_version_ = accountant_->version();
    budget_sigma_ = sigma;
  }
  return budget_allowance_;
}

void DPOptimizer::check_budget() {
  if (!options_.budget() || steps_within_budget() > 0) return;
  const auto& budget = *options_.budget();
  std::ostringstream message;
  message << "privacy budget exhausted: after " << accountant_->total_steps()
          << " accounted steps the " << accountant_->mechanism() << " accountant measures epsilon "
          << accountant_->epsilon(budget.delta) << " at delta " << budget.delta
          << ", and one more step (noise multiplier " << noise_multiplier() << ", sample rate "
          << options_.sample_rate() << ") would pass the budget of epsilon " << budget.epsilon
          << "; nothing of this step was drawn, applied or accounted, and its batch was dropped. "
             "Stop training here (the model so far is within the budget), or set a larger budget";
  // The recorded pass and anything accumulated go, so that the next forward pass starts clean.
  zero_grad();
  throw accounting::BudgetExhausted(message.str());
}

void DPOptimizer::accumulate() {
  if (!clipper_->grad_sample_module().has_pass()) return;
  if (!clipper_->accumulation().active()) begin_accumulation();
  clipper_->clip_and_accumulate();
}

double DPOptimizer::gradient_scale() const {
  const bool mean =
      clipper_->grad_sample_module().options().loss_reduction() == LossReduction::kMean;
  return mean ? 1.0 / options_.expected_batch_size() : 1.0;
}

bool DPOptimizer::draws_noise() const { return !options_.group() || options_.group()->rank() == 0; }

void DPOptimizer::begin_accumulation() {
  check_budget();  // before any noise is drawn
  AccumulationStart start;
  start.scale = gradient_scale();
  start.owner = this;
  // The adaptive clipper's unclipped count travels in the gradients' bucket.
  start.extra = options_.group() && adaptive_ ? 1 : 0;
  if (clipper_->norm_clipper()->thresholds_fixed() && draws_noise()) {
    // Noise first: the accumulators start as N(0, σ²C²)·scale and the clipped sums are added with
    // the same factor, so step() has nothing left to do to the gradients.
    start.noise_bound = clipper_->noise_bound();
    const double stddev = gradient_noise_multiplier() * start.noise_bound * start.scale;
    start.fill = [this, stddev](const std::vector<torch::Tensor>& accumulators) {
      for (const auto& acc : accumulators) noise_->fill_gaussian_(acc, stddev);
    };
  }
  clipper_->accumulation().begin(clipper_->grad_sample_module().parameters(), std::move(start));
}

void DPOptimizer::step() {
  check_budget();  // before any noise is drawn, however the accumulation began
  accumulate();
  auto& acc = clipper_->accumulation();
  if (!acc.active()) {
    // Nothing accumulated (accumulate() found no pass): the step is the noise alone, unless the
    // batch went missing because the model ran in eval mode.
    clipper_->check_nothing_unrecorded();
    begin_accumulation();
  }
  TORCH_CHECK(acc.owner() == this || acc.owner() == nullptr,
              "DPOptimizer::step() found an accumulation begun by another optimizer; step "
              "with the optimizer that accumulated it");
  // One path for every way the accumulation began: bring the sums to the gradient's scale, and
  // add the noise they do not hold yet. The noise must be scaled with the thresholds this step
  // clipped at, C = ‖aggregated thresholds‖₂; Gaussian variances add, so noise drawn for C₀
  // needs N(0, σ²(C² − C₀²)) more (none when the thresholds were fixed, as they then are).
  // The auditor's canaries join the batch as examples do, before the ranks' sums are combined.
  const auto& audit = options_.audit();
  if (audit && draws_noise()) {
    audit->insert(acc, *clipper_->norm_clipper(), clipper_->noise_bound(), options_.sample_rate());
  }
  const double scale = gradient_scale();
  const double rescale = scale / acc.scale();
  const double bound = clipper_->noise_bound();
  const double drawn = acc.initial_noise_bound();
  const double missing =
      bound > drawn && draws_noise()
          ? gradient_noise_multiplier() * std::sqrt(bound * bound - drawn * drawn) * scale
          : 0.0;
  for (const auto& sum : acc.sums()) {
    if (rescale != 1) sum.mul_(rescale);
    if (missing > 0) noise_->add_gaussian_(sum, missing);
  }
  // The noisy count of unclipped samples (Andrew et al. 2021): drawn where the gradient noise is.
  const auto count_noise = [&] {
    return noise_
        ->gaussian({1}, adaptive_->options().unclipped_num_std(),
                   torch::TensorOptions().dtype(torch::kDouble))
        .item<double>();
  };
  if (const auto& group = options_.group()) {
    // One all-reduce per bucket (one bucket unless the parameters mix dtypes or devices): the
    // ranks' clipped sums, rank 0's noise, and the unclipped counts with rank 0's count noise.
    TORCH_CHECK(!adaptive_ || acc.extra().defined(),
                "a distributed DPOptimizer with adaptive clipping must begin the accumulation "
                "itself: call optimizer.accumulate() (or step()) after backward, not the "
                "clipper's clip_and_accumulate()");
    if (adaptive_)
      acc.extra().fill_(adaptive_->pending_count() + (draws_noise() ? count_noise() : 0));
    std::vector<torch::Tensor> buckets = acc.buckets();
    group->all_reduce_sum(buckets);
    // update() adds its own pending count to the noise it is given: pass it the rest of the sum.
    const double released = adaptive_ ? acc.extra().item<double>() : 0.0;
    acc.finish(clipper_->grad_sample_module().parameters());
    if (adaptive_) {
      adaptive_->update(released - adaptive_->pending_count(), options_.expected_batch_size());
    }
  } else {
    // The accumulators become the gradients without a copy.
    acc.finish(clipper_->grad_sample_module().parameters());
    if (adaptive_) adaptive_->update(count_noise(), options_.expected_batch_size());
  }
  if (audit && draws_noise()) audit->observe(clipper_->grad_sample_module().parameters(), scale);
  inner_->step();
  const double sigma = noise_multiplier();  // this step's
  ++steps_;
  apply_clipping_schedule();
  if (accountant_ && options_.sample_rate() > 0) {
    const bool cached = options_.budget() && budget_allowance_ > 0 &&
                        accountant_->version() == budget_version_ && sigma == budget_sigma_;
    accountant_->step(sigma, options_.sample_rate());
    if (cached) {
      --budget_allowance_;
      budget_version_ = accountant_->version();
    }
  }
}

void DPOptimizer::zero_grad() {
  clipper_->zero_grad();
  inner_->zero_grad();
}

}  // namespace dptorch::optim
