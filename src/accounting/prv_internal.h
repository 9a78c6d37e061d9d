#pragma once

// The PRV accountant's stages (grid, discretisation, FFT composition, ε read-off), shared by
// prv.cpp, calibration.cpp and the tests. Internals: the public API is dptorch/accounting/prv.h.

#include <dptorch/accounting/accountant.h>
#include <dptorch/accounting/prv.h>

#include <cstdint>
#include <vector>

#include "accounting/fft.h"

namespace dptorch::accounting::detail {

/// The most grid points the PRV accountant allocates (256 MiB per array of doubles).
constexpr int64_t kMaxPrvGridSize = int64_t{1} << 25;

/// CDF of the privacy loss Y = log(p(x)/q(x)), x ~ p, of one Poisson-subsampled Gaussian step
/// (Gopi, Lee, Wutschitz 2021, Prop. B.4): with z = log((e^t - (1 - q)) / q),
/// F(t) = q Φ(zσ - 1/(2σ)) + (1 - q) Φ(zσ + 1/(2σ)) for t > log(1 - q), else 0.
double prv_cdf(double noise_multiplier, double sample_rate, double t);

/// 1 - prv_cdf(t), accurate in the upper tail.
double prv_survival(double noise_multiplier, double sample_rate, double t);

/// A uniform grid t_i = (i - offset) dt + shift, i in [0, size).
struct PrvGrid {
  double dt = 0.0;
  int64_t size = 0;
  int64_t offset = 0;
  double shift = 0.0;
  double t(int64_t i) const { return static_cast<double>(i - offset) * dt + shift; }
};

/// Half width L and mesh dt of the grid for a history.
struct PrvExtent {
  double half_width = 0.0;
  double dt = 0.0;
};

/// The extent the PRV accountant uses for a history (entries with steps > 0, q > 0, σ > 0):
/// L = max(ε_RDP(δ_err/4) of the history, ε_RDP(δ_err/(8 T)) of each single step, eps_error)
/// + 3 and dt = eps_error / sqrt(T log(12/δ_err) / 2), T the total step count (Gopi et al.
/// 2021, Remark 5.6, as in Opacus).
PrvExtent plan_prv_extent(const std::vector<HistoryEntry>& spending, double eps_error,
                          double delta_error);

/// The number of points make_prv_grid(L, dt) allocates, which may exceed kMaxPrvGridSize
/// (+infinity for an infinite L).
double prv_grid_points(double half_width, double dt);

/// Opacus's Domain.create_aligned(-L, L, dt) (2 ceil(L/dt) + 2 points, t_min = -ceil(L/dt) dt),
/// widened symmetrically to the next power of two for the radix-2 FFT. Throws if that is more
/// than kMaxPrvGridSize points.
PrvGrid make_prv_grid(double half_width, double dt);

/// Mean of the PRV of one step truncated to [t_min, t_max], by adaptive Gauss-Kronrod
/// quadrature of -∫F + ∫(1 - F).
double truncated_prv_mean(double noise_multiplier, double sample_rate, double t_min, double t_max);

/// A probability mass function on a grid (pmf[i] is the mass at grid.t(i)).
struct DiscretePrv {
  PrvGrid grid;
  Buffer pmf;
};

/// The PRV of one step truncated to the grid's span, binned (mass of [t_i - dt/2, t_i + dt/2]
/// at t_i), and shifted so that its mean is the truncated PRV's mean (Gopi et al. 2021,
/// Sec. 5.1). Throws if the shift is not below dt / 2.
DiscretePrv discretize_prv(double noise_multiplier, double sample_rate, const PrvGrid& grid);

/// The composition (sum) of `steps` independent copies of each entry's discrete PRV on
/// `grid`, by FFT: the product of the spectra raised to the step counts, inverted once, is the
/// circular convolution on the grid (mass beyond [-L, L] wraps around; L makes it negligible).
DiscretePrv compose_prvs(const std::vector<HistoryEntry>& spending, const PrvGrid& grid);

/// ε bounds at δ from a composed discrete PRV (Gopi et al. 2021, Thm. 5.5; Opacus's
/// DiscretePRV.compute_epsilon): with i the first grid point where
/// δ(t_i) = Σ_{j>=i} p_j (1 - e^(t_i - t_j)) <= δ', ε(δ') = t_i + log((Σ_{j>=i} p_j - δ') /
/// Σ_{j>=i} p_j e^(t_i - t_j)); upper = ε(δ - delta_error) + eps_error, estimate = ε(δ),
/// lower = ε(δ + delta_error) - eps_error, each clamped at 0; +infinity beyond the grid. (Opacus
/// raises where δ' is met below the grid's lowest loss; that ε is negative, so 0 here.)
PrvEpsilon epsilon_from_discrete_prv(const DiscretePrv& prv, double delta, double delta_error,
                                     double eps_error);

}  // namespace dptorch::accounting::detail
