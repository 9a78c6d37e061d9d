#include <dptorch/grad_sample/linear.h>

#include <torch/torch.h>

#include <ATen/Parallel.h>

#include "grad_sample/cost_model.h"
#include "grad_sample/cpu_kernels.h"
#include "grad_sample/rules_internal.h"

#include <algorithm>
#include <optional>
#include <vector>

namespace dptorch::grad_sample {
namespace {

using detail::broadcast_weights;
using detail::cpu_kernel_dtype;
using detail::row_norm_sq;

// [B, T, G·c] -> [B·G, T, c]
torch::Tensor by_group(const torch::Tensor& x, int64_t groups) {
  const int64_t B = x.size(0), T = x.size(1), c = x.size(2) / groups;
  if (groups == 1) return x;
  return x.reshape({B, T, groups, c}).permute({0, 2, 1, 3}).reshape({B * groups, T, c});
}

// bmm of [N, n, k] by [N, k, m]. On the CPU with several threads, the batch is split over the
// threads and each part multiplied by one thread: torch's own bmm runs its small products one
// after another, each split over the threads by the BLAS, which for the [T, T] and [p, d]
// products of the norms costs more in synchronisation than it gains.
torch::Tensor batched_matmul(const torch::Tensor& x, const torch::Tensor& y) {
  const int64_t n = x.size(0);
  if (!x.device().is_cpu() || at::get_num_threads() == 1 || n < 2 || at::in_parallel_region()) {
    return torch::bmm(x, y);
  }
  auto out = torch::empty({n, x.size(1), y.size(2)}, x.options());
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    auto part = out.narrow(0, begin, end - begin);
    at::bmm_out(part, x.narrow(0, begin, end - begin), y.narrow(0, begin, end - begin));
  });
  return out;
}

// target [P] += samples [n, P]ᵀ w [n]. On the CPU with several threads the columns are split
// over the threads, each part one gemv: torch's gemv over the transposed samples runs on one
// thread. Each column's sum runs over the samples in the same order either way.
void add_weighted_rows(const torch::Tensor& target, const torch::Tensor& samples,
                       const torch::Tensor& w) {
  constexpr int64_t kGrain = int64_t{1} << 12;
  const int64_t P = samples.size(1);
  if (!samples.device().is_cpu() || at::get_num_threads() == 1 || at::in_parallel_region() ||
      P < 2 * kGrain) {
    target.addmv_(samples.t(), w);
    return;
  }
  at::parallel_for(0, P, kGrain, [&](int64_t begin, int64_t end) {
    target.narrow(0, begin, end - begin).addmv_(samples.narrow(1, begin, end - begin).t(), w);
  });
}

}  // namespace

torch::Tensor GramCache::gram(const torch::Tensor& x, int64_t groups) {
  for (const auto& e : entries_) {
    if (e.x.is_same(x) && e.groups == groups) return e.gram;
  }
  auto xg = by_group(x, groups);
  auto gram = batched_matmul(xg, xg.transpose(1, 2));
  const bool shared = std::any_of(shared_.begin(), shared_.end(),
                                  [&](const torch::Tensor& s) { return s.is_same(x); });
  if (shared) entries_.push_back({x, groups, gram});
  return gram;
}

torch::Tensor ghost_norm_sq(const torch::Tensor& a, const torch::Tensor& g, int64_t groups,
                            GramCache* cache) {
  const int64_t B = a.size(0), T = a.size(1);
  if (T == 1) {
    // ‖g aᵀ‖² = ‖a‖²‖g‖², per group.
    auto aa = at::linalg_vector_norm(a.reshape({B, groups, a.size(2) / groups}), 2, {2});
    auto gg = at::linalg_vector_norm(g.reshape({B, groups, g.size(2) / groups}), 2, {2});
    return aa.mul_(gg).square_().sum(1);
  }
  if (cache != nullptr) {
    // Cached Gram matrices are shared: the product is a new tensor.
    return (cache->gram(a, groups) * cache->gram(g, groups)).view({B, groups * T * T}).sum(1);
  }
  // Without a cache, the product goes into one of the two [B·G, T, T] matrices: a third one
  // would raise the peak memory of the norms (encoder-32: fresh pages every step).
  auto ag = by_group(a, groups), gg = by_group(g, groups);
  auto gram_a = batched_matmul(ag, ag.transpose(1, 2));
  auto gram_g = batched_matmul(gg, gg.transpose(1, 2));
  return gram_a.mul_(gram_g).view({B, groups * T * T}).sum(1);
}

