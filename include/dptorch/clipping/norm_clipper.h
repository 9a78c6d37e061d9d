#pragma once

#include <dptorch/common.h>

#include <torch/arg.h>
#include <torch/types.h>

#include <string>
#include <vector>

/// Norm clippers (DESIGN.md §3): from per-sample gradient norms to per-sample clip factors.
namespace dptorch {

/// Turns per-sample gradient norms into clip factors. A flat clipper sees one norm vector [B] (the
/// norm over all parameters) and returns one factor vector; a per-layer clipper sees one norm
/// vector per parameter and returns one factor vector per parameter.
class NormClipper {
 public:
  virtual ~NormClipper() = default;
  /// Clip factors for `norms` ([B] each; one entry if !is_per_layer()).
  [[nodiscard]] virtual std::vector<torch::Tensor> clipping_factors(
      const std::vector<torch::Tensor>& norms) = 0;
  /// The thresholds in force after the last clipping_factors call (one, or one per parameter).
  [[nodiscard]] virtual std::vector<double> thresholds() const = 0;
  /// Whether each parameter is clipped on its own.
  [[nodiscard]] virtual bool is_per_layer() const = 0;
  /// Checks the clipper against the trainable parameters it will see (e.g. one threshold each).
  virtual void check_parameters(const std::vector<std::string>& names) const { (void)names; }
  /// The norm bound the noise must be calibrated to: C, or ‖(C_l)‖₂ for per-layer clipping.
  [[nodiscard]] virtual double noise_scale_norm() const;
};

/// factor_i = min(1, C / (‖G_i‖ + 1e-6)) over all parameters together (Abadi et al. 2016).
class ConstantFlatClipper final : public NormClipper {
 public:
  /// `max_norm` C must be finite and > 0.
  explicit ConstantFlatClipper(double max_norm);
  std::vector<torch::Tensor> clipping_factors(const std::vector<torch::Tensor>& norms) override;
  std::vector<double> thresholds() const override { return {max_norm_}; }
  bool is_per_layer() const override { return false; }

 private:
  double max_norm_;
};

/// factor_{i,l} = min(1, C_l / (‖G_{i,l}‖ + 1e-6)), one threshold per trainable parameter
/// (McMahan et al. 2018); the noise is calibrated to C = ‖(C_l)‖₂.
class ConstantPerLayerClipper final : public NormClipper {
 public:
  /// `max_norms` C_l, each finite and > 0, in the order of the module's trainable parameters.
  explicit ConstantPerLayerClipper(std::vector<double> max_norms);
  std::vector<torch::Tensor> clipping_factors(const std::vector<torch::Tensor>& norms) override;
  std::vector<double> thresholds() const override { return max_norms_; }
  bool is_per_layer() const override { return true; }
  void check_parameters(const std::vector<std::string>& names) const override;

 private:
  std::vector<double> max_norms_;
};

/// The statistic of the batch's norms a DynamicClipper follows.
enum class DynamicClipping { kMedian, kMean, kPercentile };

/// Settings of a DynamicClipper.
struct DynamicClipperOptions {
  /// `initial_threshold`: the threshold before the first batch (finite and > 0).
  explicit DynamicClipperOptions(double initial_threshold)
      : initial_threshold_(initial_threshold) {}
  /// The threshold before the first batch (the momentum average starts from it).
  TORCH_ARG(double, initial_threshold);
  /// Which statistic of the norms sets the threshold.
  TORCH_ARG(DynamicClipping, method) = DynamicClipping::kMedian;
  /// kMean: threshold = mean + ratio·std; kPercentile: the ratio-quantile (ratio in [0, 1]).
  TORCH_ARG(double, ratio) = 0.5;
  /// threshold ← momentum·threshold + (1 − momentum)·statistic (momentum in [0, 1)).
  TORCH_ARG(double, momentum) = 0.9;
  /// Clip each parameter on its own (one threshold each) instead of the flat norm.
  TORCH_ARG(bool, per_layer) = false;
};

/// Clips at a threshold that follows a statistic of the batch's own norms. NOT differentially
/// private: the threshold reads the data, and no accountant accounts for that. It says so on
/// construction; use it only to explore.
class DynamicClipper final : public NormClipper {
 public:
  explicit DynamicClipper(DynamicClipperOptions options);
  std::vector<torch::Tensor> clipping_factors(const std::vector<torch::Tensor>& norms) override;
  std::vector<double> thresholds() const override { return thresholds_; }
  bool is_per_layer() const override { return options_.per_layer(); }

 private:
  DynamicClipperOptions options_;
  std::vector<double> thresholds_;
};

}  // namespace dptorch

namespace dptorch {

/// Settings of an AdaptiveClipper (Andrew et al. 2021, "Differentially Private Learning with
/// Adaptive Clipping", Algorithm 1 with the geometric update).
struct AdaptiveClipperOptions {
  /// `initial_max_norm`: C before the first step (finite and > 0).
  explicit AdaptiveClipperOptions(double initial_max_norm) : initial_max_norm_(initial_max_norm) {}
  /// C before the first step.
  TORCH_ARG(double, initial_max_norm);
  /// γ: the fraction of samples whose norm should stay at or below C (in (0, 1)).
  TORCH_ARG(double, target_unclipped_quantile) = 0.5;
  /// η of the geometric update C ← C·exp(−η (b̃ − γ)).
  TORCH_ARG(double, learning_rate) = 0.2;
  /// σ_b: standard deviation of the noise on the count of unclipped samples.
  TORCH_ARG(double, unclipped_num_std) = 1.0;
  /// Bounds C is kept within.
  TORCH_ARG(double, min_max_norm) = 1e-6;
  TORCH_ARG(double, max_max_norm) = 1e6;
};

/// Flat clipping at a threshold C that follows a private estimate of a quantile of the per-sample
/// norms (Andrew et al. 2021). It counts the samples with ‖G_i‖ <= C; at each optimiser step the
/// count gets N(0, σ_b²) noise and C moves geometrically toward the target quantile. The count's
/// noise costs privacy: with gradient noise σ_Δ the step is accounted at
/// σ = (σ_Δ⁻² + (2σ_b)⁻²)^(−1/2) (Andrew et al. 2021, Thm 1); DPOptimizer does this split.
class AdaptiveClipper final : public NormClipper {
 public:
  explicit AdaptiveClipper(AdaptiveClipperOptions options);
  std::vector<torch::Tensor> clipping_factors(const std::vector<torch::Tensor>& norms) override;
  std::vector<double> thresholds() const override { return {max_norm_}; }
  bool is_per_layer() const override { return false; }
  /// Moves C with the noisy fraction of unclipped samples counted since the last update:
  /// b̃ = (count + noise) / expected_batch_size, `noise` ~ N(0, σ_b²) drawn by the caller.
  void update(double noise, double expected_batch_size);
  /// The current threshold C.
  [[nodiscard]] double max_norm() const { return max_norm_; }
  /// Sets C (for resuming from a checkpoint).
  void set_max_norm(double max_norm);
  /// The settings.
  [[nodiscard]] const AdaptiveClipperOptions& options() const { return options_; }

 private:
  AdaptiveClipperOptions options_;
  double max_norm_;
  double unclipped_ = 0;
};

}  // namespace dptorch
