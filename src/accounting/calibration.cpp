#include <dptorch/accounting/calibration.h>
#include <dptorch/common.h>

#include <dptorch/accounting/accountant.h>

#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <memory>
#include <utility>

#include "accounting/accountant_internal.h"

namespace dptorch::accounting {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
// The reference bisection ends on the tolerance alone; this guards against an ε(σ) that
// jumps across the tolerance band (the PRV grid changes with σ). The result stays feasible.
constexpr int kMaxBisections = 200;

void check_name(const std::string& name) {
  bool known = false;
  for (const auto& valid : accountant_names()) {
    known = known || valid == name;
  }
  if (!known) {
    (void)make_accountant(name);  // throws with the list of valid names
  }
}

int64_t resolve_steps(const std::optional<int64_t>& steps, const std::optional<double>& epochs,
                      double sample_rate) {
  TORCH_CHECK_VALUE(steps.has_value() != epochs.has_value(),
                    steps.has_value() ? "set either steps or epochs, not both"
                                      : "set the number of steps or of epochs");
  if (steps) {
    return *steps;
  }
  if (sample_rate == 0) {
    return 0;
  }
  // int(epochs / sample_rate) as Opacus: truncation toward zero of the double quotient.
  const double quotient = *epochs / sample_rate;
  TORCH_CHECK_VALUE(quotient < 9.2e18, "epochs / sample_rate = ", quotient, " steps is too many");
  return static_cast<int64_t>(quotient);
}

template <typename T>
T required(const std::optional<T>& value, const char* name) {
  TORCH_CHECK_VALUE(value.has_value(), name, " is required");
  return *value;
}

}  // namespace

// --- CalibrationOptions -------------------------------------------------------------------

CalibrationOptions& CalibrationOptions::target_epsilon(double value) {
  dptorch::detail::check_positive("target_epsilon", value);
  target_epsilon_ = value;
  return *this;
}

CalibrationOptions& CalibrationOptions::delta(double value) {
  detail::check_delta(value);
  delta_ = value;
  return *this;
}

CalibrationOptions& CalibrationOptions::sample_rate(double value) {
  detail::check_positive_sample_rate(value);
  sample_rate_ = value;
  return *this;
}

CalibrationOptions& CalibrationOptions::steps(int64_t value) {
  dptorch::detail::check_at_least("steps", value, 1);
  steps_ = value;
  return *this;
}

CalibrationOptions& CalibrationOptions::epochs(double value) {
  dptorch::detail::check_positive("epochs", value);
  epochs_ = value;
  return *this;
}

CalibrationOptions& CalibrationOptions::accountant(std::string value) {
  check_name(value);
  accountant_ = std::move(value);
  return *this;
}

CalibrationOptions& CalibrationOptions::epsilon_tolerance(double value) {
  dptorch::detail::check_positive("epsilon_tolerance", value);
  epsilon_tolerance_ = value;
  return *this;
}

CalibrationOptions& CalibrationOptions::prior(std::vector<HistoryEntry> value) {
  for (const auto& entry : value) detail::check_entry(entry);
  prior_ = std::move(value);
  return *this;
}

int64_t CalibrationOptions::resolved_steps() const {
  const double q = required(sample_rate_, "sample_rate");
  const int64_t steps = resolve_steps(steps_, epochs_, q);
  TORCH_CHECK_VALUE(steps >= 1, "epochs ", *epochs_, " with sample_rate ", q,
                    " is int(epochs / sample_rate) = 0 steps; calibration needs >= 1 step");
  return steps;
}

