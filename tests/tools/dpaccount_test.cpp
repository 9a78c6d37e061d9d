// Runs the dpaccount binary (built next to the tests, in DPTORCH_TOOLS_DIR) through popen and
// checks its help, its one-line errors with exit status 2, and golden values in its JSON.

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>

#include "support/run_tool.h"

#ifndef DPTORCH_TOOLS_DIR
#error "DPTORCH_TOOLS_DIR must name the folder that holds the dpaccount binary"
#endif

namespace {

using ::testing::HasSubstr;
using ::testing::StartsWith;

using dptorch::testing::run_tool;
using dptorch::testing::ToolRun;

std::string binary() { return dptorch::testing::tool_path("dpaccount"); }

ToolRun run_tool(const std::string& args) { return run_tool("dpaccount", args); }

nlohmann::json run_json(const std::string& args) {
  const ToolRun r = run_tool(args + " --json");
  EXPECT_EQ(r.status, 0) << args << "\n" << r.err;
  EXPECT_EQ(r.err, "");
  return nlohmann::json::parse(r.out);
}

class DpaccountTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(std::filesystem::exists(binary()))
        << binary() << " is missing: build the dpaccount target (tools/dpaccount.cpp) first";
  }
};

TEST_F(DpaccountTest, HelpNamesTheCommands) {
  const ToolRun r = run_tool("--help");
  EXPECT_EQ(r.status, 0);
  EXPECT_THAT(r.out, HasSubstr("epsilon"));
  EXPECT_THAT(r.out, HasSubstr("sigma"));
  EXPECT_THAT(r.out, HasSubstr("Exit status"));
}

TEST_F(DpaccountTest, HelpExplainsEveryOptionAndDefault) {
  const ToolRun eps = run_tool("epsilon --help");
  EXPECT_EQ(eps.status, 0);
  for (const char* option :
       {"--sigma", "--sample-rate", "--steps", "--epochs", "--delta", "--accountant", "--json"}) {
    EXPECT_THAT(eps.out, HasSubstr(option));
  }
  EXPECT_THAT(eps.out, HasSubstr("=prv"));  // the default accountant
  const ToolRun sigma = run_tool("sigma --help");
  EXPECT_EQ(sigma.status, 0);
  for (const char* option : {"--epsilon", "--tolerance", "--sample-rate", "--steps", "--epochs",
                             "--delta", "--accountant", "--json"}) {
    EXPECT_THAT(sigma.out, HasSubstr(option));
  }
  EXPECT_THAT(sigma.out, HasSubstr("=0.01"));  // the default tolerance
}

struct BadArgs {
  std::string args;
  std::string message;
};

std::ostream& operator<<(std::ostream& os, const BadArgs& b) { return os << b.args; }

class DpaccountBadArgsTest : public DpaccountTest, public ::testing::WithParamInterface<BadArgs> {};

TEST_P(DpaccountBadArgsTest, PrintsOneLineAndExitsWithTwo) {
  const ToolRun r = run_tool(GetParam().args);
  EXPECT_EQ(r.status, 2);
  EXPECT_EQ(r.out, "");
  EXPECT_THAT(r.err, StartsWith("dpaccount: error: "));
  EXPECT_THAT(r.err, HasSubstr(GetParam().message));
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.find('\n'), r.err.size() - 1) << "not one line: " << r.err;
}

const char* const kGood = " --sample-rate 0.04 --steps 100 --delta 1e-5";

INSTANTIATE_TEST_SUITE_P(
    Table, DpaccountBadArgsTest,
    ::testing::Values(
        BadArgs{"", "A subcommand is required"},
        BadArgs{"frobnicate", "unknown command 'frobnicate'"},
        BadArgs{std::string("epsilon --sigma 1") + kGood + " --noise-multipler 3",
                "--noise-multipler"},
        BadArgs{"epsilon --sample-rate 0.04 --steps 100 --delta 1e-5", "--sigma is required"},
        BadArgs{"epsilon --sigma 1 --steps 100 --delta 1e-5", "--sample-rate is required"},
        BadArgs{"epsilon --sigma 1 --sample-rate 0.04 --steps 100", "--delta is required"},
        BadArgs{"epsilon --sigma 1 --sample-rate 0.04 --delta 1e-5", "--steps or of epochs"},
        BadArgs{std::string("epsilon --sigma 1") + kGood + " --epochs 2", "--steps excludes"},
        BadArgs{std::string("epsilon --sigma -1") + kGood, "--sigma: must be finite and >= 0"},
        BadArgs{std::string("epsilon --sigma abc") + kGood, "--sigma: must be a number"},
        BadArgs{"epsilon --sigma 1 --sample-rate 1.5 --steps 100 --delta 1e-5",
                "--sample-rate: must be in [0, 1], but is 1.5"},
        BadArgs{"epsilon --sigma 1 --sample-rate 0.04 --steps -2 --delta 1e-5",
                "--steps: must be an integer >= 0"},
        BadArgs{"epsilon --sigma 1 --sample-rate 0.04 --steps 2.5 --delta 1e-5",
                "--steps: must be an integer"},
        BadArgs{"epsilon --sigma 1 --sample-rate 0.04 --steps 100 --delta 1",
                "--delta: must be in (0, 1), but is 1"},
        BadArgs{std::string("epsilon --sigma 1") + kGood + " --accountant moments",
                "--accountant: must be one of prv, pld, rdp, gdp, all"},
        BadArgs{"sigma --epsilon 0 --sample-rate 0.04 --steps 100 --delta 1e-5",
                "--epsilon: must be finite and > 0"},
        BadArgs{"sigma --epsilon 1 --sample-rate 0 --steps 100 --delta 1e-5",
                "--sample-rate: must be in (0, 1]"},
        BadArgs{"sigma --epsilon 1 --sample-rate 0.04 --steps 0 --delta 1e-5",
                "--steps: must be an integer >= 1"},
        BadArgs{"sigma --epsilon 1 --sample-rate 0.04 --epochs 0.01 --delta 1e-5", "0 steps"},
        BadArgs{"sigma --epsilon 0.01 --sample-rate 0.5 --steps 100000 --delta 1e-5 -a rdp",
                "unreachable"}));

