#pragma once

#include <cstdint>
#include <mutex>
#include <vector>

namespace dptorch::data {

/// How a sampler draws logical batches; the privacy accountant analyses the two differently.
enum class Sampling {
  /// Each example joins each batch independently with probability q (docs/design.md §4).
  kPoisson,
  /// Fixed-size batches drawn without replacement from a per-epoch shuffle.
  kShuffled,
};

/// Chooses the examples of each logical batch, as a pure function of the step, so that a run
/// resumed at step k sees exactly the batches of the uninterrupted run.
class BatchSampler {
 public:
  virtual ~BatchSampler() = default;

  /// Indices of the examples in logical batch `step` (>= 0), each in [0, dataset_size()).
  [[nodiscard]] virtual std::vector<int64_t> indices(int64_t step) const = 0;

  /// Number of logical batches that make one pass over the data set (in expectation for Poisson).
  [[nodiscard]] virtual int64_t steps_per_epoch() const = 0;

  /// Probability q that a given example is in a given batch, as the accountant needs it.
  [[nodiscard]] virtual double sample_rate() const = 0;

  /// Expected size of a logical batch; divide the noisy gradient sum by it, never by the actual
  /// size, which is private (docs/design.md §4).
  [[nodiscard]] virtual double expected_batch_size() const = 0;

  /// Number of examples sampled from.
  [[nodiscard]] virtual int64_t dataset_size() const = 0;

  /// Which sampling scheme this is, for accounting.
  [[nodiscard]] virtual Sampling sampling() const = 0;
};

/// Poisson sampling: each of the `dataset_size` examples joins logical batch `step`
/// independently with probability `sample_rate`, so batch sizes vary and empty batches are
/// normal. This is the sampling that the subsampled-Gaussian accountants assume (Abadi et al.
/// 2016; Mironov, Talwar & Zhang 2019).
///
/// Determinism: batch `step` is drawn by a std::mt19937_64 seeded with
/// splitmix64(splitmix64(splitmix64(seed) ^ stream) ^ step), `stream` being a constant per
/// sampler kind; it tests one 53-bit uniform u = (x >> 11) * 2^-53 per example in index order
/// (included iff u < q). Batches depend on (seed, step) alone, are identical on every platform
/// and standard library, and cost O(N) per step. The privacy analysis assumes the batches are
/// secret: draw the seed from a secure source (dptorch::optim::secure_seed()) and keep it with the
/// checkpoint, not in a log.
///
/// Example:
///   dptorch::data::PoissonSampler sampler(60000, 256.0 / 60000, seed);
///   for (int64_t step = 0; step < sampler.steps_per_epoch(); ++step) {
///     std::vector<int64_t> batch = sampler.indices(step);  // ascending, often ~256 long
///   }
class PoissonSampler final : public BatchSampler {
 public:
  /// Samples from `dataset_size` (>= 1) examples with probability `sample_rate` in (0, 1].
  PoissonSampler(int64_t dataset_size, double sample_rate, uint64_t seed);

  /// Ascending indices of the examples in logical batch `step`; possibly empty.
  [[nodiscard]] std::vector<int64_t> indices(int64_t step) const override;
  /// The indices of logical batch `step` within [begin, end) (0 <= begin <= end <=
  /// dataset_size): the same draw, restricted. Costs O(end).
  [[nodiscard]] std::vector<int64_t> indices(int64_t step, int64_t begin, int64_t end) const;

  /// round(1 / q), at least 1: the steps that see each example once in expectation.
  [[nodiscard]] int64_t steps_per_epoch() const override;

  /// The inclusion probability q.
  [[nodiscard]] double sample_rate() const override { return sample_rate_; }

  /// q * dataset_size.
  [[nodiscard]] double expected_batch_size() const override;

  /// Number of examples sampled from.
  [[nodiscard]] int64_t dataset_size() const override { return dataset_size_; }

  /// Sampling::kPoisson.
  [[nodiscard]] Sampling sampling() const override { return Sampling::kPoisson; }

  /// The seed that, with the step, determines every batch.
  [[nodiscard]] uint64_t seed() const noexcept { return seed_; }

