#pragma once

#include <torch/data/datasets/base.h>
#include <torch/data/example.h>
#include <torch/types.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <utility>
#include <vector>

#include "dptorch/data/samplers.h"

namespace dptorch::data {

/// Inputs and targets held as two tensors whose dimension 0 indexes the examples (like Python's
/// torch.utils.data.TensorDataset(x, y)); batches are gathered with one index_select each, on the
/// tensors' device.
class TensorPairDataset : public torch::data::datasets::Dataset<TensorPairDataset> {
 public:
  /// Pairs `data` [N, ...] with `targets` [N, ...]; both on the same device.
  TensorPairDataset(torch::Tensor data, torch::Tensor targets);

  /// Example `index`: data[index], targets[index].
  torch::data::Example<> get(size_t index) override;

  /// N.
  torch::optional<size_t> size() const override;

  /// The examples at `indices` (1-D, integer, any device), stacked: data [B, ...], targets
  /// [B, ...]; an empty `indices` gives [0, ...] tensors of the same dtype and trailing shape.
  [[nodiscard]] torch::data::Example<> gather(const torch::Tensor& indices) const;

  /// All inputs, [N, ...].
  [[nodiscard]] const torch::Tensor& data() const noexcept { return data_; }

  /// All targets, [N, ...].
  [[nodiscard]] const torch::Tensor& targets() const noexcept { return targets_; }

 private:
  torch::Tensor data_;
  torch::Tensor targets_;
};

namespace detail {

/// Whether `Dataset` has `Example<> gather(const torch::Tensor& indices) const`, a batched fast
/// path that PoissonDataLoader prefers over stacking get(i).
template <typename Dataset, typename = void>
struct HasGather : std::false_type {};

template <typename Dataset>
struct HasGather<Dataset, std::void_t<decltype(std::declval<const Dataset&>().gather(
                              std::declval<const torch::Tensor&>()))>>
    : std::is_convertible<decltype(std::declval<const Dataset&>().gather(
                              std::declval<const torch::Tensor&>())),
                          torch::data::Example<>> {};

/// An int64 tensor [n] holding `indices`, on the CPU.
[[nodiscard]] torch::Tensor index_tensor(const std::vector<int64_t>& indices);

/// The size of `dataset`, checked to be known.
[[nodiscard]] int64_t checked_dataset_size(const torch::optional<size_t>& size);

/// data and target of `example` with a leading dimension of size 0 prepended: the shape and
/// dtype of an empty batch of such examples.
[[nodiscard]] torch::data::Example<> empty_batch_like(const torch::data::Example<>& example);

/// `examples` stacked along a new dimension 0.
[[nodiscard]] torch::data::Example<> stack_examples(
    const std::vector<torch::data::Example<>>& examples);

}  // namespace detail

/// Yields logical batches drawn by a BatchSampler (Poisson by default) as stacked
/// torch::data::Example<>s, including EMPTY batches, shaped [0, ...] with the dtype and trailing
/// shape of a real example, which torch::data's DataLoader cannot return. Batch `step` is a pure
/// function of (sampler seed, step), so a run resumed with set_position(k) sees exactly the
/// batches of the uninterrupted run.
///
/// Works over any torch::data dataset whose get(i) returns Example<>; datasets that also have
/// `Example<> gather(const torch::Tensor& indices) const` (TensorPairDataset, FashionMnist) are
/// batched with it instead of one get() per example. Batches live where the dataset's tensors do.
/// Example:
///   dptorch::data::PoissonDataLoader loader(dptorch::data::FashionMnist(), 256.0 / 60000, seed);
///   loader.set_position(checkpoint_step);  // 0 for a fresh run
///   while (loader.position() < total_steps) {
///     torch::data::Example<> batch = loader.next();  // batch.data: [B, 1, 28, 28], B may be 0
///   }
template <typename Dataset = TensorPairDataset>
class PoissonDataLoader {
 public:
  /// Poisson sampling of `dataset` with probability `sample_rate`, deterministic in `seed`.
  PoissonDataLoader(Dataset dataset, double sample_rate, uint64_t seed)
      : dataset_(std::move(dataset)),
        sampler_(std::make_shared<PoissonSampler>(detail::checked_dataset_size(dataset_.size()),
                                                  sample_rate, seed)) {
    init();
  }

