#include "dptorch/optim/noise.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace dptorch::optim {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

constexpr uint64_t kSeed = 42;

// The noise sources under test, by name.
struct SourceCase {
  const char* name;
  std::function<std::unique_ptr<NoiseSource>()> make;
};

const SourceCase kSources[] = {
    {"TorchNoise", [] { return std::make_unique<TorchNoise>(kSeed); }},
    {"SecureNoise", [] { return std::make_unique<SecureNoise>(); }},
};

class NoiseSourceTest : public ::testing::TestWithParam<SourceCase> {
 protected:
  std::unique_ptr<NoiseSource> source_ = GetParam().make();
};

// Sample moments of 1e6 draws with std 2.5 (TorchNoise seeded with kSeed; SecureNoise unseeded),
// standardised by the requested std. Tolerances are at least 6 standard errors: mean within
// 0.006 (se 0.001), std within 0.5% (se 0.07%), kurtosis within 0.05 of 3 (se 0.005), mass within
// one std 0.6827 +- 0.003 (se 0.0005), beyond three std 0.0027 +- 0.0004 (se 0.00005).
TEST_P(NoiseSourceTest, DrawsMatchTheRequestedGaussian) {
  constexpr double kStd = 2.5;
  for (const auto dtype : {torch::kFloat32, torch::kFloat64}) {
    const torch::Tensor noise =
        source_->gaussian({1000, 1000}, kStd, torch::TensorOptions().dtype(dtype));
    ASSERT_EQ(noise.scalar_type(), dtype);
    const torch::Tensor z = noise.to(torch::kFloat64) / kStd;
    const double mean = z.mean().item<double>();
    const double std = z.std().item<double>();
    const double kurtosis = ((z - mean).pow(4).mean() / std::pow(std, 4)).item<double>();
    const double within_one = (z.abs() < 1).to(torch::kFloat64).mean().item<double>();
    const double beyond_three = (z.abs() > 3).to(torch::kFloat64).mean().item<double>();
    EXPECT_NEAR(mean, 0.0, 0.006) << dtype;
    EXPECT_NEAR(std, 1.0, 0.005) << dtype;
    EXPECT_NEAR(kurtosis, 3.0, 0.05) << dtype;
    EXPECT_NEAR(within_one, 0.682689, 0.003) << dtype;
    EXPECT_NEAR(beyond_three, 0.002700, 0.0004) << dtype;
  }
}

TEST_P(NoiseSourceTest, FollowsShapeDtypeAndDevice) {
  for (const auto dtype : {torch::kFloat32, torch::kFloat64, torch::kFloat16, torch::kBFloat16}) {
    const auto options = torch::TensorOptions().dtype(dtype).device(torch::kCPU);
    const torch::Tensor noise = source_->gaussian({3, 4, 5}, 1.0, options);
    EXPECT_EQ(noise.sizes(), (std::vector<int64_t>{3, 4, 5})) << dtype;
    EXPECT_EQ(noise.scalar_type(), dtype);
    EXPECT_EQ(noise.device(), torch::Device(torch::kCPU));
    EXPECT_FALSE(noise.requires_grad());
    EXPECT_TRUE(noise.isfinite().all().item<bool>()) << dtype;
    EXPECT_GT(noise.to(torch::kFloat64).abs().sum().item<double>(), 0.0) << dtype;
  }
  EXPECT_EQ(source_->gaussian({2}, 1.0, torch::TensorOptions()).scalar_type(),
            torch::get_default_dtype_as_scalartype());
  EXPECT_EQ(source_->gaussian({0, 7}, 1.0, torch::TensorOptions()).sizes(),
            (std::vector<int64_t>{0, 7}));
  EXPECT_EQ(source_->gaussian({}, 1.0, torch::TensorOptions()).dim(), 0);
}

TEST_P(NoiseSourceTest, ZeroStdGivesZeros) {
  const torch::Tensor noise =
      source_->gaussian({10, 10}, 0.0, torch::TensorOptions().dtype(torch::kFloat64));
  EXPECT_TRUE(torch::equal(noise, torch::zeros({10, 10}, torch::kFloat64)));
}

TEST_P(NoiseSourceTest, SuccessiveDrawsDiffer) {
  const auto options = torch::TensorOptions().dtype(torch::kFloat64);
  EXPECT_FALSE(
      torch::equal(source_->gaussian({100}, 1.0, options), source_->gaussian({100}, 1.0, options)));
}

