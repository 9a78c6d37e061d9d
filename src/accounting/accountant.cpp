#include <dptorch/accounting/accountant.h>
#include <dptorch/common.h>

#include <dptorch/accounting/gdp.h>
#include <dptorch/accounting/pld.h>
#include <dptorch/accounting/prv.h>
#include <dptorch/accounting/rdp.h>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <ostream>
#include <utility>

#include "accounting/accountant_internal.h"

namespace dptorch::accounting {

namespace {

constexpr const char* kStateFormat = "dptorch.accountant";
constexpr int kStateVersion = 1;

// The registry, with the built-in accountants registered on first use. Adding a built-in
// accountant is its own file and one line here.
struct Registry {
  std::mutex mutex;
  std::vector<AccountantType> types;
};

void check_type(const AccountantType& type, const std::vector<AccountantType>& types) {
  TORCH_CHECK_VALUE(!type.name.empty(), "register_accountant: the accountant needs a name");
  TORCH_CHECK_VALUE(static_cast<bool>(type.make), "register_accountant: accountant '", type.name,
                    "' has no make function");
  const bool taken = std::any_of(types.begin(), types.end(),
                                 [&](const AccountantType& t) { return t.name == type.name; });
  TORCH_CHECK_VALUE(!taken, "register_accountant: an accountant named '", type.name,
                    "' is already registered; choose another name");
  const auto made = type.make();
  TORCH_CHECK_VALUE(made != nullptr && made->mechanism() == type.name,
                    "register_accountant: accountant '", type.name,
                    "' makes accountants whose mechanism() is '",
                    made == nullptr ? std::string("(null)") : made->mechanism(),
                    "'; the two must be equal so that checkpoints load with it");
}

Registry& registry() {
  static Registry* instance = [] {
    auto* r = new Registry;
    const std::vector<AccountantType> built_in = {
        {"prv", "upper bound on epsilon, within 0.01 of the true value (Gopi et al. 2021)",
         [] { return std::make_unique<PrvAccountant>(); }},
        {"pld",
         "upper bound on epsilon by privacy loss distributions (Koskela et al. 2020; "
         "Doroshenko et al. 2022)",
         [] { return std::make_unique<PldAccountant>(); }},
        {"rdp", "upper bound on epsilon by Renyi DP (Mironov et al. 2019); looser",
         [] { return std::make_unique<RdpAccountant>(); }},
        {"gdp", "central limit approximation (Dong et al. 2019); it can underestimate epsilon",
         [] { return std::make_unique<GdpAccountant>(); }},
    };
    for (const auto& type : built_in) {
      check_type(type, r->types);
      r->types.push_back(type);
    }
    return r;
  }();
  return *instance;
}

std::string joined_names() {
  std::string out;
  for (const auto& name : accountant_names()) {
    out += (out.empty() ? "" : ", ") + name;
  }
  return out;
}

// Parses serialize()'s JSON into (mechanism, history); every problem is a c10::ValueError
// that starts with "accountant state".
// A piece of an untrusted state for an error message: printable, at most 60 characters.
std::string printable(std::string text, size_t limit = 60) {
  return dptorch::detail::printable(std::move(text), limit);
}

std::pair<std::string, std::vector<HistoryEntry>> parse_state(const std::string& state) {
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(state);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK_VALUE(false, "accountant state is not valid JSON (", printable(e.what(), 300),
                      "); pass the string that Accountant::serialize() returned");
  }
  TORCH_CHECK_VALUE(json.is_object() && json.contains("format") && json["format"].is_string() &&
                        json["format"].get<std::string>() == kStateFormat,
                    "accountant state is not a dptorch accountant state (no \"format\": \"",
                    kStateFormat, "\"); pass the string that Accountant::serialize() returned");
  TORCH_CHECK_VALUE(json.contains("version") && json["version"].is_number_integer() &&
                        json["version"].get<int>() == kStateVersion,
                    "accountant state has an unsupported version (this build reads version ",
                    kStateVersion, ")");
  TORCH_CHECK_VALUE(json.contains("mechanism") && json["mechanism"].is_string(),
                    "accountant state has no \"mechanism\" string");
  TORCH_CHECK_VALUE(json.contains("history") && json["history"].is_array(),
                    "accountant state has no \"history\" array");
  std::vector<HistoryEntry> history;
  for (const auto& item : json["history"]) {
    const bool well_formed = item.is_object() && item.contains("noise_multiplier") &&
                             item["noise_multiplier"].is_number() && item.contains("sample_rate") &&
                             item["sample_rate"].is_number() && item.contains("steps") &&
                             item["steps"].is_number_integer();
    TORCH_CHECK_VALUE(
        well_formed, "accountant state has a malformed history entry ",
        printable(item.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace)),
        "; expected {\"noise_multiplier\": number, ",
        "\"sample_rate\": number, \"steps\": integer}");
    HistoryEntry entry{item["noise_multiplier"].get<double>(), item["sample_rate"].get<double>(),
                       item["steps"].get<int64_t>()};
    detail::check_entry(entry);
    history.push_back(entry);
  }
  return {json["mechanism"].get<std::string>(), std::move(history)};
}

}  // namespace

