#pragma once

#include <dptorch/accounting/accountant.h>
#include <dptorch/audit/canaries.h>
#include <dptorch/clipping/per_sample_gradient_clipper.h>
#include <dptorch/data/samplers.h>
#include <dptorch/optim/noise.h>

#include <torch/arg.h>
#include <torch/optim/optimizer.h>

#include <functional>
#include <memory>
#include <optional>
#include <vector>

namespace dptorch::distributed {
class Group;
}  // namespace dptorch::distributed

namespace dptorch::optim {

/// Settings of a DPOptimizer.
struct DPOptimizerOptions {
  /// `noise_multiplier` σ (the one the accountant is told) and `expected_batch_size` E[B] = q·N,
  /// the divisor of the noisy sum for "mean" (never the actual, private, batch size).
  DPOptimizerOptions(double noise_multiplier, double expected_batch_size)
      : noise_multiplier_(noise_multiplier), expected_batch_size_(expected_batch_size) {}
  /// σ: the noise std is σ·C (per-layer clipping: C = ‖(C_l)‖₂).
  TORCH_ARG(double, noise_multiplier);
  /// E[B]: the expected logical batch size.
  TORCH_ARG(double, expected_batch_size);
  /// q: the sample rate reported to the accountant with each step (0: no accountant).
  TORCH_ARG(double, sample_rate) = 0;
  /// The ranks of a distributed job (null: one process). Each rank clips its own part of the
  /// logical batch; step() sums the ranks' clipped sums with one all-reduce over a flat bucket
  /// (and the adaptive clipper's unclipped count in the same bucket); rank 0 alone adds the
  /// noise, so the sum carries N(0, σ²C²) once; every rank then takes the same inner step.
  /// expected_batch_size and sample_rate are the whole job's.
  TORCH_ARG(std::shared_ptr<distributed::Group>, group) = nullptr;
  /// The ε at δ the accountant may measure, at most. A step that would pass it is refused
  /// before anything of it is drawn: accumulate() and step() throw accounting::BudgetExhausted,
  /// saying what was spent, and drop the refused batch (as zero_grad()). Needs an accountant and
  /// a sample rate. Unset: no limit.
  TORCH_ARG(std::optional<accounting::PrivacyBudget>, budget) = std::nullopt;
  /// How the batches are drawn (the loader's data::BatchSampler::sampling()). The accountants
  /// analyse Poisson sampling only, so an optimiser with an accountant refuses
  /// data::Sampling::kShuffled rather than report an ε computed for another sampler.
  TORCH_ARG(data::Sampling, sampling) = data::Sampling::kPoisson;
  /// A noise schedule: σ of optimiser step k (0-based, as steps() counts) instead of the fixed
  /// noise_multiplier, e.g. a step decay. Each step draws noise with, and tells the accountant,
  /// its own σ, so the accountant composes the segments of the schedule exactly, and a budget
  /// measures every step at its σ. Each σ must be finite and >= 0 (and, with adaptive clipping,
  /// below 2·unclipped_num_std). Null: noise_multiplier for every step.
  TORCH_ARG(std::function<double(int64_t)>, noise_schedule) = nullptr;
  /// A clipping-norm schedule: the factor s_k on the clipper's thresholds at optimiser step k
  /// (C_k = s_k·C; per-layer: every C_l·s_k), as Opacus' gradient-clipping schedulers scale
  /// max_grad_norm. The noise of step k is σ_k·C_k, so ε does not change with C (σ is relative
  /// to it) and the accountant's history is the same as without the schedule. Each s_k must be
  /// finite and > 0, and the clipper scalable() (constant flat, per-layer or automatic). Null:
  /// the clipper's own thresholds.
  TORCH_ARG(std::function<double(int64_t)>, clipping_schedule) = nullptr;
  /// Gradient canaries that audit the run (audit::GradientCanaries): each step adds the sampled
  /// included canaries to the clipped sums, clipped by this optimiser's clipper, and shows them
  /// the released gradient. Needs a sample rate and thresholds fixed for each step. Null: no
  /// audit.
  TORCH_ARG(std::shared_ptr<audit::GradientCanaries>, audit) = nullptr;
};

/// DP-SGD around any torch::optim optimiser (docs/design.md): step() clips and accumulates the
/// last backward if that was not done yet, adds N(0, σ²C²) to each parameter's clipped sum
/// (C: the norm of the thresholds the step clipped at), divides by the expected batch size
/// ("mean"), runs the inner step, and tells the accountant (σ, q). A step with nothing
/// accumulated (an empty Poisson batch) adds noise only. When the clipper's thresholds are fixed
/// for the step, the noise is drawn when the accumulation begins and the clipped sums are added
/// onto it, already divided: the same sum without a zeroing pass and a division pass over the
/// gradients. Otherwise (dynamic clipping, a user's clipper) the noise is added at the step.
/// With a distributed group, see DPOptimizerOptions::group: rank 0's noise is the noise one process
/// with the same seed would draw, so W ranks and one take the same steps (to float rounding).
///
/// Example:
///   auto clipper = std::make_shared<dptorch::PerSampleGradientClipper>(
///       model, std::make_shared<dptorch::ConstantFlatClipper>(1.0));
///   dptorch::optim::DPOptimizer opt(std::make_shared<torch::optim::SGD>(model->parameters(), 0.1),
///                                   clipper, DPOptimizerOptions(1.1, 256).sample_rate(256. / N),
///                                   std::make_shared<dptorch::optim::TorchNoise>(0), accountant);
///   loss.backward();
///   opt.step();
class DPOptimizer {
 public:
  /// `accountant` may be null (nothing is accounted); an AdaptiveClipper in `clipper` splits σ
  /// between the gradient and the unclipped count (Andrew et al. 2021).
  DPOptimizer(std::shared_ptr<torch::optim::Optimizer> inner,
              std::shared_ptr<PerSampleGradientClipper> clipper, DPOptimizerOptions options,
              std::shared_ptr<NoiseSource> noise,
              std::shared_ptr<accounting::Accountant> accountant = nullptr);

