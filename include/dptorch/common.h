#pragma once

#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
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

/// The first line of an error message (c10::Error's what() goes on with a backtrace).
[[nodiscard]] inline std::string first_line(const std::string& text) {
  return text.substr(0, text.find('\n'));
}

/// Untrusted bytes made fit for an error message: printable ASCII only (any other byte shows
/// as '?'), cut to at most `limit` characters ("..." marks the cut).
[[nodiscard]] inline std::string printable(std::string text, size_t limit = std::string::npos) {
  if (text.size() > limit) text = text.substr(0, limit < 3 ? 0 : limit - 3) + "...";
  for (char& c : text) {
    if (c < 0x20 || c > 0x7e) c = '?';
  }
  return text;
}

// One phrasing for every option check: "<name> must be <condition>, but is <value>".

/// Which ends of a range belong to it.
enum class Bounds { kOpen, kClosed, kClosedOpen, kOpenClosed };

/// Checks that `value` is finite: "<name> must be finite, but is <value>".
inline void check_finite(const char* name, double value) {
  TORCH_CHECK_VALUE(std::isfinite(value), name, " must be finite, but is ", value);
}

/// Checks that a count is at least `lo`: "steps must be >= 1, but is 0".
inline void check_at_least(const char* name, int64_t value, int64_t lo) {
  TORCH_CHECK_VALUE(value >= lo, name, " must be >= ", lo, ", but is ", value);
}

/// Checks that `value` lies in the range from `lo` to `hi` with the given ends:
/// "delta must be in (0, 1), but is 2".
inline void check_in_range(const char* name, double value, double lo, double hi, Bounds bounds) {
  const bool lo_in = bounds == Bounds::kClosed || bounds == Bounds::kClosedOpen;
  const bool hi_in = bounds == Bounds::kClosed || bounds == Bounds::kOpenClosed;
  const bool ok = (lo_in ? value >= lo : value > lo) && (hi_in ? value <= hi : value < hi);
  TORCH_CHECK_VALUE(ok, name, " must be in ", lo_in ? "[" : "(", lo, ", ", hi, hi_in ? "]" : ")",
                    ", but is ", value);
}

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
