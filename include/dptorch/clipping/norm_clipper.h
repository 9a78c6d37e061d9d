#pragma once

#include <dptorch/common.h>

#include <torch/arg.h>
#include <torch/types.h>

#include <string>
#include <vector>

/// Norm clippers (docs/design.md §3): from per-sample gradient norms to per-sample clip factors.
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
  /// The norm bound the noise must be calibrated to: ‖thresholds()‖₂ (C, or ‖(C_l)‖₂ for
  /// per-layer clipping).
  [[nodiscard]] double noise_scale_norm() const;
  /// Whether thresholds() is known before a batch's norms are seen and stays the same until the
  /// optimiser step: then a DPOptimizer can draw the step's noise before clipping. The default,
  /// false, is always correct (the noise is then added at the step, scaled with the thresholds
  /// the step clipped at).
  [[nodiscard]] virtual bool thresholds_fixed() const { return false; }
  /// Whether set_threshold_factor() is taken: clippers whose thresholds are constants of their
  /// own (constant flat, per-layer, automatic) say yes; those that move their thresholds
  /// themselves (dynamic, adaptive) say no.
  [[nodiscard]] virtual bool scalable() const { return false; }
  /// Multiplies the clipper's own thresholds by `factor` (finite and > 0) from the next
  /// clipping_factors() call on, thresholds() included: a clipping-norm schedule
  /// (optim::DPOptimizerOptions::clipping_schedule) sets it before each step. Refused unless
  /// scalable().
  void set_threshold_factor(double factor);
  /// The factor on the thresholds (1 unless set).
  [[nodiscard]] double threshold_factor() const { return threshold_factor_; }

 protected:
  double threshold_factor_ = 1.0;
};

/// factor_i = min(1, C / (‖G_i‖ + 1e-6)) over all parameters together (Abadi et al. 2016).
class ConstantFlatClipper final : public NormClipper {
 public:
  /// `max_norm` C must be finite and > 0.
  explicit ConstantFlatClipper(double max_norm);
  std::vector<torch::Tensor> clipping_factors(const std::vector<torch::Tensor>& norms) override;
  std::vector<double> thresholds() const override { return {max_norm_ * threshold_factor_}; }
  bool is_per_layer() const override { return false; }
  bool thresholds_fixed() const override { return true; }
  bool scalable() const override { return true; }

 private:
  double max_norm_;
};

/// factor_{i,l} = min(1, C_l / (‖G_{i,l}‖ + 1e-6)), one threshold per trainable parameter
/// (McMahan et al. 2018); the noise is calibrated to C = ‖(C_l)‖₂.
class ConstantPerLayerClipper final : public NormClipper {
 public:
  /// `max_norms` C_l, each finite and > 0, in the order of the module's trainable parameters;
  /// a single value is every parameter's threshold (it is repeated when the norms arrive).
  explicit ConstantPerLayerClipper(std::vector<double> max_norms);
  std::vector<torch::Tensor> clipping_factors(const std::vector<torch::Tensor>& norms) override;
  std::vector<double> thresholds() const override;
  bool is_per_layer() const override { return true; }
  bool thresholds_fixed() const override { return true; }
  bool scalable() const override { return true; }
  void check_parameters(const std::vector<std::string>& names) const override;

 private:
  std::vector<double> max_norms_;
};

/// How a DynamicClipper sets its threshold from a batch's norms (the methods of the seed's
/// dynamic clipper, plus the median).
enum class DynamicClipping {
  /// The initial threshold, always (a constant clipper).
  kStatic,
  /// The ⌊n·(1 − ratio)⌋-th smallest of the n norms (at least the first): the (1 − ratio)
  /// quantile as the seed takes it with kthvalue.
  kPValue,
  /// max(min norm, mean + ratio·std + 1e-8), std with Bessel's correction.
  kMean,
  /// The median of the norms (the lower one of an even count).
  kMedian,
};

