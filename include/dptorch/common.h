#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <string>

/// Shared vocabulary and argument checks of dptorch.
namespace dptorch {

/// How a model's loss reduces over the batch; it decides how per-sample gradients are
/// recovered from the gradient of the loss (× batch size for kMean, as is for kSum).
enum class LossReduction { kMean, kSum };

/// Parses "mean" or "sum"; anything else is refused with the accepted spellings.
[[nodiscard]] inline LossReduction parse_loss_reduction(const std::string& name) {
  if (name == "mean") return LossReduction::kMean;
  if (name == "sum") return LossReduction::kSum;
  TORCH_CHECK_VALUE(false, "loss_reduction must be \"mean\" or \"sum\", but is \"", name, "\"");
}

/// Name of a loss reduction, as parse_loss_reduction accepts it.
[[nodiscard]] inline const char* to_string(LossReduction reduction) {
  return reduction == LossReduction::kMean ? "mean" : "sum";
}

/// How the per-sample gradient norm of a linear-like layer (Linear, Conv) is computed
/// (Bu et al. 2023, "mixed ghost clipping").
enum class NormMethod {
  /// Per layer and batch shape, whichever of kGhost and kMaterialize costs fewer flops.
  kAuto,
  /// ‖G_i‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s), cost ~ B·T²·(d+p) (Li et al. 2021).
  kGhost,
  /// Forms G_i = Σ_t g_t a_tᵀ, cost ~ B·T·d·p.
  kMaterialize,
};

namespace detail {

/// Checks that `value` is finite and > 0: "<name> must be finite and > 0, but is <value>".
inline void check_positive(const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value > 0, name, " must be finite and > 0, but is ",
                    value);
}

/// Checks that `value` is finite and >= 0: "<name> must be finite and >= 0, but is <value>".
inline void check_non_negative(const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value) && value >= 0, name, " must be finite and >= 0, but is ",
                    value);
}

}  // namespace detail
}  // namespace dptorch
