#include <dptorch/accounting/report.h>

#include <c10/util/Exception.h>

#include <cmath>
#include <sstream>

namespace dptorch::accounting {

std::vector<LedgerSegment> ledger_of(const std::vector<HistoryEntry>& history, double max_grad_norm,
                                     const std::string& clipping, const std::string& sampler) {
  std::vector<LedgerSegment> ledger;
  for (const auto& entry : history) {
    ledger.push_back(
        {sampler, entry.noise_multiplier, entry.sample_rate, entry.steps, max_grad_norm, clipping});
  }
  return ledger;
}

std::vector<std::pair<std::string, double>> epsilon_by_accountant(
    const std::vector<HistoryEntry>& history, double delta) {
  std::vector<std::pair<std::string, double>> out;
  for (const auto& type : accountant_types()) {
    auto accountant = type.make();
    accountant->set_history(history);
    if (!accountant->answerable(delta)) continue;
    out.emplace_back(type.name, accountant->epsilon(delta));
  }
  return out;
}

std::string privacy_statement(double epsilon, double delta, const std::string& accountant,
                              const std::string& sampler, double max_grad_norm) {
  std::ostringstream s;
  s.precision(4);
  if (!std::isfinite(epsilon)) {
    s << "No privacy guarantee: a step without noise can reveal an example outright (epsilon is "
         "infinite by the "
      << accountant << " accountant).";
    return s.str();
  }
  s << "Privacy: (epsilon = " << epsilon << ", delta = " << delta << ") by the " << accountant
    << " accountant. What is protected is any one training example: "
    << "whether it was added to or removed from the data set changes the probability of any "
       "outcome of training (every model released during it included) by at most a factor of "
       "e^"
    << epsilon << " = " << std::exp(epsilon) << ", except with probability " << delta
    << ". This assumes that every batch was drawn by "
    << (sampler == "poisson" ? "Poisson sampling (each example independently, at the sample rate "
                               "stated)"
                             : sampler)
    << " and kept secret";
  if (max_grad_norm > 0) {
    s << ", and that every example's gradient was clipped to norm " << max_grad_norm
      << " before the noise was added";
  }
  s << ". Someone with k examples in the data set is protected as k examples are (group "
       "privacy: roughly k times epsilon).";
  return s.str();
}

}  // namespace dptorch::accounting
