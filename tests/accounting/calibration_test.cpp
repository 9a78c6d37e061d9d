#include <dptorch/accounting/calibration.h>

#include <dptorch/accounting/accountant.h>

#include <c10/util/Exception.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <vector>

namespace dptorch::accounting {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

struct CalibrationGolden {
  std::string accountant;
  std::optional<double> epochs;
  std::optional<int64_t> steps;
  double noise_multiplier;
  double tolerance;
  std::string name;
};

std::ostream& operator<<(std::ostream& os, const CalibrationGolden& g) { return os << g.name; }

CalibrationOptions golden_options(const CalibrationGolden& g) {
  CalibrationOptions options;
  options.target_epsilon(8).delta(1e-5).sample_rate(0.04).accountant(g.accountant);
  if (g.epochs) {
    options.epochs(*g.epochs);
  } else {
    options.steps(*g.steps);
  }
  return options;
}

class CalibrationGoldenTest : public ::testing::TestWithParam<CalibrationGolden> {};

// Opacus's test_get_noise_multiplier_* values (ε = 8, δ = 1e-5, q = 0.04), to the precision
// published there; they depend on the exact bisection, not only on the accountant.
TEST_P(CalibrationGoldenTest, MatchesOpacus) {
  const CalibrationGolden& g = GetParam();
  const CalibrationOptions options = golden_options(g);
  const double sigma = noise_multiplier_for_epsilon(options);
  EXPECT_NEAR(sigma, g.noise_multiplier, g.tolerance);
  // Never overshoots: the returned σ meets the target.
  const double eps = epsilon_for(EpsilonOptions()
                                     .noise_multiplier(sigma)
                                     .sample_rate(0.04)
                                     .steps(options.resolved_steps())
                                     .delta(1e-5)
                                     .accountant(g.accountant));
  EXPECT_LE(eps, 8.0);
  EXPECT_GT(eps, 8.0 - options.epsilon_tolerance());
}

INSTANTIATE_TEST_SUITE_P(
    Opacus, CalibrationGoldenTest,
    ::testing::Values(CalibrationGolden{"rdp", 90.0, std::nullopt, 1.416, 5e-5, "Rdp90Epochs"},
                      CalibrationGolden{"rdp", std::nullopt, 2000, 1.3562, 5e-5, "Rdp2000Steps"},
                      CalibrationGolden{"prv", 90.0, std::nullopt, 1.34765625, 5e-5, "Prv90Epochs"},
                      CalibrationGolden{"prv", std::nullopt, 2000, 1.2915, 5e-5, "Prv2000Steps"},
                      CalibrationGolden{"gdp", 90.0, std::nullopt, 1.3232421875, 5e-5,
                                        "Gdp90Epochs"}),
    [](const ::testing::TestParamInfo<CalibrationGolden>& info) { return info.param.name; });

TEST(CalibrationTest, EpochsResolveAsOpacus) {
  // int(90 / 0.04) = 2250 (the quotient rounds to exactly 2250.0).
  EXPECT_EQ(CalibrationOptions().sample_rate(0.04).epochs(90).resolved_steps(), 2250);
  EXPECT_EQ(CalibrationOptions().sample_rate(0.3).epochs(1).resolved_steps(), 3);
  EXPECT_EQ(CalibrationOptions().sample_rate(0.3).steps(17).resolved_steps(), 17);
}

TEST(CalibrationTest, RdpCalibrationIsTightAndFeasible) {
  const auto options =
      CalibrationOptions().target_epsilon(2.0).delta(1e-6).sample_rate(0.01).steps(5000).accountant(
          "rdp");
  const double sigma = noise_multiplier_for_epsilon(options);
  const auto eps_at = [](double s) {
    return epsilon_for(
        EpsilonOptions().noise_multiplier(s).sample_rate(0.01).steps(5000).delta(1e-6).accountant(
            "rdp"));
  };
  EXPECT_LE(eps_at(sigma), 2.0);
  EXPECT_GE(eps_at(sigma), 2.0 - 0.01);
  EXPECT_GT(eps_at(sigma * 0.99), eps_at(sigma));
}

TEST(CalibrationTest, LooserToleranceStopsEarlier) {
  auto options =
      CalibrationOptions().target_epsilon(3.0).delta(1e-5).sample_rate(0.02).steps(1000).accountant(
          "gdp");
  const double tight = noise_multiplier_for_epsilon(options);
  const double loose = noise_multiplier_for_epsilon(options.epsilon_tolerance(0.5));
  EXPECT_GE(loose, tight);  // both feasible; the loose one is further from the target
}

TEST(CalibrationTest, UnreachableTargetSaysTheSmallestReachable) {
  const auto options = CalibrationOptions()
                           .target_epsilon(0.01)
                           .delta(1e-5)
                           .sample_rate(0.5)
                           .steps(100000)
                           .accountant("rdp");
  EXPECT_THAT([&] { (void)noise_multiplier_for_epsilon(options); },
              ThrowsMessage<c10::Error>(AllOf(HasSubstr("target_epsilon 0.01 is unreachable"),
                                              HasSubstr("the smallest reachable is"),
                                              HasSubstr("noise_multiplier 2000"))));
}

// A release before training (one Gaussian mechanism on the whole data set, q = 1) composes with
// the steps: σ grows so that both together stay within the target, under every accountant.
TEST(CalibrationTest, PriorReleasesShareTheTarget) {
  const std::vector<HistoryEntry> prior{{14.142, 1.0, 1}};
  for (const std::string name : {"prv", "rdp", "gdp"}) {
    SCOPED_TRACE(name);
    auto options = CalibrationOptions()
                       .target_epsilon(3.0)
                       .delta(1e-5)
                       .sample_rate(0.1365)
                       .steps(293)
                       .accountant(name);
    const double alone = noise_multiplier_for_epsilon(options);
    const double with_prior = noise_multiplier_for_epsilon(options.prior(prior));
    EXPECT_GT(with_prior, alone);
    auto accountant = make_accountant(name);
    accountant->set_history({prior[0], {with_prior, 0.1365, 293}});
    const double total = accountant->epsilon(1e-5);
    EXPECT_LE(total, 3.0);
    EXPECT_GE(total, 3.0 - 0.01);
    // The steps alone at the new σ spend less than the target: the prior took its share.
    accountant->set_history({{with_prior, 0.1365, 293}});
    EXPECT_LT(accountant->epsilon(1e-5), total);
  }
}

// ε at δ of the Gaussian mechanism with noise multiplier σ, from its exact privacy profile
// (Balle & Wang 2018): δ(ε) = Φ(−εσ + 1/(2σ)) − e^ε·Φ(−εσ − 1/(2σ)), solved by bisection.
double gaussian_mechanism_epsilon(double sigma, double delta) {
  const auto phi = [](double x) { return 0.5 * std::erfc(-x / std::sqrt(2.0)); };
  const auto delta_at = [&](double eps) {
    return phi(-eps * sigma + 0.5 / sigma) - std::exp(eps) * phi(-eps * sigma - 0.5 / sigma);
  };
  double low = 0.0, high = 50.0;
  for (int i = 0; i < 200; ++i) {
    const double mid = (low + high) / 2;
    (delta_at(mid) > delta ? low : high) = mid;
  }
  return high;
}

// At q = 1 one step is the Gaussian mechanism (a release before training): the PLD accountant
// gives its exact ε, and the PRV accountant an upper bound within its error bound (0.01).
TEST(CalibrationTest, OneFullBatchStepIsTheGaussianMechanism) {
  EXPECT_NEAR(gaussian_mechanism_epsilon(2.0, 1e-5), 1.99309, 1e-5);
  for (const double sigma : {2.0, 14.142}) {
    SCOPED_TRACE(sigma);
    const double exact = gaussian_mechanism_epsilon(sigma, 1e-5);
    auto pld = make_accountant("pld");
    pld->step(sigma, 1.0);
    EXPECT_NEAR(pld->epsilon(1e-5), exact, 1e-3 * exact);
    auto prv = make_accountant("prv");
    prv->step(sigma, 1.0);
    EXPECT_GE(prv->epsilon(1e-5), exact);
    EXPECT_LE(prv->epsilon(1e-5), exact + 0.011);
  }
}

TEST(CalibrationTest, PriorReleasesPastTheTargetAreRefused) {
  const auto options =
      CalibrationOptions().target_epsilon(1.0).delta(1e-5).sample_rate(0.01).steps(100).prior(
          {{1.0, 1.0, 1}});
  EXPECT_THAT([&] { (void)noise_multiplier_for_epsilon(options); },
              ThrowsMessage<c10::Error>(AllOf(HasSubstr("target_epsilon 1 is unreachable"),
                                              HasSubstr("the prior releases alone spend"))));
  EXPECT_THAT(
      [] {
        CalibrationOptions().prior({{-1.0, 1.0, 1}});
      },
      ThrowsMessage<c10::Error>(HasSubstr("noise_multiplier")));
}

TEST(CalibrationTest, RejectsBadOptions) {
  EXPECT_THAT(
      [] { CalibrationOptions().target_epsilon(0); },
      ThrowsMessage<c10::Error>(HasSubstr("target_epsilon must be finite and > 0, but is 0")));
  EXPECT_THAT([] { CalibrationOptions().target_epsilon(-3); },
              ThrowsMessage<c10::Error>(HasSubstr("target_epsilon")));
  EXPECT_THAT([] { CalibrationOptions().delta(1); },
              ThrowsMessage<c10::Error>(HasSubstr("delta must be in (0, 1), but is 1")));
  EXPECT_THAT([] { CalibrationOptions().sample_rate(0); },
              ThrowsMessage<c10::Error>(HasSubstr("sample_rate must be in (0, 1], but is 0")));
  EXPECT_THAT([] { CalibrationOptions().steps(0); },
              ThrowsMessage<c10::Error>(HasSubstr("steps must be >= 1")));
  EXPECT_THAT([] { CalibrationOptions().epochs(-1); },
              ThrowsMessage<c10::Error>(HasSubstr("epochs must be finite and > 0")));
  EXPECT_THAT([] { CalibrationOptions().accountant("moments"); },
              ThrowsMessage<c10::Error>(HasSubstr("valid names are prv, pld, rdp, gdp")));
  EXPECT_THAT([] { CalibrationOptions().epsilon_tolerance(0); },
              ThrowsMessage<c10::Error>(HasSubstr("epsilon_tolerance")));

  EXPECT_THAT([] { (void)noise_multiplier_for_epsilon(CalibrationOptions().delta(1e-5)); },
              ThrowsMessage<c10::Error>(HasSubstr("target_epsilon is required")));
  EXPECT_THAT(
      [] {
        (void)noise_multiplier_for_epsilon(
            CalibrationOptions().target_epsilon(1).delta(1e-5).sample_rate(0.1));
      },
      ThrowsMessage<c10::Error>(HasSubstr("set the number of steps or of epochs")));
  EXPECT_THAT(
      [] {
        (void)noise_multiplier_for_epsilon(
            CalibrationOptions().target_epsilon(1).delta(1e-5).sample_rate(0.1).steps(5).epochs(2));
      },
      ThrowsMessage<c10::Error>(HasSubstr("either steps or epochs, not both")));
  EXPECT_THAT(
      [] {
        (void)noise_multiplier_for_epsilon(
            CalibrationOptions().target_epsilon(1).delta(1e-5).sample_rate(0.1).epochs(0.05));
      },
      ThrowsMessage<c10::Error>(HasSubstr("= 0 steps")));
}

TEST(EpsilonForTest, MatchesTheAccountant) {
  for (const auto& name : accountant_names()) {
    auto accountant = make_accountant(name);
    accountant->step(1.5, 0.04, 2250);
    const double eps = epsilon_for(
        EpsilonOptions().noise_multiplier(1.5).sample_rate(0.04).epochs(90).delta(1e-5).accountant(
            name));
    EXPECT_EQ(eps, accountant->epsilon(1e-5)) << name;
  }
  EXPECT_NEAR(epsilon_for(EpsilonOptions()
                              .noise_multiplier(1.5)
                              .sample_rate(0.04)
                              .steps(2250)
                              .delta(1e-5)
                              .accountant("rdp")),
              7.32911117143, 5e-8);
}

TEST(EpsilonForTest, RejectsBadOptions) {
  EXPECT_THAT(
      [] { EpsilonOptions().noise_multiplier(-1); },
      ThrowsMessage<c10::Error>(HasSubstr("noise_multiplier must be finite and >= 0, but is -1")));
  EXPECT_THAT([] { EpsilonOptions().sample_rate(1.5); },
              ThrowsMessage<c10::Error>(HasSubstr("sample_rate must be in [0, 1]")));
  EXPECT_THAT([] { EpsilonOptions().delta(0); }, ThrowsMessage<c10::Error>(HasSubstr("delta")));
  EXPECT_THAT([] { EpsilonOptions().steps(-1); },
              ThrowsMessage<c10::Error>(HasSubstr("steps must be >= 0")));
  EXPECT_THAT([] { (void)epsilon_for(EpsilonOptions().sample_rate(0.1).steps(3).delta(1e-5)); },
              ThrowsMessage<c10::Error>(HasSubstr("noise_multiplier is required")));
}

}  // namespace
}  // namespace dptorch::accounting
