#include "accounting/fft.h"

#include <c10/util/Exception.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <complex>
#include <cstdint>
#include <random>
#include <sstream>
#include <vector>

namespace dptorch::accounting {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;
using Complex = std::complex<double>;

constexpr double kPi = 3.14159265358979323846;

// Coefficient k of the DFT, summed directly.
Complex naive_dft(const std::vector<Complex>& x, size_t k, bool inverse) {
  const double sign = inverse ? 1.0 : -1.0;
  const size_t n = x.size();
  Complex sum = 0;
  for (size_t j = 0; j < n; ++j) {
    const double angle = sign * 2 * kPi * static_cast<double>((j * k) % n) / static_cast<double>(n);
    sum += x[j] * Complex(std::cos(angle), std::sin(angle));
  }
  return sum;
}

std::vector<Complex> random_signal(size_t n, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> normal;
  std::vector<Complex> x(n);
  for (auto& v : x) {
    v = {normal(gen), normal(gen)};
  }
  return x;
}

// Largest |a_k - b_k| with its index, as a failure message.
::testing::AssertionResult close(const std::vector<Complex>& a, const std::vector<Complex>& b,
                                 double tolerance) {
  if (a.size() != b.size()) {
    return ::testing::AssertionFailure() << "sizes " << a.size() << " and " << b.size();
  }
  double worst = 0;
  size_t where = 0;
  for (size_t k = 0; k < a.size(); ++k) {
    if (std::abs(a[k] - b[k]) > worst) {
      worst = std::abs(a[k] - b[k]);
      where = k;
    }
  }
  if (worst <= tolerance) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure()
         << "largest error " << worst << " at " << where << " (" << a[where] << " vs " << b[where]
         << "), tolerance " << tolerance;
}

class AccountingFftSizeTest : public ::testing::TestWithParam<size_t> {};

// Seed 42 per size; tolerance scales with sqrt(n) log n of a unit-variance signal.
TEST_P(AccountingFftSizeTest, MatchesDirectDftInBothDirections) {
  const size_t n = GetParam();
  const auto x = random_signal(n, 42);
  for (bool inverse : {false, true}) {
    auto y = x;
    detail::fft(y, inverse);
    // Every coefficient for small n; a spread of coefficients for the four-step sizes.
    const size_t stride = n <= 1024 ? 1 : n / 13 + 1;
    std::vector<Complex> sampled_expected;
    std::vector<Complex> sampled_got;
    for (size_t k = 0; k < n; k += stride) {
      sampled_expected.push_back(naive_dft(x, k, inverse));
      sampled_got.push_back(y[k]);
    }
    EXPECT_TRUE(close(sampled_got, sampled_expected, 1e-12 * std::sqrt(n) * std::log2(n + 1.0)))
        << "n " << n << (inverse ? " inverse" : " forward");
  }
}

INSTANTIATE_TEST_SUITE_P(PowersOfTwo, AccountingFftSizeTest,
                         ::testing::Values(1, 2, 4, 8, 16, 64, 1024, size_t{1} << 15,
                                           size_t{1} << 17));

TEST(AccountingFftTest, InverseUndoesForward) {
  const size_t n = size_t{1} << 16;
  const auto x = random_signal(n, 7);
  auto y = x;
  detail::fft(y, false);
  detail::fft(y, true);
  for (auto& v : y) {
    v /= static_cast<double>(n);
  }
  EXPECT_TRUE(close(y, x, 1e-13));
}

TEST(AccountingFftTest, RealTransformMatchesComplexTransform) {
  for (size_t n : {size_t{2}, size_t{8}, size_t{256}, size_t{1} << 16}) {
    std::mt19937 gen(3);
    std::uniform_real_distribution<double> uniform;
    std::vector<double> x(n);
    for (auto& v : x) {
      v = uniform(gen);
    }
    std::vector<Complex> full(x.begin(), x.end());
    detail::fft(full, false);
    const auto half = detail::rfft(x);
    ASSERT_EQ(half.size(), n / 2 + 1);
    EXPECT_TRUE(close(half, std::vector<Complex>(full.begin(), full.begin() + n / 2 + 1),
                      1e-12 * std::sqrt(n)))
        << "n " << n;
    const auto back = detail::irfft(half, n);
    double worst = 0;
    for (size_t i = 0; i < n; ++i) {
      worst = std::max(worst, std::abs(back[i] - x[i]));
    }
    EXPECT_LT(worst, 1e-14) << "n " << n;
  }
}

TEST(AccountingFftTest, RejectsOtherSizes) {
  std::vector<Complex> x(12);
  EXPECT_THAT([&] { detail::fft(x, false); },
              ThrowsMessage<c10::Error>(HasSubstr("power of two, but is 12")));
  EXPECT_THAT([] { (void)detail::rfft(std::vector<double>(6)); },
              ThrowsMessage<c10::Error>(HasSubstr("power of two >= 2")));
}

TEST(AccountingFftTest, PowerOfTwoHelpers) {
  EXPECT_TRUE(detail::is_power_of_two(1));
  EXPECT_TRUE(detail::is_power_of_two(4096));
  EXPECT_FALSE(detail::is_power_of_two(0));
  EXPECT_FALSE(detail::is_power_of_two(12));
  EXPECT_EQ(detail::next_power_of_two(1), 1u);
  EXPECT_EQ(detail::next_power_of_two(2462), 4096u);
  EXPECT_EQ(detail::next_power_of_two(4096), 4096u);
}

}  // namespace
}  // namespace dptorch::accounting
