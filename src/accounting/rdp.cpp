#include <dptorch/accounting/rdp.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "accounting/accountant_internal.h"
#include "accounting/numerics.h"

namespace dptorch::accounting {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kSqrt2 = 1.41421356237309504880;
// The fractional-order series stops once both new terms are below e^-30 (as in TF-Privacy).
constexpr double kSeriesCutoff = -30.0;
// A guard against a series that never meets the cutoff (it converges polynomially in i).
constexpr int64_t kMaxSeriesTerms = 10'000'000;

void check_order(double order) {
  TORCH_CHECK_VALUE(std::isfinite(order) && order > 1, "RDP order must be finite and > 1, but is ",
                    order);
}

// log(A_α) at integer α: log Σ_i C(α, i) q^i (1 - q)^(α - i) exp((i² - i) / (2σ²)).
double log_a_integer(double q, double sigma, int64_t alpha) {
  const double log_q = std::log(q);
  const double log_1mq = std::log1p(-q);
  const double two_sigma2 = 2.0 * sigma * sigma;
  double log_a = -kInf;
  double log_binom = 0.0;  // log C(α, i), updated incrementally
  for (int64_t i = 0; i <= alpha; ++i) {
    if (i > 0) {
      log_binom += std::log(static_cast<double>(alpha - i + 1) / static_cast<double>(i));
    }
    const double di = static_cast<double>(i);
    const double term = log_binom + di * log_q + static_cast<double>(alpha - i) * log_1mq +
                        (di * di - di) / two_sigma2;
    log_a = detail::log_add(log_a, term);
  }
  return log_a;
}

// log(A_α) at fractional α: the integral split at z0 = σ² log(1/q - 1) + 1/2 gives two
// alternating binomial series (Mironov, Talwar, Zhang 2019, Sec. 3.3), summed in log space.
double log_a_fractional(double q, double sigma, double alpha) {
  const double log_q = std::log(q);
  const double log_1mq = std::log1p(-q);
  const double two_sigma2 = 2.0 * sigma * sigma;
  const double z0 = sigma * sigma * (log_1mq - log_q) + 0.5;
  const double log_half = std::log(0.5);
  double log_a0 = -kInf;
  double log_a1 = -kInf;
  double coef = 1.0;  // C(α, i), real α, by the product formula
  for (int64_t i = 0;; ++i) {
    TORCH_CHECK(i < kMaxSeriesTerms, "RDP series at order ", alpha, " did not converge for q = ", q,
                ", noise_multiplier = ", sigma);
    const double di = static_cast<double>(i);
    if (i > 0) {
      coef *= (alpha - di + 1.0) / di;
    }
    const double log_coef = std::log(std::abs(coef));
    const double j = alpha - di;
    const double log_t0 = log_coef + di * log_q + j * log_1mq;
    const double log_t1 = log_coef + j * log_q + di * log_1mq;
    const double log_e0 = log_half + detail::log_erfc((di - z0) / (kSqrt2 * sigma));
    const double log_e1 = log_half + detail::log_erfc((z0 - j) / (kSqrt2 * sigma));
    const double log_s0 = log_t0 + (di * di - di) / two_sigma2 + log_e0;
    const double log_s1 = log_t1 + (j * j - j) / two_sigma2 + log_e1;
    if (coef > 0) {
      log_a0 = detail::log_add(log_a0, log_s0);
      log_a1 = detail::log_add(log_a1, log_s1);
    } else {
      log_a0 = detail::log_sub(log_a0, log_s0);
      log_a1 = detail::log_sub(log_a1, log_s1);
    }
    if (std::max(log_s0, log_s1) < kSeriesCutoff) {
      break;
    }
  }
  return detail::log_add(log_a0, log_a1);
}

}  // namespace

