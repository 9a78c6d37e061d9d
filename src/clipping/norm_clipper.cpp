#include <dptorch/clipping/norm_clipper.h>

#include <dptorch/clipping/accumulation.h>

#include <torch/torch.h>

#include <c10/util/Logging.h>

#include <cmath>

namespace dptorch {
namespace {

constexpr double kNormEpsilon = 1e-6;

torch::Tensor clip_factor(const torch::Tensor& norm, double threshold) {
  return torch::clamp_max(threshold / (norm + kNormEpsilon), 1.0);
}

}  // namespace

double NormClipper::noise_scale_norm() const { return l2_norm(thresholds()); }

void NormClipper::set_threshold_factor(double factor) {
  detail::check_positive("clipping threshold factor", factor);
  TORCH_CHECK_VALUE(scalable() || factor == 1,
                    "this clipper moves its own thresholds (dynamic or adaptive clipping), so a "
                    "clipping schedule cannot scale them; use a constant flat, per-layer or "
                    "automatic clipper with the schedule");
  threshold_factor_ = factor;
}

ConstantFlatClipper::ConstantFlatClipper(double max_norm) : max_norm_(max_norm) {
  detail::check_positive("max_grad_norm", max_norm);
}

std::vector<torch::Tensor> ConstantFlatClipper::clipping_factors(
    const std::vector<torch::Tensor>& norms) {
  TORCH_CHECK_VALUE(norms.size() == 1,
                    "ConstantFlatClipper clips the flat norm: expected one norm "
                    "vector, got ",
                    norms.size());
  return {clip_factor(norms[0], max_norm_ * threshold_factor_)};
}

ConstantPerLayerClipper::ConstantPerLayerClipper(std::vector<double> max_norms)
    : max_norms_(std::move(max_norms)) {
  TORCH_CHECK_VALUE(!max_norms_.empty(),
                    "ConstantPerLayerClipper needs one max_grad_norm per "
                    "trainable parameter, but got none");
  for (double c : max_norms_) detail::check_positive("max_grad_norm", c);
}

void ConstantPerLayerClipper::check_parameters(const std::vector<std::string>& names) const {
  TORCH_CHECK_VALUE(max_norms_.size() == 1 || max_norms_.size() == names.size(),
                    "ConstantPerLayerClipper has ", max_norms_.size(),
                    " thresholds but the module has ", names.size(),
                    " trainable parameters; give one max_grad_norm per parameter, in the order of "
                    "named_parameters(), or a single one for every parameter");
}

std::vector<torch::Tensor> ConstantPerLayerClipper::clipping_factors(
    const std::vector<torch::Tensor>& norms) {
  check_parameters(std::vector<std::string>(norms.size()));
  // A single threshold is every parameter's, from the first batch on (as the seed has it).
  if (max_norms_.size() == 1) max_norms_.assign(norms.size(), max_norms_.front());
  std::vector<torch::Tensor> factors;
  for (size_t l = 0; l < norms.size(); ++l) {
    factors.push_back(clip_factor(norms[l], max_norms_[l] * threshold_factor_));
  }
  return factors;
}

std::vector<double> ConstantPerLayerClipper::thresholds() const {
  std::vector<double> scaled = max_norms_;
  for (double& c : scaled) c *= threshold_factor_;
  return scaled;
}

DynamicClipper::DynamicClipper(DynamicClipperOptions options) : options_(std::move(options)) {
  detail::check_positive("initial_threshold", options_.initial_threshold());
  detail::check_in_range("momentum", options_.momentum(), 0, 1, detail::Bounds::kClosedOpen);
  if (options_.method() == DynamicClipping::kPValue) {
    detail::check_in_range("ratio (the fraction of norms above the threshold)", options_.ratio(), 0,
                           1, detail::Bounds::kClosed);
  } else {
    detail::check_finite("ratio", options_.ratio());
  }
  thresholds_ = {options_.initial_threshold()};
  if (options_.method() != DynamicClipping::kStatic) {
    TORCH_WARN(
        "dptorch::DynamicClipper is NOT differentially private: its threshold follows the "
        "batch's own gradient norms, and no accountant accounts for that. The epsilon "
        "reported for this run is not a privacy guarantee.");
  }
}

namespace {

// The seed's statistic of one batch's norms; `current` for kStatic.
double dynamic_statistic(const torch::Tensor& norms, DynamicClipping method, double ratio,
                         double current) {
  const auto n = norms.to(torch::kDouble);
  const int64_t count = n.numel();
  switch (method) {
    case DynamicClipping::kStatic: return current;
    case DynamicClipping::kPValue: {
      const auto cut =
          std::max<int64_t>(1, static_cast<int64_t>(static_cast<double>(count) * (1 - ratio)));
      return std::get<0>(torch::kthvalue(n, cut)).item<double>();
    }
    case DynamicClipping::kMean: {
      const double min = n.min().item<double>();
      // One norm has no standard deviation: the seed's max(min, nan) is the norm itself.
      if (count < 2) return min;
      return std::max(min, n.mean().item<double>() + ratio * n.std().item<double>() + 1e-8);
    }
    case DynamicClipping::kMedian: return n.median().item<double>();
  }
  return current;
}

}  // namespace

std::vector<torch::Tensor> DynamicClipper::clipping_factors(
    const std::vector<torch::Tensor>& norms) {
  TORCH_CHECK_VALUE(options_.per_layer() || norms.size() == 1,
                    "a flat DynamicClipper clips the flat norm: expected one norm vector, got ",
                    norms.size());
  if (thresholds_.size() != norms.size()) thresholds_.assign(norms.size(), thresholds_.front());
  std::vector<torch::Tensor> factors;
  for (size_t l = 0; l < norms.size(); ++l) {
    if (norms[l].numel() > 0) {
      const double stat = dynamic_statistic(norms[l], options_.method(), options_.ratio(),
                                            options_.initial_threshold());
      thresholds_[l] = options_.momentum() * thresholds_[l] + (1 - options_.momentum()) * stat;
    }
    factors.push_back(clip_factor(norms[l], std::max(thresholds_[l], 1e-12)));
  }
  return factors;
}

AutomaticClipper::AutomaticClipper(double max_norm, double stability)
    : max_norm_(max_norm), stability_(stability) {
  detail::check_positive("max_grad_norm", max_norm);
  detail::check_positive("stability", stability);
}

std::vector<torch::Tensor> AutomaticClipper::clipping_factors(
    const std::vector<torch::Tensor>& norms) {
  TORCH_CHECK_VALUE(norms.size() == 1,
                    "AutomaticClipper normalises the flat norm: expected one norm vector, got ",
                    norms.size());
  return {max_norm_ * threshold_factor_ / (norms[0] + stability_)};
}

}  // namespace dptorch

