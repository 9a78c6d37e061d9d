#include <dptorch/accounting/prv.h>
#include <dptorch/common.h>

#include <dptorch/accounting/rdp.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <complex>
#include <limits>
#include <queue>
#include <utility>

#include "accounting/accountant_internal.h"
#include "accounting/fft.h"
#include "accounting/prv_internal.h"

namespace dptorch::accounting {

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kSqrt2 = 1.41421356237309504880;

// --- Adaptive Gauss-Kronrod quadrature (G7/K15 pair, as QUADPACK's qk15) -------------------

constexpr double kKronrodNodes[8] = {
    0.991455371120812639206854697526329, 0.949107912342758524526189684047851,
    0.864864423359769072789712788640926, 0.741531185599394439863864773280788,
    0.586087235467691130294144845693013, 0.405845151377397166906606412076961,
    0.207784955007898467600689403773245, 0.0};
constexpr double kKronrodWeights[8] = {
    0.022935322010529224963732008058970, 0.063092092629978553290700663189204,
    0.104790010322250183839876322541518, 0.140653259715525918745189590510238,
    0.169004726639267902826583426598550, 0.190350578064785409913256402421014,
    0.204432940075298892414161999234649, 0.209482141084727828012999174891714};
// Gauss weights of the nodes kKronrodNodes[1], [3], [5], [7].
constexpr double kGaussWeights[4] = {
    0.129484966168869693270611432679082, 0.279705391489276667901467771423780,
    0.381830050505118944950369775488975, 0.417959183673469387755102040816327};

struct Segment {
  double a;
  double b;
  double value;
  double error;
  bool operator<(const Segment& other) const { return error < other.error; }
};

template <typename F>
Segment gauss_kronrod(const F& f, double a, double b) {
  const double center = 0.5 * (a + b);
  const double half = 0.5 * (b - a);
  const double fc = f(center);
  double kronrod = kKronrodWeights[7] * fc;
  double gauss = kGaussWeights[3] * fc;
  for (int k = 0; k < 7; ++k) {
    const double dx = half * kKronrodNodes[k];
    const double sum = f(center - dx) + f(center + dx);
    kronrod += kKronrodWeights[k] * sum;
    if (k % 2 == 1) {
      gauss += kGaussWeights[k / 2] * sum;
    }
  }
  return {a, b, kronrod * half, std::abs((kronrod - gauss) * half)};
}

// ∫ f over [breaks.front(), breaks.back()], refining the segment with the largest error
// estimate until the total is below max(abs_tol, rel_tol |I|) (QUADPACK's qag strategy).
template <typename F>
double integrate(const F& f, const std::vector<double>& breaks) {
  constexpr double kAbsTol = 1e-16;
  constexpr double kRelTol = 1e-13;
  constexpr int kMaxSegments = 5000;
  std::priority_queue<Segment> queue;
  double value = 0.0;
  double error = 0.0;
  for (size_t k = 0; k + 1 < breaks.size(); ++k) {
    if (breaks[k + 1] > breaks[k]) {
      Segment s = gauss_kronrod(f, breaks[k], breaks[k + 1]);
      value += s.value;
      error += s.error;
      queue.push(s);
    }
  }
  int segments = static_cast<int>(queue.size());
  while (!queue.empty() && error > std::max(kAbsTol, kRelTol * std::abs(value)) &&
         segments < kMaxSegments) {
    const Segment worst = queue.top();
    queue.pop();
    const double mid = 0.5 * (worst.a + worst.b);
    const Segment left = gauss_kronrod(f, worst.a, mid);
    const Segment right = gauss_kronrod(f, mid, worst.b);
    value += left.value + right.value - worst.value;
    error += left.error + right.error - worst.error;
    queue.push(left);
    queue.push(right);
    ++segments;
  }
  // Recompute the sum from the segments: the running total carries cancellation error.
  double total = 0.0;
  while (!queue.empty()) {
    total += queue.top().value;
    queue.pop();
  }
  return total;
}

// Breakpoints lo < ... < hi at ±10^e inside (lo, hi), to start the adaptive refinement where
// the PRV's CDF changes fastest (near 0) without wasting work far out.
std::vector<double> log_spaced_breaks(double lo, double hi) {
  std::vector<double> breaks = {lo, hi};
  for (int e = -6; e <= 3; ++e) {
    for (double sign : {-1.0, 1.0}) {
      const double x = sign * std::pow(10.0, e);
      if (x > lo && x < hi) {
        breaks.push_back(x);
      }
    }
  }
  std::sort(breaks.begin(), breaks.end());
  return breaks;
}

// --- Neumaier (compensated) summation ----------------------------------------------------

class CompensatedSum {
 public:
  void add(double x) {
    const double t = sum_ + x;
    compensation_ += std::abs(sum_) >= std::abs(x) ? (sum_ - t) + x : (x - t) + sum_;
    sum_ = t;
  }
  double value() const { return sum_ + compensation_; }

