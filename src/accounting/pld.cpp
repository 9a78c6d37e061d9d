#include <dptorch/accounting/pld.h>
#include <dptorch/common.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "accounting/accountant_internal.h"
#include "accounting/fft.h"

namespace dptorch::accounting {

namespace {

using detail::Buffer;

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kSqrt2 = 1.41421356237309504880;
// The most grid points a query allocates, as the PRV accountant (256 MiB per array).
constexpr int64_t kMaxPldGridSize = int64_t{1} << 25;
// The default mesh: the smaller of kDefaultInterval and 1/kCellsPerLossScale of the smallest
// one-step loss scale, but coarse enough that no one-step grid passes kMaxDefaultStepPoints.
constexpr double kDefaultInterval = 1e-4;
constexpr double kCellsPerLossScale = 20.0;
constexpr double kMaxDefaultStepPoints = 0x1p21;
// Past this loss e^loss overflows; connect-the-dots then rounds the mass up (pessimistic).
constexpr double kMaxExpArgument = 700.0;

// The two neighbouring directions of add/remove DP (dp_accounting's AdjacencyType): with
// M = (1-q) N(0, σ²) + q N(1, σ²), "remove" is the pair (P, Q) = (M, N(0, σ²)) and "add" the
// pair (N(0, σ²), M).
enum class Direction { kRemove, kAdd };

// --- The privacy loss of one step ---------------------------------------------------------

// Φ(z) and 1 - Φ(z), each from one erfc evaluated on the side where it is small, so that
// both tails keep their relative precision.
struct NormalTails {
  double z;
  double cdf;
  double sf;
};

NormalTails normal_tails(double z) {
  if (z < 0) {
    const double cdf = 0.5 * std::erfc(-z / kSqrt2);
    return {z, cdf, 1.0 - cdf};
  }
  const double sf = 0.5 * std::erfc(z / kSqrt2);
  return {z, 1.0 - sf, sf};
}

// Φ(b.z) - Φ(a.z) for a.z <= b.z, differencing the small tails only.
double normal_mass(const NormalTails& a, const NormalTails& b) {
  double mass = 0.0;
  if (a.z >= 0) {
    mass = a.sf - b.sf;
  } else if (b.z < 0) {
    mass = b.cdf - a.cdf;
  } else {
    mass = 1.0 - a.cdf - b.sf;
  }
  return std::max(0.0, mass);
}

// The z with 1 - Φ(z) = p, for p in (0, 1/2], by bisection (called once per query).
double upper_normal_quantile(double p) {
  double lo = 0.0;
  double hi = 40.0;
  for (int k = 0; k < 200 && hi - lo > 1e-13; ++k) {
    const double mid = 0.5 * (lo + hi);
    (normal_tails(mid).sf > p ? lo : hi) = mid;
  }
  return hi;
}

// The remove direction's loss log(P/Q)(x) = log(1 - q + q e^w), w = (2x - 1)/(2σ²); it
// increases with x. The add direction's loss is its negative.
double remove_loss(double sigma, double q, double x) {
  const double w = (2.0 * x - 1.0) / (2.0 * sigma * sigma);
  if (w > 0) {
    return w + std::log(q + (1.0 - q) * std::exp(-w));
  }
  return std::log1p(q * std::expm1(w));
}

// The x with remove_loss(x) = t: σ² log((e^t - (1 - q)) / q) + 1/2; -infinity at or below
// the bottom of the support, t <= log(1 - q).
double remove_threshold(double sigma, double q, double t) {
  double log_shifted = 0.0;  // log(e^t - (1 - q))
  if (t > 1) {
    log_shifted = t + std::log1p(-(1.0 - q) * std::exp(-t));
  } else {
    const double shifted = std::expm1(t) + q;
    if (!(shifted > 0)) {
      return -kInf;
    }
    log_shifted = std::log(shifted);
  }
  return sigma * sigma * (log_shifted - std::log(q)) + 0.5;
}

// The loss of one step as a monotone map of x, giving the P- and Q-mass of loss intervals as
// differences of normal CDFs at the x where the loss crosses the interval's ends.
class StepLoss {
 public:
  StepLoss(double sigma, double q, Direction direction)
      : sigma_(sigma), q_(q), direction_(direction) {}

