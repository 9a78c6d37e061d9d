#pragma once

#include <dptorch/accounting/accountant.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace dptorch::accounting {

/// Options of the PLD accountant: the mesh of the privacy-loss grid and the tail mass that
/// may be cut off each one-step distribution (and the composed one) and charged to δ.
///
/// Example: `PldAccountant(PldOptions().value_discretization_interval(1e-3))`.
class PldOptions {
 public:
  PldOptions() = default;

  /// Mesh Δ of the privacy-loss grid (losses iΔ). By default, at each query,
  /// Δ = min(1e-4, s/20) with s = min over the history of q sqrt(e^(1/σ²) - 1), the scale of
  /// one step's privacy loss (its standard deviation to first order in q), so that a step's
  /// loss spreads over at least 20 grid cells; widened where a step's loss range would need
  /// more than 2^21 points. The cost of a query grows as 1/Δ; the pessimism of the
  /// discretisation shrinks as (Δ/s)² (see PldAccountant).
  PldOptions& value_discretization_interval(double value);
  std::optional<double> value_discretization_interval() const noexcept {
    return value_discretization_interval_;
  }

  /// Tail mass cut off each one-step loss distribution and each side of the composed one,
  /// in (0, 1e-3]; default 1e-15. Every cut-off mass is added to δ, so a larger bound only
  /// makes the reported ε and δ more pessimistic (and the grid smaller).
  PldOptions& tail_mass_truncation(double value);
  double tail_mass_truncation() const noexcept { return tail_mass_truncation_; }

 private:
  std::optional<double> value_discretization_interval_;
  double tail_mass_truncation_ = 1e-15;
};

/// Accountant by numerical composition of privacy loss distributions (Koskela, Jälkö,
/// Honkela 2020, "Computing Tight Differential Privacy Guarantees Using FFT"; Google's
/// dp_accounting PLD library). The PLD of one Poisson-subsampled Gaussian step is discretised
/// on the grid {iΔ} by "connect the dots" (Doroshenko, Ghazi, Kamath, Kumar, Manurangsi 2022,
/// "Connect the Dots: Tighter Discrete Approximations of Privacy Loss Distributions"): the
/// mass of every loss ℓ in [iΔ, (i+1)Δ] is split between the two grid points so that both
/// its P-mass and its Q-mass (P-mass · e^(-ℓ)) are kept. The discrete pair is a dominating
/// pair of the true one (the true pair is a post-processing of it), so its composition
/// upper-bounds δ(ε) at every ε and is exact at the grid points of one step; its mean loss
/// exceeds the true one by at most Δ²/8 per step (privacy buckets, which round losses up,
/// lose up to Δ per step). Mass below the one-step grid is rounded up to its lowest point,
/// mass above it goes to +infinity. Blocks compose by FFT on a grid sized by Chernoff
/// bounds of the composed loss (aliasing only adds mass, and the cut-off tails go to δ).
///
/// Both neighbouring directions are accounted and the larger δ (and ε) reported, as in
/// dp_accounting: "remove", the pair (P, Q) = ((1-q) N(0, σ²) + q N(1, σ²), N(0, σ²)) with loss
/// log(1 - q + q e^((2x-1)/(2σ²))), x ~ P (the PRV accountant's pair); and "add", the pair
/// (N(0, σ²), (1-q) N(0, σ²) + q N(1, σ²)), the same pair reversed. The remove direction
/// gave the larger ε in every case we measured, but the two PLDs differ and no dominance
/// is assumed: both are composed (the cost of a query doubles; q = 1 needs one).
///
/// Example:
/// ```
///   dptorch::accounting::PldAccountant accountant;
///   accountant.step(/*noise_multiplier=*/1.5, /*sample_rate=*/0.04, /*steps=*/2249);
///   double eps = accountant.epsilon(1e-5);
///   double delta = accountant.delta(/*epsilon=*/eps);  // <= 1e-5
/// ```
class PldAccountant : public Accountant {
 public:
  /// An accountant with the given grid options.
  explicit PldAccountant(PldOptions options = PldOptions());

  /// The grid options.
  const PldOptions& options() const noexcept { return options_; }

  /// The smallest ε >= 0 with delta(ε) <= δ, for δ in (0, 1): an upper bound on the ε of the
  /// recorded history. 0 for an empty history; +infinity if a step with q > 0 has σ = 0 (as
  /// every accountant). Throws if δ is not above the truncated tail mass (about
  /// tail_mass_truncation per step) or the FFT's rounding level (grid size × 2.2e-16).
  [[nodiscard]] double epsilon(double delta) const override;

  /// δ(ε) = max over both directions of Σ_ℓ max(0, 1 - e^(ε-ℓ)) P(L = ℓ) + P(L = +infinity)
  /// for the composed discrete PLD, an upper bound on the true δ(ε), for finite ε >= 0.
  /// 0 for an empty history. Steps with σ = 0 enter as their true point masses (loss
  /// log(1 - q) w.p. 1 - q, +infinity w.p. q), so δ may be below 1 where epsilon() is +infinity.
  [[nodiscard]] double delta(double epsilon) const;

  /// The number of points of the FFT grid a query needs (the larger of the two directions;
  /// 0 if nothing was spent); queries needing more than 2^25 points throw.
  [[nodiscard]] double grid_size() const;

  /// Whether a query's grid is within the limit (δ itself is checked by epsilon()).
  [[nodiscard]] bool answerable(double delta) const override;

  /// "pld".
  std::string mechanism() const override { return "pld"; }

  /// A copy with the same options and history.
  std::unique_ptr<Accountant> clone() const override;

 private:
  PldOptions options_;
};

}  // namespace dptorch::accounting