torch::Tensor materialize(const torch::Tensor& a, const torch::Tensor& g, int64_t groups,
                          torch::Tensor* norms_sq) {
  const int64_t B = a.size(0);
  // The register tile forms G_i and its norm in one pass at up to twice the speed of the batched
  // matmul with AVX-512; with AVX2 it only matches it (docs/performance.md).
  if (groups == 1 && cpu_kernel_dtype(a) && g.scalar_type() == a.scalar_type() &&
      g.device() == a.device() && cpu::tile_vector_bytes() == 64) {
    const auto ac = a.contiguous(), gc = g.contiguous();
    const int64_t T = a.size(1), d = a.size(2), p = g.size(2);
    auto samples = torch::empty({B, p, d}, a.options());
    auto norms = torch::empty({norms_sq != nullptr ? B : 0}, a.options());
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "linear_weight_samples_tiled", [&] {
      cpu::linear_weight_samples_tiled(ac.data_ptr<scalar_t>(), gc.data_ptr<scalar_t>(), B, T, d, p,
                                       norms_sq != nullptr ? norms.data_ptr<scalar_t>() : nullptr,
                                       samples.data_ptr<scalar_t>());
    });
    if (norms_sq != nullptr) *norms_sq = norms;
    return samples;
  }
  auto ag = by_group(a, groups), gg = by_group(g, groups);
  auto samples = batched_matmul(gg.transpose(1, 2), ag);  // [B·G, p, d]
  samples = samples.view({B, groups * samples.size(1), samples.size(2)});
  if (norms_sq != nullptr) *norms_sq = row_norm_sq(samples);
  return samples;
}

torch::Tensor weighted_sum(const torch::Tensor& a, const torch::Tensor& g, const torch::Tensor& w,
                           int64_t groups) {
  const int64_t rows = a.size(0) * a.size(1);
  const int64_t d = a.size(2) / groups, p = g.size(2) / groups;
  auto gw = g * broadcast_weights(w, g);
  if (groups == 1) return torch::mm(gw.reshape({rows, p}).t(), a.reshape({rows, d}));
  auto gw_g = gw.reshape({rows, groups, p}).permute({1, 2, 0});  // [G, p, rows]
  auto a_g = a.reshape({rows, groups, d}).transpose(0, 1);       // [G, rows, d]
  return torch::bmm(gw_g, a_g).reshape({groups * p, d});
}

bool materialize_is_cheaper(int64_t T, int64_t d, int64_t p) { return d * p <= T * (d + p); }

bool keep_is_cheaper(int64_t T, int64_t d, int64_t p) {
  // Per sample, in ns: multiply-adds at the speeds of the batched Gram products and of the
  // matmuls (GMAC/s), passes over G_i at kKeptPassSpeed bytes per ns (cost_model.h; the matmul
  // speed from bench/dp_step_bench's block-64 and encoder-32 products, on one core).
  constexpr double kMatmulSpeed = 50;
  using detail::kGramSpeed;
  using detail::kKeptPassSpeed;
  if (T <= 1) return false;
  const double t = static_cast<double>(T), dd = static_cast<double>(d);
  const double pp = static_cast<double>(p);
  const double product = t * dd * pp / kMatmulSpeed, pass = dd * pp * 4 / kKeptPassSpeed;
  const double rule = materialize_is_cheaper(T, d, p) ? product + 2 * pass
                                                      : t * t * (dd + pp) / kGramSpeed + product;
  return product + 2 * pass < rule;
}

void PerSampleGrads::add_weighted_sum_to(const std::vector<torch::Tensor>& w,
                                         const std::vector<torch::Tensor>& out) {
  const auto sums = weighted_sum(w);
  for (size_t k = 0; k < sums.size(); ++k) out.at(k).add_(sums[k].reshape(out.at(k).sizes()));
}

