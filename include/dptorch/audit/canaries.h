#pragma once

#include <torch/arg.h>
#include <torch/types.h>

#include <cstdint>
#include <random>
#include <vector>

namespace dptorch {
class Accumulation;
class NormClipper;
}  // namespace dptorch

/// An empirical audit of a training run's privacy in one run (Steinke, Nasr & Jagielski 2023,
/// "Privacy auditing with one (1) training run"): m gradient canaries, each included in the
/// training set with probability ½, and an ε lower bound from how well the released gradients
/// tell the included ones from the others. docs/design.md §5 says what it can and cannot show.
namespace dptorch::audit {

/// The p-value of `correct` or more right guesses out of `guesses` (the rest abstained) about
/// `canaries` examples, each included independently with probability ½, if the run were
/// (ε, δ)-DP (Steinke et al. 2023, Thm 3 and Algorithm 2): P[Bin(r, p) >= v] + 2mδ·α with
/// p = e^ε/(1 + e^ε) and α = max_{i in 1..v} P[v − i <= Bin(r, p) < v] / i, at most 1.
[[nodiscard]] double audit_p_value(int64_t canaries, int64_t guesses, int64_t correct,
                                   double epsilon, double delta);

/// The largest ε for which (ε, δ)-DP is rejected at `confidence` by `correct` right guesses out
/// of `guesses` about `canaries` canaries: an ε lower bound that holds with that confidence. 0
/// if not even ε = 0 is rejected. Bisection to 1e-6 relative.
[[nodiscard]] double epsilon_lower_bound(int64_t canaries, int64_t guesses, int64_t correct,
                                         double delta, double confidence = 0.95);

/// Settings of GradientCanaries.
struct CanaryOptions {
  /// `count`: m, the number of canaries (at most the number of trainable parameter entries).
  explicit CanaryOptions(int64_t count) : count_(count) {}
  /// m: the number of canaries; each is included with probability ½.
  TORCH_ARG(int64_t, count);
  /// A canary's gradient before clipping, as a multiple of the noise's norm bound C: a correct
  /// clipper brings it down to its threshold, one that does not clip lets the whole of it
  /// through (which the audit then sees). >= 1.
  TORCH_ARG(double, norm_multiple) = 10.0;
  /// Seeds the auditor's secrets: which canaries are included, their coordinates, and in which
  /// steps each included canary is sampled.
  TORCH_ARG(uint64_t, seed) = 0;
  /// The confidence of the lower bound, in (0, 1).
  TORCH_ARG(double, confidence) = 0.95;
};

/// What an audit found.
struct AuditResult {
  int64_t canaries = 0;
  /// Optimiser steps observed.
  int64_t steps = 0;
  /// Guesses made (the most and the least confident halves of them) and how many were right.
  int64_t guesses = 0;
  int64_t correct = 0;
  /// ε lower bound at `delta` with `confidence` (over the guess counts tried, Bonferroni).
  double epsilon_lower_bound = 0.0;
  double delta = 0.0;
  double confidence = 0.0;
};

/// White-box gradient canaries (Steinke et al. 2023, §6): canary i is an example whose gradient
/// is always norm_multiple·C on one coordinate of the model of its own, zero elsewhere. Included
/// canaries join each logical batch with the run's sample rate q, as every example does, and are
/// clipped by the run's own clipper; the auditor scores each canary by the sum over the steps of
/// the released (noisy) gradient at its coordinate, guesses "included" for the highest scores
/// and "excluded" for the lowest, and turns the count of right guesses into an ε lower bound.
/// A DPOptimizer given the canaries (DPOptimizerOptions::audit) calls insert() and observe() at
/// each step; with a distributed group, rank 0 does.
///
/// Example:
///   auto canaries = std::make_shared<dptorch::audit::GradientCanaries>(
///       dptorch::audit::CanaryOptions(1000).seed(7));
///   // ... PrivacyOptions().audit(canaries) ..., train ...
///   auto found = canaries->result(1e-5);  // found.epsilon_lower_bound <= the accountant's ε
class GradientCanaries {
 public:
  explicit GradientCanaries(CanaryOptions options);

  /// Places the canaries on distinct coordinates of `params` (drawn uniformly over their
  /// entries) and clears the scores. Called once, with the parameters the optimiser steps.
  void attach(const std::vector<torch::Tensor>& params);
  /// Adds this step's sampled included canaries to the clipped sums of `accumulation` (its
  /// accumulators follow the attached parameters), each clipped by `clipper` as a sample with
  /// that one gradient and scaled by the accumulation's factor. `noise_bound` is C.
  void insert(Accumulation& accumulation, NormClipper& clipper, double noise_bound,
              double sample_rate);
  /// Adds each coordinate of the released gradients (the attached parameters' `.grad`, which
  /// are `scale` times the noisy sums) to its canary's score.
  void observe(const std::vector<torch::Tensor>& params, double scale);

  /// The audit of the steps observed so far, at `delta`.
  [[nodiscard]] AuditResult result(double delta) const;
  /// Each canary's score [m] (double).
  [[nodiscard]] const torch::Tensor& scores() const { return scores_; }
  /// Which canaries are included [m] (bool): the auditor's secret.
  [[nodiscard]] const torch::Tensor& included() const { return included_; }
  /// Whether attach() has placed the canaries.
  [[nodiscard]] bool attached() const { return !coordinates_.empty(); }
  /// The settings.
  [[nodiscard]] const CanaryOptions& options() const { return options_; }

 private:
  CanaryOptions options_;
  std::mt19937_64 rng_;
  torch::Tensor included_;  // [m] bool
  torch::Tensor scores_;    // [m] double
  // Per attached parameter: the flat indices of its canaries and their canary numbers.
  std::vector<torch::Tensor> coordinates_;
  std::vector<torch::Tensor> owners_;
  int64_t steps_ = 0;
};

}  // namespace dptorch::audit