TEST_P(NoiseSourceTest, RefusesBadArguments) {
  const auto options = torch::TensorOptions().dtype(torch::kFloat32);
  EXPECT_THAT([&] { (void)source_->gaussian({2}, -1.0, options); },
              ThrowsMessage<c10::Error>(HasSubstr("stddev must be finite and >= 0, but is -1")));
  EXPECT_THAT(
      [&] { (void)source_->gaussian({2}, std::numeric_limits<double>::infinity(), options); },
      ThrowsMessage<c10::Error>(HasSubstr("stddev must be finite and >= 0, but is inf")));
  EXPECT_THAT(
      [&] { (void)source_->gaussian({2}, 1.0, options.dtype(torch::kInt64)); },
      ThrowsMessage<c10::Error>(HasSubstr("noise dtype must be floating point, but is Long")));
}

// add_gaussian_ adds the same distribution in place: the moments of the added values, with the
// tolerances of DrawsMatchTheRequestedGaussian, on contiguous and non-contiguous targets.
TEST_P(NoiseSourceTest, AddGaussianAddsTheRequestedGaussianInPlace) {
  constexpr double kStd = 2.5;
  for (const auto dtype : {torch::kFloat32, torch::kFloat64}) {
    for (const bool contiguous : {true, false}) {
      auto base = torch::full({1000, 1000}, 3.0, torch::TensorOptions().dtype(dtype));
      auto target = contiguous ? base : base.t();
      const void* data = target.data_ptr();
      source_->add_gaussian_(target, kStd);
      ASSERT_EQ(target.data_ptr(), data);
      const torch::Tensor z = (base.to(torch::kFloat64) - 3.0) / kStd;
      const double mean = z.mean().item<double>();
      const double std = z.std().item<double>();
      const double within_one = (z.abs() < 1).to(torch::kFloat64).mean().item<double>();
      EXPECT_NEAR(mean, 0.0, 0.006) << dtype << " contiguous " << contiguous;
      EXPECT_NEAR(std, 1.0, 0.005) << dtype << " contiguous " << contiguous;
      EXPECT_NEAR(within_one, 0.682689, 0.003) << dtype << " contiguous " << contiguous;
    }
  }
  auto unchanged = torch::ones({5});
  source_->add_gaussian_(unchanged, 0.0);
  EXPECT_TRUE(torch::equal(unchanged, torch::ones({5})));
  EXPECT_THAT([&] { source_->add_gaussian_(unchanged, -1.0); },
              ThrowsMessage<c10::Error>(HasSubstr("stddev must be finite and >= 0, but is -1")));
  auto ints = torch::zeros({3}, torch::kLong);
  EXPECT_THAT([&] { source_->add_gaussian_(ints, 1.0); },
              ThrowsMessage<c10::Error>(HasSubstr("noise dtype must be floating point")));
}

INSTANTIATE_TEST_SUITE_P(Sources, NoiseSourceTest, ::testing::ValuesIn(kSources),
                         [](const ::testing::TestParamInfo<SourceCase>& info) {
                           return std::string(info.param.name);
                         });

TEST(TorchNoiseTest, SameSeedGivesSameNoise) {
  TorchNoise first(kSeed);
  TorchNoise second(kSeed);
  const auto options = torch::TensorOptions().dtype(torch::kFloat32);
  for (int call = 0; call < 3; ++call) {
    EXPECT_TRUE(
        torch::equal(first.gaussian({50, 3}, 0.7, options), second.gaussian({50, 3}, 0.7, options)))
        << "call " << call;
  }
  EXPECT_FALSE(torch::equal(TorchNoise(kSeed).gaussian({50}, 1.0, options),
                            TorchNoise(kSeed + 1).gaussian({50}, 1.0, options)));
  EXPECT_EQ(first.seed(), kSeed);
  EXPECT_FALSE(first.is_secure());
}

// TorchNoise adds chunk by chunk from one stream: reproducible from the seed, and no chunk
// repeats another's values.
TEST(TorchNoiseTest, AddGaussianIsReproducibleAndChunksDiffer) {
  const int64_t n = 2 * TorchNoise::kChunk + 5;
  auto first = torch::zeros({n}), second = torch::zeros({n});
  TorchNoise(kSeed).add_gaussian_(first, 1.0);
  TorchNoise(kSeed).add_gaussian_(second, 1.0);
  EXPECT_TRUE(torch::equal(first, second));
  const auto head = first.narrow(0, 0, 5);
  EXPECT_FALSE(torch::equal(head, first.narrow(0, TorchNoise::kChunk, 5)));
  EXPECT_FALSE(torch::equal(head, first.narrow(0, 2 * TorchNoise::kChunk, 5)));
  EXPECT_TRUE(first.narrow(0, 2 * TorchNoise::kChunk, 5).ne(0).all().item<bool>());
}