  // The normal tails at the x where the loss crosses t, under N(0, σ²) and N(1, σ²).
  struct Edge {
    NormalTails at0;
    NormalTails at1;
  };

  Edge edge(double t) const {
    // {L <= t} is {x <= x(t)} for remove and {x >= x(-t)} for add.
    const double x = direction_ == Direction::kRemove ? remove_threshold(sigma_, q_, t)
                                                      : remove_threshold(sigma_, q_, -t);
    return {normal_tails(x / sigma_), normal_tails((x - 1.0) / sigma_)};
  }

  // P-mass and Q-mass of the losses in (t1, t2], from edge(t1) and edge(t2).
  std::pair<double, double> masses(const Edge& e1, const Edge& e2) const {
    const bool remove = direction_ == Direction::kRemove;
    const Edge& lo = remove ? e1 : e2;
    const Edge& hi = remove ? e2 : e1;
    const double mass0 = normal_mass(lo.at0, hi.at0);
    const double mass1 = normal_mass(lo.at1, hi.at1);
    const double mixture = (1.0 - q_) * mass0 + q_ * mass1;
    return remove ? std::make_pair(mixture, mass0) : std::make_pair(mass0, mixture);
  }

  // A loss interval [t_lo, t_hi] outside which P has mass <= tail on each side: the loss
  // at the P-quantiles of x (for the mixture, the quantiles of its outer component bound it).
  std::pair<double, double> range(double tail) const {
    const double z = upper_normal_quantile(tail);
    if (direction_ == Direction::kRemove) {
      return {remove_loss(sigma_, q_, -sigma_ * z), remove_loss(sigma_, q_, 1.0 + sigma_ * z)};
    }
    return {-remove_loss(sigma_, q_, sigma_ * z), -remove_loss(sigma_, q_, -sigma_ * z)};
  }

