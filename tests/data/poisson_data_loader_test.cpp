#include "dptorch/data/poisson_data_loader.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "dptorch/data/samplers.h"

namespace dptorch::data {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

constexpr uint64_t kSeed = 1234;

// Equal shape, dtype and values, or a message saying which differs and where.
::testing::AssertionResult tensors_equal(const torch::Tensor& got, const torch::Tensor& want) {
  if (got.sizes() != want.sizes() || got.scalar_type() != want.scalar_type()) {
    return ::testing::AssertionFailure() << "got " << got.sizes() << " " << got.scalar_type()
                                         << ", want " << want.sizes() << " " << want.scalar_type();
  }
  if (got.numel() == 0 || torch::equal(got, want)) {
    return ::testing::AssertionSuccess();
  }
  const torch::Tensor diff = (got.to(torch::kFloat64) - want.to(torch::kFloat64)).abs().flatten();
  const int64_t where = diff.argmax().item<int64_t>();
  return ::testing::AssertionFailure()
         << "max |got - want| = " << diff[where].item<double>() << " at flat index " << where;
}

// N = 40 examples: inputs [40, 3] float whose row i is (i, 2i, 3i), targets [40] int64 = i % 7.
TensorPairDataset make_tensor_dataset(int64_t n = 40) {
  const torch::Tensor i = torch::arange(n, torch::TensorOptions().dtype(torch::kFloat32));
  return TensorPairDataset(torch::stack({i, 2 * i, 3 * i}, 1),
                           torch::arange(n, torch::TensorOptions().dtype(torch::kInt64)) % 7);
}

// The same examples, served one at a time with image-like data [1, 2, 2] and no gather(): the
// loader's generic path.
class OneByOneDataset : public torch::data::datasets::Dataset<OneByOneDataset> {
 public:
  explicit OneByOneDataset(int64_t n) : n_(n) {}
  torch::data::Example<> get(size_t index) override {
    ++gets_;
    const auto i = static_cast<double>(index);
    return {torch::full({1, 2, 2}, i, torch::TensorOptions().dtype(torch::kFloat64)),
            torch::tensor(static_cast<int64_t>(index) % 7, torch::kInt64)};
  }
  torch::optional<size_t> size() const override { return static_cast<size_t>(n_); }
  int64_t gets_ = 0;

