#include "dptorch/data/samplers.h"

#include <c10/util/Exception.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <set>
#include <vector>

namespace dptorch::data {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

constexpr uint64_t kSeed = 20240611;

TEST(PoissonSamplerTest, GoldenIndicesPinTheDocumentedDerivation) {
  // Computed independently from the derivation documented in samplers.h (a Python mt19937_64),
  // so a change of algorithm, which would break resumption of old checkpoints, is caught.
  const PoissonSampler sampler(20, 0.3, 7);
  EXPECT_THAT(sampler.indices(0), ElementsAre(2, 5, 6, 7, 8, 9, 11, 16, 17));
  EXPECT_THAT(sampler.indices(3), ElementsAre(4, 5, 9, 11, 15, 19));
}

TEST(PoissonSamplerTest, BatchDependsOnSeedAndStepAlone) {
  const PoissonSampler first(1000, 0.1, kSeed);
  const PoissonSampler second(1000, 0.1, kSeed);
  EXPECT_EQ(first.indices(5), second.indices(5));
  EXPECT_EQ(first.indices(5), first.indices(5));
  EXPECT_NE(first.indices(5), first.indices(6));
  EXPECT_NE(first.indices(5), PoissonSampler(1000, 0.1, kSeed + 1).indices(5));
}

TEST(PoissonSamplerTest, ResumedRunSeesTheBatchesOfTheUninterruptedRun) {
  const PoissonSampler uninterrupted(500, 0.05, kSeed);
  std::vector<std::vector<int64_t>> batches;
  for (int64_t step = 0; step < 40; ++step) {
    batches.push_back(uninterrupted.indices(step));
  }
  const PoissonSampler resumed(500, 0.05, kSeed);  // a fresh object, as after a restart
  for (int64_t step = 25; step < 40; ++step) {
    EXPECT_EQ(resumed.indices(step), batches[static_cast<size_t>(step)]) << "step " << step;
  }
}

TEST(PoissonSamplerTest, IndicesAreAscendingAndInRange) {
  const PoissonSampler sampler(300, 0.5, kSeed);
  for (int64_t step = 0; step < 10; ++step) {
    const auto batch = sampler.indices(step);
    EXPECT_TRUE(std::is_sorted(batch.begin(), batch.end()));
    EXPECT_EQ(std::adjacent_find(batch.begin(), batch.end()), batch.end()) << "duplicate";
    for (const int64_t i : batch) {
      ASSERT_GE(i, 0);
      ASSERT_LT(i, 300);
    }
  }
}

TEST(PoissonSamplerTest, FullRateTakesEveryExample) {
  const PoissonSampler sampler(7, 1.0, kSeed);
  EXPECT_THAT(sampler.indices(0), ElementsAre(0, 1, 2, 3, 4, 5, 6));
  EXPECT_EQ(sampler.steps_per_epoch(), 1);
}

// Statistics of the sampler, seed kSeed. N = 1000 examples, q = 0.05, 4000 steps.
class PoissonSamplerStatisticsTest : public ::testing::Test {
 protected:
  static constexpr int64_t kN = 1000;
  static constexpr double kQ = 0.05;
  static constexpr int64_t kSteps = 4000;

  void SetUp() override {
    const PoissonSampler sampler(kN, kQ, kSeed);
    in_batch_.assign(kSteps, std::vector<bool>(kN, false));
    for (int64_t step = 0; step < kSteps; ++step) {
      for (const int64_t i : sampler.indices(step)) {
        in_batch_[static_cast<size_t>(step)][static_cast<size_t>(i)] = true;
      }
    }
  }

