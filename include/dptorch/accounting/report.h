#pragma once

#include <dptorch/accounting/accountant.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

/// What a run reports of its privacy: the ledger of what it spent, ε under every accountant, and
/// a statement a reader without the mathematics can follow. dptrain and dpaccount print them.
namespace dptorch::accounting {

/// One segment of a run's privacy ledger: `steps` consecutive steps with the same sampler,
/// noise multiplier σ, sample rate q and clipping.
struct LedgerSegment {
  /// How batches were drawn: "poisson" (each example independently with probability q).
  std::string sampler = "poisson";
  double noise_multiplier = 0.0;
  double sample_rate = 0.0;
  int64_t steps = 0;
  /// The bound C every example's gradient was clipped to (the noise's scale is σ·C).
  double max_grad_norm = 0.0;
  /// "flat", "per-layer", "adaptive" or "automatic".
  std::string clipping = "flat";
};

/// The ledger of an accountant's history, every block a segment with the run's sampler and
/// clipping.
[[nodiscard]] std::vector<LedgerSegment> ledger_of(const std::vector<HistoryEntry>& history,
                                                   double max_grad_norm,
                                                   const std::string& clipping,
                                                   const std::string& sampler = "poisson");

/// ε at δ of `history` under every registered accountant, in registration order (+infinity where
/// a step had no noise). An accountant whose limits the query passes (Accountant::answerable) is
/// left out rather than failing the report.
[[nodiscard]] std::vector<std::pair<std::string, double>> epsilon_by_accountant(
    const std::vector<HistoryEntry>& history, double delta);

/// A few plain sentences: what is protected (one training example, added or removed), ε and δ
/// and what they mean, which accountant measured them, and what the guarantee assumes (the
/// sampler, secret batches, the clipping bound). `max_grad_norm` <= 0 leaves the clipping bound
/// unstated (dpaccount, which does not know it).
[[nodiscard]] std::string privacy_statement(double epsilon, double delta,
                                            const std::string& accountant,
                                            const std::string& sampler, double max_grad_norm);

}  // namespace dptorch::accounting