bool operator==(const HistoryEntry& a, const HistoryEntry& b) {
  return a.noise_multiplier == b.noise_multiplier && a.sample_rate == b.sample_rate &&
         a.steps == b.steps;
}

bool operator!=(const HistoryEntry& a, const HistoryEntry& b) { return !(a == b); }

std::ostream& operator<<(std::ostream& os, const HistoryEntry& entry) {
  return os << "(noise_multiplier=" << entry.noise_multiplier
            << ", sample_rate=" << entry.sample_rate << ", steps=" << entry.steps << ")";
}

Accountant::Accountant(const Accountant& other) : history_(other.history()) {}

Accountant& Accountant::operator=(const Accountant& other) {
  if (this != &other) set_history(other.history());
  return *this;
}

std::vector<HistoryEntry> Accountant::history() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return history_;
}

void Accountant::reset() {
  std::lock_guard<std::mutex> lock(mutex_);
  history_.clear();
  ++version_;
}

uint64_t Accountant::version() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return version_;
}

void Accountant::step(double noise_multiplier, double sample_rate, int64_t steps) {
  detail::check_entry({noise_multiplier, sample_rate, steps});
  if (steps == 0) {
    return;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  ++version_;
  if (!history_.empty() && history_.back().noise_multiplier == noise_multiplier &&
      history_.back().sample_rate == sample_rate) {
    history_.back().steps += steps;
    return;
  }
  history_.push_back({noise_multiplier, sample_rate, steps});
}

void Accountant::set_history(std::vector<HistoryEntry> history) {
  for (const auto& entry : history) {
    detail::check_entry(entry);
  }
  std::lock_guard<std::mutex> lock(mutex_);
  history_ = std::move(history);
  ++version_;
}

int64_t Accountant::total_steps() const {
  int64_t total = 0;
  for (const auto& entry : history()) {
    total += entry.steps;
  }
  return total;
}

std::string Accountant::serialize() const {
  nlohmann::json history = nlohmann::json::array();
  for (const auto& entry : this->history()) {
    history.push_back({{"noise_multiplier", entry.noise_multiplier},
                       {"sample_rate", entry.sample_rate},
                       {"steps", entry.steps}});
  }
  nlohmann::json json = {{"format", kStateFormat},
                         {"version", kStateVersion},
                         {"mechanism", mechanism()},
                         {"history", std::move(history)}};
  return json.dump();
}

void Accountant::deserialize(const std::string& state) {
  auto [state_mechanism, history] = parse_state(state);
  TORCH_CHECK_VALUE(state_mechanism == mechanism(), "accountant state is of mechanism '",
                    printable(state_mechanism), "', but this accountant is '", mechanism(),
                    "'; load it with load_accountant(state) or make_accountant(\"",
                    printable(state_mechanism), "\")");
  std::lock_guard<std::mutex> lock(mutex_);
  history_ = std::move(history);
  ++version_;
}

void check_budget(const PrivacyBudget& budget) {
  TORCH_CHECK_VALUE(std::isfinite(budget.epsilon) && budget.epsilon >= 0,
                    "the privacy budget's epsilon must be finite and >= 0, but is ",
                    budget.epsilon);
  detail::check_delta(budget.delta);
}

int64_t steps_within_budget(const Accountant& accountant, double noise_multiplier,
                            double sample_rate, const PrivacyBudget& budget, int64_t limit) {
  check_budget(budget);
  detail::check_entry({noise_multiplier, sample_rate, 1});
  dptorch::detail::check_non_negative("limit", static_cast<double>(limit));
  if (sample_rate == 0) return limit;
  auto probe = accountant.clone();
  auto within = [&](int64_t steps) {
    auto history = accountant.history();
    if (steps > 0) history.push_back({noise_multiplier, sample_rate, steps});
    probe->set_history(std::move(history));
    return probe->epsilon(budget.delta) <= budget.epsilon;
  };
  if (limit == 0 || !within(1)) return 0;
  // within(low) holds and within(high) fails (high = limit + 1 stands for "past the limit"):
  // double, then bisect.
  int64_t low = 1, high = limit < 2 ? limit + 1 : 2;
  while (high <= limit && within(high)) {
    low = high;
    high = high > limit / 2 ? limit + 1 : 2 * high;
  }
  while (high - low > 1) {
    const int64_t mid = low + (high - low) / 2;
    (within(mid) ? low : high) = mid;
  }
  return low;
}

void register_accountant(AccountantType type) {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  check_type(type, r.types);
  r.types.push_back(std::move(type));
}

std::vector<AccountantType> accountant_types() {
  auto& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  return r.types;
}

std::vector<std::string> accountant_names() {
  std::vector<std::string> names;
  for (const auto& type : accountant_types()) names.push_back(type.name);
  return names;
}

std::unique_ptr<Accountant> make_accountant(const std::string& name) {
  std::function<std::unique_ptr<Accountant>()> make;
  {
    auto& r = registry();
    std::lock_guard<std::mutex> lock(r.mutex);
    for (const auto& type : r.types) {
      if (type.name == name) make = type.make;
    }
  }
  TORCH_CHECK_VALUE(static_cast<bool>(make), "unknown accountant '", printable(name),
                    "'; valid names are ", joined_names());
  return make();
}

std::unique_ptr<Accountant> load_accountant(const std::string& state) {
  auto [mechanism, history] = parse_state(state);
  const auto names = accountant_names();
  TORCH_CHECK_VALUE(std::find(names.begin(), names.end(), mechanism) != names.end(),
                    "accountant state is of unknown mechanism '", printable(mechanism),
                    "'; valid mechanisms are ", joined_names(),
                    " (register a user's accountant with register_accountant before loading)");
  auto accountant = make_accountant(mechanism);
  accountant->set_history(std::move(history));
  return accountant;
}

namespace detail {

void check_noise_multiplier(double noise_multiplier) {
  dptorch::detail::check_non_negative("noise_multiplier", noise_multiplier);
}

void check_sample_rate(double sample_rate) {
  dptorch::detail::check_in_range("sample_rate", sample_rate, 0, 1,
                                  dptorch::detail::Bounds::kClosed);
}

void check_positive_sample_rate(double sample_rate) {
  dptorch::detail::check_in_range("sample_rate", sample_rate, 0, 1,
                                  dptorch::detail::Bounds::kOpenClosed);
}

void check_steps(int64_t steps) { dptorch::detail::check_at_least("steps", steps, 0); }

void check_delta(double delta) {
  dptorch::detail::check_in_range("delta", delta, 0, 1, dptorch::detail::Bounds::kOpen);
}

void check_entry(const HistoryEntry& entry) {
  check_noise_multiplier(entry.noise_multiplier);
  check_sample_rate(entry.sample_rate);
  check_steps(entry.steps);
}

std::vector<HistoryEntry> spending_entries(const std::vector<HistoryEntry>& history) {
  std::vector<HistoryEntry> spending;
  for (const auto& entry : history) {
    if (entry.steps > 0 && entry.sample_rate > 0) {
      spending.push_back(entry);
    }
  }
  return spending;
}

bool has_noiseless_step(const std::vector<HistoryEntry>& spending) {
  for (const auto& entry : spending) {
    if (entry.noise_multiplier == 0) {
      return true;
    }
  }
  return false;
}

}  // namespace detail

}  // namespace dptorch::accounting
