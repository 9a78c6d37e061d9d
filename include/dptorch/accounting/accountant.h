#pragma once

#include <cstdint>
#include <functional>
#include <iosfwd>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace dptorch::accounting {

/// One block of an accountant's history: `steps` consecutive steps of the Poisson-subsampled
/// Gaussian mechanism with noise multiplier σ (noise std / clipping norm) and sample rate q.
struct HistoryEntry {
  double noise_multiplier = 0.0;
  double sample_rate = 0.0;
  int64_t steps = 0;
};

/// Entries are equal when σ, q and the step count are all equal.
bool operator==(const HistoryEntry& a, const HistoryEntry& b);
/// Negation of operator==.
bool operator!=(const HistoryEntry& a, const HistoryEntry& b);
/// Prints "(noise_multiplier=1.5, sample_rate=0.04, steps=2250)".
std::ostream& operator<<(std::ostream& os, const HistoryEntry& entry);

/// A privacy accountant: records the (σ, q) of every DP-SGD step and answers the ε spent so
/// far for a given δ. The history is a list of (σ, q, steps) blocks; a step with the same σ
/// and q as the last block extends it, so a run with a fixed schedule is a single block.
/// Composition over blocks with different (σ, q) is exact for every accountant.
///
/// Thread safety: the history is guarded by a mutex, so one thread may record steps (the
/// training loop) while others query epsilon(), history() or serialize(); each query sees the
/// history as it was at one moment.
///
/// Example:
/// ```
///   auto accountant = dptorch::accounting::make_accountant("prv");
///   for (int64_t i = 0; i < 2249; ++i) accountant->step(/*noise_multiplier=*/1.5, 0.04);
///   double eps = accountant->epsilon(/*delta=*/1e-5);  // 6.7774
///   std::string state = accountant->serialize();       // store with the checkpoint
/// ```
class Accountant {
 public:
  virtual ~Accountant() = default;

  /// Records `steps` steps with noise multiplier σ and sample rate q; extends the last
  /// history block if it has the same σ and q. Throws unless σ is finite and >= 0,
  /// q in [0, 1] and steps >= 0; zero steps record nothing.
  void step(double noise_multiplier, double sample_rate, int64_t steps = 1);

  /// The recorded (σ, q, steps) blocks, oldest first (a copy: the history as it is now).
  std::vector<HistoryEntry> history() const;

  /// Replaces the history (for example with one block when calibrating σ). Every entry is
  /// validated as in step(); entries are kept as given, not merged.
  void set_history(std::vector<HistoryEntry> history);

  /// Forgets the history.
  void reset();

  /// A counter that changes whenever the history does (step, set_history, reset, deserialize):
  /// what a cache of a result about the history compares, instead of a copy of it.
  [[nodiscard]] uint64_t version() const;

  /// Total number of recorded steps over all blocks.
  int64_t total_steps() const;

  /// The ε spent by the recorded history at the given δ in (0, 1). ε = 0 when no step has a
  /// positive sample rate; ε = +infinity when a step with q > 0 has σ = 0.
  [[nodiscard]] virtual double epsilon(double delta) const = 0;

  /// Whether epsilon(delta) fits within the accountant's own limits (the PRV and PLD
  /// accountants refuse queries whose grid would pass theirs). Calibration treats a probe that
  /// does not as infeasible instead of failing. True unless an accountant says otherwise.
  [[nodiscard]] virtual bool answerable(double delta) const {
    (void)delta;
    return true;
  }

  /// The accounting mechanism, the name it is registered under ("prv", "pld", "rdp", "gdp" or a
  /// user's own; make_accountant takes it).
  virtual std::string mechanism() const = 0;

  /// A copy of this accountant, with its options and history.
  virtual std::unique_ptr<Accountant> clone() const = 0;

  /// The state (mechanism and history) as a JSON string, for checkpoints. Floating-point
  /// values round-trip exactly. Options (RDP orders, PRV error bounds) are not part of it.
  std::string serialize() const;

  /// Restores the history from a string written by serialize(). Throws, leaving this
  /// accountant unchanged, if the string is corrupt or was written by another mechanism.
  void deserialize(const std::string& state);

 protected:
  Accountant() = default;
  /// Copies the history (under the other's lock); each accountant keeps its own mutex.
  Accountant(const Accountant& other);
  Accountant& operator=(const Accountant& other);

 private:
  mutable std::mutex mutex_;
  std::vector<HistoryEntry> history_;
  uint64_t version_ = 0;
};

/// A privacy budget: the ε at δ a run may spend, as its accountant measures it.
struct PrivacyBudget {
  double epsilon = 0.0;
  double delta = 0.0;
};

/// Throws unless ε >= 0 is finite and δ is in (0, 1).
void check_budget(const PrivacyBudget& budget);

/// What a DPOptimizer with a budget throws instead of a step that would spend more than it: the
/// message says what was spent and what the step would have cost. Nothing of that step was
/// drawn, applied or accounted.
class BudgetExhausted : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// The most further steps of (σ, q) after `accountant`'s history whose ε at budget.delta stays
/// within budget.epsilon, up to `limit`: 0 if the next step would pass it (or the history
/// already has). Found by doubling and bisection over copies of the accountant (about
/// 2·log2(answer) ε queries); the accountant itself is unchanged. A step with q = 0 spends
/// nothing: `limit` then.
[[nodiscard]] int64_t steps_within_budget(const Accountant& accountant, double noise_multiplier,
                                          double sample_rate, const PrivacyBudget& budget,
                                          int64_t limit = int64_t{1} << 40);

/// One accountant in the registry that make_accountant, load_accountant, calibration and the
/// command-line tools read.
struct AccountantType {
  /// The name make_accountant takes; the accountants it makes report it as mechanism().
  std::string name;
  /// One line for the tools' help: what the reported ε is (bound or estimate) and its source.
  std::string description;
  /// A default-configured accountant with an empty history.
  std::function<std::unique_ptr<Accountant>()> make;
};

/// Adds an accountant to the registry, after those already there. Throws if the name is empty,
/// taken, or not the mechanism() of what `make` returns. The built-in accountants are
/// registered before the first use of the registry: "prv" (the default), "pld", "rdp", "gdp".
/// Safe to call from several threads.
///
/// Example (docs/extending.md):
/// ```
///   dptorch::accounting::register_accountant(
///       {"mine", "my bound (My et al. 2026)", [] { return std::make_unique<MyAccountant>(); }});
///   auto accountant = dptorch::accounting::make_accountant("mine");
/// ```
void register_accountant(AccountantType type);

/// The registered accountants, in registration order (the built-ins first, "prv" first of all).
std::vector<AccountantType> accountant_types();

/// The registered names, in registration order: {"prv", "pld", "rdp", "gdp"} and any a user
/// registered.
std::vector<std::string> accountant_names();

/// A default-configured accountant by registered name: "prv" (PrvAccountant, Gopi et al. 2021),
/// "pld" (PldAccountant, Koskela et al. 2020; Doroshenko et al. 2022), "rdp" (RdpAccountant,
/// Mironov et al. 2019), "gdp" (GdpAccountant, Dong et al. 2019), or a user's own. Throws for
/// any other name, listing the registered ones.
std::unique_ptr<Accountant> make_accountant(const std::string& name);

/// A default-configured accountant of the mechanism named in `state` (written by
/// Accountant::serialize()), with its history restored. Throws if that mechanism is not
/// registered.
std::unique_ptr<Accountant> load_accountant(const std::string& state);

}  // namespace dptorch::accounting