double noise_multiplier_for_epsilon(const CalibrationOptions& options) {
  const double target = required(options.target_epsilon(), "target_epsilon");
  const double delta = required(options.delta(), "delta");
  const double q = required(options.sample_rate(), "sample_rate");
  const int64_t steps = options.resolved_steps();
  const double tolerance = options.epsilon_tolerance();
  const std::unique_ptr<Accountant> accountant = make_accountant(options.accountant());

  // The history of a probe: the prior releases, then the steps at σ.
  auto probe = [&](double sigma) {
    auto history = options.prior();
    history.push_back({sigma, q, steps});
    accountant->set_history(std::move(history));
  };
  auto epsilon_at = [&](double sigma) {
    probe(sigma);
    return accountant->epsilon(delta);
  };

  if (!options.prior().empty()) {
    accountant->set_history(options.prior());
    const double spent = accountant->epsilon(delta);
    TORCH_CHECK_VALUE(spent < target, "target_epsilon ", target,
                      " is unreachable: the prior releases alone spend epsilon ", spent,
                      " at delta ", delta, " by the ", options.accountant(),
                      " accountant; raise target_epsilon or the prior releases' noise");
  }

  double sigma_low = 0.0;
  double sigma_high = 10.0;
  double eps_high = kInf;
  while (eps_high > target) {
    sigma_high *= 2.0;
    if (sigma_high > kMaxNoiseMultiplier) {
      const double smallest = epsilon_at(kMaxNoiseMultiplier);
      TORCH_CHECK_VALUE(false, "target_epsilon ", target, " is unreachable with delta ", delta,
                        ", sample_rate ", q, " and ", steps, " steps by the ", options.accountant(),
                        " accountant: the smallest reachable is ", smallest,
                        " (at noise_multiplier ", kMaxNoiseMultiplier,
                        "); raise target_epsilon or delta, or lower sample_rate or steps");
    }
    eps_high = epsilon_at(sigma_high);
  }

  for (int iteration = 0; target - eps_high > tolerance && iteration < kMaxBisections;
       ++iteration) {
    const double sigma = (sigma_low + sigma_high) / 2.0;
    // Below the optimum the grids of the PRV and PLD accountants grow as ε does; a query over
    // the accountant's limits means ε is far above the target there, so the probe is
    // infeasible (never unsafe).
    probe(sigma);
    if (!accountant->answerable(delta)) {
      sigma_low = sigma;
      continue;
    }
    const double eps = epsilon_at(sigma);
    if (eps < target) {
      sigma_high = sigma;
      eps_high = eps;
    } else {
      sigma_low = sigma;
    }
  }
  return sigma_high;
}

// --- EpsilonOptions -----------------------------------------------------------------------

EpsilonOptions& EpsilonOptions::noise_multiplier(double value) {
  detail::check_noise_multiplier(value);
  noise_multiplier_ = value;
  return *this;
}

EpsilonOptions& EpsilonOptions::sample_rate(double value) {
  detail::check_sample_rate(value);
  sample_rate_ = value;
  return *this;
}

EpsilonOptions& EpsilonOptions::delta(double value) {
  detail::check_delta(value);
  delta_ = value;
  return *this;
}

EpsilonOptions& EpsilonOptions::steps(int64_t value) {
  detail::check_steps(value);
  steps_ = value;
  return *this;
}

EpsilonOptions& EpsilonOptions::epochs(double value) {
  dptorch::detail::check_non_negative("epochs", value);
  epochs_ = value;
  return *this;
}

EpsilonOptions& EpsilonOptions::accountant(std::string value) {
  check_name(value);
  accountant_ = std::move(value);
  return *this;
}

int64_t EpsilonOptions::resolved_steps() const {
  return resolve_steps(steps_, epochs_, required(sample_rate_, "sample_rate"));
}

double epsilon_for(const EpsilonOptions& options) {
  const double sigma = required(options.noise_multiplier(), "noise_multiplier");
  const double q = required(options.sample_rate(), "sample_rate");
  const double delta = required(options.delta(), "delta");
  const int64_t steps = options.resolved_steps();
  auto accountant = make_accountant(options.accountant());
  accountant->set_history({{sigma, q, steps}});
  return accountant->epsilon(delta);
}

}  // namespace dptorch::accounting
