#pragma once

// Argument checks and history helpers shared by the accountants and the calibration. Internals:
// the public API is dptorch/accounting/accountant.h.

#include <dptorch/accounting/accountant.h>

#include <cstdint>
#include <vector>

namespace dptorch::accounting::detail {

/// Throws unless σ is finite and >= 0: "noise_multiplier must be finite and >= 0, but is -1".
void check_noise_multiplier(double noise_multiplier);
/// Throws unless q is in [0, 1].
void check_sample_rate(double sample_rate);
/// Throws unless q is in (0, 1] (calibration: q = 0 spends nothing whatever σ is).
void check_positive_sample_rate(double sample_rate);
/// Throws unless steps >= 0.
void check_steps(int64_t steps);
/// Throws unless δ is in (0, 1).
void check_delta(double delta);
/// Throws unless the history entry's σ, q and steps are valid.
void check_entry(const HistoryEntry& entry);

/// The entries that spend privacy: steps > 0 and q > 0 (the others are the identity).
std::vector<HistoryEntry> spending_entries(const std::vector<HistoryEntry>& history);

/// True if some spending entry has σ = 0 (no noise: ε is infinite).
bool has_noiseless_step(const std::vector<HistoryEntry>& spending);

}  // namespace dptorch::accounting::detail