 private:
  int64_t n_;
};

static_assert(detail::HasGather<TensorPairDataset>::value);
static_assert(!detail::HasGather<OneByOneDataset>::value);

TEST(PoissonDataLoaderTest, BatchHoldsTheSampledRowsOfTheTensors) {
  const TensorPairDataset dataset = make_tensor_dataset();
  PoissonDataLoader loader(dataset, 0.25, kSeed);
  const PoissonSampler sampler(40, 0.25, kSeed);
  for (int64_t step = 0; step < 5; ++step) {
    const auto indices = torch::tensor(sampler.indices(step), torch::kInt64);
    const auto batch = loader.batch(step);
    EXPECT_TRUE(tensors_equal(batch.data, dataset.data().index_select(0, indices)));
    EXPECT_TRUE(tensors_equal(batch.target, dataset.targets().index_select(0, indices)));
  }
}

TEST(PoissonDataLoaderTest, EmptyBatchHasTheShapeAndDtypeOfARealOne) {
  // q = 0.001 over 40 examples: most batches are empty (0.999^40 = 0.96).
  PoissonDataLoader loader(make_tensor_dataset(), 0.001, kSeed);
  const PoissonSampler sampler(40, 0.001, kSeed);
  int64_t step = 0;
  while (!sampler.indices(step).empty()) {
    ++step;
  }
  const auto batch = loader.batch(step);
  EXPECT_EQ(batch.data.sizes(), (std::vector<int64_t>{0, 3}));
  EXPECT_EQ(batch.data.scalar_type(), torch::kFloat32);
  EXPECT_EQ(batch.target.sizes(), (std::vector<int64_t>{0}));
  EXPECT_EQ(batch.target.scalar_type(), torch::kInt64);
}

TEST(PoissonDataLoaderTest, GenericDatasetStacksExamplesLikeTheTensorPath) {
  PoissonDataLoader generic(OneByOneDataset(40), 0.3, kSeed);
  const PoissonSampler sampler(40, 0.3, kSeed);
  bool saw_empty = false;
  for (int64_t step = 0; step < 8; ++step) {
    const std::vector<int64_t> indices = sampler.indices(step);
    const auto batch = generic.batch(step);
    const auto n = static_cast<int64_t>(indices.size());
    ASSERT_EQ(batch.data.sizes(), (std::vector<int64_t>{n, 1, 2, 2}));
    ASSERT_EQ(batch.target.sizes(), (std::vector<int64_t>{n}));
    EXPECT_EQ(batch.data.scalar_type(), torch::kFloat64);
    for (int64_t k = 0; k < n; ++k) {
      EXPECT_EQ(batch.data[k][0][1][1].item<double>(), static_cast<double>(indices[k]));
      EXPECT_EQ(batch.target[k].item<int64_t>(), indices[k] % 7);
    }
    saw_empty = saw_empty || n == 0;
  }
  // Example 0 told the loader what an empty batch looks like.
  PoissonDataLoader sparse(OneByOneDataset(3), 0.01, kSeed);
  const auto empty = sparse.batch(0);
  ASSERT_TRUE(PoissonSampler(3, 0.01, kSeed).indices(0).empty());
  EXPECT_EQ(empty.data.sizes(), (std::vector<int64_t>{0, 1, 2, 2}));
  EXPECT_EQ(empty.data.scalar_type(), torch::kFloat64);
  EXPECT_EQ(empty.target.sizes(), (std::vector<int64_t>{0}));
  EXPECT_EQ(empty.target.scalar_type(), torch::kInt64);
}

TEST(PoissonDataLoaderTest, NextAdvancesAndSetPositionResumes) {
  PoissonDataLoader uninterrupted(make_tensor_dataset(), 0.2, kSeed);
  std::vector<torch::data::Example<>> batches;
  for (int64_t step = 0; step < 12; ++step) {
    EXPECT_EQ(uninterrupted.position(), step);
    batches.push_back(uninterrupted.next());
  }
  EXPECT_EQ(uninterrupted.position(), 12);

  PoissonDataLoader resumed(make_tensor_dataset(), 0.2, kSeed);  // as after a restart
  resumed.set_position(7);
  for (int64_t step = 7; step < 12; ++step) {
    const auto batch = resumed.next();
    EXPECT_TRUE(tensors_equal(batch.data, batches[static_cast<size_t>(step)].data)) << step;
    EXPECT_TRUE(tensors_equal(batch.target, batches[static_cast<size_t>(step)].target)) << step;
  }
  EXPECT_THAT([&] { resumed.set_position(-1); },
              ThrowsMessage<c10::Error>(HasSubstr("step must be >= 0, but is -1")));
}

TEST(PoissonDataLoaderTest, BuildsFromTwoTensors) {
  const TensorPairDataset dataset = make_tensor_dataset();
  PoissonDataLoader loader(dataset.data(), dataset.targets(), 0.1, kSeed);
  static_assert(std::is_same_v<decltype(loader), PoissonDataLoader<TensorPairDataset>>);
  EXPECT_EQ(loader.steps_per_epoch(), 10);
  EXPECT_DOUBLE_EQ(loader.sample_rate(), 0.1);
  EXPECT_DOUBLE_EQ(loader.expected_batch_size(), 4.0);
  EXPECT_EQ(loader.sampler().sampling(), Sampling::kPoisson);
  EXPECT_EQ(loader.dataset().data().size(0), 40);
}

TEST(PoissonDataLoaderTest, AcceptsAShuffledSampler) {
  auto sampler = std::make_shared<ShuffledSampler>(40, 8, kSeed);
  PoissonDataLoader loader(make_tensor_dataset(), sampler);
  EXPECT_EQ(loader.steps_per_epoch(), 5);
  const auto batch = loader.next();
  EXPECT_EQ(batch.data.size(0), 8);
  const auto indices = torch::tensor(sampler->indices(0), torch::kInt64);
  EXPECT_TRUE(
      tensors_equal(batch.target, make_tensor_dataset().targets().index_select(0, indices)));
}

TEST(PoissonDataLoaderTest, RefusesASamplerOfAnotherSize) {
  EXPECT_THAT(
      [] {
        PoissonDataLoader loader(make_tensor_dataset(),
                                 std::make_shared<PoissonSampler>(41, 0.1, 1));
      },
      ThrowsMessage<c10::Error>(
          HasSubstr("sampler was built for dataset_size 41, but the dataset has 40 examples")));
  EXPECT_THAT([] { PoissonDataLoader loader(make_tensor_dataset(), nullptr); },
              ThrowsMessage<c10::Error>(HasSubstr("sampler must not be null")));
  EXPECT_THAT([] { PoissonDataLoader loader(make_tensor_dataset(), 2.0, 1); },
              ThrowsMessage<c10::Error>(HasSubstr("sample_rate must be in (0, 1], but is 2")));
}

TEST(TensorPairDatasetTest, RefusesMisalignedTensors) {
  const auto options = torch::TensorOptions().dtype(torch::kFloat32);
  EXPECT_THAT(
      [&] {
        TensorPairDataset(torch::zeros({5, 2}, options), torch::zeros({4}, options));
      },
      ThrowsMessage<c10::Error>(HasSubstr("data has 5 examples but targets has 4")));
  EXPECT_THAT([&] { TensorPairDataset(torch::zeros({}, options), torch::zeros({4}, options)); },
              ThrowsMessage<c10::Error>(HasSubstr("need dimension 0 to index the examples")));
}

TEST(TensorPairDatasetTest, GetAndGather) {
  TensorPairDataset dataset = make_tensor_dataset(10);
  const auto example = dataset.get(4);
  EXPECT_TRUE(tensors_equal(example.data, torch::tensor({4.0f, 8.0f, 12.0f})));
  EXPECT_EQ(example.target.item<int64_t>(), 4);
  EXPECT_THROW((void)dataset.get(10), c10::IndexError);
  const auto batch = dataset.gather(torch::tensor({9, 9, 0}, torch::kInt32));
  EXPECT_TRUE(tensors_equal(batch.target, torch::tensor({2, 2, 0}, torch::kInt64)));
  EXPECT_THAT(
      [&] {
        (void)dataset.gather(torch::zeros({1, 2}, torch::kInt64));
      },
      ThrowsMessage<c10::Error>(HasSubstr("indices must be a 1-D integer tensor")));
}

}  // namespace
}  // namespace dptorch::data
