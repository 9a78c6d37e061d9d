#include <dptorch/accounting/rdp.h>

#include <c10/util/Exception.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

namespace dptorch::accounting {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

constexpr double kInf = std::numeric_limits<double>::infinity();

// Opacus's published RDP value (opacus/tests/accountants_test.py, test_rdp_accountant):
// σ = 1.5, q = 0.04, int(90 / 0.04) = 2250 steps, δ = 1e-5.
TEST(RdpAccountantTest, MatchesOpacusGoldenValue) {
  RdpAccountant accountant;
  for (int i = 0; i < 2250; ++i) {
    accountant.step(1.5, 0.04);
  }
  ASSERT_EQ(accountant.history().size(), 1u);
  EXPECT_NEAR(accountant.epsilon(1e-5), 7.32911117143, 5e-8);
}

TEST(RdpAccountantTest, ExposesTheBestOrder) {
  RdpAccountant accountant;
  accountant.step(1.5, 0.04, 2250);
  const RdpEpsilon best = accountant.epsilon_and_order(1e-5);
  EXPECT_DOUBLE_EQ(best.epsilon, accountant.epsilon(1e-5));
  // The minimiser is one of the orders, strictly inside the default range.
  const auto& orders = default_rdp_orders();
  EXPECT_NE(std::find(orders.begin(), orders.end(), best.order), orders.end());
  EXPECT_GT(best.order, orders.front());
  EXPECT_LT(best.order, orders.back());
  // ...and no order does better.
  const auto rdp = accountant.rdp();
  for (size_t k = 0; k < orders.size(); ++k) {
    const double a = orders[k];
    const double eps = rdp[k] - (std::log(1e-5) + std::log(a)) / (a - 1) + std::log((a - 1) / a);
    EXPECT_GE(eps, best.epsilon - 1e-12) << "order " << a;
  }
}

TEST(RdpAccountantTest, DefaultOrdersAreOpacusOrders) {
  const auto& orders = default_rdp_orders();
  ASSERT_EQ(orders.size(), 99u + 52u);
  EXPECT_DOUBLE_EQ(orders.front(), 1.1);
  EXPECT_DOUBLE_EQ(orders[98], 10.9);
  EXPECT_DOUBLE_EQ(orders[99], 12.0);
  EXPECT_DOUBLE_EQ(orders.back(), 63.0);
  EXPECT_EQ(orders[9], 2.0);  // 1 + 10/10 is exactly 2: the integer-order formula applies
}

TEST(RdpTest, SpecialCases) {
  EXPECT_EQ(rdp_subsampled_gaussian(1.0, 0.0, 2.5), 0.0);
  EXPECT_EQ(rdp_subsampled_gaussian(0.0, 0.1, 2.5), kInf);
  // Without subsampling the Gaussian mechanism has RDP α / (2σ²) (Mironov 2017, Prop. 7).
  EXPECT_DOUBLE_EQ(rdp_subsampled_gaussian(2.0, 1.0, 3.5), 3.5 / 8.0);
}

TEST(RdpTest, IntegerOrderMatchesClosedForm) {
  // α = 2: A_2 = (1 - q)² + 2q(1 - q) + q² e^(1/σ²) = 1 + q² (e^(1/σ²) - 1).
  const double q = 0.1;
  const double sigma = 0.8;
  const double expected = std::log1p(q * q * std::expm1(1 / (sigma * sigma)));
  EXPECT_NEAR(rdp_subsampled_gaussian(sigma, q, 2.0), expected, 1e-14);
}

TEST(RdpTest, FractionalOrdersInterpolateIntegerOrders) {
  // The fractional series and the integer sum are two formulas for one continuous function.
  for (double sigma : {0.7, 1.5, 4.0}) {
    for (double q : {0.001, 0.04, 0.3}) {
      for (double order : {2.0, 3.0, 8.0}) {
        const double at = rdp_subsampled_gaussian(sigma, q, order);
        const double below = rdp_subsampled_gaussian(sigma, q, order - 1e-7);
        const double above = rdp_subsampled_gaussian(sigma, q, order + 1e-7);
        EXPECT_NEAR(below, at, 1e-5 * at + 1e-12) << "σ " << sigma << " q " << q << " α " << order;
        EXPECT_NEAR(above, at, 1e-5 * at + 1e-12) << "σ " << sigma << " q " << q << " α " << order;
        EXPECT_LT(below, above);
      }
    }
  }
}

TEST(RdpTest, ComposesLinearlyInSteps) {
  const std::vector<double> orders = {1.5, 2.0, 10.0, 32.5};
  const auto one = rdp_subsampled_gaussian(1.1, 0.02, 1, orders);
  const auto many = rdp_subsampled_gaussian(1.1, 0.02, 300, orders);
  for (size_t k = 0; k < orders.size(); ++k) {
    EXPECT_DOUBLE_EQ(many[k], 300 * one[k]);
  }
  const auto none = rdp_subsampled_gaussian(0.0, 0.02, 0, orders);
  for (double r : none) {
    EXPECT_EQ(r, 0.0);
  }
}

TEST(RdpTest, ConversionIsBalleTheorem21) {
  const std::vector<double> orders = {2.0, 4.0};
  const std::vector<double> rdp = {0.5, 3.0};
  const RdpEpsilon out = rdp_to_epsilon(orders, rdp, 1e-5);
  const double at2 = 0.5 - (std::log(1e-5) + std::log(2.0)) / 1.0 + std::log(0.5);
  const double at4 = 3.0 - (std::log(1e-5) + std::log(4.0)) / 3.0 + std::log(0.75);
  EXPECT_DOUBLE_EQ(out.epsilon, std::min(at2, at4));
  EXPECT_EQ(out.order, at2 < at4 ? 2.0 : 4.0);
}

TEST(RdpTest, ConversionSkipsNanAndReportsInfinity) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  EXPECT_EQ(rdp_to_epsilon({2.0, 3.0}, {nan, 1.0}, 1e-5).order, 3.0);
  EXPECT_EQ(rdp_to_epsilon({2.0, 3.0}, {nan, nan}, 1e-5).epsilon, kInf);
  EXPECT_EQ(rdp_to_epsilon({2.0, 3.0}, {kInf, kInf}, 1e-5).epsilon, kInf);
}

