#include "dptorch/data/samplers.h"
#include <dptorch/common.h>

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <utility>

namespace dptorch::data {
namespace {

// Domain separation: the same seed gives unrelated streams to the two samplers.
constexpr uint64_t kPoissonStream = 0x506F6973736F6E31ULL;   // "Poisson1"
constexpr uint64_t kShuffledStream = 0x53687566666C6531ULL;  // "Shuffle1"

// SplitMix64's finaliser (Steele, Lea & Flood 2014): a bijective 64-bit mix.
uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

std::mt19937_64 make_engine(uint64_t seed, uint64_t stream, int64_t counter) {
  return std::mt19937_64(
      splitmix64(splitmix64(splitmix64(seed) ^ stream) ^ static_cast<uint64_t>(counter)));
}

// Uniform in [0, bound) without modulo bias: reject the lowest 2^64 mod bound values.
uint64_t uniform_below(std::mt19937_64& engine, uint64_t bound) {
  const uint64_t threshold = (0 - bound) % bound;
  while (true) {
    const uint64_t x = engine();
    if (x >= threshold) {
      return x % bound;
    }
  }
}

void check_dataset_size(int64_t dataset_size) {
  dptorch::detail::check_at_least("dataset_size", dataset_size, 1);
}

void check_step(const char* name, int64_t value) {
  dptorch::detail::check_at_least(name, value, 0);
}

}  // namespace

PoissonSampler::PoissonSampler(int64_t dataset_size, double sample_rate, uint64_t seed)
    : dataset_size_(dataset_size), sample_rate_(sample_rate), seed_(seed) {
  check_dataset_size(dataset_size);
  dptorch::detail::check_in_range("sample_rate", sample_rate, 0, 1,
                                  dptorch::detail::Bounds::kOpenClosed);
}

std::vector<int64_t> PoissonSampler::indices(int64_t step) const {
  return indices(step, 0, dataset_size_);
}

std::vector<int64_t> PoissonSampler::indices(int64_t step, int64_t begin, int64_t end) const {
  check_step("step", step);
  TORCH_CHECK_VALUE(0 <= begin && begin <= end && end <= dataset_size_,
                    "PoissonSampler: the range [", begin, ", ", end,
                    ") must lie within [0, dataset_size = ", dataset_size_, "]");
  std::mt19937_64 engine = make_engine(seed_, kPoissonStream, step);
  std::vector<int64_t> batch;
  const double expected = sample_rate_ * static_cast<double>(end - begin);
  batch.reserve(static_cast<size_t>(expected * 1.1 + 16));
  // One uniform per example in index order, so a range sees the whole draw's decisions.
  for (int64_t i = 0; i < end; ++i) {
    const double u = static_cast<double>(engine() >> 11) * 0x1.0p-53;
    if (u < sample_rate_ && i >= begin) {
      batch.push_back(i);
    }
  }
  return batch;
}

namespace {

// Rank r's shard of n examples over w ranks begins at floor(r * n / w), computed as
// r * (n / w) + floor(r * (n % w) / w) so that r * n cannot overflow.
int64_t shard_start(int64_t rank, int64_t world_size, int64_t n) {
  return rank * (n / world_size) + (rank * (n % world_size)) / world_size;
}

}  // namespace

DistributedPoissonSampler::DistributedPoissonSampler(int64_t dataset_size, double sample_rate,
                                                     uint64_t seed, int64_t rank,
                                                     int64_t world_size)
    : whole_(dataset_size, sample_rate, seed), rank_(rank), world_size_(world_size) {
  TORCH_CHECK_VALUE(world_size >= 1, "DistributedPoissonSampler: world_size must be at least 1, ",
                    "but is ", world_size);
  TORCH_CHECK_VALUE(rank >= 0 && rank < world_size, "DistributedPoissonSampler: rank must be in ",
                    "[0, world_size = ", world_size, "), but is ", rank);
  begin_ = shard_start(rank, world_size, dataset_size);
  end_ = shard_start(rank + 1, world_size, dataset_size);
}

std::vector<int64_t> DistributedPoissonSampler::indices(int64_t step) const {
  return whole_.indices(step, begin_, end_);
}

int64_t PoissonSampler::steps_per_epoch() const {
  return std::max<int64_t>(1, std::llround(1.0 / sample_rate_));
}

double PoissonSampler::expected_batch_size() const {
  return sample_rate_ * static_cast<double>(dataset_size_);
}

ShuffledSampler::ShuffledSampler(int64_t dataset_size, int64_t batch_size, uint64_t seed)
    : dataset_size_(dataset_size), batch_size_(batch_size), seed_(seed) {
  check_dataset_size(dataset_size);
  TORCH_CHECK_VALUE(batch_size >= 1 && batch_size <= dataset_size,
                    "batch_size must be in [1, dataset_size = ", dataset_size, "], but is ",
                    batch_size);
}

std::vector<int64_t> ShuffledSampler::permutation(int64_t epoch) const {
  check_step("epoch", epoch);
  std::mt19937_64 engine = make_engine(seed_, kShuffledStream, epoch);
  std::vector<int64_t> order(static_cast<size_t>(dataset_size_));
  for (int64_t i = 0; i < dataset_size_; ++i) {
    order[static_cast<size_t>(i)] = i;
  }
  for (int64_t i = dataset_size_ - 1; i > 0; --i) {
    const auto j = static_cast<int64_t>(uniform_below(engine, static_cast<uint64_t>(i) + 1));
    std::swap(order[static_cast<size_t>(i)], order[static_cast<size_t>(j)]);
  }
  return order;
}

std::vector<int64_t> ShuffledSampler::indices(int64_t step) const {
  check_step("step", step);
  const int64_t epoch = step / steps_per_epoch();
  const int64_t begin = (step % steps_per_epoch()) * batch_size_;
  std::lock_guard<std::mutex> lock(cache_mutex_);
  if (cached_epoch_ != epoch) {
    cached_permutation_ = permutation(epoch);
    cached_epoch_ = epoch;
  }
  const auto first = cached_permutation_.begin() + begin;
  return std::vector<int64_t>(first, first + batch_size_);
}

int64_t ShuffledSampler::steps_per_epoch() const { return dataset_size_ / batch_size_; }

double ShuffledSampler::sample_rate() const {
  return static_cast<double>(batch_size_) / static_cast<double>(dataset_size_);
}

double ShuffledSampler::expected_batch_size() const { return static_cast<double>(batch_size_); }

}  // namespace dptorch::data