LinearLikeGrads::LinearLikeGrads(torch::Tensor a, torch::Tensor g, int64_t groups,
                                 std::vector<int64_t> weight_shape, bool has_bias,
                                 NormMethod method)
    : a_(std::move(a)),
      g_(std::move(g)),
      groups_(groups),
      weight_shape_(std::move(weight_shape)),
      has_bias_(has_bias) {
  switch (method) {
    case NormMethod::kGhost: materialize_ = false; break;
    case NormMethod::kMaterialize: materialize_ = true; break;
    case NormMethod::kAuto:
      materialize_ = materialize_is_cheaper(a_.size(1), a_.size(2) / groups_, g_.size(2) / groups_);
      break;
  }
}

std::vector<std::string> LinearLikeGrads::names() const {
  std::vector<std::string> names;
  if (!weight_shape_.empty()) names.emplace_back("weight");
  if (has_bias_) names.emplace_back("bias");
  return names;
}

const torch::Tensor& LinearLikeGrads::weight_samples() {
  if (!weight_samples_.defined()) {
    weight_samples_ = grad_sample::materialize(a_, g_, groups_, &weight_norms_sq_);
  }
  return weight_samples_;
}

const torch::Tensor& LinearLikeGrads::bias_samples() {
  // One position (a plain Linear): the rows of g themselves, not a copy.
  if (!bias_samples_.defined()) bias_samples_ = g_.size(1) == 1 ? g_.select(1, 0) : g_.sum(1);
  return bias_samples_;
}

std::vector<torch::Tensor> LinearLikeGrads::norm_sq() { return norm_sq(nullptr); }

std::vector<torch::Tensor> LinearLikeGrads::norm_sq(GramCache* cache) {
  std::vector<torch::Tensor> out;
  if (!weight_shape_.empty()) {
    if (materialize_) {
      weight_samples();
      out.push_back(weight_norms_sq_);
    } else {
      out.push_back(ghost_norm_sq(a_, g_, groups_, cache));
    }
  }
  if (has_bias_) out.push_back(bias_samples().square().sum(1));
  return out;
}

std::vector<torch::Tensor> LinearLikeGrads::weighted_sum(const std::vector<torch::Tensor>& w) {
  std::vector<torch::Tensor> out;
  size_t k = 0;
  if (!weight_shape_.empty()) {
    const auto& wk = w.at(k++);
    // Once G_i exists, Σ w_i G_i is a matrix-vector product; otherwise one matmul over B·T rows.
    auto sum = weight_samples_.defined()
                   ? torch::mv(weight_samples_.flatten(1).t(), wk.to(a_.scalar_type()))
                   : grad_sample::weighted_sum(a_, g_, wk, groups_);
    out.push_back(sum.view(weight_shape_));
  }
  if (has_bias_) out.push_back(torch::mv(bias_samples().t(), w.at(k).to(g_.scalar_type())));
  return out;
}

void LinearLikeGrads::add_weighted_sum_to(const std::vector<torch::Tensor>& w,
                                          const std::vector<torch::Tensor>& out) {
  for (const auto& o : out) {
    if (!o.is_contiguous()) return PerSampleGrads::add_weighted_sum_to(w, out);
  }
  size_t k = 0;
  if (!weight_shape_.empty()) {
    const auto wk = w.at(k).to(a_.scalar_type());
    const auto& o = out.at(k++);
    if (weight_samples_.defined()) {
      add_weighted_rows(o.view({-1}), weight_samples_.flatten(1), wk);
    } else if (groups_ == 1) {
      // The non-private weight gradient's matmul, with the rows of g scaled per sample, a few
      // samples at a time: the scaled copy of g stays near kSumChunkBytes.
      const int64_t B = a_.size(0), T = a_.size(1), d = a_.size(2), p = g_.size(2);
      const int64_t sample_bytes = std::max<int64_t>(1, T * p * g_.element_size());
      const int64_t chunk = std::max<int64_t>(1, kSumChunkBytes / sample_bytes);
      auto o2 = o.view({p, d});
      for (int64_t b = 0; b < B; b += chunk) {
        const int64_t n = std::min(chunk, B - b);
        const auto gc = g_.narrow(0, b, n);
        auto gw = gc * broadcast_weights(wk.narrow(0, b, n), gc);
        o2.addmm_(gw.reshape({n * T, p}).t(), a_.narrow(0, b, n).reshape({n * T, d}));
      }
    } else {
      o.add_(grad_sample::weighted_sum(a_, g_, wk, groups_).view(o.sizes()));
    }
  }
  if (has_bias_) out.at(k).addmv_(bias_samples().t(), w.at(k).to(g_.scalar_type()));
}