TEST(RdpTest, RejectsBadInput) {
  EXPECT_THAT(
      [] { (void)rdp_subsampled_gaussian(-1.0, 0.1, 2.0); },
      ThrowsMessage<c10::Error>(HasSubstr("noise_multiplier must be finite and >= 0, but is -1")));
  EXPECT_THAT([] { (void)rdp_subsampled_gaussian(1.0, 1.5, 2.0); },
              ThrowsMessage<c10::Error>(HasSubstr("sample_rate must be in [0, 1], but is 1.5")));
  EXPECT_THAT([] { (void)rdp_subsampled_gaussian(1.0, 0.1, 1.0); },
              ThrowsMessage<c10::Error>(HasSubstr("RDP order must be finite and > 1")));
  EXPECT_THAT(
      [] {
        (void)rdp_to_epsilon({2.0}, {1.0, 2.0}, 1e-5);
      },
      ThrowsMessage<c10::Error>(HasSubstr("one RDP value per order")));
  EXPECT_THAT([] { (void)rdp_to_epsilon({2.0}, {1.0}, 2.0); },
              ThrowsMessage<c10::Error>(HasSubstr("delta must be in (0, 1), but is 2")));
  EXPECT_THAT(
      [] {
        RdpAccountant accountant({2.0, 0.5});
      },
      ThrowsMessage<c10::Error>(HasSubstr("RDP order must be finite and > 1, but is 0.5")));
}

TEST(RdpAccountantTest, CustomOrders) {
  RdpAccountant coarse({2.0, 8.0, 32.0});
  RdpAccountant fine;
  coarse.step(1.0, 0.01, 1000);
  fine.step(1.0, 0.01, 1000);
  EXPECT_EQ(coarse.orders().size(), 3u);
  // Fewer orders can only give a looser (larger) bound.
  EXPECT_GE(coarse.epsilon(1e-5), fine.epsilon(1e-5));
}

}  // namespace
}  // namespace dptorch::accounting
