#pragma once

#include <dptorch/clipping/accumulation.h>
#include <dptorch/clipping/norm_clipper.h>
#include <dptorch/grad_sample/grad_sample_module.h>

#include <functional>
#include <memory>
#include <ostream>
#include <string>
#include <vector>

namespace dptorch {

/// What the on-batch-clip callback sees: once per trainable parameter after each
/// clip_and_accumulate(), then once with an empty `name` to mark the end of the batch (the seed's
/// on_batch_clip_func arguments).
struct ClipEvent {
  /// The parameter's name in module->named_parameters(); empty for the end-of-batch call.
  std::string name;
  /// Clip factor per sample [B].
  torch::Tensor clip_factor;
  /// The threshold the parameter was clipped at (the flat threshold for flat clipping).
  double threshold = 0;
  /// Per-sample norm [B] that was clipped (the flat norm for flat clipping).
  torch::Tensor per_sample_norm;
  /// The per-sample gradients [B, ...] (ClipCallbackOptions::grad_sample).
  torch::Tensor grad_sample;
  /// This call's clipped gradient Σ_i factor_i G_i, ÷ this call's batch size for a "mean" loss
  /// (ClipCallbackOptions::grad_after_clip).
  torch::Tensor grad_after_clip;
  /// This call's unclipped gradient Σ_i G_i, scaled the same way: the gradient plain autograd
  /// would have formed (ClipCallbackOptions::grad_before_clip).
  torch::Tensor grad_before_clip;
};

/// What the on-batch-clip callback is given besides names, factors, thresholds and norms.
struct ClipCallbackOptions {
  /// The materialised per-sample gradients (memory heavy).
  TORCH_ARG(bool, grad_sample) = false;
  /// This call's clipped gradient (one gradient's worth of memory; the seed always gave it).
  TORCH_ARG(bool, grad_after_clip) = true;
  /// This call's unclipped gradient (computed on request: no `.grad` is formed in backward).
  TORCH_ARG(bool, grad_before_clip) = false;
};

/// What pre_step() returns: the seed's pair (max_norm, batch_size), and the per-parameter
/// thresholds.
struct ClipStats {
  /// The norm bound the noise must be scaled with, once per trainable parameter: the ℓ2 norm of
  /// the aggregated thresholds (flat clipping: C; per-layer: ‖(C_l)‖₂, the same for every
  /// parameter).
  std::vector<double> max_norm;
  /// Samples accumulated since the last pre_step().
  int64_t batch_size = 0;
  /// The largest threshold each trainable parameter was clipped at over the accumulated calls.
  std::vector<double> thresholds;
};

/// Clips per-sample gradients and accumulates their sum (the seed's PerSampleGradientClipper,
/// docs/design.md): after each backward, clip_and_accumulate() computes per-sample norms and clip
/// factors and adds Σ_i factor_i G_i to each parameter's accumulator; pre_step() writes the
/// accumulated sum into `.grad` (÷ batch size for "mean"), resets, and returns the noise bound
/// and batch size. Several clip_and_accumulate() calls before one pre_step() are virtual steps of
/// one logical batch. Layers record in training mode only.
///
/// Example:
///   dptorch::PerSampleGradientClipper clipper(
///       model, std::make_shared<dptorch::ConstantFlatClipper>(1.0));
///   loss.backward();
///   clipper.clip_and_accumulate();
///   auto stats = clipper.pre_step();  // stats.max_norm[k] · σ: the noise std of parameter k
///   optimizer.step();
class PerSampleGradientClipper {
 public:
  /// Attaches to `module`; `loss_reduction` is "mean" or "sum".
  PerSampleGradientClipper(std::shared_ptr<torch::nn::Module> module,
                           std::shared_ptr<NormClipper> norm_clipper, bool batch_first = true,
                           const std::string& loss_reduction = "mean");
  template <typename M>
  PerSampleGradientClipper(const torch::nn::ModuleHolder<M>& module,
                           std::shared_ptr<NormClipper> norm_clipper, bool batch_first = true,
                           const std::string& loss_reduction = "mean")
      : PerSampleGradientClipper(module.ptr(), std::move(norm_clipper), batch_first,
                                 loss_reduction) {}
  /// Attaches to `module` with every option of its GradSampleModule: batch_first,
  /// loss_reduction, and the norm method (kAuto: the cost model; kGhost / kMaterialize force one).
  /// Example: `PerSampleGradientClipper(model, clipper,
  ///                                    GradSampleOptions().norm_method(NormMethod::kGhost))`.
  PerSampleGradientClipper(std::shared_ptr<torch::nn::Module> module,
                           std::shared_ptr<NormClipper> norm_clipper,
                           const GradSampleOptions& options);
  template <typename M>
  PerSampleGradientClipper(const torch::nn::ModuleHolder<M>& module,
                           std::shared_ptr<NormClipper> norm_clipper,
                           const GradSampleOptions& options)
      : PerSampleGradientClipper(module.ptr(), std::move(norm_clipper), options) {}

