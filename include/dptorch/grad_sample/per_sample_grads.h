#pragma once

#include <dptorch/common.h>

#include <torch/types.h>

#include <memory>
#include <string>
#include <vector>

/// The interface of a per-sample gradient rule (docs/design.md §2): from what a layer recorded in
/// forward and backward, the per-sample squared norms, the weighted (clipped) sum, and on request
/// the materialised per-sample gradients; and the rule of parameters small enough to hold.
namespace dptorch::grad_sample {

/// Per-sample gradients of one layer's trainable parameters for one backward pass: the rule's
/// three answers (docs/design.md §2). Results are in the order of `names()`, for the gradient of
/// the loss as recorded (the caller rescales for the loss reduction).
class PerSampleGrads {
 public:
  virtual ~PerSampleGrads() = default;
  /// Local names of the parameters covered ("weight", "bias").
  [[nodiscard]] virtual std::vector<std::string> names() const = 0;
  /// Squared per-sample norms, [B] per parameter.
  [[nodiscard]] virtual std::vector<torch::Tensor> norm_sq() = 0;
  /// Σ_i w_i G_i per parameter, each with its own weights w [B].
  [[nodiscard]] virtual std::vector<torch::Tensor> weighted_sum(
      const std::vector<torch::Tensor>& w) = 0;
  /// Adds Σ_i w_i G_i into `out` (one tensor of each parameter's shape) in place. The default
  /// adds weighted_sum(); rules override it to write without a parameter-sized temporary.
  virtual void add_weighted_sum_to(const std::vector<torch::Tensor>& w,
                                   const std::vector<torch::Tensor>& out);
  /// The per-sample gradients [B, param shape...] per parameter (costly; on request only).
  [[nodiscard]] virtual std::vector<torch::Tensor> materialize() = 0;
};

/// Rule for per-sample gradients formed once and held (norm layers' affine parameters, and
/// convolutions whose cost model kept them): norms and sums follow from them.
class MaterializedGrads final : public PerSampleGrads {
 public:
  /// One [B, param shape...] tensor per named parameter.
  MaterializedGrads(std::vector<std::string> names, std::vector<torch::Tensor> samples);
  /// Per named parameter, its per-sample gradients as consecutive chunks of samples
  /// ([B_1, param shape...], [B_2, ...], ...), which are never concatenated for norms and sums.
  MaterializedGrads(std::vector<std::string> names, std::vector<std::vector<torch::Tensor>> chunks);
  /// The same with the squared norms [B] already formed (undefined where not), so that norm_sq()
  /// need not read the per-sample gradients again.
  MaterializedGrads(std::vector<std::string> names, std::vector<std::vector<torch::Tensor>> chunks,
                    std::vector<torch::Tensor> norms_sq);
  std::vector<std::string> names() const override { return names_; }
  std::vector<torch::Tensor> norm_sq() override;
  std::vector<torch::Tensor> weighted_sum(const std::vector<torch::Tensor>& w) override;
  void add_weighted_sum_to(const std::vector<torch::Tensor>& w,
                           const std::vector<torch::Tensor>& out) override;
  std::vector<torch::Tensor> materialize() override;

 private:
  std::vector<std::string> names_;
  std::vector<std::vector<torch::Tensor>> chunks_;
  std::vector<torch::Tensor> norms_sq_;
};

}  // namespace dptorch::grad_sample