TEST(TorchNoiseTest, RestoredStateContinuesTheStream) {
  const auto options = torch::TensorOptions().dtype(torch::kFloat64);
  TorchNoise noise(kSeed);
  (void)noise.gaussian({1000}, 1.0, options);
  const std::string state = noise.state();
  const torch::Tensor expected = noise.gaussian({1000}, 1.0, options);

  noise.set_state(state);
  EXPECT_TRUE(torch::equal(noise.gaussian({1000}, 1.0, options), expected));

  TorchNoise restarted(7);  // a fresh process, seeded anyhow, then restored
  restarted.set_state(state);
  EXPECT_EQ(restarted.seed(), kSeed);
  EXPECT_TRUE(torch::equal(restarted.gaussian({1000}, 1.0, options), expected));

  // A state taken before any draw restores the fresh stream.
  TorchNoise fresh(kSeed);
  const std::string initial = fresh.state();
  const torch::Tensor first_draw = fresh.gaussian({10}, 1.0, options);
  fresh.set_state(initial);
  EXPECT_TRUE(torch::equal(fresh.gaussian({10}, 1.0, options), first_draw));
}

TEST(TorchNoiseTest, RefusesDamagedState) {
  TorchNoise noise(kSeed);
  (void)noise.gaussian({4}, 1.0, torch::TensorOptions().dtype(torch::kFloat32));
  const std::string state = noise.state();
  EXPECT_THAT([&] { noise.set_state("not a state"); },
              ThrowsMessage<c10::Error>(HasSubstr("TorchNoise state does not start with")));
  EXPECT_THAT([&] { noise.set_state(state.substr(0, state.size() - 10)); },
              ThrowsMessage<c10::Error>(HasSubstr("TorchNoise state is truncated")));
  EXPECT_THAT([&] { noise.set_state(state + "x"); },
              ThrowsMessage<c10::Error>(HasSubstr("TorchNoise state has extra bytes")));
  // A refused state leaves the source as it was.
  TorchNoise reference(kSeed);
  reference.set_state(state);
  const auto options = torch::TensorOptions().dtype(torch::kFloat64);
  EXPECT_TRUE(
      torch::equal(noise.gaussian({8}, 1.0, options), reference.gaussian({8}, 1.0, options)));
}

TEST(SecureNoiseTest, IsSecureAndUnseeded) {
  SecureNoise first;
  SecureNoise second;
  EXPECT_TRUE(first.is_secure());
  const auto options = torch::TensorOptions().dtype(torch::kFloat64);
  EXPECT_FALSE(
      torch::equal(first.gaussian({64}, 1.0, options), second.gaussian({64}, 1.0, options)));
}

TEST(SecureRandomTest, BytesAndSeedsVary) {
  std::vector<unsigned char> a(64, 0);
  std::vector<unsigned char> b(64, 0);
  secure_random_bytes(a.data(), a.size());
  secure_random_bytes(b.data(), b.size());
  EXPECT_NE(a, b);
  EXPECT_NE(a, std::vector<unsigned char>(64, 0));
  EXPECT_NE(secure_seed(), secure_seed());
}

TEST(MakeNoiseSourceTest, BuildsTheRequestedSource) {
  const auto options = torch::TensorOptions().dtype(torch::kFloat32);
  EXPECT_TRUE(make_noise_source(NoiseOptions().secure_mode(true))->is_secure());
  const auto seeded = make_noise_source(NoiseOptions().seed(kSeed));
  EXPECT_FALSE(seeded->is_secure());
  EXPECT_TRUE(torch::equal(seeded->gaussian({20}, 1.0, options),
                           TorchNoise(kSeed).gaussian({20}, 1.0, options)));
  EXPECT_FALSE(make_noise_source()->is_secure());
}

TEST(MakeNoiseSourceTest, RefusesASeedInSecureMode) {
  EXPECT_THAT([] { (void)make_noise_source(NoiseOptions().secure_mode(true).seed(7)); },
              ThrowsMessage<c10::Error>(HasSubstr("secure_mode takes no seed, but seed is 7")));
}

}  // namespace
}  // namespace dptorch::optim
