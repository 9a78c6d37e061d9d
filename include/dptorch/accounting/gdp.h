#pragma once

#include <dptorch/accounting/accountant.h>

#include <cstdint>
#include <memory>
#include <string>

namespace dptorch::accounting {

/// μ of the central-limit Gaussian DP approximation of `steps` Poisson-subsampled Gaussian
/// steps (Dong, Roth, Su 2019, "Gaussian Differential Privacy", Thm. 3.5 / Cor. 5.4; Bu et al.
/// 2020, "Deep Learning with Gaussian Differential Privacy", Poisson version):
/// μ = q · sqrt(T · (exp(1/σ²) - 1)). +infinity for σ = 0 and q > 0.
[[nodiscard]] double gdp_mu_poisson(double noise_multiplier, double sample_rate, int64_t steps);

/// δ(ε) of a μ-GDP mechanism (Dong, Roth, Su 2019, Cor. 2.13):
/// δ = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2).
[[nodiscard]] double gdp_delta(double epsilon, double mu);

/// The ε with gdp_delta(ε, μ) = δ, by bisection to double precision; 0 if δ(0) <= δ already,
/// +infinity for μ = +infinity.
[[nodiscard]] double gdp_epsilon(double mu, double delta);

/// Accountant by the central limit theorem of Gaussian DP (Dong, Roth, Su 2019; Bu et al.
/// 2020), as Opacus's "gdp" accountant with Poisson sampling. An approximation that can
/// UNDERESTIMATE ε (Gopi et al. 2021, Sec. 1); for comparison only. Blocks with different
/// (σ, q) compose by adding their μ² (Dong, Roth, Su 2019, Thm. 3.5), which reduces to the
/// single-block formula when (σ, q) is constant.
class GdpAccountant : public Accountant {
 public:
  GdpAccountant() = default;

  /// ε at δ for the μ of the whole history (see gdp_epsilon()).
  [[nodiscard]] double epsilon(double delta) const override;

  /// μ of the whole history: sqrt(Σ_blocks q² T (exp(1/σ²) - 1)).
  [[nodiscard]] double mu() const;

  /// "gdp".
  std::string mechanism() const override { return "gdp"; }

  /// A copy with the same history.
  std::unique_ptr<Accountant> clone() const override;
};

}  // namespace dptorch::accounting
