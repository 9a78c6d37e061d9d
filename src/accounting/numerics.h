#pragma once

// Log-space arithmetic and Gaussian tail functions shared by the accountants. These are
// internals: the public API of the accountants is in rdp.h, prv.h, gdp.h and calibration.h.

namespace dptorch::accounting::detail {

/// log(exp(log_x) + exp(log_y)) without overflow; -infinity stands for 0.
double log_add(double log_x, double log_y);

/// log(exp(log_x) - exp(log_y)) for log_x >= log_y; -infinity stands for 0. Throws if
/// log_x < log_y, since the difference would be negative.
double log_sub(double log_x, double log_y);

/// log(erfc(x)), accurate for large x where erfc(x) underflows (asymptotic series past 25).
double log_erfc(double x);

/// log(Phi(x)) of the standard normal CDF Phi, accurate deep in the lower tail.
double log_normal_cdf(double x);

/// Standard normal CDF Phi(x) = erfc(-x / sqrt(2)) / 2.
double normal_cdf(double x);

}  // namespace dptorch::accounting::detail
