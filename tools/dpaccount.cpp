// dpaccount: the ε of a DP-SGD run for a noise multiplier, or the noise multiplier for a
// target ε, from the accountants in dptorch::accounting. All numbers come from the library;
// this file parses the command line and prints.

#include <dptorch/accounting/accountant.h>
#include <dptorch/accounting/calibration.h>
#include <dptorch/accounting/report.h>

#include <c10/util/Exception.h>
#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace acc = dptorch::accounting;

constexpr int kUsageError = 2;
constexpr int kFailure = 1;

// What the command line said, before it is resolved by the library.
struct Request {
  double noise_multiplier = 0.0;
  double target_epsilon = 0.0;
  double sample_rate = 0.0;
  double delta = 0.0;
  int64_t steps = 0;
  double epochs = 0.0;
  double epsilon_tolerance = 0.01;
  std::string accountant = "prv";
  bool json = false;
};

// One line on stderr: what is wrong, then where the usage is explained.
int usage_error(const std::string& what, const std::string& command = "") {
  const std::string line = what.substr(0, what.find('\n'));
  const std::string help =
      command.empty() ? "dpaccount --help" : "dpaccount " + command + " --help";
  std::cerr << "dpaccount: error: " << line << "; see '" << help << "'\n";
  return kUsageError;
}

// A validator with an option-named message: "--delta: must be in (0, 1), but is 2".
CLI::Validator number_check(const std::string& description, std::function<bool(double)> ok) {
  return CLI::Validator(
      [description, ok](std::string& input) -> std::string {
        char* end = nullptr;
        const double value = std::strtod(input.c_str(), &end);
        if (input.empty() || end != input.c_str() + input.size()) {
          return "must be a number, but is '" + input + "'";
        }
        if (!ok(value)) {
          return "must be " + description + ", but is " + input;
        }
        return {};
      },
      description);
}

CLI::Validator count_check(int64_t minimum) {
  const std::string description = "an integer >= " + std::to_string(minimum);
  return CLI::Validator(
      [description, minimum](std::string& input) -> std::string {
        char* end = nullptr;
        const long long value = std::strtoll(input.c_str(), &end, 10);
        if (input.empty() || end != input.c_str() + input.size()) {
          return "must be " + description + ", but is '" + input + "'";
        }
        if (value < minimum) {
          return "must be " + description + ", but is " + input;
        }
        return {};
      },
      description);
}

CLI::Validator accountant_check() {
  return CLI::Validator(
      [](std::string& input) -> std::string {
        for (const auto& name : acc::accountant_names()) {
          if (input == name) {
            return {};
          }
        }
        if (input == "all") {
          return {};
        }
        std::string names;
        for (const auto& name : acc::accountant_names()) names += name + ", ";
        return "must be one of " + names + "all, but is '" + input + "'";
      },
      [] {
        std::string names;
        for (const auto& name : acc::accountant_names()) names += name + "|";
        return names + "all";
      }());
}

std::vector<std::string> selected(const std::string& accountant) {
  if (accountant == "all") {
    return acc::accountant_names();
  }
  return {accountant};
}

std::string format(double value) {
  std::ostringstream os;
  os.precision(6);
  os << value;
  return os.str();
}

// Left-aligned columns, each as wide as its widest cell plus two spaces.
void print_table(const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths;
  for (const auto& row : rows) {
    widths.resize(std::max(widths.size(), row.size()), 0);
    for (size_t c = 0; c < row.size(); ++c) {
      widths[c] = std::max(widths[c], row[c].size());
    }
  }
  for (const auto& row : rows) {
    std::string line;
    for (size_t c = 0; c < row.size(); ++c) {
      line += row[c];
      if (c + 1 < row.size()) {
        line += std::string(widths[c] - row[c].size() + 2, ' ');
      }
    }
    std::cout << line << '\n';
  }
}

void print_notes(const std::vector<std::string>& names) {
  for (const auto& type : acc::accountant_types()) {
    if (std::find(names.begin(), names.end(), type.name) != names.end()) {
      std::cout << type.name << ": " << type.description << '\n';
    }
  }
}

// The --accountant help: every registered accountant with its description.
std::string accountant_help() {
  std::string help = "Accountant:";
  for (const auto& type : acc::accountant_types()) {
    help += " " + type.name + " (" + type.description + "),";
  }
  return help + " or all.";
}

// Adds the options both subcommands share.
struct Common {
  CLI::Option* sample_rate = nullptr;
  CLI::Option* steps = nullptr;
  CLI::Option* epochs = nullptr;
};

