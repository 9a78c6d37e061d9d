#pragma once

#include <dptorch/accounting/accountant.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dptorch::accounting {

/// The default RDP orders: {1.1, 1.2, ..., 10.9} ∪ {12, 13, ..., 63}, as in Opacus.
const std::vector<double>& default_rdp_orders();

/// Rényi DP at order α > 1 of ONE step of the Poisson-subsampled Gaussian mechanism with
/// noise multiplier σ and sample rate q (Mironov, Talwar, Zhang 2019, "Rényi Differential
/// Privacy of the Sampled Gaussian Mechanism", Sec. 3.3): log(A_α) / (α - 1), with A_α the
/// exact binomial sum at integer α and the exact two-sided series at fractional α.
/// 0 for q = 0, +infinity for σ = 0 (and q > 0), α / (2σ²) for q = 1.
[[nodiscard]] double rdp_subsampled_gaussian(double noise_multiplier, double sample_rate,
                                             double order);

/// RDP of `steps` compositions of the Poisson-subsampled Gaussian at each order (RDP adds
/// up under composition, Mironov 2017, Prop. 1).
[[nodiscard]] std::vector<double> rdp_subsampled_gaussian(double noise_multiplier,
                                                          double sample_rate, int64_t steps,
                                                          const std::vector<double>& orders);

/// An (ε, δ) bound from RDP with the order that attains it.
struct RdpEpsilon {
  double epsilon = 0.0;
  double order = 0.0;
};

/// Converts RDP values (one per order) to (ε, δ)-DP by Balle et al. 2020 ("Hypothesis
/// Testing Interpretations and Rényi Differential Privacy", Thm. 21):
/// ε = min over α of rdp(α) - (log δ + log α) / (α - 1) + log((α - 1) / α), clamped at 0.
/// NaN entries are skipped; all-NaN gives ε = +infinity.
[[nodiscard]] RdpEpsilon rdp_to_epsilon(const std::vector<double>& orders,
                                        const std::vector<double>& rdp, double delta);

/// Accountant by Rényi DP of the Poisson-subsampled Gaussian (Mironov, Talwar, Zhang 2019),
/// converted to (ε, δ) with Balle et al. 2020, Thm. 21 at the best of its orders.
///
/// Example:
/// ```
///   dptorch::accounting::RdpAccountant accountant;
///   accountant.step(/*noise_multiplier=*/1.5, /*sample_rate=*/0.04, /*steps=*/2250);
///   double eps = accountant.epsilon(1e-5);  // 7.3291
/// ```
class RdpAccountant : public Accountant {
 public:
  /// An accountant with the default orders (default_rdp_orders()).
  RdpAccountant();
  /// An accountant with the given orders, each finite and > 1.
  explicit RdpAccountant(std::vector<double> orders);

  /// The RDP orders searched by epsilon().
  const std::vector<double>& orders() const noexcept { return orders_; }

  /// ε at δ, minimised over the orders (see rdp_to_epsilon()).
  [[nodiscard]] double epsilon(double delta) const override;

  /// ε at δ and the order that attains it (order 0 when ε = 0 because nothing was spent).
  [[nodiscard]] RdpEpsilon epsilon_and_order(double delta) const;

  /// The RDP of the whole history at each order (the sum over blocks).
  [[nodiscard]] std::vector<double> rdp() const;

  /// "rdp".
  std::string mechanism() const override { return "rdp"; }

  /// A copy with the same orders and history.
  std::unique_ptr<Accountant> clone() const override;

 private:
  std::vector<double> orders_;
};

}  // namespace dptorch::accounting
