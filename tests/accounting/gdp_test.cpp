#include <dptorch/accounting/gdp.h>

#include <c10/util/Exception.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

namespace dptorch::accounting {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

// Opacus's test_gdp_accountant: σ = 1.5, q = 0.04, int(90 // 0.04) = 2249 steps, δ = 1e-5.
TEST(GdpAccountantTest, MatchesOpacusGoldenRange) {
  GdpAccountant accountant;
  for (int i = 0; i < 2249; ++i) {
    accountant.step(1.5, 0.04);
  }
  const double eps = accountant.epsilon(1e-5);
  EXPECT_GT(eps, 6.59);
  EXPECT_LT(eps, 6.60);
}

TEST(GdpTest, MuIsTheCentralLimitFormula) {
  EXPECT_DOUBLE_EQ(gdp_mu_poisson(1.5, 0.04, 2249),
                   0.04 * std::sqrt(2249 * (std::exp(1 / 2.25) - 1)));
  EXPECT_EQ(gdp_mu_poisson(1.5, 0.0, 100), 0.0);
  EXPECT_EQ(gdp_mu_poisson(1.5, 0.1, 0), 0.0);
  EXPECT_EQ(gdp_mu_poisson(0.0, 0.1, 1), std::numeric_limits<double>::infinity());
}

TEST(GdpTest, EpsilonInvertsDelta) {
  for (double mu : {0.05, 0.5, 1.0, 3.0, 10.0}) {
    for (double delta : {1e-3, 1e-5, 1e-9}) {
      const double eps = gdp_epsilon(mu, delta);
      if (eps > 0) {
        EXPECT_NEAR(gdp_delta(eps, mu), delta, 1e-9 * delta) << "μ " << mu << " δ " << delta;
      }
    }
  }
  // μ-GDP with tiny μ is (0, δ)-DP for any moderate δ.
  EXPECT_EQ(gdp_epsilon(1e-6, 1e-3), 0.0);
  EXPECT_EQ(gdp_epsilon(std::numeric_limits<double>::infinity(), 1e-5),
            std::numeric_limits<double>::infinity());
}

TEST(GdpTest, DeltaOfGaussianMechanism) {
  // δ(0) = Φ(μ/2) - Φ(-μ/2) = 2Φ(μ/2) - 1 (Dong, Roth, Su 2019, Cor. 2.13).
  const double mu = 1.3;
  EXPECT_NEAR(gdp_delta(0.0, mu), std::erf(mu / 2 / std::sqrt(2.0)), 1e-15);
}

TEST(GdpAccountantTest, BlocksComposeByAddingMuSquared) {
  GdpAccountant accountant;
  accountant.step(1.5, 0.04, 1000);
  accountant.step(2.5, 0.01, 3000);
  const double a = gdp_mu_poisson(1.5, 0.04, 1000);
  const double b = gdp_mu_poisson(2.5, 0.01, 3000);
  EXPECT_DOUBLE_EQ(accountant.mu(), std::sqrt(a * a + b * b));
}

TEST(GdpTest, RejectsBadInput) {
  EXPECT_THAT([] { (void)gdp_epsilon(1.0, 0.0); },
              ThrowsMessage<c10::Error>(HasSubstr("delta must be in (0, 1), but is 0")));
  EXPECT_THAT([] { (void)gdp_delta(-1.0, 1.0); },
              ThrowsMessage<c10::Error>(HasSubstr("epsilon must be >= 0")));
  EXPECT_THAT([] { (void)gdp_mu_poisson(1.0, 0.1, -5); },
              ThrowsMessage<c10::Error>(HasSubstr("steps must be >= 0, but is -5")));
}

}  // namespace
}  // namespace dptorch::accounting