Common add_common(CLI::App* command, Request& request, bool calibrating) {
  Common common;
  common.sample_rate =
      command
          ->add_option("--sample-rate,-q", request.sample_rate,
                       "Poisson sample rate q: each example joins a batch with this probability "
                       "(expected batch size / dataset size).")
          ->required()
          ->check(calibrating
                      ? number_check("in (0, 1]", [](double q) { return q > 0 && q <= 1; })
                      : number_check("in [0, 1]", [](double q) { return q >= 0 && q <= 1; }));
  common.steps = command
                     ->add_option("--steps,-T", request.steps,
                                  "Number of optimiser steps. Give --steps or --epochs.")
                     ->check(count_check(calibrating ? 1 : 0));
  common.epochs =
      command
          ->add_option("--epochs", request.epochs,
                       "Number of epochs; steps = int(epochs / sample-rate). Give --steps or "
                       "--epochs.")
          ->check(number_check(calibrating ? "finite and > 0" : "finite and >= 0",
                               [calibrating](double e) {
                                 return std::isfinite(e) && (calibrating ? e > 0 : e >= 0);
                               }));
  common.steps->excludes(common.epochs);
  command
      ->add_option("--delta,-d", request.delta,
                   "Target delta, in (0, 1); typically below 1 / dataset size.")
      ->required()
      ->check(number_check("in (0, 1)", [](double d) { return d > 0 && d < 1; }));
  command->add_option("--accountant,-a", request.accountant, accountant_help())
      ->capture_default_str()
      ->check(accountant_check());
  command->add_flag("--json", request.json,
                    "Print one JSON object instead of a table (epsilon infinity prints as null).");
  return common;
}

int64_t resolve_steps(const Common& common, const Request& request) {
  TORCH_CHECK_VALUE(common.steps->count() + common.epochs->count() > 0,
                    "give the number of steps with --steps or of epochs with --epochs");
  if (common.steps->count() > 0) {
    return request.steps;
  }
  if (request.sample_rate == 0) {
    return 0;
  }
  return static_cast<int64_t>(request.epochs / request.sample_rate);
}

int64_t resolve_calibration_steps(const Common& common, const Request& request) {
  const int64_t steps = resolve_steps(common, request);
  TORCH_CHECK_VALUE(steps >= 1, "--epochs ", request.epochs, " with --sample-rate ",
                    request.sample_rate,
                    " is int(epochs / sample-rate) = 0 steps; give more "
                    "epochs, or --steps");
  return steps;
}

void run_epsilon(const Request& request, int64_t steps) {
  const auto names = selected(request.accountant);
  nlohmann::ordered_json epsilons = nlohmann::ordered_json::object();
  std::vector<std::vector<std::string>> rows = {{"accountant", "epsilon"}};
  double first_epsilon = 0.0;
  for (const auto& name : names) {
    const double eps = acc::epsilon_for(acc::EpsilonOptions()
                                            .noise_multiplier(request.noise_multiplier)
                                            .sample_rate(request.sample_rate)
                                            .steps(steps)
                                            .delta(request.delta)
                                            .accountant(name));
    epsilons[name] = eps;
    if (name == names.front()) first_epsilon = eps;
    rows.push_back({name, format(eps)});
  }
  if (request.json) {
    nlohmann::ordered_json out = {{"command", "epsilon"},
                                  {"noise_multiplier", request.noise_multiplier},
                                  {"sample_rate", request.sample_rate},
                                  {"steps", steps},
                                  {"delta", request.delta},
                                  {"epsilon", epsilons}};
    std::cout << out.dump() << '\n';
    return;
  }
  print_table({{"noise_multiplier", format(request.noise_multiplier)},
               {"sample_rate", format(request.sample_rate)},
               {"steps", std::to_string(steps)},
               {"delta", format(request.delta)}});
  std::cout << '\n';
  print_table(rows);
  print_notes(names);
  // What the first accountant's ε means, in words (the clipping bound is not known here).
  std::cout << '\n'
            << acc::privacy_statement(first_epsilon, request.delta, names.front(), "poisson", 0)
            << '\n';
}

