#include <dptorch/clipping/accumulation.h>

#include <dptorch/grad_sample/grad_sample_module.h>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>

namespace dptorch {

double l2_norm(const std::vector<double>& v) {
  double sq = 0;
  for (double x : v) sq += x * x;
  return std::sqrt(sq);
}

bool Accumulation::reusable(const std::vector<torch::Tensor>& params, int64_t extra) const {
  if (sums_.size() != params.size() || extra != extra_ || buckets_.empty()) return false;
  for (size_t k = 0; k < params.size(); ++k) {
    const auto& p = params[k];
    const auto& acc = sums_[k];
    if (acc.sizes() != p.sizes() || acc.scalar_type() != p.scalar_type() ||
        acc.device() != p.device()) {
      return false;
    }
    if (p.grad().defined() && p.grad().is_alias_of(acc)) return false;
  }
  return true;
}

void Accumulation::begin(const std::vector<torch::Tensor>& params, AccumulationStart start) {
  TORCH_CHECK(!active_, "an accumulation is already under way; finish or reset it first");
  TORCH_CHECK(start.extra >= 0, "AccumulationStart::extra must be >= 0, got ", start.extra);
  if (!reusable(params, start.extra)) {
    // One flat bucket per (dtype, device), in the order the parameters first use them; each
    // accumulator is a view of its bucket.
    std::vector<int64_t> sizes;
    std::vector<torch::TensorOptions> kinds;
    bucket_of_.assign(params.size(), 0);
    for (size_t k = 0; k < params.size(); ++k) {
      const auto& p = params[k];
      size_t b = 0;
      while (b < kinds.size() &&
             !(kinds[b].dtype() == p.dtype() && kinds[b].device() == p.device())) {
        ++b;
      }
      if (b == kinds.size()) {
        kinds.push_back(p.options().requires_grad(false));
        sizes.push_back(0);
      }
      bucket_of_[k] = b;
      sizes[b] += p.numel();
    }
    if (kinds.empty() && start.extra > 0) {
      kinds.push_back(torch::TensorOptions().dtype(torch::kDouble));
      sizes.push_back(0);
    }
    if (!sizes.empty()) sizes[0] += start.extra;
    buckets_.clear();
    for (size_t b = 0; b < kinds.size(); ++b)
      buckets_.push_back(torch::empty({sizes[b]}, kinds[b]));
    std::vector<int64_t> offset(kinds.size(), 0);
    sums_.resize(params.size());
    for (size_t k = 0; k < params.size(); ++k) {
      const size_t b = bucket_of_[k];
      const int64_t n = params[k].numel();
      sums_[k] = buckets_[b].narrow(0, offset[b], n).view(params[k].sizes());
      offset[b] += n;
    }
    extra_ = start.extra;
  }
  if (start.fill) {
    start.fill(sums_);
    if (extra_ > 0) extra().zero_();
  } else {
    for (auto& bucket : buckets_) bucket.zero_();
  }
  start_ = std::move(start);
  start_.fill = nullptr;
  max_thresholds_.clear();
  batch_size_ = 0;
  iterations_ = 0;
  active_ = true;
}

torch::Tensor Accumulation::extra() const {
  if (extra_ == 0 || buckets_.empty()) return {};
  return buckets_.front().narrow(0, buckets_.front().numel() - extra_, extra_);
}

void Accumulation::merge_thresholds(const std::vector<double>& thresholds) {
  // The element-wise maximum, a single value standing for every entry (as torch.max broadcasts).
  if (max_thresholds_.empty()) {
    max_thresholds_ = thresholds;
    return;
  }
  if (max_thresholds_.size() == 1 && thresholds.size() > 1) {
    max_thresholds_.assign(thresholds.size(), max_thresholds_.front());
  }
  for (size_t k = 0; k < max_thresholds_.size(); ++k) {
    max_thresholds_[k] =
        std::max(max_thresholds_[k], thresholds[std::min(k, thresholds.size() - 1)]);
  }
}

void Accumulation::add(GradSampleModule& gsm, const std::vector<torch::Tensor>& weights,
                       const std::vector<double>& thresholds) {
  TORCH_CHECK(active_, "Accumulation::add before begin()");
  if (start_.scale == 1) {
    gsm.add_clipped_sum_to(weights, sums_);
  } else {
    std::vector<torch::Tensor> scaled(weights.size());
    for (size_t k = 0; k < weights.size(); ++k) scaled[k] = weights[k] * start_.scale;
    gsm.add_clipped_sum_to(scaled, sums_);
  }
  merge_thresholds(thresholds);
  batch_size_ += gsm.batch_size();
  ++iterations_;
}

void Accumulation::add_sums(const std::vector<torch::Tensor>& sums,
                            const std::vector<double>& thresholds, int64_t batch_size) {
  TORCH_CHECK(active_, "Accumulation::add_sums before begin()");
  TORCH_CHECK(sums.size() == sums_.size(), "Accumulation::add_sums got ", sums.size(), " sums for ",
              sums_.size(), " parameters");
  for (size_t k = 0; k < sums.size(); ++k) sums_[k].add_(sums[k], start_.scale);
  merge_thresholds(thresholds);
  batch_size_ += batch_size;
  ++iterations_;
}

double Accumulation::noise_bound() const { return l2_norm(max_thresholds_); }

void Accumulation::finish(const std::vector<torch::Tensor>& params) {
  TORCH_CHECK(active_, "Accumulation::finish with no accumulation under way");
  TORCH_CHECK(params.size() == sums_.size(), "Accumulation::finish got ", params.size(),
              " parameters for ", sums_.size(), " sums");
  for (size_t k = 0; k < params.size(); ++k) params[k].mutable_grad() = sums_[k].detach();
  reset();
}

void Accumulation::reset() {
  active_ = false;
  start_ = AccumulationStart{};
  max_thresholds_.clear();
  batch_size_ = 0;
  iterations_ = 0;
}

void Accumulation::release() {
  reset();
  sums_.clear();
  buckets_.clear();
  bucket_of_.clear();
  extra_ = 0;
}

}  // namespace dptorch