  /// Clips the per-sample gradients of the last backward and adds their sum to the accumulators
  /// (the largest thresholds and the batch size are aggregated too). Error if the last backward
  /// recorded nothing (e.g. it ran in eval mode: the error says so).
  void clip_and_accumulate();
  /// Writes the accumulated sums into each parameter's `.grad` (÷ accumulated batch size for
  /// "mean"), resets, and returns the noise bound per parameter and the batch size (the seed's
  /// pair; see ClipStats). Error if nothing was accumulated.
  ClipStats pre_step();
  /// Drops accumulated sums and recorded per-sample gradients, and zeroes `.grad`.
  void zero_grad();
  /// Detaches from the module (the module runs as plain torch again).
  void close();
  /// Sets the callback run after each clip_and_accumulate() (see ClipEvent); with
  /// `with_grad_sample` it also receives the materialised per-sample gradients (costly).
  void set_on_batch_clip_func(std::function<void(const ClipEvent&)> func,
                              bool with_grad_sample = false);
  /// Sets the callback with the tensors `options` asks for.
  void set_on_batch_clip_func(std::function<void(const ClipEvent&)> func,
                              const ClipCallbackOptions& options);

  /// The accumulation the clipped sums go into; a DPOptimizer begins and finishes it.
  [[nodiscard]] Accumulation& accumulation() { return accumulation_; }
  [[nodiscard]] const Accumulation& accumulation() const { return accumulation_; }
  /// Samples accumulated since the last reset.
  [[nodiscard]] int64_t accumulated_batch_size() const { return accumulation_.batch_size(); }
  /// clip_and_accumulate() calls since the last reset.
  [[nodiscard]] int64_t accumulated_iterations() const { return accumulation_.iterations(); }
  /// The largest threshold per trainable parameter over the accumulated calls.
  [[nodiscard]] std::vector<double> accumulated_thresholds() const;
  /// Forgets accumulated sums, thresholds and batch size (keeps `.grad`).
  void reset_accumulation() { accumulation_.reset(); }
  /// The norm bound the noise of the current logical batch must be scaled with: ‖aggregated
  /// thresholds‖₂ once something is accumulated, else the norm clipper's current thresholds
  /// (one per trainable parameter for per-layer clipping).
  [[nodiscard]] double noise_bound() const;
  /// Throws, naming the layer and the fix, if a trainable dp layer ran a forward pass with grad
  /// mode on outside training mode since the last clip (it recorded nothing, as the seed's hooks
  /// did not in eval mode).
  void check_nothing_unrecorded() const;
  /// The tape the clipper reads.
  [[nodiscard]] GradSampleModule& grad_sample_module() { return *gsm_; }
  /// The norm clipper in use.
  [[nodiscard]] const std::shared_ptr<NormClipper>& norm_clipper() const { return norm_clipper_; }

 private:
  // The clipper's thresholds, one per trainable parameter for a per-layer clipper.
  [[nodiscard]] std::vector<double> parameter_thresholds(const std::vector<double>& t) const;

  std::unique_ptr<GradSampleModule> gsm_;
  std::shared_ptr<NormClipper> norm_clipper_;
  Accumulation accumulation_;
  std::function<void(const ClipEvent&)> on_batch_clip_;
  ClipCallbackOptions callback_options_;
};

/// Prints what the clipper is attached to (the seed's repr): "PerSampleGradientClipper on
/// <module>", or "... (closed)" once closed.
std::ostream& operator<<(std::ostream& stream, const PerSampleGradientClipper& clipper);

}  // namespace dptorch
