#include <dptorch/accounting/prv.h>

#include <dptorch/accounting/gdp.h>

#include <c10/util/Exception.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <ostream>
#include <string>
#include <utility>

#include "accounting/numerics.h"
#include "accounting/prv_internal.h"

namespace dptorch::accounting {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

// --- Golden values ------------------------------------------------------------------------

struct PrvGolden {
  double noise_multiplier;
  double sample_rate;
  int64_t steps;
  double delta;
  double epsilon;
  std::string name;
};

std::ostream& operator<<(std::ostream& os, const PrvGolden& g) {
  return os << "σ=" << g.noise_multiplier << " q=" << g.sample_rate << " T=" << g.steps
            << " δ=" << g.delta;
}

class PrvGoldenTest : public ::testing::TestWithParam<PrvGolden> {};

// Values published with the reference implementation: Opacus's test_prv_accountant
// (σ = 1.5, q = 0.04, int(90 // 0.04) = 2249 steps) and opacus/tests/prv_accountant.py,
// which were computed with Microsoft's prv_accountant at δ = 1e-6. Both are checked to
// 4 decimals (|error| < 5e-5), as there.
TEST_P(PrvGoldenTest, MatchesReference) {
  const PrvGolden& g = GetParam();
  PrvAccountant accountant;
  accountant.step(g.noise_multiplier, g.sample_rate, g.steps);
  EXPECT_NEAR(accountant.epsilon(g.delta), g.epsilon, 5e-5);
}

INSTANTIATE_TEST_SUITE_P(
    Reference, PrvGoldenTest,
    ::testing::Values(PrvGolden{1.5, 0.04, 2249, 1e-5, 6.777395712150674, "Opacus"},
                      PrvGolden{0.8, 0.001, 100, 1e-6, 0.2704033640, "Msr_0_8_q0_001_T100"},
                      PrvGolden{0.8, 0.05, 100, 1e-6, 6.7410519394, "Msr_0_8_q0_05_T100"},
                      PrvGolden{1.5, 0.05, 1000, 1e-6, 6.2099692466, "Msr_1_5_q0_05_T1000"},
                      PrvGolden{2.0, 0.2, 100, 1e-6, 5.6720556088, "Msr_2_q0_2_T100"},
                      PrvGolden{3.0, 0.05, 50000, 1e-6, 24.9420056431, "Msr_3_q0_05_T50000"},
                      PrvGolden{1.5, 0.001, 20000, 1e-6, 0.4370051087, "Msr_1_5_q0_001_T20000"}),
    [](const ::testing::TestParamInfo<PrvGolden>& info) { return info.param.name; });

// --- Accountant ---------------------------------------------------------------------------

TEST(PrvAccountantTest, BoundsAreOrderedAndWithinTheErrors) {
  PrvAccountant accountant;
  accountant.step(1.2, 0.02, 500);
  const PrvEpsilon bounds = accountant.epsilon_bounds(1e-5);
  EXPECT_LT(bounds.lower, bounds.estimate);
  EXPECT_LT(bounds.estimate, bounds.upper);
  EXPECT_EQ(accountant.epsilon(1e-5), bounds.upper);
  // Each side is eps_error plus the change of ε over delta_error = δ/1000: small.
  EXPECT_LT(bounds.upper - bounds.estimate, 0.011);
  EXPECT_LT(bounds.estimate - bounds.lower, 0.011);
}

TEST(PrvAccountantTest, EpsErrorOptionWidensTheBounds) {
  PrvAccountant fine;
  PrvAccountant coarse(PrvOptions().eps_error(0.1).delta_error(1e-9));
  fine.step(1.2, 0.02, 500);
  coarse.step(1.2, 0.02, 500);
  EXPECT_EQ(coarse.options().eps_error(), 0.1);
  const PrvEpsilon a = fine.epsilon_bounds(1e-5);
  const PrvEpsilon b = coarse.epsilon_bounds(1e-5);
  EXPECT_NEAR(a.estimate, b.estimate, 0.02);
  EXPECT_GT(b.upper, a.upper);
  // A coarser mesh needs fewer points.
  EXPECT_LT(coarse.grid_size(1e-5), fine.grid_size(1e-5));
}

TEST(PrvAccountantTest, ExactForTheGaussianMechanism) {
  // Without subsampling, T steps compose to the Gaussian mechanism with μ = sqrt(T)/σ, whose
  // exact ε(δ) is the μ-GDP one (Dong, Roth, Su 2019, Cor. 2.13).
  for (const auto& [sigma, steps] :
       {std::pair{1.0, int64_t{1}}, std::pair{0.8, int64_t{10}}, std::pair{5.0, int64_t{400}}}) {
    PrvAccountant accountant;
    accountant.step(sigma, 1.0, steps);
    const double exact = gdp_epsilon(std::sqrt(static_cast<double>(steps)) / sigma, 1e-6);
    const PrvEpsilon bounds = accountant.epsilon_bounds(1e-6);
    EXPECT_NEAR(bounds.estimate, exact, 1e-4) << "σ " << sigma << " T " << steps;
    EXPECT_GE(bounds.upper, exact) << "σ " << sigma << " T " << steps;
    EXPECT_LE(bounds.lower, exact) << "σ " << sigma << " T " << steps;
  }
}

TEST(PrvAccountantTest, LargeDeltaNeedsNoPrivacyLoss) {
  PrvAccountant accountant;
  accountant.step(1.0, 0.5, 1);
  EXPECT_EQ(accountant.epsilon(0.99), 0.0);
}

TEST(PrvAccountantTest, TighterThanRdpAtTheGoldenSetting) {
  PrvAccountant accountant;
  accountant.step(1.5, 0.04, 2249);
  EXPECT_LT(accountant.epsilon(1e-5), 7.3);  // RDP gives 7.33 at 2250 steps
}

TEST(PrvAccountantTest, RejectsBadOptions) {
  EXPECT_THAT([] { PrvOptions().eps_error(0); },
              ThrowsMessage<c10::Error>(HasSubstr("eps_error must be finite and > 0, but is 0")));
  EXPECT_THAT([] { PrvOptions().delta_error(1); },
              ThrowsMessage<c10::Error>(HasSubstr("delta_error must be in (0, 1), but is 1")));
  PrvAccountant accountant(PrvOptions().delta_error(1e-5));
  accountant.step(1.0, 0.1, 10);
  EXPECT_THAT([&] { (void)accountant.epsilon(1e-6); },
              ThrowsMessage<c10::Error>(HasSubstr("delta_error must be < delta")));
}

TEST(PrvAccountantTest, RefusesGridsBeyondItsLimit) {
  PrvAccountant accountant(PrvOptions().eps_error(1e-4));
  accountant.step(0.3, 1.0, 100000);
  EXPECT_GT(accountant.grid_size(1e-5), static_cast<double>(detail::kMaxPrvGridSize));
  EXPECT_THAT([&] { (void)accountant.epsilon(1e-5); },
              ThrowsMessage<c10::Error>(HasSubstr("use the rdp accountant")));
}

// --- The privacy loss distribution ---------------------------------------------------------

TEST(PrvTest, CdfAndSurvivalAreComplementaryAndMonotone) {
  for (double q : {0.01, 0.2, 1.0}) {
    double previous = 0.0;
    for (double t = -3.0; t <= 6.0; t += 0.01) {
      const double cdf = detail::prv_cdf(1.3, q, t);
      EXPECT_NEAR(cdf + detail::prv_survival(1.3, q, t), 1.0, 1e-15) << "q " << q << " t " << t;
      EXPECT_GE(cdf, previous) << "q " << q << " t " << t;
      previous = cdf;
    }
  }
  // No mass below log(1 - q): the privacy loss of a subsampled step is at least that.
  EXPECT_EQ(detail::prv_cdf(1.0, 0.1, std::log(0.9) - 1e-9), 0.0);
}

TEST(PrvTest, WithoutSubsamplingTheLossIsGaussian) {
  // q = 1: Y ~ N(μ²/2, μ²) with μ = 1/σ (Dong, Roth, Su 2019, Sec. 2).
  const double sigma = 0.9;
  const double mu = 1 / sigma;
  for (double t : {-1.0, 0.0, 0.3, 2.0, 5.0}) {
    EXPECT_NEAR(detail::prv_cdf(sigma, 1.0, t), detail::normal_cdf((t - mu * mu / 2) / mu), 1e-15);
  }
}

TEST(PrvTest, TruncatedMeanMatchesKnownMean) {
  // For q = 1 and a wide truncation the mean is μ²/2 = 1/(2σ²).
  const double sigma = 1.1;
  EXPECT_NEAR(detail::truncated_prv_mean(sigma, 1.0, -30, 30), 1 / (2 * sigma * sigma), 1e-12);
  // For q < 1 the mean of the loss is KL(P || Q) >= 0, and small for small q.
  const double mean = detail::truncated_prv_mean(1.5, 0.04, -12, 12);
  EXPECT_GT(mean, 0.0);
  EXPECT_LT(mean, 0.04 * 0.04 * std::expm1(1 / (1.5 * 1.5)));  // KL <= χ²
}

TEST(PrvTest, GridIsAlignedAndAPowerOfTwo) {
  const detail::PrvGrid grid = detail::make_prv_grid(12.3, 0.01);
  // Opacus's aligned domain would have 2 ceil(12.3/0.01) + 2 = 2462 points.
  EXPECT_EQ(grid.size, 4096);
  EXPECT_EQ(grid.offset, 2047);
  EXPECT_DOUBLE_EQ(grid.t(grid.offset), 0.0);
  EXPECT_LE(grid.t(0), -12.3);
  EXPECT_GE(grid.t(grid.size - 1), 12.3);
  EXPECT_EQ(detail::prv_grid_points(12.3, 0.01), 4096.0);
}

TEST(PrvTest, DiscretisationKeepsMassAndMean) {
  const detail::PrvGrid grid = detail::make_prv_grid(10.0, 1e-3);
  const detail::DiscretePrv prv = detail::discretize_prv(1.2, 0.05, grid);
  double mass = 0.0;
  double mean = 0.0;
  for (int64_t i = 0; i < grid.size; ++i) {
    EXPECT_GE(prv.pmf[i], 0.0);
    mass += prv.pmf[i];
    mean += prv.grid.t(i) * prv.pmf[i];
  }
  EXPECT_NEAR(mass, 1.0, 1e-14);
  const double expected = detail::truncated_prv_mean(1.2, 0.05, grid.t(0), grid.t(grid.size - 1));
  EXPECT_NEAR(mean, expected, 1e-14);
  EXPECT_LT(std::abs(prv.grid.shift), grid.dt / 2);
}

TEST(PrvTest, CompositionAddsMeansAndKeepsMass) {
  const detail::PrvGrid grid = detail::make_prv_grid(10.0, 1e-3);
  const std::vector<HistoryEntry> blocks = {{1.2, 0.05, 40}, {2.0, 0.1, 25}};
  const detail::DiscretePrv composed = detail::compose_prvs(blocks, grid);
  double mass = 0.0;
  double mean = 0.0;
  for (int64_t i = 0; i < grid.size; ++i) {
    mass += composed.pmf[i];
    mean += composed.grid.t(i) * composed.pmf[i];
  }
  const double t_min = grid.t(0);
  const double t_max = grid.t(grid.size - 1);
  const double expected = 40 * detail::truncated_prv_mean(1.2, 0.05, t_min, t_max) +
                          25 * detail::truncated_prv_mean(2.0, 0.1, t_min, t_max);
  EXPECT_NEAR(mass, 1.0, 1e-12);
  EXPECT_NEAR(mean, expected, 1e-10);
}

}  // namespace
}  // namespace dptorch::accounting
