// SecureNoise, statistically (it cannot be seeded, so every test is a hypothesis test with a
// stated false-alarm rate: sizes and tolerances below), and secure mode's refusal of seeds.

#include <dptorch/dptorch.h>
#include <dptorch/engine/privacy_engine.h>
#include <dptorch/optim/noise.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <sstream>
#include <vector>

#include "support/temp_dir.h"
#include "support/toy_training.h"

namespace dptorch::optim {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

// P(|Z| > k) for a standard Gaussian.
double two_sided_tail(double k) { return std::erfc(k / std::sqrt(2.0)); }

// Kolmogorov–Smirnov against N(0, 1) on 2·10^6 double draws: D = sup |F_n − Φ| must be below
// 2.69/√n, the critical value at level 10^-6 (c(α) = √(−ln(α/2)/2)).
TEST(SecureNoiseStatistics, KolmogorovSmirnovAgainstTheStandardGaussian) {
  SecureNoise noise;
  constexpr int64_t kN = 2'000'000;
  auto z =
      std::get<0>(noise.gaussian({kN}, 1.0, torch::TensorOptions().dtype(torch::kDouble)).sort());
  const auto phi = 0.5 * torch::erfc(-z / std::sqrt(2.0));
  const auto i = torch::arange(kN, torch::kDouble);
  const double d = torch::maximum((i + 1) / kN - phi, phi - i / kN).max().item<double>();
  EXPECT_LT(d, 2.69 / std::sqrt(static_cast<double>(kN)));
}

// Tails from 1σ to 6σ over 2·10^7 float draws (std 3, standardised): the count beyond kσ is
// within 6 Poisson standard deviations (+3) of n·P(|Z| > k) for k = 1..5 (expected 6.3·10^6 down
// to 11); beyond 6σ (expected 0.04) at most 3 (probability of more: 4·10^-8). The largest draw is
// beyond 4σ (P(not) < 10^-500) and below 8σ (P(not) ≈ 3·10^-8).
TEST(SecureNoiseStatistics, TailsMatchTheGaussianToSixSigma) {
  SecureNoise noise;
  constexpr int64_t kChunk = 4'000'000, kChunks = 5;
  const double n = static_cast<double>(kChunk * kChunks);
  std::vector<double> beyond(7, 0.0);
  double largest = 0;
  for (int64_t c = 0; c < kChunks; ++c) {
    const auto z =
        noise.gaussian({kChunk}, 3.0, torch::TensorOptions().dtype(torch::kFloat)).abs_().div_(3.0);
    for (int k = 1; k <= 6; ++k) beyond[k] += (z > k).sum().item<double>();
    largest = std::max(largest, z.max().item<double>());
  }
  for (int k = 1; k <= 5; ++k) {
    const double expected = n * two_sided_tail(k);
    EXPECT_NEAR(beyond[k], expected, 6 * std::sqrt(expected) + 3) << k << " sigma";
  }
  EXPECT_LE(beyond[6], 3) << "6 sigma (expected " << n * two_sided_tail(6) << ")";
  EXPECT_GT(largest, 4.0);
  EXPECT_LT(largest, 8.0);
}

// Independence: two successive calls, and neighbours within a call, are uncorrelated, also in
// their squares (a dependence of scale), to 6/√n with n = 10^6; one call's draws are not a
// shifted copy of the other's (no repeated stream).
TEST(SecureNoiseStatistics, CallsAndNeighboursAreIndependent) {
  SecureNoise noise;
  constexpr int64_t kN = 1'000'000;
  const auto options = torch::TensorOptions().dtype(torch::kDouble);
  const auto a = noise.gaussian({kN}, 1.0, options);
  const auto b = noise.gaussian({kN}, 1.0, options);
  const double bound = 6.0 / std::sqrt(static_cast<double>(kN));
  const auto correlation = [](const torch::Tensor& x, const torch::Tensor& y) {
    const auto xc = x - x.mean(), yc = y - y.mean();
    return ((xc * yc).mean() / (xc.std(false) * yc.std(false))).item<double>();
  };
  EXPECT_LT(std::abs(correlation(a, b)), bound);
  EXPECT_LT(std::abs(correlation(a * a, b * b)), bound);
  EXPECT_LT(std::abs(correlation(a.slice(0, 0, kN - 1), a.slice(0, 1))), bound);
  EXPECT_LT(std::abs(correlation(a.slice(0, 0, kN - 1).square(), a.slice(0, 1).square())), bound);
  for (const int64_t shift : {1, 2, 4, 1024}) {
    EXPECT_FALSE(torch::equal(a.slice(0, shift, shift + 1000), b.slice(0, 0, 1000))) << shift;
  }
}

// Secure mode takes no seed from anywhere: not from the options (make_noise_source and
// make_private refuse one), not from a checkpoint (none is written there, and a resumed secure
// run keeps its own fresh seed), and not from the environment (no variable seeds dptorch).
TEST(SecureMode, TakesNoSeedFromOptionsOrCheckpoints) {
  EXPECT_THAT([] { (void)make_noise_source(NoiseOptions().secure_mode(true).seed(1)); },
              ThrowsMessage<c10::Error>(HasSubstr("seed")));
  auto data = testing::toy_data();
  const auto options =
      PrivacyOptions().noise_multiplier(1.0).expected_batch_size(20).secure_mode(true);
  PrivacyEngine engine;
  EXPECT_THAT(
      [&] {
        auto m = testing::toy_mlp();
        (void)engine.make_private(
            m, std::make_shared<torch::optim::SGD>(m->parameters(), torch::optim::SGDOptions(0.1)),
            data, PrivacyOptions(options).seed(7));
      },
      ThrowsMessage<c10::Error>(HasSubstr("secure_mode refuses a seed")));

  testing::TempDir dir;
  auto first_model = testing::toy_mlp();
  PrivacyEngine first_engine;
  auto first = first_engine.make_private(
      first_model,
      std::make_shared<torch::optim::SGD>(first_model->parameters(), torch::optim::SGDOptions(0.1)),
      data, options);
  ASSERT_TRUE(first.optimizer->noise().is_secure());
  auto batch = first.loader.next();
  torch::nll_loss(first_model->forward(batch.data), batch.target).backward();
  first.optimizer->step();
  first_engine.save_checkpoint(dir.file("secure.pt"), first);
  // The file holds no seed: its info tensor's third entry is 0.
  torch::serialize::InputArchive archive;
  std::istringstream bytes(io::read_checked_file(dir.file("secure.pt"), "checkpoint"));
  archive.load_from(bytes);
  torch::Tensor info;
  archive.read("info", info);
  EXPECT_EQ(info[2].item<int64_t>(), 0);

  auto second_model = testing::toy_mlp();
  PrivacyEngine second_engine;
  auto second =
      second_engine.make_private(second_model,
                                 std::make_shared<torch::optim::SGD>(second_model->parameters(),
                                                                     torch::optim::SGDOptions(0.1)),
                                 data, options);
  const uint64_t own_seed = second.settings.sampler_seed;
  EXPECT_NE(own_seed, first.settings.sampler_seed);  // both from the CSPRNG
  (void)second_engine.load_checkpoint(dir.file("secure.pt"), second);
  EXPECT_EQ(second.settings.sampler_seed, own_seed);
  EXPECT_EQ(second.loader.position(), 1);
  EXPECT_EQ(second_engine.accountant()->total_steps(), 1);
}

}  // namespace
}  // namespace dptorch::optim