  /// Clips and accumulates the last backward pass (a virtual step); step() does it too.
  void accumulate();
  /// One private optimiser step over everything accumulated since the last step.
  void step();
  /// Zeroes gradients and drops accumulated sums and recorded per-sample gradients.
  void zero_grad();

  /// The wrapped optimiser.
  [[nodiscard]] torch::optim::Optimizer& inner() { return *inner_; }
  /// The clipper that feeds this optimiser.
  [[nodiscard]] PerSampleGradientClipper& clipper() { return *clipper_; }
  /// The accountant told of each step (may be null).
  [[nodiscard]] const std::shared_ptr<accounting::Accountant>& accountant() const {
    return accountant_;
  }
  /// The noise source.
  [[nodiscard]] NoiseSource& noise() { return *noise_; }
  /// The settings.
  [[nodiscard]] const DPOptimizerOptions& options() const { return options_; }
  /// The std multiplier of the next step's gradient noise (σ, or σ_Δ > σ with adaptive
  /// clipping).
  [[nodiscard]] double gradient_noise_multiplier() const;
  /// σ of the next step: noise_schedule(steps()) if there is a schedule, else noise_multiplier.
  [[nodiscard]] double noise_multiplier() const;
  /// Optimiser steps taken.
  [[nodiscard]] int64_t steps() const { return steps_; }
  /// Sets the step count (for resuming from a checkpoint).
  void set_steps(int64_t steps);
  /// How many more steps the budget allows after the accountant's history as it is now (it may
  /// have been restored from a checkpoint or shared with another optimiser); -1 without a
  /// budget. Recomputed (about 2·log2 of the answer ε queries) only when the history changed
  /// other than by this optimiser's own steps.
  [[nodiscard]] int64_t steps_within_budget();

 private:
  // Begins the clipper's accumulation with the clip weights scaled by 1/E[B] ("mean") and, when
  // the thresholds are fixed for the step, the noise already in the accumulators.
  void begin_accumulation();
  // The factor between a clipped sum and the gradient: 1/E[B] for a mean loss, else 1.
  [[nodiscard]] double gradient_scale() const;
  // Whether this process draws the noise: always with one process, rank 0 of a group.
  [[nodiscard]] bool draws_noise() const;
  // Throws BudgetExhausted if the budget does not allow one more step.
  void check_budget();
  // The gradient's share of σ (σ itself, or σ_Δ with adaptive clipping), checked.
  [[nodiscard]] double gradient_sigma(double sigma) const;
  // Sets the clipper's thresholds to the clipping schedule's factor for the next step.
  void apply_clipping_schedule();

  std::shared_ptr<torch::optim::Optimizer> inner_;
  std::shared_ptr<PerSampleGradientClipper> clipper_;
  DPOptimizerOptions options_;
  std::shared_ptr<NoiseSource> noise_;
  std::shared_ptr<accounting::Accountant> accountant_;
  std::shared_ptr<AdaptiveClipper> adaptive_;
  int64_t steps_ = 0;
  // steps_within_budget() for the accountant's history at version budget_version_.
  uint64_t budget_version_ = 0;
  double budget_sigma_ = -1;
  int64_t budget_allowance_ = -1;
};

}  // namespace dptorch::optim