/// Settings of a DynamicClipper. The defaults are the seed's (static, ratio 0, no momentum).
struct DynamicClipperOptions {
  /// `initial_threshold`: the threshold before the first batch (finite and > 0).
  explicit DynamicClipperOptions(double initial_threshold)
      : initial_threshold_(initial_threshold) {}
  /// The threshold before the first batch (kStatic keeps it; momentum starts from it).
  TORCH_ARG(double, initial_threshold);
  /// Which statistic of the norms sets the threshold.
  TORCH_ARG(DynamicClipping, method) = DynamicClipping::kStatic;
  /// kPValue: the fraction of norms above the threshold (in [0, 1]); kMean: the multiple of
  /// the standard deviation added to the mean.
  TORCH_ARG(double, ratio) = 0;
  /// threshold ← momentum·threshold + (1 − momentum)·statistic (momentum in [0, 1); 0, the
  /// seed's behaviour, takes each batch's statistic as it is).
  TORCH_ARG(double, momentum) = 0;
  /// Clip each parameter on its own (one threshold each) instead of the flat norm.
  TORCH_ARG(bool, per_layer) = false;
};

/// Clips at a threshold that follows a statistic of the batch's own norms (the seed's dynamic
/// clipper). NOT differentially private unless static: the threshold reads the data, and no
/// accountant accounts for that. It says so on construction; use it only to explore. The noise
/// of a step is scaled with the thresholds that step clipped at.
class DynamicClipper final : public NormClipper {
 public:
  explicit DynamicClipper(DynamicClipperOptions options);
  std::vector<torch::Tensor> clipping_factors(const std::vector<torch::Tensor>& norms) override;
  std::vector<double> thresholds() const override { return thresholds_; }
  bool is_per_layer() const override { return options_.per_layer(); }
  bool thresholds_fixed() const override { return options_.method() == DynamicClipping::kStatic; }
  /// The settings.
  [[nodiscard]] const DynamicClipperOptions& options() const { return options_; }

 private:
  DynamicClipperOptions options_;
  std::vector<double> thresholds_;
};

/// Automatic (normalised) clipping, AUTO-S of Bu et al. 2022 ("Automatic Clipping: Differentially
/// Private Deep Learning Made Easier and Stronger"): factor_i = C / (‖G_i‖ + γ), so every clipped
/// gradient has norm below C and the sensitivity is C (with C = 1, the paper's form, the noise
/// std is σ). Small gradients are scaled up, not left alone; the stability constant γ keeps
/// the factor finite.
class AutomaticClipper final : public NormClipper {
 public:
  /// `max_norm` C (finite and > 0; 1 is the paper's form) and `stability` γ (finite and > 0).
  explicit AutomaticClipper(double max_norm = 1.0, double stability = 0.01);
  std::vector<torch::Tensor> clipping_factors(const std::vector<torch::Tensor>& norms) override;
  std::vector<double> thresholds() const override { return {max_norm_ * threshold_factor_}; }
  bool is_per_layer() const override { return false; }
  bool thresholds_fixed() const override { return true; }
  bool scalable() const override { return true; }
  /// γ.
  [[nodiscard]] double stability() const { return stability_; }

 private:
  double max_norm_;
  double stability_;
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
/// norms (Andrew et al. 2021). It counts the samples with ‖G_i‖ <= C, centred (each counts
/// 1[‖G_i‖ ≤ C] − ½, so one sample moves the count by at most ½); at each optimiser step the
/// count gets N(0, σ_b²) noise, b̃ = count / E[B] + ½, and C moves geometrically toward the
/// target quantile. The count's
/// noise costs privacy: with gradient noise σ_Δ the step is accounted at
/// σ = (σ_Δ⁻² + (2σ_b)⁻²)^(−1/2) (Andrew et al. 2021, Thm 1); DPOptimizer does this split.
class AdaptiveClipper final : public NormClipper {
 public:
  explicit AdaptiveClipper(AdaptiveClipperOptions options);
  std::vector<torch::Tensor> clipping_factors(const std::vector<torch::Tensor>& norms) override;
  std::vector<double> thresholds() const override { return {max_norm_}; }
  bool is_per_layer() const override { return false; }
  // C changes only in update(), which DPOptimizer::step() calls after the gradients are noised.
  bool thresholds_fixed() const override { return true; }
  /// Moves C with the noisy fraction of unclipped samples counted since the last update:
  /// b̃ = (count + noise) / expected_batch_size + ½, `noise` ~ N(0, σ_b²) drawn by the caller.
  void update(double noise, double expected_batch_size);
  /// The centred count the next update() releases: Σ_i (1[‖G_i‖ ≤ C] − ½) since the last one.
  [[nodiscard]] double pending_count() const { return unclipped_; }
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