 private:
  double sum_ = 0.0;
  double compensation_ = 0.0;
};

// Inputs to Φ of the PRV's CDF at t, or false if t <= log(1 - q) (outside the support).
bool prv_cdf_arguments(double sigma, double q, double t, double* a, double* b) {
  const double shifted = std::expm1(t) + q;  // e^t - (1 - q)
  if (!(shifted > 0)) {
    return false;
  }
  const double z = std::log(shifted / q);
  *a = z * sigma - 0.5 / sigma;
  *b = z * sigma + 0.5 / sigma;
  return true;
}

double rdp_epsilon(const std::vector<double>& rdp, double delta) {
  return rdp_to_epsilon(default_rdp_orders(), rdp, delta).epsilon;
}

}  // namespace

// --- PrvOptions ---------------------------------------------------------------------------

PrvOptions& PrvOptions::eps_error(double value) {
  dptorch::detail::check_positive("eps_error", value);
  eps_error_ = value;
  return *this;
}

PrvOptions& PrvOptions::delta_error(double value) {
  dptorch::detail::check_in_range("delta_error", value, 0, 1, dptorch::detail::Bounds::kOpen);
  delta_error_ = value;
  return *this;
}

// --- detail -------------------------------------------------------------------------------

namespace detail {

double prv_cdf(double noise_multiplier, double sample_rate, double t) {
  double a = 0.0;
  double b = 0.0;
  if (!prv_cdf_arguments(noise_multiplier, sample_rate, t, &a, &b)) {
    return 0.0;
  }
  // Φ(x) = erfc(-x/√2)/2 has no cancellation for either sign of x.
  return 0.5 * sample_rate * std::erfc(-a / kSqrt2) +
         0.5 * (1.0 - sample_rate) * std::erfc(-b / kSqrt2);
}

double prv_survival(double noise_multiplier, double sample_rate, double t) {
  double a = 0.0;
  double b = 0.0;
  if (!prv_cdf_arguments(noise_multiplier, sample_rate, t, &a, &b)) {
    return 1.0;
  }
  return 0.5 * sample_rate * std::erfc(a / kSqrt2) +
         0.5 * (1.0 - sample_rate) * std::erfc(b / kSqrt2);
}

double prv_grid_points(double half_width, double dt) {
  TORCH_CHECK(half_width > 0 && std::isfinite(dt) && dt > 0,
              "PRV grid needs a half width and a finite mesh > 0, but got L = ", half_width,
              ", dt = ", dt);
  const double aligned = 2.0 * std::ceil(half_width / dt) + 2.0;
  if (!(aligned < static_cast<double>(int64_t{1} << 62))) {
    return aligned;
  }
  return static_cast<double>(next_power_of_two(static_cast<size_t>(aligned)));
}

PrvGrid make_prv_grid(double half_width, double dt) {
  const double points = prv_grid_points(half_width, dt);
  TORCH_CHECK_VALUE(points <= static_cast<double>(kMaxPrvGridSize),
                    "the PRV accountant needs a grid of ", points,
                    " points for this query (privacy loss domain [-", half_width, ", ", half_width,
                    "], mesh ", dt, "), more than its limit of ", kMaxPrvGridSize,
                    "; use the rdp accountant, or a larger eps_error");
  const auto size = static_cast<int64_t>(points);
  return {dt, size, size / 2 - 1, 0.0};
}

PrvExtent plan_prv_extent(const std::vector<HistoryEntry>& spending, double eps_error,
                          double delta_error) {
  TORCH_CHECK(!spending.empty(), "plan_prv_extent needs a history that spends privacy");
  int64_t total_steps = 0;
  for (const auto& entry : spending) {
    total_steps += entry.steps;
  }
  const double total = static_cast<double>(total_steps);
  const auto& orders = default_rdp_orders();
  std::vector<double> total_rdp(orders.size(), 0.0);
  double half_width = eps_error;
  for (const auto& entry : spending) {
    const auto one_step =
        rdp_subsampled_gaussian(entry.noise_multiplier, entry.sample_rate, 1, orders);
    for (size_t k = 0; k < orders.size(); ++k) {
      total_rdp[k] += one_step[k] * static_cast<double>(entry.steps);
    }
    half_width = std::max(half_width, rdp_epsilon(one_step, delta_error / (8.0 * total)));
  }
  half_width = std::max(half_width, rdp_epsilon(total_rdp, delta_error / 4.0)) + 3.0;
  const double dt = eps_error / std::sqrt(total * std::log(12.0 / delta_error) / 2.0);
  return {half_width, dt};
}

double truncated_prv_mean(double noise_multiplier, double sample_rate, double t_min, double t_max) {
  TORCH_CHECK(t_min < 0 && t_max > 0, "truncated_prv_mean needs t_min < 0 < t_max");
  const double sigma = noise_multiplier;
  const double q = sample_rate;
  const double cdf_min = prv_cdf(sigma, q, t_min);
  const double survival_max = prv_survival(sigma, q, t_max);
  const double mass = 1.0 - survival_max - cdf_min;
  // E[Y] = -∫_{t_min}^0 F_trunc + ∫_0^{t_max} (1 - F_trunc): both integrands are small and
  // positive, so the mean keeps its relative precision (t_max - ∫F would cancel).
  const double support = q < 1 ? std::max(t_min, std::log1p(-q)) : t_min;
  const double lower =
      integrate([&](double t) { return prv_cdf(sigma, q, t); }, log_spaced_breaks(support, 0.0)) -
      cdf_min * (0.0 - t_min);
  const double upper = integrate([&](double t) { return prv_survival(sigma, q, t); },
                                 log_spaced_breaks(0.0, t_max)) -
                       survival_max * t_max;
  return (upper - lower) / mass;
}

namespace {

// Writes the discretised truncated PRV of one step into out[0, grid.size) and returns the
// mean-preserving shift (see discretize_prv).
double discretize_into(double sigma, double q, const PrvGrid& grid, double* out) {
  const int64_t n = grid.size;
  const double t_min = grid.t(0);
  const double t_max = grid.t(n - 1);
  const double cdf_min = prv_cdf(sigma, q, t_min);
  const double survival_max = prv_survival(sigma, q, t_max);
  const double mass = 1.0 - survival_max - cdf_min;
  // Below log(1 - q) the CDF is exactly 0; stay a mesh clear of the boundary's rounding.
  const double zero_below = (q < 1 ? std::log1p(-q) : -kInf) - grid.dt;

  // Bin i holds F_trunc(t_i + dt/2) - F_trunc(t_i - dt/2). Edges below 0 carry the truncated
  // CDF, edges at or above 0 the truncated survival function, so that neither tail loses
  // its small masses to cancellation against 1.
  struct Edge {
    bool upper;
    double value;  // F_trunc if !upper, 1 - F_trunc if upper
  };
  bool tail_underflowed = false;
  auto edge = [&](int64_t j) -> Edge {
    if (j == 0) {
      return {false, 0.0};
    }
    if (j == n) {
      return {true, 0.0};
    }
    const double e = t_min + (static_cast<double>(j) - 0.5) * grid.dt;
    if (e < 0) {
      if (e < zero_below) {
        return {false, 0.0};
      }
      return {false, (prv_cdf(sigma, q, e) - cdf_min) / mass};
    }
    if (tail_underflowed) {
      return {true, 0.0};
    }
    const double survival = prv_survival(sigma, q, e);
    // The survival function only falls: once it underflows, every later edge is 0 too.
    tail_underflowed = survival == 0.0;
    return {true, (survival - survival_max) / mass};
  };

  // Skip the bins below the support (exact zeros) and stop once the upper tail underflows.
  int64_t first = 0;
  if (std::isfinite(zero_below) && zero_below > t_min) {
    first = std::clamp(static_cast<int64_t>((zero_below - t_min) / grid.dt) - 2, int64_t{0}, n);
  }
  std::fill(out, out + first, 0.0);
  CompensatedSum mean_discrete;
  Edge left = edge(first);
  for (int64_t i = first; i < n; ++i) {
    if (tail_underflowed && left.upper && left.value == 0.0) {
      std::fill(out + i, out + n, 0.0);
      break;
    }
    const Edge right = edge(i + 1);
    double p = 0.0;
    if (!left.upper && !right.upper) {
      p = right.value - left.value;
    } else if (left.upper && right.upper) {
      p = left.value - right.value;
    } else {
      p = (1.0 - right.value) - left.value;
    }
    out[i] = p;
    if (p != 0.0) {
      mean_discrete.add(grid.t(i) * p);
    }
    left = right;
  }

  const double mean_continuous = truncated_prv_mean(sigma, q, t_min, t_max);
  const double shift = mean_continuous - mean_discrete.value();
  TORCH_CHECK(std::abs(shift) < grid.dt / 2, "PRV discretisation: the discrete mean differs from ",
              "the continuous mean ", mean_continuous, " by ", shift, ", more than half the mesh ",
              grid.dt, " (noise_multiplier ", sigma, ", sample_rate ", q, ")");
  return shift;
}

}  // namespace

DiscretePrv discretize_prv(double noise_multiplier, double sample_rate, const PrvGrid& grid) {
  DiscretePrv out{grid, Buffer(static_cast<size_t>(grid.size))};
  out.grid.shift += discretize_into(noise_multiplier, sample_rate, grid, out.pmf.data());
  return out;
}

DiscretePrv compose_prvs(const std::vector<HistoryEntry>& spending, const PrvGrid& grid) {
  TORCH_CHECK(!spending.empty(), "compose_prvs needs a history that spends privacy");
  const auto n = static_cast<size_t>(grid.size);
  const size_t bins = n / 2 + 1;
  Buffer product(n, n + 2);
  Buffer work(spending.size() > 1 ? n : 0, spending.size() > 1 ? n + 2 : 0);
  Buffer scratch(n);
  int64_t total_steps = 0;
  double total_shift = 0.0;
  for (size_t b = 0; b < spending.size(); ++b) {
    const auto& entry = spending[b];
    Buffer& target = b == 0 ? product : work;
    target.resize(n);
    const double shift =
        discretize_into(entry.noise_multiplier, entry.sample_rate, grid, target.data());
    rfft_inplace(target, scratch);
    detail::raise_spectrum(target.data(), bins, entry.steps);
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
    total_steps += entry.steps;
    total_shift += static_cast<double>(entry.steps) * (grid.shift + shift);
  }
  irfft_inplace(product, n, scratch);

  // T points with t_i = (i - offset) dt + s sum to (Σi - T offset) dt + T s; the composed grid
  // keeps the offset, so composed bin k is circular bin k + (T - 1) offset (mod n).
  const auto size = static_cast<int64_t>(n);
  const int64_t roll = ((total_steps - 1) % size) * (grid.offset % size) % size;
  std::rotate(product.begin(), product.begin() + roll, product.end());
  DiscretePrv out{grid, std::move(product)};
  out.grid.shift = total_shift;
  return out;
}

PrvEpsilon epsilon_from_discrete_prv(const DiscretePrv& prv, double delta, double delta_error,
                                     double eps_error) {
  const int64_t n = prv.grid.size;
  TORCH_CHECK_VALUE(
      static_cast<double>(std::numeric_limits<long double>::epsilon()) * static_cast<double>(n) <=
          delta - delta_error,
      "delta ", delta, " is too small for the PRV accountant: rounding errors of its ", n,
      "-point grid would dominate; raise delta or eps_error");
  // From the right: d1_i = Σ_{j>=i} p_j and D_i = Σ_{j>=i} p_j e^(t_i - t_j), the latter by
  // D_i = p_i + e^(-dt) D_{i+1}, which never forms e^(-t) (it overflows on wide grids). The
  // answer for δ' is the first i with D_i - d1_i >= -δ' (numpy.searchsorted(side="left") in
  // Opacus); D - d1 = -δ(t) only grows with t, so it is one past the first index from the
  // right where D - d1 < -δ'.
  const double targets[3] = {delta - delta_error, delta, delta + delta_error};
  double epsilons[3] = {kInf, kInf, kInf};
  bool found[3] = {false, false, false};
  int remaining = 3;
  const double decay = std::exp(-prv.grid.dt);
  double d1 = 0.0;
  double d_exp = 0.0;
  double next_d1 = 0.0;  // values at i + 1
  double next_d_exp = 0.0;
  for (int64_t i = n - 1; i >= 0 && remaining > 0; --i) {
    const double p = prv.pmf[static_cast<size_t>(i)];
    d1 += p;
    d_exp = p + decay * d_exp;
    for (int k = 0; k < 3; ++k) {
      if (!found[k] && d_exp - d1 < -targets[k]) {
        found[k] = true;
        --remaining;
        if (i + 1 < n) {
          epsilons[k] = prv.grid.t(i + 1) + std::log((next_d1 - targets[k]) / next_d_exp);
        }
      }
    }
    next_d1 = d1;
    next_d_exp = d_exp;
  }
  // A δ' never exceeded even at the grid's lowest loss t_0 < 0 is met by some ε < 0: ε = 0.
  for (int k = 0; k < 3; ++k) {
    if (!found[k]) {
      epsilons[k] = -kInf;
    }
  }
  PrvEpsilon out;
  out.upper = std::max(0.0, epsilons[0] + eps_error);
  out.estimate = std::max(0.0, epsilons[1]);
  out.lower = std::max(0.0, epsilons[2] - eps_error);
  return out;
}

}  // namespace detail

