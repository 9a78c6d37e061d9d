#pragma once

#include <dptorch/common.h>
#include <dptorch/grad_sample/rules.h>
#include <dptorch/nn/layer.h>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/ordered_dict.h>

#include <memory>
#include <string>
#include <vector>

namespace dptorch {

/// Settings of a GradSampleModule.
struct GradSampleOptions {
  /// Whether the batch is dimension 0 of every layer input (true), or dimension 1 of inputs with
  /// two or more leading dimensions ([T, B, d], the RNN convention).
  TORCH_ARG(bool, batch_first) = true;
  /// How the loss reduced over the batch: per-sample gradients are the recorded ones × B for
  /// kMean, as recorded for kSum.
  TORCH_ARG(LossReduction, loss_reduction) = LossReduction::kMean;
  /// Ghost norms, materialised per-sample gradients, or per layer the cheaper (the default).
  TORCH_ARG(NormMethod, norm_method) = NormMethod::kAuto;
};

/// Checks that every trainable parameter of `module` belongs to a dp layer (a
/// nn::PerSampleLayer), and that no module mixes samples across the batch (BatchNorm). Errors
/// name the module path and the fix.
void validate(torch::nn::Module& module);

/// Attaches a tape to every dp layer of a module, so that after one `loss.backward()` the
/// per-sample gradients of all trainable parameters are known (docs/design.md §2): their squared
/// norms, their weighted sum for any per-sample weights, and, on request, the per-sample gradients
/// themselves. Results are keyed by the names of `module->named_parameters()`. Detaches on
/// destruction or close().
///
/// Example:
///   dptorch::GradSampleModule gsm(model);
///   loss_fn(model->forward(x), y).backward();
///   torch::Tensor norms = gsm.flat_norm();                    // [B]
///   auto sums = gsm.clipped_sum(torch::clamp_max(1.0 / norms, 1.0));
class GradSampleModule {
 public:
  /// Validates `module` (see validate()) and attaches; nothing is attached if it throws.
  explicit GradSampleModule(std::shared_ptr<torch::nn::Module> module,
                            GradSampleOptions options = {});
  template <typename M>
  explicit GradSampleModule(const torch::nn::ModuleHolder<M>& module,
                            GradSampleOptions options = {})
      : GradSampleModule(module.ptr(), std::move(options)) {}
  GradSampleModule(const GradSampleModule&) = delete;
  GradSampleModule& operator=(const GradSampleModule&) = delete;
  ~GradSampleModule();

  /// Detaches every layer: the module runs as plain torch again. Idempotent.
  void close();

  /// The module the tape is attached to.
  [[nodiscard]] const std::shared_ptr<torch::nn::Module>& module() const { return module_; }
  /// The options the module was attached with.
  [[nodiscard]] const GradSampleOptions& options() const { return options_; }
  /// Names of the trainable parameters (module->named_parameters() order) whose per-sample
  /// gradients this computes.
  [[nodiscard]] std::vector<std::string> parameter_names() const;
  /// The trainable parameters, in the order of parameter_names().
  [[nodiscard]] std::vector<torch::Tensor> parameters() const;
  /// How many trainable parameters there are.
  [[nodiscard]] size_t num_parameters() const { return slots_.size(); }

  /// Whether a backward pass has filed per-sample gradients not yet cleared.
  [[nodiscard]] bool has_pass() const;
  /// The path of a dp layer that ran forward in eval mode with grad mode on since the last
  /// clear() (it recorded nothing: layers record in training mode only); empty if none.
  [[nodiscard]] std::string unrecorded_layer() const;
  /// Whether close() was called.
  [[nodiscard]] bool closed() const { return closed_; }
  /// Samples in the last backward pass.
  [[nodiscard]] int64_t batch_size();
  /// Squared per-sample norm [B] of each trainable parameter.
  [[nodiscard]] torch::OrderedDict<std::string, torch::Tensor> norm_sq();
  /// Per-sample norm [B] of each trainable parameter.
  [[nodiscard]] torch::OrderedDict<std::string, torch::Tensor> norms();
  /// Per-sample norm [B] of the gradient of all trainable parameters together.
  [[nodiscard]] torch::Tensor flat_norm();
  /// Σ_i w_i G_i for each trainable parameter, one weight w_i [B] per sample for all parameters.
  [[nodiscard]] torch::OrderedDict<std::string, torch::Tensor> clipped_sum(const torch::Tensor& w);
  /// Σ_i w_i G_i for each trainable parameter with its own weights (in parameter_names() order).
  [[nodiscard]] torch::OrderedDict<std::string, torch::Tensor> clipped_sum(
      const std::vector<torch::Tensor>& w);
  /// Adds Σ_i w_i G_i into `out[k]` (one tensor per trainable parameter, its shape, in
  /// parameter_names() order) in place: the accumulation of DP-SGD without parameter-sized
  /// temporaries where the rule allows it (Linear writes with addmm_, Embedding with index_add_).
  void add_clipped_sum_to(const std::vector<torch::Tensor>& w,
                          const std::vector<torch::Tensor>& out);
  /// The per-sample gradients [B, param shape...] of each trainable parameter (memory heavy:
  /// only on request).
  [[nodiscard]] torch::OrderedDict<std::string, torch::Tensor> grad_samples();
  /// Forgets the per-sample gradients of the last pass; the next forward/backward starts anew.
  void clear();

 private:
  struct Slot {  // one trainable parameter
    std::string name;
    torch::Tensor param;
    size_t layer;  // index into layers_
    std::string local;
  };
  struct Pass;  // per-sample gradients of one backward pass

  Pass& pass();
  std::vector<torch::Tensor> per_slot(
      const std::function<std::vector<torch::Tensor>(grad_sample::PerSampleGrads&, size_t layer)>&
          query);

  std::shared_ptr<torch::nn::Module> module_;
  GradSampleOptions options_;
  std::shared_ptr<nn::detail::Tape> tape_;
  std::vector<std::pair<std::string, nn::PerSampleLayer*>> layers_;
  std::vector<Slot> slots_;
  std::unique_ptr<Pass> pass_;
  bool closed_ = false;
};

}  // namespace dptorch
