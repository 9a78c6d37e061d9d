#include <dptorch/accounting/accountant.h>
#include <dptorch/common.h>

#include <dptorch/accounting/gdp.h>
#include <dptorch/accounting/prv.h>
#include <dptorch/accounting/rdp.h>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <limits>
#include <ostream>
#include <utility>

#include "accounting/accountant_internal.h"

namespace dptorch::accounting {

namespace {

constexpr const char* kStateFormat = "dptorch.accountant";
constexpr int kStateVersion = 1;

std::string joined_names() {
  std::string out;
  for (const auto& name : accountant_names()) {
    out += (out.empty() ? "" : ", ") + name;
  }
  return out;
}

// Parses serialize()'s JSON into (mechanism, history); every problem is a c10::ValueError
// that starts with "accountant state".
std::pair<std::string, std::vector<HistoryEntry>> parse_state(const std::string& state) {
  nlohmann::json json;
  try {
    json = nlohmann::json::parse(state);
  } catch (const nlohmann::json::exception& e) {
    TORCH_CHECK_VALUE(false, "accountant state is not valid JSON (", e.what(),
                      "); pass the string that Accountant::serialize() returned");
  }
  TORCH_CHECK_VALUE(json.is_object() && json.value("format", "") == kStateFormat,
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
    TORCH_CHECK_VALUE(well_formed, "accountant state has a malformed history entry ", item.dump(),
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

void Accountant::step(double noise_multiplier, double sample_rate, int64_t steps) {
  detail::check_entry({noise_multiplier, sample_rate, steps});
  if (steps == 0) {
    return;
  }
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
  history_ = std::move(history);
}

int64_t Accountant::total_steps() const noexcept {
  int64_t total = 0;
  for (const auto& entry : history_) {
    total += entry.steps;
  }
  return total;
}

std::string Accountant::serialize() const {
  nlohmann::json history = nlohmann::json::array();
  for (const auto& entry : history_) {
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
                    state_mechanism, "', but this accountant is '", mechanism(),
                    "'; load it with load_accountant(state) or make_accountant(\"", state_mechanism,
                    "\")");
  history_ = std::move(history);
}

const std::vector<std::string>& accountant_names() {
  static const std::vector<std::string> names = {"prv", "rdp", "gdp"};
  return names;
}

std::unique_ptr<Accountant> make_accountant(const std::string& name) {
  if (name == "prv") {
    return std::make_unique<PrvAccountant>();
  }
  if (name == "rdp") {
    return std::make_unique<RdpAccountant>();
  }
  if (name == "gdp") {
    return std::make_unique<GdpAccountant>();
  }
  TORCH_CHECK_VALUE(false, "unknown accountant '", name, "'; valid names are ", joined_names());
}

std::unique_ptr<Accountant> load_accountant(const std::string& state) {
  auto [mechanism, history] = parse_state(state);
  TORCH_CHECK_VALUE(mechanism == "prv" || mechanism == "rdp" || mechanism == "gdp",
                    "accountant state is of unknown mechanism '", mechanism,
                    "'; valid mechanisms are ", joined_names());
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
