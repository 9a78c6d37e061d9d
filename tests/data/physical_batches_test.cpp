#include "dptorch/data/physical_batches.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <vector>

namespace dptorch::data {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

// A logical batch of `rows` rows: data [rows, 2] = (i, -i), target [rows] = i.
torch::data::Example<> logical_batch(int64_t rows) {
  const torch::Tensor i = torch::arange(rows, torch::TensorOptions().dtype(torch::kFloat32));
  return {torch::stack({i, -i}, 1),
          torch::arange(rows, torch::TensorOptions().dtype(torch::kInt64))};
}

struct SplitCase {
  int64_t rows;
  int64_t max_size;
  std::vector<int64_t> chunk_rows;
};

class PhysicalBatchesSplitTest : public ::testing::TestWithParam<SplitCase> {};

TEST_P(PhysicalBatchesSplitTest, SplitsInOrderAndMarksTheLastChunk) {
  const SplitCase& c = GetParam();
  const auto logical = logical_batch(c.rows);
  const auto chunks = physical_batches(logical, c.max_size);
  ASSERT_EQ(chunks.size(), c.chunk_rows.size());
  std::vector<torch::Tensor> data;
  std::vector<torch::Tensor> targets;
  for (size_t k = 0; k < chunks.size(); ++k) {
    EXPECT_EQ(chunks[k].index, static_cast<int64_t>(k));
    EXPECT_EQ(chunks[k].is_last, k + 1 == chunks.size());
    EXPECT_EQ(chunks[k].data.sizes(), (std::vector<int64_t>{c.chunk_rows[k], 2}));
    EXPECT_EQ(chunks[k].target.sizes(), (std::vector<int64_t>{c.chunk_rows[k]}));
    EXPECT_EQ(chunks[k].data.scalar_type(), torch::kFloat32);
    EXPECT_EQ(chunks[k].target.scalar_type(), torch::kInt64);
    data.push_back(chunks[k].data);
    targets.push_back(chunks[k].target);
  }
  EXPECT_TRUE(torch::equal(torch::cat(data), logical.data));
  EXPECT_TRUE(torch::equal(torch::cat(targets), logical.target));
}

INSTANTIATE_TEST_SUITE_P(Sizes, PhysicalBatchesSplitTest,
                         ::testing::Values(SplitCase{0, 4, {0}},  // empty: one empty chunk
                                           SplitCase{1, 4, {1}}, SplitCase{3, 4, {3}},
                                           SplitCase{4, 4, {4}}, SplitCase{8, 4, {4, 4}},
                                           SplitCase{9, 4, {4, 4, 1}},
                                           SplitCase{5, 1, {1, 1, 1, 1, 1}}));

TEST(PhysicalBatchesTest, ChunksAreViewsOfTheLogicalBatch) {
  const auto logical = logical_batch(6);
  const auto chunks = physical_batches(logical, 4);
  EXPECT_EQ(chunks[1].data.data_ptr<float>(), logical.data.data_ptr<float>() + 4 * 2);
}

TEST(PhysicalBatchesTest, RefusesBadArguments) {
  EXPECT_THAT(
      [] { (void)physical_batches(logical_batch(3), 0); },
      ThrowsMessage<c10::Error>(HasSubstr("max_physical_batch_size must be >= 1, but is 0")));
  const torch::data::Example<> misaligned{logical_batch(3).data, torch::zeros({2}, torch::kInt64)};
  EXPECT_THAT([&] { (void)physical_batches(misaligned, 2); },
              ThrowsMessage<c10::Error>(HasSubstr("data has 3 rows but its target has 2")));
  const torch::data::Example<> scalar{torch::zeros({}, torch::kFloat32),
                                      torch::zeros({}, torch::kInt64)};
  EXPECT_THAT([&] { (void)physical_batches(scalar, 2); },
              ThrowsMessage<c10::Error>(HasSubstr("needs its rows in dimension 0")));
}

}  // namespace
}  // namespace dptorch::data
