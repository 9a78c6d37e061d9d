#pragma once

#include <dptorch/clipping/norm_clipper.h>
#include <dptorch/grad_sample/grad_sample_module.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace dptorch {

namespace optim {
class DPOptimizer;
}  // namespace optim

/// What the on-batch-clip callback sees: once per trainable parameter after each
/// clip_and_accumulate(), then once with an empty `name` to mark the end of the batch.
struct ClipEvent {
  /// The parameter's name in module->named_parameters(); empty for the end-of-batch call.
  std::string name;
  /// Clip factor per sample [B].
  torch::Tensor clip_factor;
  /// The threshold the parameter was clipped at (the flat threshold for flat clipping).
  double threshold = 0;
  /// Per-sample norm [B] that was clipped (the flat norm for flat clipping).
  torch::Tensor per_sample_norm;
  /// The materialised per-sample gradient [B, ...], only if the callback asked for it.
  torch::Tensor grad_sample;
};

/// What pre_step() reports about the accumulated logical batch.
struct ClipStats {
  /// The largest threshold each trainable parameter was clipped at, over the accumulated calls.
  std::vector<double> max_norms;
  /// Samples accumulated since the last pre_step().
  int64_t batch_size = 0;
};

/// Clips per-sample gradients and accumulates their sum (DESIGN.md §3): after each backward,
/// clip_and_accumulate() computes per-sample norms, clip factors, and adds Σ_i factor_i G_i to
/// each parameter's accumulator; pre_step() writes the accumulated sum into `.grad` (÷ batch size
/// for "mean") and resets. Several clip_and_accumulate() calls before one pre_step() are virtual
/// steps of one logical batch.
///
/// Example:
///   dptorch::PerSampleGradientClipper clipper(
///       model, std::make_shared<dptorch::ConstantFlatClipper>(1.0));
///   loss.backward();
///   clipper.clip_and_accumulate();
///   auto stats = clipper.pre_step();
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

  /// Clips the per-sample gradients of the last backward and adds their sum to the accumulators.
  void clip_and_accumulate();
  /// Writes the accumulated sums into each parameter's `.grad` (÷ accumulated batch size for
  /// "mean"), returns the thresholds and batch size, and resets. Error if nothing accumulated.
  ClipStats pre_step();
  /// Drops accumulated sums and recorded per-sample gradients, and zeroes `.grad`.
  void zero_grad();
  /// Detaches from the module (the module runs as plain torch again).
  void close();
  /// Sets the callback run after each clip_and_accumulate() (see ClipEvent); with
  /// `with_grad_sample` it also receives the materialised per-sample gradients (costly).
  void set_on_batch_clip_func(std::function<void(const ClipEvent&)> func,
                              bool with_grad_sample = false);

  /// Accumulated Σ clipped per-sample gradients per trainable parameter, in the order of
  /// grad_sample_module().parameter_names(); empty when nothing was accumulated since the last
  /// reset. The accumulators are kept from step to step (overwritten, not reallocated, when a
  /// new accumulation starts, unless a `.grad` still holds them), so a step allocates no
  /// parameter-sized tensors; pre_step() and DPOptimizer::step() hand them to `.grad` without a
  /// copy. In an accumulation begun by a DPOptimizer they hold the noise and the scaled sums.
  [[nodiscard]] std::vector<torch::Tensor> accumulated() const;
  /// Samples accumulated since the last reset.
  [[nodiscard]] int64_t accumulated_batch_size() const { return batch_size_; }
  /// clip_and_accumulate() calls since the last reset.
  [[nodiscard]] int64_t accumulated_iterations() const { return iterations_; }
  /// The largest threshold per parameter over the accumulated calls.
  [[nodiscard]] const std::vector<double>& accumulated_max_norms() const { return max_norms_; }
  /// Forgets accumulated sums, thresholds and batch size (keeps `.grad` until the next
  /// clip_and_accumulate(); a `.grad` still held then is left alone, and a new accumulator made).
  void reset_accumulation();
  /// The tape the clipper reads.
  [[nodiscard]] GradSampleModule& grad_sample_module() { return *gsm_; }
  /// The norm clipper in use.
  [[nodiscard]] const std::shared_ptr<NormClipper>& norm_clipper() const { return norm_clipper_; }

 private:
  // DPOptimizer begins its accumulations itself: the accumulators start as the noise, and the
  // 1/E[B] of a mean loss is folded into the clip weights, which spares a zeroing pass and a
  // division pass over every gradient per step (DESIGN.md §4).
  friend class optim::DPOptimizer;

  // How an accumulation begins.
  struct AccumulationStart {
    // Writes the accumulators' first values (they arrive uninitialised); empty: zeros.
    std::function<void(const std::vector<torch::Tensor>&)> fill;
    // Multiplies every clipped sum added during the accumulation.
    double scale = 1;
  };

  // Begins an accumulation (one must not be under way): the accumulators are reused where
  // possible (not while a `.grad` holds them) and given their first values.
  void start_accumulation(const AccumulationStart& start);

  std::unique_ptr<GradSampleModule> gsm_;
  std::shared_ptr<NormClipper> norm_clipper_;

  std::vector<torch::Tensor> summed_;  // kept across resets; valid while accumulating_
  bool accumulating_ = false;          // begun and not reset
  bool filled_ = false;                // begun with an AccumulationStart::fill
  double scale_ = 1;                   // the accumulation's AccumulationStart::scale
  uint64_t accumulation_id_ = 0;       // counts the accumulations begun, to tell them apart
  std::vector<double> max_norms_;
  int64_t batch_size_ = 0;
  int64_t iterations_ = 0;
  std::function<void(const ClipEvent&)> on_batch_clip_;
  bool with_grad_sample_ = false;
};

}  // namespace dptorch