  /// Batches of `dataset` chosen by `sampler` (e.g. a ShuffledSampler), which must have been
  /// built for this dataset's size.
  PoissonDataLoader(Dataset dataset, std::shared_ptr<const BatchSampler> sampler)
      : dataset_(std::move(dataset)), sampler_(std::move(sampler)) {
    TORCH_CHECK_VALUE(sampler_ != nullptr, "sampler must not be null");
    const int64_t size = detail::checked_dataset_size(dataset_.size());
    TORCH_CHECK_VALUE(sampler_->dataset_size() == size, "sampler was built for dataset_size ",
                      sampler_->dataset_size(), ", but the dataset has ", size,
                      " examples; build the sampler with the dataset's size");
    init();
  }

  /// Poisson sampling of the examples (data[i], targets[i]) with probability `sample_rate`.
  template <typename D = Dataset, std::enable_if_t<std::is_same_v<D, TensorPairDataset>, int> = 0>
  PoissonDataLoader(torch::Tensor data, torch::Tensor targets, double sample_rate, uint64_t seed)
      : PoissonDataLoader(TensorPairDataset(std::move(data), std::move(targets)), sample_rate,
                          seed) {}

  /// Logical batch `step` (>= 0), stacked; does not move the position.
  [[nodiscard]] torch::data::Example<> batch(int64_t step) {
    const std::vector<int64_t> indices = sampler_->indices(step);
    if constexpr (detail::HasGather<Dataset>::value) {
      return dataset_.gather(detail::index_tensor(indices));
    } else {
      if (indices.empty()) {
        return {empty_.data.clone(), empty_.target.clone()};
      }
      std::vector<torch::data::Example<>> examples;
      examples.reserve(indices.size());
      for (const int64_t index : indices) {
        examples.push_back(dataset_.get(static_cast<size_t>(index)));
      }
      return detail::stack_examples(examples);
    }
  }

  /// The batch at position() and advances the position by one.
  [[nodiscard]] torch::data::Example<> next() {
    torch::data::Example<> result = batch(position_);
    ++position_;
    return result;
  }

  /// Step index of the batch that next() returns; save it with a checkpoint.
  [[nodiscard]] int64_t position() const noexcept { return position_; }

  /// Resumes at step `step` (>= 0): next() returns batch(step).
  void set_position(int64_t step) {
    TORCH_CHECK_VALUE(step >= 0, "step must be >= 0, but is ", step);
    position_ = step;
  }

  /// Batches per epoch, as the sampler defines it (round(1 / q) for Poisson).
  [[nodiscard]] int64_t steps_per_epoch() const { return sampler_->steps_per_epoch(); }

  /// Probability q that an example is in a batch, for the accountant.
  [[nodiscard]] double sample_rate() const { return sampler_->sample_rate(); }

  /// Expected logical batch size, the divisor of the noisy gradient sum.
  [[nodiscard]] double expected_batch_size() const { return sampler_->expected_batch_size(); }

  /// The sampler that chooses the batches.
  [[nodiscard]] const BatchSampler& sampler() const noexcept { return *sampler_; }

  /// The dataset batches are drawn from.
  [[nodiscard]] const Dataset& dataset() const noexcept { return dataset_; }

 private:
  void init() {
    if constexpr (!detail::HasGather<Dataset>::value) {
      // An empty batch still needs a shape and dtype; example 0 provides them.
      empty_ = detail::empty_batch_like(dataset_.get(0));
    }
  }

  Dataset dataset_;
  std::shared_ptr<const BatchSampler> sampler_;
  int64_t position_ = 0;
  torch::data::Example<> empty_;
};

/// Deduces PoissonDataLoader<TensorPairDataset> from two tensors.
PoissonDataLoader(torch::Tensor, torch::Tensor, double, uint64_t)
    ->PoissonDataLoader<TensorPairDataset>;

}  // namespace dptorch::data
