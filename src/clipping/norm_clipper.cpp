#include <dptorch/clipping/norm_clipper.h>

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

double NormClipper::noise_scale_norm() const {
  double sq = 0;
  for (double t : thresholds()) sq += t * t;
  return std::sqrt(sq);
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
  return {clip_factor(norms[0], max_norm_)};
}

ConstantPerLayerClipper::ConstantPerLayerClipper(std::vector<double> max_norms)
    : max_norms_(std::move(max_norms)) {
  TORCH_CHECK_VALUE(!max_norms_.empty(),
                    "ConstantPerLayerClipper needs one max_grad_norm per "
                    "trainable parameter, but got none");
  for (double c : max_norms_) detail::check_positive("max_grad_norm", c);
}

void ConstantPerLayerClipper::check_parameters(const std::vector<std::string>& names) const {
  TORCH_CHECK_VALUE(max_norms_.size() == names.size(), "ConstantPerLayerClipper has ",
                    max_norms_.size(), " thresholds but the module has ", names.size(),
                    " trainable parameters; give one max_grad_norm per parameter, in the order of "
                    "named_parameters()");
}

std::vector<torch::Tensor> ConstantPerLayerClipper::clipping_factors(
    const std::vector<torch::Tensor>& norms) {
  check_parameters(std::vector<std::string>(norms.size()));
  std::vector<torch::Tensor> factors;
  for (size_t l = 0; l < norms.size(); ++l) factors.push_back(clip_factor(norms[l], max_norms_[l]));
  return factors;
}

DynamicClipper::DynamicClipper(DynamicClipperOptions options) : options_(std::move(options)) {
  detail::check_positive("initial_threshold", options_.initial_threshold());
  TORCH_CHECK_VALUE(options_.momentum() >= 0 && options_.momentum() < 1,
                    "momentum must be in [0, 1), but is ", options_.momentum());
  if (options_.method() == DynamicClipping::kPercentile) {
    TORCH_CHECK_VALUE(options_.ratio() >= 0 && options_.ratio() <= 1,
                      "ratio (the percentile) must be in [0, 1], but is ", options_.ratio());
  } else {
    detail::check_non_negative("ratio", options_.ratio());
  }
  thresholds_ = {options_.initial_threshold()};
  TORCH_WARN(
      "dptorch::DynamicClipper is NOT differentially private: its threshold follows the "
      "batch's own gradient norms, and no accountant accounts for that. The epsilon "
      "reported for this run is not a privacy guarantee.");
}

std::vector<torch::Tensor> DynamicClipper::clipping_factors(
    const std::vector<torch::Tensor>& norms) {
  if (thresholds_.size() != norms.size()) {
    thresholds_.assign(norms.size(), thresholds_.front());
  }
  std::vector<torch::Tensor> factors;
  for (size_t l = 0; l < norms.size(); ++l) {
    const auto n = norms[l].to(torch::kDouble);
    double stat = thresholds_[l];
    if (n.numel() > 0) {
      switch (options_.method()) {
        case DynamicClipping::kMedian: stat = n.median().item<double>(); break;
        case DynamicClipping::kMean:
          stat = n.mean().item<double>() +
                 options_.ratio() * (n.numel() > 1 ? n.std().item<double>() : 0.0);
          break;
        case DynamicClipping::kPercentile:
          stat = torch::quantile(n, options_.ratio()).item<double>();
          break;
      }
      thresholds_[l] = options_.momentum() * thresholds_[l] + (1 - options_.momentum()) * stat;
    }
    factors.push_back(clip_factor(norms[l], std::max(thresholds_[l], 1e-12)));
  }
  return factors;
}

}  // namespace dptorch

namespace dptorch {

AdaptiveClipper::AdaptiveClipper(AdaptiveClipperOptions options)
    : options_(std::move(options)), max_norm_(options_.initial_max_norm()) {
  detail::check_positive("initial_max_norm", options_.initial_max_norm());
  const double gamma = options_.target_unclipped_quantile();
  TORCH_CHECK_VALUE(gamma > 0 && gamma < 1, "target_unclipped_quantile must be in (0, 1), but is ",
                    gamma);
  detail::check_positive("learning_rate", options_.learning_rate());
  detail::check_positive("unclipped_num_std", options_.unclipped_num_std());
  detail::check_positive("min_max_norm", options_.min_max_norm());
  TORCH_CHECK_VALUE(options_.max_max_norm() >= options_.min_max_norm(),
                    "max_max_norm must be >= min_max_norm, but is ", options_.max_max_norm());
}

std::vector<torch::Tensor> AdaptiveClipper::clipping_factors(
    const std::vector<torch::Tensor>& norms) {
  TORCH_CHECK_VALUE(norms.size() == 1,
                    "AdaptiveClipper clips the flat norm: expected one norm "
                    "vector, got ",
                    norms.size());
  unclipped_ += (norms[0] <= max_norm_).sum().item<double>();
  return {clip_factor(norms[0], max_norm_)};
}

void AdaptiveClipper::update(double noise, double expected_batch_size) {
  detail::check_positive("expected_batch_size", expected_batch_size);
  const double fraction = (unclipped_ + noise) / expected_batch_size;
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
