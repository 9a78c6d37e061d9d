#include "dptorch/optim/noise.h"

#include "optim/philox.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
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
    {"PhiloxNoise", [] { return std::make_unique<PhiloxNoise>(kSeed); }},
    {"TorchNoise", [] { return std::make_unique<TorchNoise>(kSeed); }},
    {"SecureNoise", [] { return std::make_unique<SecureNoise>(); }},
};

class NoiseSourceTest : public ::testing::TestWithParam<SourceCase> {
 protected:
  std::unique_ptr<NoiseSource> source_ = GetParam().make();
};

// Sample moments of 1e6 draws with std 2.5 (PhiloxNoise and TorchNoise seeded with kSeed;
// SecureNoise unseeded),
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

// fill_gaussian_ overwrites whatever the target held (NaN here) with the requested Gaussian, in
// the target's own storage; with stddev 0 it writes zeros. Same moment bounds as above.
TEST_P(NoiseSourceTest, FillGaussianOverwritesWithTheRequestedGaussian) {
  constexpr double kStd = 2.5;
  for (const auto dtype : {torch::kFloat32, torch::kFloat64}) {
    for (const bool contiguous : {true, false}) {
      auto base = torch::full({1000, 1000}, NAN, torch::TensorOptions().dtype(dtype));
      auto target = contiguous ? base : base.t();
      const void* data = target.data_ptr();
      source_->fill_gaussian_(target, kStd);
      ASSERT_EQ(target.data_ptr(), data);
      const torch::Tensor z = base.to(torch::kFloat64) / kStd;
      ASSERT_TRUE(z.isfinite().all().item<bool>()) << dtype << " contiguous " << contiguous;
      EXPECT_NEAR(z.mean().item<double>(), 0.0, 0.006) << dtype << " contiguous " << contiguous;
      EXPECT_NEAR(z.std().item<double>(), 1.0, 0.005) << dtype << " contiguous " << contiguous;
    }
  }
  auto zeroed = torch::full({5}, NAN);
  source_->fill_gaussian_(zeroed, 0.0);
  EXPECT_TRUE(torch::equal(zeroed, torch::zeros({5})));
  EXPECT_THAT([&] { source_->fill_gaussian_(zeroed, -1.0); },
              ThrowsMessage<c10::Error>(HasSubstr("stddev must be finite and >= 0, but is -1")));
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
                           PhiloxNoise(kSeed).gaussian({20}, 1.0, options)));
  EXPECT_FALSE(make_noise_source()->is_secure());
}

TEST(MakeNoiseSourceTest, RefusesASeedInSecureMode) {
  EXPECT_THAT([] { (void)make_noise_source(NoiseOptions().secure_mode(true).seed(7)); },
              ThrowsMessage<c10::Error>(HasSubstr("secure_mode takes no seed, but seed is 7")));
}

// ------------------------------------------------------------------------------- PhiloxNoise

// Known-answer vectors of Philox4x32-10 from Random123's kat_vectors file (counter, key,
// expected output).
TEST(PhiloxTest, MatchesTheRandom123KnownAnswers) {
  using detail::philox4x32_10;
  EXPECT_EQ(philox4x32_10({0, 0, 0, 0}, {0, 0}),
            (std::array<uint32_t, 4>{0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8}));
  EXPECT_EQ(
      philox4x32_10({0xffffffff, 0xffffffff, 0xffffffff, 0xffffffff}, {0xffffffff, 0xffffffff}),
      (std::array<uint32_t, 4>{0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd}));
  EXPECT_EQ(
      philox4x32_10({0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344}, {0xa4093822, 0x299f31d0}),
      (std::array<uint32_t, 4>{0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1}));
}