  std::vector<std::vector<bool>> in_batch_;
};

TEST_F(PoissonSamplerStatisticsTest, BatchSizeIsBinomial) {
  std::vector<double> sizes;
  for (const auto& batch : in_batch_) {
    sizes.push_back(static_cast<double>(std::count(batch.begin(), batch.end(), true)));
  }
  const double mean = std::accumulate(sizes.begin(), sizes.end(), 0.0) / kSteps;
  double var = 0;
  for (const double s : sizes) {
    var += (s - mean) * (s - mean);
  }
  var /= kSteps - 1;
  const double expected_var = kN * kQ * (1 - kQ);  // 47.5
  // Mean: 5 standard errors (sqrt(47.5 / 4000) = 0.109). Variance: 10% (about 4.5 standard
  // errors of a sample variance of 4000 draws).
  EXPECT_NEAR(mean, kN * kQ, 5 * std::sqrt(expected_var / kSteps));
  EXPECT_NEAR(var, expected_var, 0.1 * expected_var);
}

TEST_F(PoissonSamplerStatisticsTest, EveryExampleIsIncludedWithProbabilityQ) {
  // Pearson's statistic over the 1000 per-example counts, each Binomial(4000, 0.05): close to
  // chi-squared with 1000 degrees of freedom (mean 1000, sd 44.7); accept within 5 sd.
  const double expected = kSteps * kQ;
  double chi2 = 0;
  for (int64_t i = 0; i < kN; ++i) {
    int64_t count = 0;
    for (const auto& batch : in_batch_) {
      count += batch[static_cast<size_t>(i)];
    }
    chi2 += (count - expected) * (count - expected) / (expected * (1 - kQ));
  }
  EXPECT_NEAR(chi2, kN, 5 * std::sqrt(2.0 * kN));
}

TEST_F(PoissonSamplerStatisticsTest, ConsecutiveStepsAreIndependent) {
  // An example is in two consecutive batches with probability q^2: 0.0025 of 3999000 pairs,
  // 9997.5 expected, sd ~ 100; accept within 5%.
  int64_t both = 0;
  for (int64_t step = 0; step + 1 < kSteps; ++step) {
    for (int64_t i = 0; i < kN; ++i) {
      both += in_batch_[static_cast<size_t>(step)][static_cast<size_t>(i)] &&
              in_batch_[static_cast<size_t>(step + 1)][static_cast<size_t>(i)];
    }
  }
  const double expected = kQ * kQ * kN * (kSteps - 1);
  EXPECT_NEAR(static_cast<double>(both), expected, 0.05 * expected);
}

TEST(PoissonSamplerTest, EmptyBatchesAreNormal) {
  // N = 10, q = 0.01: a batch is empty with probability 0.99^10 = 0.904; 1000 steps give 904
  // empty ones in expectation, sd 9.3.
  const PoissonSampler sampler(10, 0.01, kSeed);
  int64_t empty = 0;
  for (int64_t step = 0; step < 1000; ++step) {
    empty += sampler.indices(step).empty();
  }
  EXPECT_NEAR(static_cast<double>(empty), 904.4, 50.0);
}

struct StepsPerEpochCase {
  double sample_rate;
  int64_t steps;
};

class PoissonStepsPerEpochTest : public ::testing::TestWithParam<StepsPerEpochCase> {};

TEST_P(PoissonStepsPerEpochTest, IsRoundedInverseRate) {
  const PoissonSampler sampler(60000, GetParam().sample_rate, kSeed);
  EXPECT_EQ(sampler.steps_per_epoch(), GetParam().steps);
}

INSTANTIATE_TEST_SUITE_P(Rates, PoissonStepsPerEpochTest,
                         ::testing::Values(StepsPerEpochCase{0.01, 100}, StepsPerEpochCase{0.3, 3},
                                           StepsPerEpochCase{0.4, 3}, StepsPerEpochCase{0.9, 1},
                                           StepsPerEpochCase{1.0, 1},
                                           StepsPerEpochCase{256.0 / 60000, 234}));

TEST(PoissonSamplerTest, ReportsWhatTheAccountantNeeds) {
  const PoissonSampler sampler(60000, 0.004, kSeed);
  EXPECT_DOUBLE_EQ(sampler.sample_rate(), 0.004);
  EXPECT_DOUBLE_EQ(sampler.expected_batch_size(), 240.0);
  EXPECT_EQ(sampler.dataset_size(), 60000);
  EXPECT_EQ(sampler.sampling(), Sampling::kPoisson);
  EXPECT_EQ(sampler.seed(), kSeed);
}

struct BadArgumentCase {
  const char* name;
  std::function<void()> make;
  const char* message;
};

class SamplerArgumentsTest : public ::testing::TestWithParam<BadArgumentCase> {};

TEST_P(SamplerArgumentsTest, AreRefusedWithTheirName) {
  EXPECT_THAT(GetParam().make, ThrowsMessage<c10::Error>(HasSubstr(GetParam().message)));
}

INSTANTIATE_TEST_SUITE_P(
    BadArguments, SamplerArgumentsTest,
    ::testing::Values(
        BadArgumentCase{"RateZero", [] { PoissonSampler(10, 0.0, 1); },
                        "sample_rate must be in (0, 1], but is 0"},
        BadArgumentCase{"RateAboveOne", [] { PoissonSampler(10, 1.5, 1); },
                        "sample_rate must be in (0, 1], but is 1.5"},
        BadArgumentCase{"RateNegative", [] { PoissonSampler(10, -0.1, 1); },
                        "sample_rate must be in (0, 1], but is -0.1"},
        BadArgumentCase{"RateNan",
                        [] { PoissonSampler(10, std::numeric_limits<double>::quiet_NaN(), 1); },
                        "sample_rate must be in (0, 1], but is nan"},
        BadArgumentCase{"EmptyDataset", [] { PoissonSampler(0, 0.5, 1); },
                        "dataset_size must be >= 1, but is 0"},
        BadArgumentCase{"NegativeStep", [] { (void)PoissonSampler(10, 0.5, 1).indices(-1); },
                        "step must be >= 0, but is -1"},
        BadArgumentCase{"ShuffledBatchTooLarge", [] { ShuffledSampler(10, 11, 1); },
                        "batch_size must be in [1, dataset_size = 10], but is 11"},
        BadArgumentCase{"ShuffledBatchZero", [] { ShuffledSampler(10, 0, 1); },
                        "batch_size must be in [1, dataset_size = 10], but is 0"},
        BadArgumentCase{"ShuffledEmptyDataset", [] { ShuffledSampler(-3, 1, 1); },
                        "dataset_size must be >= 1, but is -3"},
        BadArgumentCase{"ShuffledNegativeEpoch",
                        [] { (void)ShuffledSampler(10, 2, 1).permutation(-2); },
                        "epoch must be >= 0, but is -2"}),
    [](const ::testing::TestParamInfo<BadArgumentCase>& info) { return info.param.name; });

TEST(ShuffledSamplerTest, GoldenIndicesPinTheDocumentedDerivation) {
  // Computed independently from the derivation documented in samplers.h.
  const ShuffledSampler sampler(10, 4, 7);
  EXPECT_THAT(sampler.indices(0), ElementsAre(3, 0, 7, 2));
  EXPECT_THAT(sampler.indices(1), ElementsAre(1, 4, 8, 5));
  EXPECT_THAT(sampler.indices(2), ElementsAre(1, 6, 5, 2));  // epoch 1
}

TEST(ShuffledSamplerTest, EachEpochDrawsWithoutReplacement) {
  const ShuffledSampler sampler(10, 3, kSeed);
  ASSERT_EQ(sampler.steps_per_epoch(), 3);  // one example per epoch is left out
  for (int64_t epoch = 0; epoch < 4; ++epoch) {
    std::set<int64_t> seen;
    for (int64_t k = 0; k < 3; ++k) {
      const auto batch = sampler.indices(epoch * 3 + k);
      ASSERT_EQ(batch.size(), 3u);
      seen.insert(batch.begin(), batch.end());
    }
    EXPECT_EQ(seen.size(), 9u) << "epoch " << epoch << " repeated an example";
    EXPECT_LT(*seen.rbegin(), 10);
  }
  std::vector<int64_t> permutation = sampler.permutation(2);
  std::sort(permutation.begin(), permutation.end());
  std::vector<int64_t> identity(10);
  std::iota(identity.begin(), identity.end(), 0);
  EXPECT_EQ(permutation, identity);
}

TEST(ShuffledSamplerTest, EpochsAreReshuffledDeterministically) {
  const ShuffledSampler sampler(100, 10, kSeed);
  EXPECT_NE(sampler.permutation(0), sampler.permutation(1));
  const ShuffledSampler resumed(100, 10, kSeed);
  for (const int64_t step : {0, 9, 10, 37, 9}) {  // also out of order, across the cache
    EXPECT_EQ(resumed.indices(step), sampler.indices(step)) << "step " << step;
  }
  EXPECT_NE(ShuffledSampler(100, 10, kSeed + 1).permutation(0), sampler.permutation(0));
}

TEST(ShuffledSamplerTest, ShufflesUniformly) {
  // Where each of 5 examples lands over 20000 epochs: each (example, position) cell has
  // expectation 4000 and sd 56.6; accept within 5 sd.
  const ShuffledSampler sampler(5, 5, kSeed);
  std::vector<std::vector<int64_t>> counts(5, std::vector<int64_t>(5, 0));
  for (int64_t epoch = 0; epoch < 20000; ++epoch) {
    const auto permutation = sampler.permutation(epoch);
    for (size_t position = 0; position < 5; ++position) {
      ++counts[static_cast<size_t>(permutation[position])][position];
    }
  }
  for (size_t example = 0; example < 5; ++example) {
    for (size_t position = 0; position < 5; ++position) {
      EXPECT_NEAR(static_cast<double>(counts[example][position]), 4000.0, 283.0)
          << "example " << example << " at position " << position;
    }
  }
}

TEST(ShuffledSamplerTest, ReportsWhatTheAccountantNeeds) {
  const ShuffledSampler sampler(1000, 50, kSeed);
  EXPECT_EQ(sampler.steps_per_epoch(), 20);
  EXPECT_DOUBLE_EQ(sampler.sample_rate(), 0.05);
  EXPECT_DOUBLE_EQ(sampler.expected_batch_size(), 50.0);
  EXPECT_EQ(sampler.batch_size(), 50);
  EXPECT_EQ(sampler.sampling(), Sampling::kShuffled);
}

// ------------------------------------------------------------------ DistributedPoissonSampler

// The ranks' parts are disjoint, ascending, inside their shards, and together the one-process
// batch of the same seed, for world sizes that do and do not divide the data set.
TEST(DistributedPoissonSamplerTest, RanksTogetherDrawTheOneProcessBatch) {
  const int64_t n = 1003;
  const PoissonSampler whole(n, 0.05, kSeed);
  for (int64_t world : {1, 2, 3, 7}) {
    SCOPED_TRACE(world);
    std::vector<DistributedPoissonSampler> ranks;
    for (int64_t r = 0; r < world; ++r) ranks.emplace_back(n, 0.05, kSeed, r, world);
    EXPECT_EQ(ranks.front().shard_begin(), 0);
    EXPECT_EQ(ranks.back().shard_end(), n);
    for (int64_t r = 1; r < world; ++r) {
      EXPECT_EQ(ranks[r].shard_begin(), ranks[r - 1].shard_end());
    }
    for (int64_t step : {0, 1, 17, 500}) {
      std::vector<int64_t> joined;
      for (const auto& rank : ranks) {
        const auto part = rank.indices(step);
        EXPECT_TRUE(std::is_sorted(part.begin(), part.end()));
        for (auto i : part) {
          EXPECT_GE(i, rank.shard_begin());
          EXPECT_LT(i, rank.shard_end());
        }
        joined.insert(joined.end(), part.begin(), part.end());
      }
      EXPECT_EQ(joined, whole.indices(step)) << "step " << step;
    }
  }
}

// What the accountant and the optimiser see is the whole job's: q, q·N, N, 1/q steps per epoch.
TEST(DistributedPoissonSamplerTest, AccountingQuantitiesAreTheWholeJobs) {
  const DistributedPoissonSampler rank(60000, 256.0 / 60000, kSeed, 1, 2);
  EXPECT_DOUBLE_EQ(rank.sample_rate(), 256.0 / 60000);
  EXPECT_DOUBLE_EQ(rank.expected_batch_size(), 256.0);
  EXPECT_EQ(rank.dataset_size(), 60000);
  EXPECT_EQ(rank.steps_per_epoch(), 234);
  EXPECT_EQ(rank.sampling(), Sampling::kPoisson);
  EXPECT_EQ(rank.shard_begin(), 30000);
  EXPECT_EQ(rank.shard_end(), 60000);
}

// Each example of a rank's shard joins at rate q on its own: over 400 steps of a 500-example
// shard at q = 0.1 (seed kSeed), the mean part size is 50 ± 3 (its standard error is
// sqrt(500·0.1·0.9 / 400) = 0.34) and every example joins 40 ± 25 times (Binomial(400, 0.1) has
// standard deviation 6: ±4.2 of them, which all 500 examples pass but with probability 0.015 by
// chance). An empty part at a small rate is returned as such.
TEST(DistributedPoissonSamplerTest, EachRankSamplesItsShardAtRateQ) {
  const DistributedPoissonSampler rank(1000, 0.1, kSeed, 1, 2);
  std::vector<int64_t> joins(1000, 0);
  int64_t total = 0;
  for (int64_t step = 0; step < 400; ++step) {
    const auto part = rank.indices(step);
    total += static_cast<int64_t>(part.size());
    for (auto i : part) ++joins[i];
  }
  EXPECT_NEAR(static_cast<double>(total) / 400.0, 50.0, 3.0);
  for (int64_t i = 500; i < 1000; ++i) {
    EXPECT_GT(joins[i], 15) << i;
    EXPECT_LT(joins[i], 65) << i;
  }
  const DistributedPoissonSampler sparse(40, 0.01, kSeed, 0, 4);  // 10 examples at q = 0.01
  int64_t empty = 0;
  for (int64_t step = 0; step < 50; ++step) empty += sparse.indices(step).empty();
  EXPECT_GT(empty, 0);
}

TEST(DistributedPoissonSamplerTest, RefusesABadRankOrWorldSize) {
  EXPECT_THAT([] { DistributedPoissonSampler(100, 0.1, kSeed, 2, 2); },
              ThrowsMessage<c10::ValueError>(HasSubstr("rank must be in [0, world_size = 2)")));
  EXPECT_THAT([] { DistributedPoissonSampler(100, 0.1, kSeed, -1, 2); },
              ThrowsMessage<c10::ValueError>(HasSubstr("rank")));
  EXPECT_THAT([] { DistributedPoissonSampler(100, 0.1, kSeed, 0, 0); },
              ThrowsMessage<c10::ValueError>(HasSubstr("world_size must be at least 1")));
  const PoissonSampler whole(100, 0.1, kSeed);
  EXPECT_THAT([&] { (void)whole.indices(0, 50, 101); },
              ThrowsMessage<c10::ValueError>(HasSubstr("dataset_size = 100")));
}

}  // namespace
}  // namespace dptorch::data