// --- PrvAccountant ------------------------------------------------------------------------

PrvAccountant::PrvAccountant(PrvOptions options) : options_(options) {}

double PrvAccountant::resolved_delta_error(double delta) const {
  detail::check_delta(delta);
  const double delta_error = options_.delta_error().value_or(delta / 1000.0);
  TORCH_CHECK_VALUE(delta_error < delta, "delta_error must be < delta, but delta_error is ",
                    delta_error, " and delta is ", delta);
  return delta_error;
}

double PrvAccountant::grid_size(double delta) const {
  const double delta_error = resolved_delta_error(delta);
  const auto spending = detail::spending_entries(history());
  if (spending.empty() || detail::has_noiseless_step(spending)) {
    return 0;
  }
  const auto extent = detail::plan_prv_extent(spending, options_.eps_error(), delta_error);
  return detail::prv_grid_points(extent.half_width, extent.dt);
}

bool PrvAccountant::answerable(double delta) const {
  return grid_size(delta) <= static_cast<double>(detail::kMaxPrvGridSize);
}

PrvEpsilon PrvAccountant::epsilon_bounds(double delta) const {
  const double delta_error = resolved_delta_error(delta);
  const auto spending = detail::spending_entries(history());
  if (spending.empty()) {
    return {0.0, 0.0, 0.0};
  }
  if (detail::has_noiseless_step(spending)) {
    return {kInf, kInf, kInf};
  }
  const auto extent = detail::plan_prv_extent(spending, options_.eps_error(), delta_error);
  const detail::PrvGrid grid = detail::make_prv_grid(extent.half_width, extent.dt);
  const detail::DiscretePrv composed = detail::compose_prvs(spending, grid);
  return detail::epsilon_from_discrete_prv(composed, delta, delta_error, options_.eps_error());
}

double PrvAccountant::epsilon(double delta) const { return epsilon_bounds(delta).upper; }

std::unique_ptr<Accountant> PrvAccountant::clone() const {
  return std::make_unique<PrvAccountant>(*this);
}

}  // namespace dptorch::accounting