// Every float code path this processor runs (baseline, AVX2, AVX-512) against a scalar
// reference of the stream's definition: Philox4x32-10 of (block, stream) under the key, then
// Box–Muller on the words with the float path's own log and sin/cos. Ranges start and end
// inside a group, cross the 2^32-block boundary of the counter's low word, and are written and
// added. A wrong Philox word would move an entry by O(1); the paths may differ only by the
// rounding of fused multiply-adds and the float products: within 1e-6·(1 + |z|) (all paths are
// within 1.4e-7 here).
TEST(PhiloxTest, EveryVectorPathComputesTheDefinedStream) {
  const uint64_t key = 0x0123456789abcdefULL;
  const uint64_t stream = 0x00000005fedcba98ULL;
  const float scale = 1.5f;
  auto reference = [&](uint64_t j) {
    const uint64_t block = j / 4;
    const auto w =
        detail::philox4x32_10({static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                               static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)},
                              {static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32)});
    const int pair = static_cast<int>(j % 4) / 2;
    const uint32_t radius_word = w[2 * pair], angle_word = w[2 * pair + 1];
    const float u1 =
        static_cast<float>(static_cast<int32_t>(radius_word >> 1)) * 0x1p-31f + 0x1p-32f;
    const float u2 = static_cast<float>(static_cast<int32_t>(angle_word >> 8)) * 0x1p-24f;
    const float radius = std::sqrt(-2.0f * detail::log_poly(u1));
    float s = 0, c = 0;
    detail::sincos_turns(u2, &s, &c);
    return static_cast<double>(scale * radius) * (j % 2 == 0 ? c : s);
  };
  struct Range {
    uint64_t first;
    int64_t count;
  };
  const Range ranges[] = {{0, 1},
                          {13, 1000},
                          {250, 2 * 256 + 77},
                          {(uint64_t{1} << 34) - 4 * 70 + 3, 4 * 140}};  // blocks 2^32 - 70 ...
  const detail::FillPath paths[] = {detail::FillPath::kBaseline, detail::FillPath::kAvx2,
                                    detail::FillPath::kAvx512};
  int paths_run = 0;
  for (const auto path : paths) {
    if (!detail::has_fill_path(path)) continue;
    ++paths_run;
    for (const auto& range : ranges) {
      std::vector<float> written(static_cast<size_t>(range.count));
      std::vector<float> added(static_cast<size_t>(range.count));
      for (size_t i = 0; i < added.size(); ++i) added[i] = static_cast<float>(i % 7) - 3.0f;
      detail::normal_fill(path, written.data(), range.count, range.first, key, stream, scale,
                          false);
      detail::normal_fill(path, added.data(), range.count, range.first, key, stream, scale, true);
      double worst = 0;
      for (size_t i = 0; i < written.size(); ++i) {
        const double z = reference(range.first + i);
        worst = std::max(worst, std::fabs(written[i] - z) / (1 + std::fabs(z)));
        const double base = static_cast<double>(i % 7) - 3.0;
        worst = std::max(worst, std::fabs(added[i] - (base + z)) / (1 + std::fabs(base + z)));
      }
      EXPECT_LE(worst, 1e-6) << "path " << static_cast<int>(path) << ", first " << range.first;
    }
  }
  EXPECT_GE(paths_run, 1);
  EXPECT_EQ(detail::has_fill_path(detail::best_fill_path()), true);
}

// The float path's log over [2^-32, 1] (the radius' arguments) in 2^20 geometric steps, and its
// sin/cos over [0, 1) turns in 2^20 steps, against the C library in double. Bounds: log within
// 2 ulp of the float result; sin and cos within 2e-7 absolute (the reduction's product with
// π/2 rounds once).
TEST(PhiloxTest, FloatLogAndSinCosAreAccurate) {
  double worst_log_ulp = 0;
  for (int64_t i = 0; i <= (int64_t{1} << 20); ++i) {
    const auto x = static_cast<float>(std::exp2(-32.0 * static_cast<double>(i) / (1 << 20)));
    const double exact = std::log(static_cast<double>(x));
    const double ulp = std::max(
        static_cast<double>(std::nextafter(static_cast<float>(std::fabs(exact)), INFINITY)) -
            std::fabs(exact),
        1e-45);
    worst_log_ulp = std::max(worst_log_ulp, std::fabs(detail::log_poly(x) - exact) / ulp);
  }
  EXPECT_LE(worst_log_ulp, 2.0);
  double worst_trig = 0;
  for (int64_t i = 0; i < (int64_t{1} << 20); ++i) {
    const float u = static_cast<float>(i) / static_cast<float>(1 << 20);
    float s = 0, c = 0;
    detail::sincos_turns(u, &s, &c);
    const double angle = 2 * M_PI * static_cast<double>(u);
    worst_trig =
        std::max({worst_trig, std::fabs(s - std::sin(angle)), std::fabs(c - std::cos(angle))});
  }
  EXPECT_LE(worst_trig, 2e-7);
}

// Kolmogorov–Smirnov distance of 2^21 float draws (seed kSeed) from the standard normal CDF,
// against the α = 0.001 critical value 1.95/√n; the largest |z| reaches the float path's range
// (about 6.66) but not beyond.
TEST(PhiloxTest, FloatDrawsPassKolmogorovSmirnov) {
  PhiloxNoise noise(kSeed);
  const int64_t n = int64_t{1} << 21;
  auto z = std::get<0>(noise.gaussian({n}, 1.0, torch::TensorOptions().dtype(torch::kFloat32))
                           .to(torch::kFloat64)
                           .sort());
  auto cdf = 0.5 * torch::erfc(-z / std::sqrt(2.0));
  auto i = torch::arange(n, torch::kFloat64);
  const double d = torch::max((i + 1) / n - cdf, cdf - i / n).max().item<double>();
  EXPECT_LT(d, 1.95 / std::sqrt(static_cast<double>(n)));
  EXPECT_LE(z.abs().max().item<double>(), 6.7);
}