void run_sigma(const Request& request, int64_t steps) {
  const auto names = selected(request.accountant);
  nlohmann::ordered_json sigmas = nlohmann::ordered_json::object();
  nlohmann::ordered_json epsilons = nlohmann::ordered_json::object();
  std::vector<std::vector<std::string>> rows = {{"accountant", "noise_multiplier", "epsilon"}};
  for (const auto& name : names) {
    const double sigma =
        acc::noise_multiplier_for_epsilon(acc::CalibrationOptions()
                                              .target_epsilon(request.target_epsilon)
                                              .delta(request.delta)
                                              .sample_rate(request.sample_rate)
                                              .steps(steps)
                                              .accountant(name)
                                              .epsilon_tolerance(request.epsilon_tolerance));
    const double eps = acc::epsilon_for(acc::EpsilonOptions()
                                            .noise_multiplier(sigma)
                                            .sample_rate(request.sample_rate)
                                            .steps(steps)
                                            .delta(request.delta)
                                            .accountant(name));
    sigmas[name] = sigma;
    epsilons[name] = eps;
    rows.push_back({name, format(sigma), format(eps)});
  }
  if (request.json) {
    nlohmann::ordered_json out = {{"command", "sigma"},
                                  {"target_epsilon", request.target_epsilon},
                                  {"delta", request.delta},
                                  {"sample_rate", request.sample_rate},
                                  {"steps", steps},
                                  {"epsilon_tolerance", request.epsilon_tolerance},
                                  {"noise_multiplier", sigmas},
                                  {"epsilon", epsilons}};
    std::cout << out.dump() << '\n';
    return;
  }
  print_table({{"target_epsilon", format(request.target_epsilon)},
               {"delta", format(request.delta)},
               {"sample_rate", format(request.sample_rate)},
               {"steps", std::to_string(steps)}});
  std::cout << '\n';
  print_table(rows);
  print_notes(names);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{
      "dpaccount: privacy accounting for DP-SGD with Poisson sampling and Gaussian noise.\n"
      "Computes the epsilon a run spends, or the noise multiplier that meets a target epsilon.",
      "dpaccount"};
  app.footer(
      "Examples:\n"
      "  dpaccount epsilon --sigma 1.5 --sample-rate 0.04 --epochs 90 --delta 1e-5\n"
      "  dpaccount sigma --epsilon 8 --sample-rate 0.04 --steps 2000 --delta 1e-5 "
      "--accountant all --json\n"
      "Exit status: 0 on success, 2 on a bad argument (one line on stderr).");
  app.require_subcommand(1);

  Request request;
  CLI::App* epsilon_command =
      app.add_subcommand("epsilon", "The epsilon spent by a run with noise multiplier --sigma.");
  epsilon_command
      ->add_option("--sigma,-s", request.noise_multiplier,
                   "Noise multiplier sigma: noise std / clipping norm, >= 0.")
      ->required()
      ->check(number_check("finite and >= 0", [](double s) { return std::isfinite(s) && s >= 0; }));
  const Common epsilon_common = add_common(epsilon_command, request, /*calibrating=*/false);

  CLI::App* sigma_command = app.add_subcommand(
      "sigma", "The noise multiplier that keeps epsilon at or below --epsilon (never above).");
  sigma_command->add_option("--epsilon,-e", request.target_epsilon, "Target epsilon, > 0.")
      ->required()
      ->check(number_check("finite and > 0", [](double e) { return std::isfinite(e) && e > 0; }));
  sigma_command
      ->add_option("--tolerance", request.epsilon_tolerance,
                   "Stop the search once epsilon is within this of the target.")
      ->capture_default_str()
      ->check(number_check("finite and > 0", [](double t) { return std::isfinite(t) && t > 0; }));
  const Common sigma_common = add_common(sigma_command, request, /*calibrating=*/true);

  if (argc > 1 && argv[1][0] != '-' && std::string(argv[1]) != "epsilon" &&
      std::string(argv[1]) != "sigma") {
    return usage_error("unknown command '" + std::string(argv[1]) +
                       "'; the commands are epsilon and sigma");
  }
  const std::string command = argc > 1 && argv[1][0] != '-' ? argv[1] : "";
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) {
      return app.exit(e);  // --help
    }
    return usage_error(e.what(), command);
  }

  try {
    if (epsilon_command->parsed()) {
      run_epsilon(request, resolve_steps(epsilon_common, request));
    } else {
      run_sigma(request, resolve_calibration_steps(sigma_common, request));
    }
  } catch (const c10::Error& e) {
    return usage_error(e.what_without_backtrace(), command);
  } catch (const std::exception& e) {
    std::cerr << "dpaccount: error: " << e.what() << '\n';
    return kFailure;
  }
  return 0;
}
