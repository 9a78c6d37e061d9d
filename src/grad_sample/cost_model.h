#pragma once

// Speeds shared by the cost models of the convolution rule (plan_conv) and of Linear's keeping
// (keep_is_cheaper), fitted on one core of the machine in docs/performance.md; only their ratios
// matter for the choices. Not installed.

namespace dptorch::grad_sample::detail {

/// Batched Gram products of ghost norms, multiply-adds per ns (GMAC/s).
constexpr double kGramSpeed = 38;
/// One pass over kept per-sample gradients (norms, or the clipped sum), bytes per ns.
constexpr double kKeptPassSpeed = 14;

}  // namespace dptorch::grad_sample::detail