 private:
  int64_t dataset_size_;
  double sample_rate_;
  uint64_t seed_;
};

/// Poisson sampling split over the ranks of a distributed job. Rank r of W owns the shard
/// [⌊r·N/W⌋, ⌊(r+1)·N/W⌋) of the data set (contiguous, disjoint, covering it) and takes the
/// examples of its shard that the whole data set's draw (PoissonSampler with the same seed)
/// includes. Each example still joins independently with probability q, so the union of the
/// ranks' parts is a Poisson sample of the whole at rate q, exactly the batch one process would
/// draw with that seed; the accountant sees that q. A rank's part may be empty, which is normal.
/// sample_rate(), expected_batch_size(), dataset_size() and steps_per_epoch() are the whole
/// job's: divide the summed noisy gradient by the job's expected batch size.
///
/// Every rank draws the whole data set's uniforms up to the end of its shard (O(N) per step, as
/// PoissonSampler) and so knows every rank's batch: the ranks of one job trust one another.
class DistributedPoissonSampler final : public BatchSampler {
 public:
  /// Rank `rank` in [0, world_size) of `world_size` (>= 1) ranks sampling `dataset_size`
  /// examples at rate `sample_rate`, every rank with the same `seed`.
  DistributedPoissonSampler(int64_t dataset_size, double sample_rate, uint64_t seed, int64_t rank,
                            int64_t world_size);

  /// Ascending (global) indices of this rank's examples in logical batch `step`; possibly empty.
  [[nodiscard]] std::vector<int64_t> indices(int64_t step) const override;
  [[nodiscard]] int64_t steps_per_epoch() const override { return whole_.steps_per_epoch(); }
  [[nodiscard]] double sample_rate() const override { return whole_.sample_rate(); }
  /// The whole job's q·N.
  [[nodiscard]] double expected_batch_size() const override { return whole_.expected_batch_size(); }
  [[nodiscard]] int64_t dataset_size() const override { return whole_.dataset_size(); }
  [[nodiscard]] Sampling sampling() const override { return Sampling::kPoisson; }

  [[nodiscard]] int64_t rank() const noexcept { return rank_; }
  [[nodiscard]] int64_t world_size() const noexcept { return world_size_; }
  /// This rank's shard, [shard_begin, shard_end).
  [[nodiscard]] int64_t shard_begin() const noexcept { return begin_; }
  [[nodiscard]] int64_t shard_end() const noexcept { return end_; }

 private:
  PoissonSampler whole_;
  int64_t rank_, world_size_, begin_, end_;
};

/// Fixed-size batches without replacement: each epoch is a fresh shuffle of the data set, cut
/// into dataset_size / batch_size batches of exactly `batch_size` (the remainder of the shuffle
/// is dropped so that every batch has the size the accountant assumes).
///
/// Determinism: epoch e's permutation is a Fisher-Yates shuffle of 0..N-1 (for i = N-1 down to
/// 1, swap i with j uniform in [0, i]) driven by a std::mt19937_64 seeded with
/// splitmix64(splitmix64(splitmix64(seed) ^ stream) ^ e); j = x mod (i+1), rejecting
/// x < 2^64 mod (i+1) so it is unbiased. It depends on (seed, epoch) alone and is identical on
/// every platform.
/// The permutation of the latest epoch is cached; indices() may be called from several threads.
class ShuffledSampler final : public BatchSampler {
 public:
  /// Samples batches of `batch_size` (in [1, dataset_size]) from `dataset_size` (>= 1) examples.
  ShuffledSampler(int64_t dataset_size, int64_t batch_size, uint64_t seed);

  /// The `batch_size` indices of logical batch `step`, in shuffled order.
  [[nodiscard]] std::vector<int64_t> indices(int64_t step) const override;

  /// dataset_size / batch_size, rounded down.
  [[nodiscard]] int64_t steps_per_epoch() const override;

  /// batch_size / dataset_size.
  [[nodiscard]] double sample_rate() const override;

  /// batch_size, exactly.
  [[nodiscard]] double expected_batch_size() const override;

  /// Number of examples sampled from.
  [[nodiscard]] int64_t dataset_size() const override { return dataset_size_; }

  /// Sampling::kShuffled.
  [[nodiscard]] Sampling sampling() const override { return Sampling::kShuffled; }

  /// The size of every batch.
  [[nodiscard]] int64_t batch_size() const noexcept { return batch_size_; }

  /// The seed that, with the epoch, determines every batch.
  [[nodiscard]] uint64_t seed() const noexcept { return seed_; }

  /// The permutation of the data set used in `epoch` (>= 0).
  [[nodiscard]] std::vector<int64_t> permutation(int64_t epoch) const;

 private:
  int64_t dataset_size_;
  int64_t batch_size_;
  uint64_t seed_;
  mutable std::mutex cache_mutex_;
  mutable int64_t cached_epoch_ = -1;
  mutable std::vector<int64_t> cached_permutation_;
};

}  // namespace dptorch::data
