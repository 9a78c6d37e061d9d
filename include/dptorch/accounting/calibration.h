#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <dptorch/accounting/accountant.h>

namespace dptorch::accounting {

/// Noise multipliers above this are not searched: a target that needs more is unreachable.
constexpr double kMaxNoiseMultiplier = 2000.0;

/// What to calibrate σ for: the target (ε, δ) after a number of Poisson-subsampled Gaussian
/// steps, given as `steps` or as `epochs` (steps = int(epochs / sample_rate)).
///
/// Example:
/// ```
///   double sigma = noise_multiplier_for_epsilon(
///       CalibrationOptions().target_epsilon(8).delta(1e-5).sample_rate(0.04).epochs(90));
/// ```
class CalibrationOptions {
 public:
  CalibrationOptions() = default;

  /// Required: the ε to reach, finite and > 0.
  CalibrationOptions& target_epsilon(double value);
  /// Required: δ in (0, 1).
  CalibrationOptions& delta(double value);
  /// Required: the Poisson sample rate q in (0, 1].
  CalibrationOptions& sample_rate(double value);
  /// The number of steps, >= 1. Exactly one of steps and epochs is required.
  CalibrationOptions& steps(int64_t value);
  /// The number of epochs, > 0; resolves to int(epochs / sample_rate) steps.
  CalibrationOptions& epochs(double value);
  /// The accountant that measures ε: a registered name (accountant_names(): "prv", the default,
  /// "pld", "rdp", "gdp", or a user's own).
  CalibrationOptions& accountant(std::string value);
  /// The bisection stops once ε is within this of the target (from below); default 0.01.
  CalibrationOptions& epsilon_tolerance(double value);
  /// Releases of the same data set before the steps (for example a private feature statistic,
  /// features::ChannelWhitening::release()), as history blocks: σ is calibrated so that they
  /// and the steps together stay within the target. Empty by default.
  CalibrationOptions& prior(std::vector<HistoryEntry> value);

  /// The values as set (empty where not set); see the setters.
  std::optional<double> target_epsilon() const noexcept { return target_epsilon_; }
  std::optional<double> delta() const noexcept { return delta_; }
  std::optional<double> sample_rate() const noexcept { return sample_rate_; }
  std::optional<int64_t> steps() const noexcept { return steps_; }
  std::optional<double> epochs() const noexcept { return epochs_; }
  const std::string& accountant() const noexcept { return accountant_; }
  double epsilon_tolerance() const noexcept { return epsilon_tolerance_; }
  const std::vector<HistoryEntry>& prior() const noexcept { return prior_; }

  /// The number of steps: `steps`, or int(epochs / sample_rate). Throws if neither or both
  /// were set, or if the result is < 1.
  int64_t resolved_steps() const;

 private:
  std::optional<double> target_epsilon_;
  std::optional<double> delta_;
  std::optional<double> sample_rate_;
  std::optional<int64_t> steps_;
  std::optional<double> epochs_;
  std::string accountant_ = "prv";
  double epsilon_tolerance_ = 0.01;
  std::vector<HistoryEntry> prior_;
};

/// The noise multiplier σ that keeps ε at or below the target after the given steps: the
/// bisection of Opacus's get_noise_multiplier, reproduced exactly. Starting from σ = 20 it
/// doubles σ until ε(σ) <= target, then bisects [0, σ] keeping the upper end feasible until
/// target - ε(σ) <= epsilon_tolerance, and returns the feasible upper end, so it never
/// overshoots the target. ε is that of the prior releases followed by the steps. Throws if the
/// target needs σ > kMaxNoiseMultiplier (or the prior alone spends it).
[[nodiscard]] double noise_multiplier_for_epsilon(const CalibrationOptions& options);

/// What to measure: ε after `steps` (or `epochs`) steps with noise multiplier σ and sample
/// rate q, at δ, by an accountant.
///
/// Example:
/// ```
///   double eps = epsilon_for(EpsilonOptions().noise_multiplier(1.5).sample_rate(0.04)
///                                .steps(2250).delta(1e-5).accountant("rdp"));  // 7.3291
/// ```
class EpsilonOptions {
 public:
  EpsilonOptions() = default;

  /// Required: σ, finite and >= 0.
  EpsilonOptions& noise_multiplier(double value);
  /// Required: q in [0, 1].
  EpsilonOptions& sample_rate(double value);
  /// Required: δ in (0, 1).
  EpsilonOptions& delta(double value);
  /// The number of steps, >= 0. Exactly one of steps and epochs is required.
  EpsilonOptions& steps(int64_t value);
  /// The number of epochs, >= 0; resolves to int(epochs / sample_rate) steps (0 if q = 0).
  EpsilonOptions& epochs(double value);
  /// A registered accountant name (accountant_names()); "prv" by default.
  EpsilonOptions& accountant(std::string value);

  /// The values as set (empty where not set); see the setters.
  std::optional<double> noise_multiplier() const noexcept { return noise_multiplier_; }
  std::optional<double> sample_rate() const noexcept { return sample_rate_; }
  std::optional<double> delta() const noexcept { return delta_; }
  std::optional<int64_t> steps() const noexcept { return steps_; }
  std::optional<double> epochs() const noexcept { return epochs_; }
  const std::string& accountant() const noexcept { return accountant_; }

  /// The number of steps: `steps`, or int(epochs / sample_rate). Throws if neither or both
  /// were set.
  int64_t resolved_steps() const;

 private:
  std::optional<double> noise_multiplier_;
  std::optional<double> sample_rate_;
  std::optional<double> delta_;
  std::optional<int64_t> steps_;
  std::optional<double> epochs_;
  std::string accountant_ = "prv";
};

/// ε at δ of `steps` Poisson-subsampled Gaussian steps, by the named accountant.
[[nodiscard]] double epsilon_for(const EpsilonOptions& options);

}  // namespace dptorch::accounting
