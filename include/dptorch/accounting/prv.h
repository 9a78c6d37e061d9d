#pragma once

#include <dptorch/accounting/accountant.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace dptorch::accounting {

/// Options of the PRV accountant (Gopi, Lee, Wutschitz 2021): the reported ε is within
/// eps_error of the true ε of the mechanism at δ ± delta_error (Thm. 5.5 there).
///
/// Example: `PrvAccountant(PrvOptions().eps_error(0.05))`.
class PrvOptions {
 public:
  PrvOptions() = default;

  /// Allowed error of ε; default 0.01. Smaller means a finer grid (cost ~ 1/eps_error).
  PrvOptions& eps_error(double value);
  double eps_error() const noexcept { return eps_error_; }

  /// Allowed error of δ, in (0, δ); default δ / 1000 at each query.
  PrvOptions& delta_error(double value);
  std::optional<double> delta_error() const noexcept { return delta_error_; }

 private:
  double eps_error_ = 0.01;
  std::optional<double> delta_error_;
};

/// The PRV accountant's bounds on ε at one δ: lower <= true ε <= upper, and the estimate in
/// between (Gopi, Lee, Wutschitz 2021, Thm. 5.5).
struct PrvEpsilon {
  double lower = 0.0;
  double estimate = 0.0;
  double upper = 0.0;
};

/// Accountant by numerical composition of privacy loss random variables (Gopi, Lee,
/// Wutschitz 2021, "Numerical Composition of Differential Privacy"), following Opacus's
/// PRVAccountant: the PRV of each (σ, q) block is truncated to a domain [-L, L] sized from
/// RDP tail bounds (Remark 5.6), discretised with a mean-preserving shift, composed by FFT
/// (T-fold self-composition as a power of its spectrum), and ε is read off the composed
/// discrete distribution. The default accountant: tighter than RDP, and epsilon() returns
/// the UPPER bound, so the reported ε is a guarantee.
///
/// Example:
/// ```
///   dptorch::accounting::PrvAccountant accountant;
///   accountant.step(/*noise_multiplier=*/1.5, /*sample_rate=*/0.04, /*steps=*/2249);
///   double eps = accountant.epsilon(1e-5);  // 6.7774
/// ```
class PrvAccountant : public Accountant {
 public:
  /// An accountant with the given error bounds.
  explicit PrvAccountant(PrvOptions options = PrvOptions());

  /// The error bounds.
  const PrvOptions& options() const noexcept { return options_; }

  /// The upper bound on ε at δ (epsilon_bounds(δ).upper).
  [[nodiscard]] double epsilon(double delta) const override;

  /// Lower bound, estimate and upper bound of ε at δ.
  [[nodiscard]] PrvEpsilon epsilon_bounds(double delta) const;

  /// The number of grid points an ε query at δ needs (0 if nothing was spent or ε is
  /// infinite); queries needing more than 2^25 points (256 MiB per array) throw.
  [[nodiscard]] double grid_size(double delta) const;

  /// Whether grid_size(delta) is within the limit.
  [[nodiscard]] bool answerable(double delta) const override;

  /// "prv".
  std::string mechanism() const override { return "prv"; }

  /// A copy with the same options and history.
  std::unique_ptr<Accountant> clone() const override;

 private:
  double resolved_delta_error(double delta) const;

  PrvOptions options_;
};

}  // namespace dptorch::accounting