// Golden values of the reference implementation (see the accountant tests), through the CLI.
TEST_F(DpaccountTest, EpsilonGoldenValuesInJson) {
  const auto j = run_json(
      "epsilon --sigma 1.5 --sample-rate 0.04 --steps 2249 --delta 1e-5 "
      "--accountant all");
  EXPECT_EQ(j["command"], "epsilon");
  EXPECT_EQ(j["steps"], 2249);
  EXPECT_NEAR(j["epsilon"]["prv"].get<double>(), 6.777395712150674, 5e-5);
  EXPECT_GT(j["epsilon"]["gdp"].get<double>(), 6.59);
  EXPECT_LT(j["epsilon"]["gdp"].get<double>(), 6.60);
  const auto rdp = run_json(
      "epsilon --sigma 1.5 --sample-rate 0.04 --epochs 90 --delta 1e-5 "
      "--accountant rdp");
  EXPECT_EQ(rdp["steps"], 2250);
  EXPECT_NEAR(rdp["epsilon"]["rdp"].get<double>(), 7.32911117143, 5e-8);
  EXPECT_FALSE(rdp["epsilon"].contains("prv"));
}

TEST_F(DpaccountTest, SigmaGoldenValuesInJson) {
  const auto epochs = run_json(
      "sigma --epsilon 8 --sample-rate 0.04 --epochs 90 --delta 1e-5 "
      "--accountant all");
  EXPECT_EQ(epochs["command"], "sigma");
  EXPECT_EQ(epochs["steps"], 2250);
  EXPECT_NEAR(epochs["noise_multiplier"]["prv"].get<double>(), 1.34765625, 5e-5);
  EXPECT_NEAR(epochs["noise_multiplier"]["rdp"].get<double>(), 1.416, 5e-5);
  EXPECT_NEAR(epochs["noise_multiplier"]["gdp"].get<double>(), 1.3232421875, 5e-5);
  for (const char* name : {"prv", "rdp", "gdp"}) {
    EXPECT_LE(epochs["epsilon"][name].get<double>(), 8.0) << name;
  }
  const auto steps = run_json(
      "sigma --epsilon 8 --sample-rate 0.04 --steps 2000 --delta 1e-5 "
      "--accountant rdp");
  EXPECT_NEAR(steps["noise_multiplier"]["rdp"].get<double>(), 1.3562, 5e-5);
}

TEST_F(DpaccountTest, NoNoiseIsInfinite) {
  const auto j = run_json("epsilon --sigma 0 --sample-rate 0.1 --steps 10 --delta 1e-5 -a all");
  for (const char* name : {"prv", "pld", "rdp", "gdp"}) {
    EXPECT_TRUE(j["epsilon"][name].is_null()) << name;  // JSON has no infinity
  }
  const ToolRun r = run_tool("epsilon --sigma 0 --sample-rate 0.1 --steps 10 --delta 1e-5");
  EXPECT_EQ(r.status, 0);
  EXPECT_THAT(r.out, HasSubstr("prv         inf\n"));
}

TEST_F(DpaccountTest, TableIsAligned) {
  const ToolRun r =
      run_tool("epsilon --sigma 1.5 --sample-rate 0.04 --steps 2249 --delta 1e-5 -a all");
  EXPECT_EQ(r.status, 0);
  EXPECT_THAT(r.out, HasSubstr("noise_multiplier  1.5\n"));
  EXPECT_THAT(r.out, HasSubstr("steps             2249\n"));
  EXPECT_THAT(r.out, HasSubstr("accountant  epsilon\n"));
  EXPECT_THAT(r.out, HasSubstr("prv         6.777"));
  EXPECT_THAT(r.out, HasSubstr("rdp         7.32"));
}

}  // namespace