std::vector<torch::Tensor> LinearLikeGrads::materialize() {
  std::vector<torch::Tensor> out;
  if (!weight_shape_.empty()) {
    std::vector<int64_t> shape{a_.size(0)};
    shape.insert(shape.end(), weight_shape_.begin(), weight_shape_.end());
    out.push_back(weight_samples().view(shape));
  }
  if (has_bias_) out.push_back(bias_samples());
  return out;
}

MaterializedGrads::MaterializedGrads(std::vector<std::string> names,
                                     std::vector<torch::Tensor> samples)
    : names_(std::move(names)) {
  for (auto& s : samples) chunks_.push_back({std::move(s)});
}

MaterializedGrads::MaterializedGrads(std::vector<std::string> names,
                                     std::vector<std::vector<torch::Tensor>> chunks)
    : names_(std::move(names)), chunks_(std::move(chunks)) {
  TORCH_CHECK(names_.size() == chunks_.size(), "MaterializedGrads: ", names_.size(), " names for ",
              chunks_.size(), " parameters");
  for (const auto& c : chunks_) {
    TORCH_CHECK(!c.empty(), "MaterializedGrads: a parameter without per-sample gradients");
  }
}

MaterializedGrads::MaterializedGrads(std::vector<std::string> names,
                                     std::vector<std::vector<torch::Tensor>> chunks,
                                     std::vector<torch::Tensor> norms_sq)
    : MaterializedGrads(std::move(names), std::move(chunks)) {
  TORCH_CHECK(norms_sq.size() == chunks_.size(), "MaterializedGrads: ", norms_sq.size(),
              " norms for ", chunks_.size(), " parameters");
  norms_sq_ = std::move(norms_sq);
}

std::vector<torch::Tensor> MaterializedGrads::norm_sq() {
  std::vector<torch::Tensor> out;
  for (size_t k = 0; k < chunks_.size(); ++k) {
    if (k < norms_sq_.size() && norms_sq_[k].defined()) {
      out.push_back(norms_sq_[k]);
      continue;
    }
    const auto& chunks = chunks_[k];
    std::vector<torch::Tensor> parts;
    for (const auto& c : chunks) parts.push_back(row_norm_sq(c));
    out.push_back(parts.size() == 1 ? parts.front() : torch::cat(parts));
  }
  return out;
}

void MaterializedGrads::add_weighted_sum_to(const std::vector<torch::Tensor>& w,
                                            const std::vector<torch::Tensor>& out) {
  for (size_t k = 0; k < chunks_.size(); ++k) {
    const auto& o = out.at(k);
    const auto wk = w.at(k).to(chunks_[k].front().scalar_type());
    auto target = o.is_contiguous() ? o.view({-1}) : torch::zeros({o.numel()}, o.options());
    int64_t begin = 0;
    for (const auto& c : chunks_[k]) {
      add_weighted_rows(target, c.flatten(1), wk.narrow(0, begin, c.size(0)));
      begin += c.size(0);
    }
    if (!o.is_contiguous()) o.add_(target.view(o.sizes()));
  }
}

std::vector<torch::Tensor> MaterializedGrads::weighted_sum(const std::vector<torch::Tensor>& w) {
  std::vector<torch::Tensor> out;
  for (const auto& chunks : chunks_) {
    const auto& first = chunks.front();
    out.push_back(torch::zeros(first.sizes().slice(1), first.options()));
  }
  add_weighted_sum_to(w, out);
  return out;
}

std::vector<torch::Tensor> MaterializedGrads::materialize() {
  std::vector<torch::Tensor> out;
  for (const auto& chunks : chunks_) {
    out.push_back(chunks.size() == 1 ? chunks.front() : torch::cat(chunks));
  }
  return out;
}

}  // namespace dptorch::grad_sample