 private:
  double sigma_;
  double q_;
  Direction direction_;
};

// --- Discretisation -----------------------------------------------------------------------

// A discrete PLD on the grid {iΔ}: P-mass pmf[k] at loss (first + k)Δ, and P-mass at +inf.
struct DiscretePld {
  int64_t first = 0;
  std::vector<double> pmf;
  double infinity_mass = 0.0;
};

// Connect the dots (Doroshenko et al. 2022): P-mass p with Q-mass r of losses in [t, t + Δ]
// becomes masses at t and t + Δ with the same P- and Q-mass (a e^-t + b e^-(t+Δ) = r), a
// pair of which the original is a post-processing (merging the two points).
void split_mass(double p, double r, double t, double one_minus_decay, double* lower,
                double* upper) {
  double up = p;
  if (t < kMaxExpArgument) {
    up = std::clamp((p - r * std::exp(t)) / one_minus_decay, 0.0, p);
  }
  *lower += p - up;
  *upper += up;
}

// Drops zero masses at both ends, so that the first and last masses are positive.
void trim(DiscretePld& pld) {
  const auto& pmf = pld.pmf;
  const auto begin = std::find_if(pmf.begin(), pmf.end(), [](double p) { return p > 0; });
  if (begin == pmf.end()) {
    pld.pmf.clear();
    return;
  }
  const auto end = std::find_if(pmf.rbegin(), pmf.rend(), [](double p) { return p > 0; }).base();
  pld.first += begin - pmf.begin();
  pld.pmf = std::vector<double>(begin, end);
}

// A point mass p at loss `loss` with Q-mass r (σ = 0), split onto the grid.
DiscretePld point_mass_pld(double loss, double p, double r, double infinity_mass, double dl) {
  DiscretePld out;
  out.infinity_mass = infinity_mass;
  if (p > 0) {
    out.first = static_cast<int64_t>(std::floor(loss / dl));
    out.pmf.assign(2, 0.0);
    split_mass(p, r, static_cast<double>(out.first) * dl, -std::expm1(-dl), &out.pmf[0],
               &out.pmf[1]);
  }
  trim(out);
  return out;
}

// The discrete PLD of one Poisson-subsampled Gaussian step in one direction: losses in
// [t_lo, t_hi] (see StepLoss::range) connect the dots, mass below t_lo is rounded up to it,
// mass above t_hi goes to +infinity.
DiscretePld discretize_step(double sigma, double q, Direction direction, double dl, double tail) {
  if (sigma == 0) {
    // Outcomes 0 and 1: remove has loss log(1 - q) w.p. 1 - q (Q-mass 1) and +inf w.p. q;
    // add has loss -log(1 - q) w.p. 1 (Q-mass 1 - q), +inf for q = 1.
    if (q == 1) {
      return point_mass_pld(0.0, 0.0, 0.0, 1.0, dl);
    }
    return direction == Direction::kRemove ? point_mass_pld(std::log1p(-q), 1.0 - q, 1.0, q, dl)
                                           : point_mass_pld(-std::log1p(-q), 1.0, 1.0 - q, 0.0, dl);
  }
  const StepLoss loss(sigma, q, direction);
  const auto [t_lo, t_hi] = loss.range(tail);
  const double points = std::ceil(t_hi / dl) - std::floor(t_lo / dl) + 1.0;
  TORCH_CHECK_VALUE(points <= static_cast<double>(kMaxPldGridSize), "the PLD accountant needs ",
                    points, " grid points for one step with noise_multiplier ", sigma,
                    " and sample_rate ", q, " (privacy loss range [", t_lo, ", ", t_hi, "], mesh ",
                    dl, "), more than its limit of ", kMaxPldGridSize,
                    "; use a larger value_discretization_interval, or the prv or rdp accountant");
  DiscretePld out;
  out.first = static_cast<int64_t>(std::floor(t_lo / dl));
  const auto n = static_cast<size_t>(points);
  out.pmf.assign(n, 0.0);
  const double one_minus_decay = -std::expm1(-dl);

  StepLoss::Edge left = loss.edge(static_cast<double>(out.first) * dl);
  out.pmf[0] = loss.masses(loss.edge(-kInf), left).first;
  for (size_t k = 0; k + 1 < n; ++k) {
    const double t = static_cast<double>(out.first + static_cast<int64_t>(k)) * dl;
    const StepLoss::Edge right = loss.edge(t + dl);
    const auto [p, r] = loss.masses(left, right);
    if (p > 0) {
      split_mass(p, r, t, one_minus_decay, &out.pmf[k], &out.pmf[k + 1]);
    }
    left = right;
  }
  out.infinity_mass = loss.masses(left, loss.edge(kInf)).first;
  trim(out);
  return out;
}

// --- Composition --------------------------------------------------------------------------

// log Σ_k pmf[k] e^(λ (first + k) Δ) for λ != 0 and a trimmed, non-empty pmf, by Horner's
// rule in e^(-|λ|Δ) < 1 from the end whose term is largest: no exp per point, no overflow.
double log_mgf(const DiscretePld& pld, double lambda, double dl) {
  const size_t n = pld.pmf.size();
  const double ratio = std::exp(-std::abs(lambda) * dl);
  double acc = 0.0;
  if (lambda > 0) {
    for (size_t k = 0; k < n; ++k) {
      acc = acc * ratio + pld.pmf[k];
    }
    return lambda * static_cast<double>(pld.first + static_cast<int64_t>(n) - 1) * dl +
           std::log(acc);
  }
  for (size_t k = n; k-- > 0;) {
    acc = acc * ratio + pld.pmf[k];
  }
  return lambda * static_cast<double>(pld.first) * dl + std::log(acc);
}

// The steps of one history block in one direction.
struct Block {
  DiscretePld step;
  int64_t steps;
};

// The discrete PLDs of a history in one direction and the window [lo, lo + size) of grid
// indices the composed finite part is computed on; outside_mass bounds its mass outside.
struct CompositionPlan {
  std::vector<Block> blocks;
  bool finite_part_empty = false;  // some step is +inf with probability 1
  double log_finite_mass = 0.0;    // log P(composed loss < +inf)
  int64_t lo = 0;
  double size = 0.0;  // a power of two (maybe past kMaxPldGridSize), or 0 if finite_part_empty
  double outside_mass = 0.0;
};

// The mesh of a query: the option if set, else min(1e-4, s/20) with s the smallest
// q sqrt(e^(1/σ²) - 1) of the history's noisy blocks (sqrt of the χ²-divergence of a step,
// which is its loss's standard deviation to first order in q): the pessimism of connect-the-
// dots grows as (Δ/s)². Small q with small σ gives a loss range far wider than s; there the
// mesh is widened to keep each one-step grid within kMaxDefaultStepPoints.
double resolved_interval(const std::vector<HistoryEntry>& spending, const PldOptions& options) {
  if (options.value_discretization_interval()) {
    return *options.value_discretization_interval();
  }
  double interval = kDefaultInterval;
  double floor = 0.0;
  for (const auto& entry : spending) {
    const double sigma = entry.noise_multiplier;
    const double q = entry.sample_rate;
    if (sigma > 0) {
      interval =
          std::min(interval, q * std::sqrt(std::expm1(1.0 / (sigma * sigma))) / kCellsPerLossScale);
      for (Direction direction : {Direction::kRemove, Direction::kAdd}) {
        const auto [t_lo, t_hi] =
            StepLoss(sigma, q, direction).range(options.tail_mass_truncation());
        floor = std::max(floor, (t_hi - t_lo) / kMaxDefaultStepPoints);
      }
    }
  }
  return std::max(interval, floor);
}

CompositionPlan plan_composition(const std::vector<HistoryEntry>& spending, Direction direction,
                                 double dl, double tail) {
  CompositionPlan plan;
  double min_index = 0.0;  // doubles: T times an index may pass int64 for absurd histories
  double max_index = 0.0;
  for (const auto& entry : spending) {
    Block block{discretize_step(entry.noise_multiplier, entry.sample_rate, direction, dl, tail),
                entry.steps};
    const double steps = static_cast<double>(entry.steps);
    plan.log_finite_mass += steps * std::log1p(-block.step.infinity_mass);
    if (block.step.pmf.empty()) {
      plan.finite_part_empty = true;
      continue;
    }
    min_index += steps * static_cast<double>(block.step.first);
    max_index += steps * static_cast<double>(block.step.first +
                                             static_cast<int64_t>(block.step.pmf.size()) - 1);
    plan.blocks.push_back(std::move(block));
  }
  if (plan.finite_part_empty) {
    return plan;
  }

  // Chernoff: P(S >= h) <= e^(K(λ) - λh) and P(S <= l) <= e^(K(-λ) + λl) for the composed
  // loss S with log-MGF K = Σ T_b log M_b; the best λ of a geometric set gives the window.
  const double log_tail = std::log(tail);
  double upper = kInf;
  double lower = -kInf;
  for (int k = -8; k <= 30; ++k) {
    const double lambda = std::exp2(0.5 * k);
    double k_plus = 0.0;
    double k_minus = 0.0;
    for (const auto& block : plan.blocks) {
      const double steps = static_cast<double>(block.steps);
      k_plus += steps * log_mgf(block.step, lambda, dl);
      k_minus += steps * log_mgf(block.step, -lambda, dl);
    }
    upper = std::min(upper, (k_plus - log_tail) / lambda);
    lower = std::max(lower, (log_tail - k_minus) / lambda);
  }
  double hi = std::ceil(upper / dl);
  double lo = std::floor(lower / dl);
  if (hi < max_index) {
    plan.outside_mass += tail;
  } else {
    hi = max_index;
  }
  if (lo > min_index) {
    plan.outside_mass += tail;
  } else {
    lo = min_index;
  }
  lo = std::min(lo, hi);
  constexpr double kMaxIndex = 0x1p62;
  TORCH_CHECK_VALUE(std::abs(lo) < kMaxIndex && std::abs(hi) < kMaxIndex,
                    "the PLD accountant cannot index the composed privacy loss of this history ",
                    "(grid indices up to ", std::max(std::abs(lo), std::abs(hi)),
                    "); use a larger value_discretization_interval, or the rdp accountant");
  plan.lo = static_cast<int64_t>(lo);
  plan.size = std::exp2(std::ceil(std::log2(std::max(2.0, hi - lo + 1.0))));
  return plan;
}

int64_t positive_mod(int64_t i, int64_t n) { return ((i % n) + n) % n; }

// The composed PLD: P-mass pmf[j] at loss (first + j)Δ, and `extra`, the mass at +inf plus
// the bound on the mass outside the window, charged to δ at every ε.
struct ComposedPld {
  int64_t first = 0;
  Buffer pmf;
  double extra = 0.0;
};

// Composes the plan's blocks by FFT on `size` points: each one-step PLD is folded modulo
// size (so its span may exceed the window), the product of the spectra raised to the step
// counts is the distribution of the composed index modulo size, and reading it on the
// window [lo, lo + size) is exact up to the mass outside the window, which lands on some
// window point (adding, never removing, mass) and is bounded by outside_mass.
ComposedPld compose(const CompositionPlan& plan) {
  ComposedPld out;
  out.extra = -std::expm1(plan.log_finite_mass);
  if (plan.finite_part_empty) {
    out.extra = 1.0;
    return out;
  }
  TORCH_CHECK_VALUE(plan.size <= static_cast<double>(kMaxPldGridSize), "the PLD accountant needs ",
                    plan.size, " grid points to compose this history, more than its limit of ",
                    kMaxPldGridSize, "; use a larger value_discretization_interval or ",
                    "tail_mass_truncation, or the prv or rdp accountant");
  const auto n = static_cast<int64_t>(plan.size);
  const auto un = static_cast<size_t>(n);
  const size_t bins = un / 2 + 1;
  Buffer product(un, un + 2);
  Buffer work(plan.blocks.size() > 1 ? un : 0, plan.blocks.size() > 1 ? un + 2 : 0);
  Buffer scratch(un);
  for (size_t b = 0; b < plan.blocks.size(); ++b) {
    const auto& block = plan.blocks[b];
    Buffer& target = b == 0 ? product : work;
    target.resize(un);
    std::fill(target.begin(), target.end(), 0.0);
    int64_t index = positive_mod(block.step.first, n);
    for (double p : block.step.pmf) {
      target[static_cast<size_t>(index)] += p;
      index = index + 1 == n ? 0 : index + 1;
    }
    detail::rfft_inplace(target, scratch);
    detail::raise_spectrum(target.data(), bins, block.steps);
    if (b > 0) {
      double* acc = product.data();
      const double* z = work.data();
      for (size_t k = 0; k < bins; ++k) {
        const double re = acc[2 * k] * z[2 * k] - acc[2 * k + 1] * z[2 * k + 1];
        const double im = acc[2 * k] * z[2 * k + 1] + acc[2 * k + 1] * z[2 * k];
        acc[2 * k] = re;
        acc[2 * k + 1] = im;
      }
    }
  }
  detail::irfft_inplace(product, un, scratch);
  std::rotate(product.begin(), product.begin() + positive_mod(plan.lo, n), product.end());
  // Rounding leaves values of about 1e-16 of either sign; negative ones are no mass at all.
  for (double& p : product) {
    p = std::max(0.0, p);
  }
  out.first = plan.lo;
  out.pmf = std::move(product);
  out.extra = std::min(1.0, out.extra + plan.outside_mass);
  return out;
}

// δ(ε) = Σ_j p_j max(0, 1 - e^(ε - ℓ_j)) + extra.
double delta_of(const ComposedPld& pld, double epsilon, double dl) {
  double sum = pld.extra;
  for (size_t j = pld.pmf.size(); j-- > 0;) {
    const double loss = static_cast<double>(pld.first + static_cast<int64_t>(j)) * dl;
    if (!(loss > epsilon)) {
      break;
    }
    sum += pld.pmf[j] * -std::expm1(epsilon - loss);
  }
  return std::min(1.0, sum);
}

// The smallest ε >= 0 with delta_of(ε) <= δ, for a history without noiseless steps (so that
// `extra` is only truncated tail mass, which a δ at or below it cannot afford). Between grid points
// δ(ε) = extra + S1_j - e^(ε - ℓ_j) D_j with S1_j = Σ_{k>=j} p_k and D_j = Σ_{k>=j} p_k e^(ℓ_j -
// ℓ_k), so ε is solved exactly in the interval where δ crosses; D_j = p_j + e^(-Δ) D_{j+1} never
// forms e^(-ℓ), which overflows on wide grids.
double epsilon_of(const ComposedPld& pld, double delta, double dl, double tail) {
  const int64_t n = static_cast<int64_t>(pld.pmf.size());
  TORCH_CHECK_VALUE(static_cast<double>(n) * DBL_EPSILON <= delta, "delta ", delta,
                    " is too small for the PLD accountant: rounding errors of its ", n,
                    "-point FFT would dominate; raise delta or value_discretization_interval");
  TORCH_CHECK_VALUE(pld.extra < delta, "delta ", delta, " is too small for the PLD accountant ",
                    "with tail_mass_truncation ", tail, ": the tail mass it cuts off, ", pld.extra,
                    ", is charged to delta; set a smaller tail_mass_truncation");
  const double decay = std::exp(-dl);
  double s1 = 0.0;
  double d = 0.0;
  for (int64_t j = n - 1; j >= 0; --j) {
    const double p = pld.pmf[static_cast<size_t>(j)];
    s1 += p;
    d = p + decay * d;
    if (pld.extra + s1 - decay * d > delta) {  // δ(ℓ_{j-1}) > δ >= δ(ℓ_j)
      const double loss = static_cast<double>(pld.first + j) * dl;
      return std::max(0.0, loss + std::log((pld.extra + s1 - delta) / d));
    }
  }
  // δ is met below the window: continue the last interval's formula, clamped at 0.
  const double numerator = pld.extra + s1 - delta;
  if (!(numerator > 0) || !(d > 0)) {
    return 0.0;
  }
  return std::max(0.0, static_cast<double>(pld.first) * dl + std::log(numerator / d));
}

// The directions to account: both, or one when every block has q = 1 (the Gaussian
// mechanism's pairs are mirror images with the same PLD).
std::vector<Direction> directions(const std::vector<HistoryEntry>& spending) {
  const bool all_full =
      std::all_of(spending.begin(), spending.end(),
                  [](const HistoryEntry& entry) { return entry.sample_rate == 1.0; });
  if (all_full) {
    return {Direction::kRemove};
  }
  return {Direction::kRemove, Direction::kAdd};
}

// The largest of measure(plan, Δ) over the composition plans of the neighbouring directions:
// every query reports the worse direction.
template <typename Measure>
double max_over_directions(const std::vector<HistoryEntry>& spending, const PldOptions& options,
                           Measure measure) {
  const double dl = resolved_interval(spending, options);
  double out = 0.0;
  for (Direction direction : directions(spending)) {
    out = std::max(
        out,
        measure(plan_composition(spending, direction, dl, options.tail_mass_truncation()), dl));
  }
  return out;
}

}  // namespace

// --- PldOptions ---------------------------------------------------------------------------

PldOptions& PldOptions::value_discretization_interval(double value) {
  dptorch::detail::check_positive("value_discretization_interval", value);
  value_discretization_interval_ = value;
  return *this;
}

PldOptions& PldOptions::tail_mass_truncation(double value) {
  dptorch::detail::check_in_range("tail_mass_truncation", value, 0, 1e-3,
                                  dptorch::detail::Bounds::kOpenClosed);
  tail_mass_truncation_ = value;
  return *this;
}

// --- PldAccountant ------------------------------------------------------------------------

PldAccountant::PldAccountant(PldOptions options) : options_(options) {}

double PldAccountant::epsilon(double delta) const {
  detail::check_delta(delta);
  const auto spending = detail::spending_entries(history());
  if (spending.empty()) {
    return 0.0;
  }
  if (detail::has_noiseless_step(spending)) {
    return kInf;
  }
  const double tail = options_.tail_mass_truncation();
  return max_over_directions(spending, options_, [&](const CompositionPlan& plan, double dl) {
    return epsilon_of(compose(plan), delta, dl, tail);
  });
}

double PldAccountant::delta(double epsilon) const {
  dptorch::detail::check_non_negative("epsilon", epsilon);
  const auto spending = detail::spending_entries(history());
  if (spending.empty()) {
    return 0.0;
  }
  return max_over_directions(spending, options_, [&](const CompositionPlan& plan, double dl) {
    return delta_of(compose(plan), epsilon, dl);
  });
}

bool PldAccountant::answerable(double delta) const {
  (void)delta;
  try {
    return grid_size() <= static_cast<double>(kMaxPldGridSize);
  } catch (const c10::Error&) {
    return false;  // a history whose grid cannot even be planned
  }
}

double PldAccountant::grid_size() const {
  const auto spending = detail::spending_entries(history());
  if (spending.empty()) {
    return 0.0;
  }
  return max_over_directions(spending, options_,
                             [](const CompositionPlan& plan, double) { return plan.size; });
}

std::unique_ptr<Accountant> PldAccountant::clone() const {
  return std::make_unique<PldAccountant>(*this);
}

}  // namespace dptorch::accounting
