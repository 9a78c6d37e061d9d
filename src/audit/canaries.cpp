#include <dptorch/audit/canaries.h>

#include <dptorch/clipping/accumulation.h>
#include <dptorch/clipping/norm_clipper.h>
#include <dptorch/common.h>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <unordered_map>

namespace dptorch::audit {
namespace {

// log P[Bin(n, p) = k] for 0 < p < 1.
double log_binomial_pmf(int64_t n, int64_t k, double p) {
  const auto nd = static_cast<double>(n), kd = static_cast<double>(k);
  return std::lgamma(nd + 1) - std::lgamma(kd + 1) - std::lgamma(nd - kd + 1) + kd * std::log(p) +
         (nd - kd) * std::log1p(-p);
}

// The fractions of the canaries guessed at (half "included", half "excluded"): fixed before the
// scores are seen, and the bound takes the best of them with a Bonferroni correction.
constexpr double kGuessFractions[] = {0.02, 0.05, 0.1, 0.2, 0.5, 1.0};

}  // namespace

double audit_p_value(int64_t canaries, int64_t guesses, int64_t correct, double epsilon,
                     double delta) {
  TORCH_CHECK_VALUE(0 <= correct && correct <= guesses && guesses <= canaries,
                    "an audit needs 0 <= correct <= guesses <= canaries, but has correct = ",
                    correct, ", guesses = ", guesses, ", canaries = ", canaries);
  detail::check_non_negative("epsilon", epsilon);
  detail::check_in_range("delta", delta, 0, 1, detail::Bounds::kClosed);
  if (correct == 0) return 1.0;
  // The accuracy of ε-DP randomised response, the best an (ε, 0)-DP run allows per guess.
  const double p = 1 / (1 + std::exp(-epsilon));
  std::vector<double> pmf(static_cast<size_t>(guesses) + 1);
  for (int64_t k = 0; k <= guesses; ++k) pmf[k] = std::exp(log_binomial_pmf(guesses, k, p));
  double tail = 0;  // P[Bin(r, p) >= v]
  for (int64_t k = correct; k <= guesses; ++k) tail += pmf[k];
  // δ lets a run be more accurate than randomised response with small probability: Thm 3's
  // correction, the largest average of the pmf just below v, times 2mδ.
  double alpha = 0, below = 0;
  for (int64_t i = 1; i <= correct; ++i) {
    below += pmf[correct - i];
    alpha = std::max(alpha, below / static_cast<double>(i));
  }
  return std::min(1.0, tail + alpha * delta * 2 * static_cast<double>(canaries));
}

double epsilon_lower_bound(int64_t canaries, int64_t guesses, int64_t correct, double delta,
                           double confidence) {
  detail::check_in_range("confidence", confidence, 0, 1, detail::Bounds::kOpen);
  const double level = 1 - confidence;
  const auto rejected = [&](double eps) {
    return audit_p_value(canaries, guesses, correct, eps, delta) < level;
  };
  if (!rejected(0)) return 0;
  double lo = 0, hi = 1;
  while (rejected(hi)) {
    lo = hi;
    hi *= 2;
    if (hi > 1e3) return lo;  // every ε the binomial can tell apart is rejected
  }
  while (hi - lo > 1e-6 * hi) {
    const double mid = (lo + hi) / 2;
    (rejected(mid) ? lo : hi) = mid;
  }
  return lo;
}

GradientCanaries::GradientCanaries(CanaryOptions options) : options_(options) {
  detail::check_at_least("canary count", options_.count(), 2);
  TORCH_CHECK_VALUE(std::isfinite(options_.norm_multiple()) && options_.norm_multiple() >= 1,
                    "norm_multiple must be finite and >= 1, but is ", options_.norm_multiple());
  detail::check_in_range("confidence", options_.confidence(), 0, 1, detail::Bounds::kOpen);
  rng_.seed(options_.seed() ^ 0x6a09e667f3bcc909ULL);
  std::bernoulli_distribution coin(0.5);
  included_ = torch::empty({options_.count()}, torch::kBool);
  auto* in = included_.data_ptr<bool>();
  for (int64_t i = 0; i < options_.count(); ++i) in[i] = coin(rng_);
  scores_ = torch::zeros({options_.count()}, torch::kDouble);
}

void GradientCanaries::attach(const std::vector<torch::Tensor>& params) {
  int64_t total = 0;
  for (const auto& p : params) total += p.numel();
  TORCH_CHECK_VALUE(total >= options_.count(), "an audit with ", options_.count(),
                    " canaries needs as many parameter entries, one per canary, but the model has ",
                    total, "; use fewer canaries");
  // m distinct flat positions over all parameters: a partial Fisher–Yates shuffle of a sparse
  // permutation, so no total-sized array is made.
  std::vector<int64_t> positions(options_.count());
  std::unordered_map<int64_t, int64_t> swapped;
  const auto at = [&](int64_t k) {
    auto it = swapped.find(k);
    return it == swapped.end() ? k : it->second;
  };
  for (int64_t i = 0; i < options_.count(); ++i) {
    std::uniform_int_distribution<int64_t> pick(i, total - 1);
    const int64_t j = pick(rng_);
    positions[i] = at(j);
    swapped[j] = at(i);
  }
  coordinates_.assign(params.size(), torch::Tensor());
  owners_.assign(params.size(), torch::Tensor());
  int64_t begin = 0;
  for (size_t p = 0; p < params.size(); ++p) {
    const int64_t end = begin + params[p].numel();
    std::vector<int64_t> flat, owner;
    for (int64_t i = 0; i < options_.count(); ++i) {
      if (positions[i] >= begin && positions[i] < end) {
        flat.push_back(positions[i] - begin);
        owner.push_back(i);
      }
    }
    coordinates_[p] = torch::tensor(flat, torch::kLong);
    owners_[p] = torch::tensor(owner, torch::kLong);
    begin = end;
  }
  scores_.zero_();
  steps_ = 0;
}

void GradientCanaries::insert(Accumulation& accumulation, NormClipper& clipper, double noise_bound,
                              double sample_rate) {
  TORCH_CHECK(attached(), "GradientCanaries::insert before attach()");
  const auto& sums = accumulation.sums();
  TORCH_CHECK(sums.size() == coordinates_.size(), "GradientCanaries: the accumulation has ",
              sums.size(), " sums but the canaries were attached to ", coordinates_.size(),
              " parameters");
  // Which included canaries this step's batch holds: each with probability q, as any example.
  std::bernoulli_distribution sampled(sample_rate);
  const auto* in = included_.data_ptr<bool>();
  std::vector<char> present(options_.count());
  for (int64_t i = 0; i < options_.count(); ++i) present[i] = in[i] && sampled(rng_);
  // Each present canary is a sample of its own: its gradient norm on its parameter, zero on the
  // others, clipped as the clipper clips any sample.
  const double raw = options_.norm_multiple() * noise_bound;
  std::vector<torch::Tensor> norms;
  std::vector<int64_t> parameter_of;  // per sample
  std::vector<int64_t> index_of;      // per sample: its canary slot
  for (size_t p = 0; p < coordinates_.size(); ++p) {
    const auto* owner = owners_[p].data_ptr<int64_t>();
    for (int64_t k = 0; k < owners_[p].numel(); ++k) {
      if (!present[owner[k]]) continue;
      parameter_of.push_back(static_cast<int64_t>(p));
      index_of.push_back(k);
    }
  }
  const auto samples = static_cast<int64_t>(parameter_of.size());
  if (samples == 0) return;
  if (clipper.is_per_layer()) {
    for (size_t p = 0; p < coordinates_.size(); ++p) {
      auto n = torch::zeros({samples}, torch::kDouble);
      auto* v = n.data_ptr<double>();
      for (int64_t s = 0; s < samples; ++s)
        v[s] = parameter_of[s] == static_cast<int64_t>(p) ? raw : 0;
      norms.push_back(n);
    }
  } else {
    norms.push_back(torch::full({samples}, raw, torch::kDouble));
  }
  std::vector<torch::Tensor> factors;
  for (const auto& f : clipper.clipping_factors(norms)) {
    factors.push_back(f.to(torch::kCPU, torch::kDouble).contiguous());
  }
  std::vector<double> added(samples);
  for (int64_t s = 0; s < samples; ++s) {
    const auto& f = factors[clipper.is_per_layer() ? parameter_of[s] : 0];
    added[s] = f.data_ptr<double>()[s] * raw * accumulation.scale();
  }
  for (size_t p = 0; p < coordinates_.size(); ++p) {
    std::vector<int64_t> idx;
    std::vector<double> val;
    const auto* coordinate = coordinates_[p].data_ptr<int64_t>();
    for (int64_t s = 0; s < samples; ++s) {
      if (parameter_of[s] != static_cast<int64_t>(p)) continue;
      idx.push_back(coordinate[index_of[s]]);
      val.push_back(added[s]);
    }
    if (idx.empty()) continue;
    auto flat = sums[p].view(-1);
    flat.index_add_(0, torch::tensor(idx, torch::kLong).to(flat.device()),
                    torch::tensor(val, torch::kDouble).to(flat.options()));
  }
}

void GradientCanaries::observe(const std::vector<torch::Tensor>& params, double scale) {
  TORCH_CHECK(attached(), "GradientCanaries::observe before attach()");
  TORCH_CHECK(params.size() == coordinates_.size(), "GradientCanaries: observed ", params.size(),
              " parameters but attached to ", coordinates_.size());
  for (size_t p = 0; p < params.size(); ++p) {
    if (owners_[p].numel() == 0 || !params[p].grad().defined()) continue;
    const auto released =
        params[p].grad().reshape(-1).index_select(0, coordinates_[p].to(params[p].device()));
    scores_.index_add_(0, owners_[p], released.to(torch::kCPU, torch::kDouble) / scale);
  }
  ++steps_;
}

AuditResult GradientCanaries::result(double delta) const {
  detail::check_in_range("delta", delta, 0, 1, detail::Bounds::kClosedOpen);
  AuditResult out;
  out.canaries = options_.count();
  out.steps = steps_;
  out.delta = delta;
  out.confidence = options_.confidence();
  // Most confident first: the highest scores are guessed included, the lowest excluded.
  const auto order = torch::argsort(scores_, /*dim=*/0, /*descending=*/true);
  const auto in = included_.index_select(0, order);
  const auto* sorted = in.data_ptr<bool>();
  const int64_t m = options_.count();
  const double share =
      1 - (1 - options_.confidence()) / static_cast<double>(std::size(kGuessFractions));
  for (double fraction : kGuessFractions) {
    const int64_t half =
        std::clamp<int64_t>(std::llround(fraction * static_cast<double>(m) / 2), 1, m / 2);
    int64_t right = 0;
    for (int64_t k = 0; k < half; ++k) right += sorted[k] ? 1 : 0;
    for (int64_t k = m - half; k < m; ++k) right += sorted[k] ? 0 : 1;
    const double bound = epsilon_lower_bound(m, 2 * half, right, delta, share);
    if (bound > out.epsilon_lower_bound || out.guesses == 0) {
      out.epsilon_lower_bound = bound;
      out.guesses = 2 * half;
      out.correct = right;
    }
  }
  return out;
}

}  // namespace dptorch::audit
