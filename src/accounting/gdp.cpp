#include <dptorch/accounting/gdp.h>

#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

#include "accounting/accountant_internal.h"
#include "accounting/numerics.h"

namespace dptorch::accounting {

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();
// The bracket Opacus hands to brentq; widened by doubling if the root lies beyond it.
constexpr double kInitialUpperEpsilon = 500.0;
}  // namespace

double gdp_mu_poisson(double noise_multiplier, double sample_rate, int64_t steps) {
  detail::check_entry({noise_multiplier, sample_rate, steps});
  if (steps == 0 || sample_rate == 0) {
    return 0.0;
  }
  if (noise_multiplier == 0) {
    return kInf;
  }
  const double growth = std::expm1(1.0 / (noise_multiplier * noise_multiplier));
  return sample_rate * std::sqrt(static_cast<double>(steps) * growth);
}

double gdp_delta(double epsilon, double mu) {
  TORCH_CHECK_VALUE(mu > 0 && !std::isnan(mu), "mu must be > 0, but is ", mu);
  TORCH_CHECK_VALUE(epsilon >= 0, "epsilon must be >= 0, but is ", epsilon);
  const double first = detail::normal_cdf(-epsilon / mu + mu / 2.0);
  // e^ε Φ(x) in log space: e^ε overflows long before the product does.
  const double second = std::exp(epsilon + detail::log_normal_cdf(-epsilon / mu - mu / 2.0));
  return first - second;
}

double gdp_epsilon(double mu, double delta) {
  detail::check_delta(delta);
  TORCH_CHECK_VALUE(mu >= 0 && !std::isnan(mu), "mu must be >= 0, but is ", mu);
  if (mu == 0) {
    return 0.0;
  }
  if (std::isinf(mu)) {
    return kInf;
  }
  if (gdp_delta(0.0, mu) <= delta) {
    return 0.0;
  }
  double lo = 0.0;
  double hi = kInitialUpperEpsilon;
  while (gdp_delta(hi, mu) > delta) {
    lo = hi;
    hi *= 2.0;
    if (std::isinf(hi)) {
      return kInf;
    }
  }
  // δ(ε) decreases in ε; bisect until the bracket cannot shrink any further.
  for (;;) {
    const double mid = lo + (hi - lo) / 2.0;
    if (mid <= lo || mid >= hi) {
      break;
    }
    if (gdp_delta(mid, mu) > delta) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  return hi;
}

double GdpAccountant::mu() const {
  double mu2 = 0.0;
  for (const auto& entry : detail::spending_entries(history())) {
    const double mu = gdp_mu_poisson(entry.noise_multiplier, entry.sample_rate, entry.steps);
    mu2 += mu * mu;
  }
  return std::sqrt(mu2);
}

double GdpAccountant::epsilon(double delta) const {
  detail::check_delta(delta);
  return gdp_epsilon(mu(), delta);
}

std::unique_ptr<Accountant> GdpAccountant::clone() const {
  return std::make_unique<GdpAccountant>(*this);
}

}  // namespace dptorch::accounting