namespace dptorch {

AdaptiveClipper::AdaptiveClipper(AdaptiveClipperOptions options)
    : options_(std::move(options)), max_norm_(options_.initial_max_norm()) {
  detail::check_positive("initial_max_norm", options_.initial_max_norm());
  detail::check_in_range("target_unclipped_quantile", options_.target_unclipped_quantile(), 0, 1,
                         detail::Bounds::kOpen);
  detail::check_positive("learning_rate", options_.learning_rate());
  detail::check_positive("unclipped_num_std", options_.unclipped_num_std());
  detail::check_positive("min_max_norm", options_.min_max_norm());
  TORCH_CHECK_VALUE(options_.max_max_norm() >= options_.min_max_norm(),
                    "max_max_norm must be >= min_max_norm (", options_.min_max_norm(), "), but is ",
                    options_.max_max_norm());
}

std::vector<torch::Tensor> AdaptiveClipper::clipping_factors(
    const std::vector<torch::Tensor>& norms) {
  TORCH_CHECK_VALUE(norms.size() == 1,
                    "AdaptiveClipper clips the flat norm: expected one norm "
                    "vector, got ",
                    norms.size());
  // Each sample contributes 1[‖G_i‖ ≤ C] − ½: a sample added or removed moves the count by ½,
  // the sensitivity behind the σ split of Andrew et al. 2021 (Thm 1); an uncentred count
  // would move by 1 and spend more privacy than is accounted.
  unclipped_ += (norms[0] <= max_norm_).sum().item<double>() - 0.5 * norms[0].numel();
  return {clip_factor(norms[0], max_norm_)};
}

void AdaptiveClipper::update(double noise, double expected_batch_size) {
  detail::check_positive("expected_batch_size", expected_batch_size);
  const double fraction = (unclipped_ + noise) / expected_batch_size + 0.5;
  unclipped_ = 0;
  max_norm_ *=
      std::exp(-options_.learning_rate() * (fraction - options_.target_unclipped_quantile()));
  max_norm_ = std::clamp(max_norm_, options_.min_max_norm(), options_.max_max_norm());
}

void AdaptiveClipper::set_max_norm(double max_norm) {
  detail::check_positive("max_norm", max_norm);
  max_norm_ = max_norm;
}

}  // namespace dptorch