const std::vector<double>& default_rdp_orders() {
  static const std::vector<double> orders = [] {
    std::vector<double> out;
    for (int x = 1; x < 100; ++x) {
      out.push_back(1.0 + x / 10.0);
    }
    for (int a = 12; a < 64; ++a) {
      out.push_back(a);
    }
    return out;
  }();
  return orders;
}

double rdp_subsampled_gaussian(double noise_multiplier, double sample_rate, double order) {
  detail::check_noise_multiplier(noise_multiplier);
  detail::check_sample_rate(sample_rate);
  check_order(order);
  if (sample_rate == 0) {
    return 0.0;
  }
  if (noise_multiplier == 0) {
    return kInf;
  }
  if (sample_rate == 1) {
    return order / (2.0 * noise_multiplier * noise_multiplier);
  }
  const double log_a =
      order == std::floor(order)
          ? log_a_integer(sample_rate, noise_multiplier, static_cast<int64_t>(order))
          : log_a_fractional(sample_rate, noise_multiplier, order);
  return log_a / (order - 1.0);
}

std::vector<double> rdp_subsampled_gaussian(double noise_multiplier, double sample_rate,
                                            int64_t steps, const std::vector<double>& orders) {
  detail::check_steps(steps);
  std::vector<double> rdp;
  rdp.reserve(orders.size());
  for (double order : orders) {
    const double one = rdp_subsampled_gaussian(noise_multiplier, sample_rate, order);
    // 0 steps of an infinite-RDP step spend nothing (and inf * 0 would be NaN).
    rdp.push_back(steps == 0 ? 0.0 : one * static_cast<double>(steps));
  }
  return rdp;
}

RdpEpsilon rdp_to_epsilon(const std::vector<double>& orders, const std::vector<double>& rdp,
                          double delta) {
  TORCH_CHECK_VALUE(orders.size() == rdp.size(), "rdp_to_epsilon needs one RDP value per order, ",
                    "but got ", orders.size(), " orders and ", rdp.size(), " values");
  TORCH_CHECK_VALUE(!orders.empty(), "rdp_to_epsilon needs at least one order");
  detail::check_delta(delta);
  RdpEpsilon best{kInf, std::numeric_limits<double>::quiet_NaN()};
  bool any = false;
  for (size_t k = 0; k < orders.size(); ++k) {
    const double a = orders[k];
    check_order(a);
    const double eps =
        rdp[k] - (std::log(delta) + std::log(a)) / (a - 1.0) + std::log((a - 1.0) / a);
    if (std::isnan(eps)) {
      continue;
    }
    if (!any || eps < best.epsilon) {
      best = {eps, a};
      any = true;
    }
  }
  best.epsilon = std::max(best.epsilon, 0.0);
  return best;
}

RdpAccountant::RdpAccountant() : orders_(default_rdp_orders()) {}

RdpAccountant::RdpAccountant(std::vector<double> orders) : orders_(std::move(orders)) {
  TORCH_CHECK_VALUE(!orders_.empty(), "RdpAccountant needs at least one order");
  for (double order : orders_) {
    check_order(order);
  }
}

std::vector<double> RdpAccountant::rdp() const {
  std::vector<double> total(orders_.size(), 0.0);
  for (const auto& entry : detail::spending_entries(history())) {
    const auto block =
        rdp_subsampled_gaussian(entry.noise_multiplier, entry.sample_rate, entry.steps, orders_);
    for (size_t k = 0; k < total.size(); ++k) {
      total[k] += block[k];
    }
  }
  return total;
}

RdpEpsilon RdpAccountant::epsilon_and_order(double delta) const {
  detail::check_delta(delta);
  if (detail::spending_entries(history()).empty()) {
    return {0.0, 0.0};
  }
  return rdp_to_epsilon(orders_, rdp(), delta);
}

double RdpAccountant::epsilon(double delta) const { return epsilon_and_order(delta).epsilon; }

std::unique_ptr<Accountant> RdpAccountant::clone() const {
  return std::make_unique<RdpAccountant>(*this);
}

}  // namespace dptorch::accounting
