#include "accounting/numerics.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace dptorch::accounting::detail {

namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kLogSqrtPi = 0.57236494292470008707;  // log(sqrt(pi))
constexpr double kSqrt2 = 1.41421356237309504880;
constexpr double kLog2 = 0.69314718055994530942;
// Past this argument std::erfc loses relative precision to subnormals; switch to the series.
constexpr double kErfcSeriesFrom = 25.0;
}  // namespace

double log_add(double log_x, double log_y) {
  const double lo = std::min(log_x, log_y);
  const double hi = std::max(log_x, log_y);
  if (lo == -kInf) {
    return hi;
  }
  return std::log1p(std::exp(lo - hi)) + hi;
}

double log_sub(double log_x, double log_y) {
  TORCH_CHECK(log_x >= log_y, "log_sub: the difference exp(", log_x, ") - exp(", log_y,
              ") is negative");
  if (log_y == -kInf) {
    return log_x;
  }
  if (log_x == log_y) {
    return -kInf;
  }
  // log(e^x - e^y) = x + log(1 - e^(y - x)); -expm1 keeps full precision for y close to x
  // and does not overflow for y far below x.
  return log_x + std::log(-std::expm1(log_y - log_x));
}

double log_erfc(double x) {
  if (x < kErfcSeriesFrom) {
    return std::log(std::erfc(x));
  }
  // erfc(x) = exp(-x^2) / (x sqrt(pi)) * (1 - 1/(2x^2) + 3/(2x^2)^2 - 15/(2x^2)^3 + ...);
  // at x >= 25 ten terms are accurate to well below double precision.
  const double inv_two_x2 = 1.0 / (2.0 * x * x);
  double term = 1.0;
  double series = 1.0;
  for (int k = 1; k <= 10; ++k) {
    term *= -(2.0 * k - 1.0) * inv_two_x2;
    series += term;
  }
  return -x * x - std::log(x) - kLogSqrtPi + std::log(series);
}

double log_normal_cdf(double x) { return log_erfc(-x / kSqrt2) - kLog2; }

double normal_cdf(double x) { return 0.5 * std::erfc(-x / kSqrt2); }

}  // namespace dptorch::accounting::detail