TEST(PhiloxTest, EveryDrawIsNewAndTheSeedDecides) {
  const auto options = torch::TensorOptions().dtype(torch::kFloat32);
  PhiloxNoise a(kSeed), b(kSeed), c(kSeed + 1);
  const auto a1 = a.gaussian({100}, 1.0, options), a2 = a.gaussian({100}, 1.0, options);
  EXPECT_TRUE(torch::equal(a1, b.gaussian({100}, 1.0, options)));
  EXPECT_FALSE(torch::equal(a1, a2));
  EXPECT_FALSE(torch::equal(a1, c.gaussian({100}, 1.0, options)));
  EXPECT_EQ(a.draws(), 2U);
}

// Entry j depends on j alone: the same tensor for any thread count, and a prefix of a longer
// draw equals the shorter draw.
TEST(PhiloxTest, IndependentOfThreadsAndOfTheLength) {
  for (const auto dtype : {torch::kFloat32, torch::kFloat64}) {
    const auto options = torch::TensorOptions().dtype(dtype);
    const int threads = torch::get_num_threads();
    torch::set_num_threads(1);
    const auto one = PhiloxNoise(kSeed).gaussian({300001}, 1.0, options);
    torch::set_num_threads(std::max(2, threads));
    const auto many = PhiloxNoise(kSeed).gaussian({300001}, 1.0, options);
    torch::set_num_threads(threads);
    EXPECT_TRUE(torch::equal(one, many)) << dtype;
    EXPECT_TRUE(torch::equal(PhiloxNoise(kSeed).gaussian({77}, 1.0, options), one.narrow(0, 0, 77)))
        << dtype;
  }
}

TEST(PhiloxTest, AddGaussianAddsWhatGaussianWouldDraw) {
  for (const auto dtype : {torch::kFloat32, torch::kFloat64}) {
    const auto options = torch::TensorOptions().dtype(dtype);
    PhiloxNoise noise(kSeed);
    (void)noise.gaussian({5}, 1.0, options);  // not the first draw
    const std::string state = noise.state();
    auto target = torch::randn({1000, 37}, options);
    const auto before = target.clone();
    noise.add_gaussian_(target, 0.7);
    noise.set_state(state);
    EXPECT_TRUE(torch::allclose(target, before + noise.gaussian({1000, 37}, 0.7, options), 0, 0))
        << dtype;
    // A non-contiguous target takes the same draw.
    noise.set_state(state);
    auto strided = before.t().contiguous().t();
    noise.add_gaussian_(strided, 0.7);
    EXPECT_TRUE(torch::allclose(strided, target, 1e-6, 1e-6)) << dtype;
  }
}

// fill_gaussian_ writes exactly the draw gaussian() would return from the same state, and
// advances the stream by one draw; a non-contiguous target gets the same values.
TEST(PhiloxTest, FillGaussianWritesWhatGaussianWouldDraw) {
  for (const auto dtype : {torch::kFloat32, torch::kFloat64}) {
    const auto options = torch::TensorOptions().dtype(dtype);
    PhiloxNoise noise(kSeed);
    (void)noise.gaussian({5}, 1.0, options);
    const std::string state = noise.state();
    auto target = torch::randn({1000, 37}, options);
    noise.fill_gaussian_(target, 0.7);
    EXPECT_EQ(noise.draws(), 2u);
    noise.set_state(state);
    EXPECT_TRUE(torch::equal(target, noise.gaussian({1000, 37}, 0.7, options))) << dtype;
    noise.set_state(state);
    auto strided = torch::randn({37, 1000}, options).t();
    noise.fill_gaussian_(strided, 0.7);
    EXPECT_TRUE(torch::equal(strided, target)) << dtype;
  }
}

TEST(PhiloxTest, StateRoundTripsAndRefusesOtherStrings) {
  const auto options = torch::TensorOptions().dtype(torch::kFloat32);
  PhiloxNoise noise(kSeed);
  (void)noise.gaussian({3}, 1.0, options);
  const std::string state = noise.state();
  const auto next = noise.gaussian({50}, 1.0, options);
  PhiloxNoise other(7);
  other.set_state(state);
  EXPECT_TRUE(torch::equal(other.gaussian({50}, 1.0, options), next));
  EXPECT_THAT([&] { other.set_state(TorchNoise(kSeed).state()); },
              ThrowsMessage<c10::Error>(HasSubstr("PhiloxNoise state does not start with")));
  EXPECT_THAT([&] { other.set_state(state + "x"); },
              ThrowsMessage<c10::Error>(HasSubstr("bytes after its header instead of 16")));
  EXPECT_EQ(other.draws(), 2U);  // unchanged by the refused strings
  EXPECT_FALSE(SecureNoise().resumable());
  EXPECT_THAT([] { (void)SecureNoise().state(); },
              ThrowsMessage<c10::Error>(HasSubstr("cannot be saved")));
}

}  // namespace
}  // namespace dptorch::optim
