// The PLD accountant against published values, exact formulas and the PRV accountant; the
// accountant registry.

#include <dptorch/dptorch.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

namespace dptorch::accounting {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

double normal_cdf(double z) { return 0.5 * std::erfc(-z / std::sqrt(2.0)); }

PldAccountant pld_of(double sigma, double q, int64_t steps, PldOptions options = PldOptions()) {
  PldAccountant accountant(options);
  accountant.step(sigma, q, steps);
  return accountant;
}

// The reference values (Google's dp_accounting and exact formulas), to within 1%.
TEST(PldAccountant, MeetsThePublishedValues) {
  // Poisson-subsampled Gaussian, q = 0.2, σ = 0.5, 3 steps: δ(ε = 1) = 0.15593.
  EXPECT_NEAR(pld_of(0.5, 0.2, 3).delta(1.0), 0.15593, 0.01 * 0.15593);
  // The Gaussian mechanism σ = √3, 3 steps (μ = 1 GDP): δ(1) = Φ(−0.5) − e Φ(−1.5), exactly.
  const double exact = normal_cdf(-0.5) - std::exp(1.0) * normal_cdf(-1.5);
  EXPECT_NEAR(exact, 0.1269367, 1e-7);
  const auto gaussian = pld_of(std::sqrt(3.0), 1.0, 3);
  EXPECT_GE(gaussian.delta(1.0), exact);  // an upper bound
  EXPECT_NEAR(gaussian.delta(1.0), exact, 0.01 * exact);
  EXPECT_NEAR(gaussian.epsilon(exact), 1.0, 0.01);
  // q = 0.01, σ = 4, 10000 steps: ε(1e-5) = 0.947.
  EXPECT_NEAR(pld_of(4.0, 0.01, 10000).epsilon(1e-5), 0.947, 0.01 * 0.947);
}

// One step has a closed form in both neighbouring directions: with x(t) the point where the
// remove direction's loss is t, δ_remove(ε) = (1−q)Φ(−x/σ) + qΦ((1−x)/σ) − e^ε Φ(−x/σ) and
// δ_add(ε) = Φ(x'/σ) − e^ε((1−q)Φ(x'/σ) + qΦ((x'−1)/σ)), x' = x(−ε). The PLD's δ is an upper
// bound on the larger, within 1%.
TEST(PldAccountant, OneStepBoundsTheClosedFormInBothDirections) {
  auto x_of = [](double sigma, double q, double t) {
    const double shifted = std::exp(t) - (1 - q);
    return shifted <= 0 ? -INFINITY : sigma * sigma * std::log(shifted / q) + 0.5;
  };
  for (const double sigma : {0.5, 1.0, 2.0}) {
    for (const double q : {0.01, 0.2, 1.0}) {
      for (const double eps : {0.1, 1.0, 3.0}) {
        const double x = x_of(sigma, q, eps);
        const double remove = (1 - q) * normal_cdf(-x / sigma) + q * normal_cdf((1 - x) / sigma) -
                              std::exp(eps) * normal_cdf(-x / sigma);
        const double xa = x_of(sigma, q, -eps);
        const double add = xa == -INFINITY ? 0.0
                                           : normal_cdf(xa / sigma) -
                                                 std::exp(eps) * ((1 - q) * normal_cdf(xa / sigma) +
                                                                  q * normal_cdf((xa - 1) / sigma));
        const double exact = std::max(remove, add);
        const double got = pld_of(sigma, q, 1).delta(eps);
        SCOPED_TRACE("sigma " + std::to_string(sigma) + " q " + std::to_string(q) + " eps " +
                     std::to_string(eps));
        EXPECT_GE(got, exact * (1 - 1e-9) - 1e-15);
        EXPECT_LE(got, exact * 1.01 + 1e-12);
      }
    }
  }
}

// PLD and PRV agree within their errors: the PLD's ε (an upper bound) is at least the PRV's
// lower bound and at most its upper bound plus 0.001.
TEST(PldAccountant, AgreesWithThePrvAccountantOnAGrid) {
  for (const double sigma : {0.8, 1.0, 2.0}) {
    for (const double q : {0.001, 0.01, 0.1}) {
      for (const int64_t steps : {1, 100, 1000}) {
        PrvAccountant prv;
        prv.step(sigma, q, steps);
        const auto bounds = prv.epsilon_bounds(1e-5);
        const double eps = pld_of(sigma, q, steps).epsilon(1e-5);
        SCOPED_TRACE("sigma " + std::to_string(sigma) + " q " + std::to_string(q) + " steps " +
                     std::to_string(steps));
        EXPECT_GE(eps, bounds.lower - 1e-12);
        EXPECT_LE(eps, bounds.upper + 1e-3);
      }
    }
  }
}

// Blocks of one (σ, q) compose to the same as one block; blocks of different (σ, q) compose
// in either order to the same.
TEST(PldAccountant, ComposesBlocksExactly) {
  PldAccountant two, one;
  two.set_history({{1.0, 0.05, 100}, {1.0, 0.05, 100}});
  one.set_history({{1.0, 0.05, 200}});
  EXPECT_NEAR(two.epsilon(1e-5), one.epsilon(1e-5), 1e-6);
  EXPECT_NEAR(two.delta(1.0), one.delta(1.0), 1e-9);
  PldAccountant ab, ba;
  ab.set_history({{0.8, 0.01, 300}, {2.0, 0.1, 50}});
  ba.set_history({{2.0, 0.1, 50}, {0.8, 0.01, 300}});
  EXPECT_NEAR(ab.epsilon(1e-5), ba.epsilon(1e-5), 1e-6);
}

// epsilon() and delta() answer the same question from two sides.
TEST(PldAccountant, EpsilonAndDeltaAreConsistent) {
  const auto accountant = pld_of(1.1, 0.02, 500);
  for (const double delta : {1e-3, 1e-5, 1e-7}) {
    const double eps = accountant.epsilon(delta);
    EXPECT_LE(accountant.delta(eps), delta * (1 + 1e-9));
    EXPECT_GT(accountant.delta(eps * 0.99), delta);
  }
}

TEST(PldAccountant, EdgeCases) {
  EXPECT_EQ(PldAccountant().epsilon(1e-5), 0.0);
  EXPECT_EQ(PldAccountant().delta(0.5), 0.0);
  EXPECT_EQ(pld_of(1.0, 0.0, 10).epsilon(1e-5), 0.0);
  EXPECT_EQ(pld_of(1.0, 0.1, 0).epsilon(1e-5), 0.0);
  EXPECT_TRUE(std::isinf(pld_of(0.0, 0.1, 3).epsilon(1e-5)));
  // Without noise a step reveals its sample with probability q: δ(0) = 1 − (1 − q)^T.
  EXPECT_NEAR(pld_of(0.0, 0.1, 3).delta(0.0), 1 - std::pow(0.9, 3), 1e-9);
  const auto copy = pld_of(1.0, 0.1, 7).clone();
  EXPECT_EQ(copy->mechanism(), "pld");
  EXPECT_EQ(copy->history().at(0), (HistoryEntry{1.0, 0.1, 7}));
}

TEST(PldAccountant, RefusesBadInputWithAClearMessage) {
  EXPECT_THAT([] { (void)pld_of(1, 0.1, 1).epsilon(0); },
              ThrowsMessage<c10::Error>(HasSubstr("delta")));
  EXPECT_THAT([] { (void)pld_of(1, 0.1, 1).delta(-1); },
              ThrowsMessage<c10::Error>(HasSubstr("epsilon")));
  EXPECT_THAT([] { PldOptions().value_discretization_interval(0); },
              ThrowsMessage<c10::Error>(HasSubstr("value_discretization_interval")));
  EXPECT_THAT([] { PldOptions().tail_mass_truncation(0.5); },
              ThrowsMessage<c10::Error>(HasSubstr("tail_mass_truncation")));
  const auto huge = pld_of(0.5, 0.5, 100000000);
  EXPECT_FALSE(huge.answerable(1e-5));
  EXPECT_THAT([&] { (void)huge.epsilon(1e-5); },
              ThrowsMessage<c10::Error>(HasSubstr("grid points")));
}

// Checkpoints and calibration go through the registry.
TEST(PldAccountant, SerialisesAndCalibrates) {
  const auto accountant = pld_of(1.3, 0.02, 400);
  const auto loaded = load_accountant(accountant.serialize());
  EXPECT_EQ(loaded->mechanism(), "pld");
  EXPECT_EQ(loaded->epsilon(1e-5), accountant.epsilon(1e-5));
  const double sigma = noise_multiplier_for_epsilon(
      CalibrationOptions().target_epsilon(2.0).sample_rate(0.02).steps(400).delta(1e-5).accountant(
          "pld"));
  const double eps = pld_of(sigma, 0.02, 400).epsilon(1e-5);
  EXPECT_LE(eps, 2.0);
  EXPECT_GT(eps, 2.0 - 0.01 - 1e-9);  // the default tolerance
}

// A user's accountant: one registration, then every entry point knows it.
class HalfRdpAccountant : public Accountant {
 public:
  double epsilon(double delta) const override {
    RdpAccountant rdp;
    rdp.set_history(history());
    return rdp.epsilon(delta) / 2;
  }
  std::string mechanism() const override { return "half-rdp-test"; }
  std::unique_ptr<Accountant> clone() const override {
    return std::make_unique<HalfRdpAccountant>(*this);
  }
};

TEST(AccountantRegistry, ARegisteredAccountantIsEverywhere) {
  register_accountant({"half-rdp-test", "half of RDP's epsilon (a test, not a bound)",
                       [] { return std::make_unique<HalfRdpAccountant>(); }});
  const auto names = accountant_names();
  EXPECT_EQ(names.front(), "prv");
  EXPECT_NE(std::find(names.begin(), names.end(), "half-rdp-test"), names.end());
  auto accountant = make_accountant("half-rdp-test");
  accountant->step(1.0, 0.01, 100);
  RdpAccountant rdp;
  rdp.step(1.0, 0.01, 100);
  EXPECT_DOUBLE_EQ(accountant->epsilon(1e-5), rdp.epsilon(1e-5) / 2);
  EXPECT_EQ(load_accountant(accountant->serialize())->epsilon(1e-5), accountant->epsilon(1e-5));
  EXPECT_DOUBLE_EQ(epsilon_for(EpsilonOptions()
                                   .noise_multiplier(1.0)
                                   .sample_rate(0.01)
                                   .steps(100)
                                   .delta(1e-5)
                                   .accountant("half-rdp-test")),
                   rdp.epsilon(1e-5) / 2);
  EXPECT_THAT(
      [] {
        register_accountant(
            {"half-rdp-test", "again", [] { return std::make_unique<HalfRdpAccountant>(); }});
      },
      ThrowsMessage<c10::Error>(HasSubstr("already registered")));
  EXPECT_THAT(
      [] {
        register_accountant(
            {"other-name", "wrong", [] { return std::make_unique<HalfRdpAccountant>(); }});
      },
      ThrowsMessage<c10::Error>(HasSubstr("mechanism() is 'half-rdp-test'")));
  EXPECT_THAT(
      [] {
        register_accountant({"", "nameless", nullptr});
      },
      ThrowsMessage<c10::Error>(HasSubstr("needs a name")));
}

}  // namespace
}  // namespace dptorch::accounting
