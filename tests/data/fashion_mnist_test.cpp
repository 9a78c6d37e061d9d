#include "dptorch/data/fashion_mnist.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "support/idx_files.h"
#include "support/temp_dir.h"

namespace dptorch::data {
namespace {

using ::testing::AllOf;
using testing::Bytes;
using ::testing::HasSubstr;
using testing::idx_header;
using testing::TempDir;
using ::testing::ThrowsMessage;
using testing::write_gz;
using testing::write_plain;

// Pixel (i, r, c) of the synthetic images: distinct per image, covering 0..255.
std::uint8_t pixel(int64_t i, int64_t r, int64_t c) {
  return static_cast<std::uint8_t>((i * 91 + r * 28 + c) % 256);
}

Bytes image_file(int64_t count, std::uint32_t rows = 28, std::uint32_t cols = 28) {
  Bytes out = idx_header(0x08, {static_cast<std::uint32_t>(count), rows, cols});
  for (int64_t i = 0; i < count; ++i) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t c = 0; c < cols; ++c) {
        out.push_back(pixel(i, r, c));
      }
    }
  }
  return out;
}

Bytes label_file(const std::vector<std::uint8_t>& labels) {
  Bytes out = idx_header(0x08, {static_cast<std::uint32_t>(labels.size())});
  out.insert(out.end(), labels.begin(), labels.end());
  return out;
}

const std::vector<std::uint8_t> kTrainLabels = {9, 0, 3};
const std::vector<std::uint8_t> kTestLabels = {1, 8};

// A directory with a complete synthetic Fashion-MNIST: 3 training and 2 test examples.
void write_synthetic(const TempDir& dir) {
  write_gz(dir.file("train-images-idx3-ubyte.gz"), image_file(3));
  write_gz(dir.file("train-labels-idx1-ubyte.gz"), label_file(kTrainLabels));
  write_gz(dir.file("t10k-images-idx3-ubyte.gz"), image_file(2));
  write_gz(dir.file("t10k-labels-idx1-ubyte.gz"), label_file(kTestLabels));
}

torch::Tensor expected_image(int64_t i) {
  torch::Tensor out = torch::empty({1, 28, 28}, torch::TensorOptions().dtype(torch::kFloat32));
  auto a = out.accessor<float, 3>();
  for (int64_t r = 0; r < 28; ++r) {
    for (int64_t c = 0; c < 28; ++c) {
      a[0][r][c] = static_cast<float>(pixel(i, r, c)) / 255.0f;
    }
  }
  return out;
}

std::vector<int64_t> to_vector(const torch::Tensor& tensor) {
  const torch::Tensor flat = tensor.to(torch::kInt64).contiguous();
  return std::vector<int64_t>(flat.data_ptr<int64_t>(), flat.data_ptr<int64_t>() + flat.numel());
}

// Largest absolute difference and where, on failure.
::testing::AssertionResult all_close(const torch::Tensor& got, const torch::Tensor& want,
                                     double atol) {
  if (got.sizes() != want.sizes()) {
    return ::testing::AssertionFailure() << "shape " << got.sizes() << " != " << want.sizes();
  }
  const torch::Tensor diff = (got.to(torch::kFloat64) - want.to(torch::kFloat64)).abs().flatten();
  if (diff.numel() == 0) {
    return ::testing::AssertionSuccess();
  }
  const int64_t where = diff.argmax().item<int64_t>();
  const double worst = diff[where].item<double>();
  if (worst > atol) {
    return ::testing::AssertionFailure() << "max |got - want| = " << worst << " at flat index "
                                         << where << " (atol " << atol << ")";
  }
  return ::testing::AssertionSuccess();
}

TEST(FashionMnistTest, LoadsSyntheticSplits) {
  TempDir dir;
  write_synthetic(dir);
  FashionMnist train(dir.path().string());
  FashionMnist test(dir.path().string(), FashionMnist::Mode::kTest);
  EXPECT_TRUE(train.is_train());
  EXPECT_FALSE(test.is_train());
  ASSERT_EQ(train.size(), torch::optional<size_t>(3));
  ASSERT_EQ(test.size(), torch::optional<size_t>(2));
  EXPECT_EQ(train.images().sizes(), (std::vector<int64_t>{3, 1, 28, 28}));
  EXPECT_EQ(train.images().scalar_type(), torch::kFloat32);
  EXPECT_EQ(train.labels().scalar_type(), torch::kInt64);
  for (int64_t i = 0; i < 3; ++i) {
    const auto example = train.get(static_cast<size_t>(i));
    EXPECT_TRUE(all_close(example.data, expected_image(i), 1e-7)) << "train image " << i;
    EXPECT_EQ(example.target.dim(), 0);
    EXPECT_EQ(example.target.item<int64_t>(), kTrainLabels[static_cast<size_t>(i)]);
  }
  EXPECT_EQ(test.get(1).target.item<int64_t>(), 8);
  EXPECT_TRUE(all_close(test.get(1).data, expected_image(1), 1e-7));
}

TEST(FashionMnistTest, ReadsUncompressedFilesWhenNoGzipIsPresent) {
  TempDir dir;
  write_plain(dir.file("t10k-images-idx3-ubyte"), image_file(2));
  write_plain(dir.file("t10k-labels-idx1-ubyte"), label_file(kTestLabels));
  FashionMnist test(dir.path().string(), FashionMnist::Mode::kTest);
  EXPECT_EQ(to_vector(test.labels()), (std::vector<int64_t>{1, 8}));
}

TEST(FashionMnistTest, GatherStacksExamplesAndHandlesEmptyIndices) {
  TempDir dir;
  write_synthetic(dir);
  const FashionMnist train(dir.path().string());
  const auto batch = train.gather(torch::tensor({2, 0, 2}, torch::kInt64));
  ASSERT_EQ(batch.data.sizes(), (std::vector<int64_t>{3, 1, 28, 28}));
  EXPECT_TRUE(all_close(batch.data[0], expected_image(2), 1e-7));
  EXPECT_TRUE(all_close(batch.data[1], expected_image(0), 1e-7));
  EXPECT_EQ(to_vector(batch.target), (std::vector<int64_t>{3, 9, 3}));
  const auto empty = train.gather(torch::empty({0}, torch::kInt64));
  EXPECT_EQ(empty.data.sizes(), (std::vector<int64_t>{0, 1, 28, 28}));
  EXPECT_EQ(empty.data.scalar_type(), torch::kFloat32);
  EXPECT_EQ(empty.target.sizes(), (std::vector<int64_t>{0}));
  EXPECT_EQ(empty.target.scalar_type(), torch::kInt64);
  EXPECT_THAT([&] { (void)train.gather(torch::zeros({2}, torch::kFloat32)); },
              ThrowsMessage<c10::Error>(HasSubstr("indices must be a 1-D integer tensor")));
}

TEST(FashionMnistTest, GetOutOfRangeIsAnIndexError) {
  TempDir dir;
  write_synthetic(dir);
  FashionMnist train(dir.path().string());
  EXPECT_THROW((void)train.get(3), c10::IndexError);
}

TEST(FashionMnistTest, MissingDirectorySaysWhichPackageProvidesIt) {
  const std::string root = "/nonexistent/fashion-mnist";
  EXPECT_THAT([&] { FashionMnist dataset(root); },
              ThrowsMessage<c10::Error>(AllOf(HasSubstr("directory '" + root + "' does not exist"),
                                              HasSubstr("apt-get install dataset-fashion-mnist"))));
}

// Each case damages one file of a complete synthetic directory and names a phrase of the error,
// which must also name the damaged file.
struct DamageCase {
  const char* name;
  const char* file;
  std::function<void(const std::string& path)> damage;
  const char* message;
};

class FashionMnistDamageTest : public ::testing::TestWithParam<DamageCase> {};

TEST_P(FashionMnistDamageTest, ErrorNamesTheFileAndTheProblem) {
  const DamageCase& c = GetParam();
  TempDir dir;
  write_synthetic(dir);
  const std::string path = dir.file(c.file);
  c.damage(path);
  EXPECT_THAT([&] { FashionMnist dataset(dir.path().string()); },
              ThrowsMessage<c10::Error>(AllOf(HasSubstr(path), HasSubstr(c.message))));
}

INSTANTIATE_TEST_SUITE_P(
    DamagedFiles, FashionMnistDamageTest,
    ::testing::Values(
        DamageCase{"MissingLabels", "train-labels-idx1-ubyte.gz",
                   [](const std::string& p) { std::filesystem::remove(p); },
                   "is missing (and so is the plain 'train-labels-idx1-ubyte'); `apt-get install "
                   "dataset-fashion-mnist`"},
        DamageCase{"MissingImages", "train-images-idx3-ubyte.gz",
                   [](const std::string& p) { std::filesystem::remove(p); }, "is missing"},
        DamageCase{"FewerLabelsThanImages", "train-labels-idx1-ubyte.gz",
                   [](const std::string& p) {
                     write_gz(p, label_file({1, 2}));
                   },
                   "holds 3 images but"},
        DamageCase{"ImagesAre27Wide", "train-images-idx3-ubyte.gz",
                   [](const std::string& p) { write_gz(p, image_file(3, 28, 27)); },
                   "is not a Fashion-MNIST image file: it holds [3, 28, 27]"},
        DamageCase{"LabelsAsImages", "train-labels-idx1-ubyte.gz",
                   [](const std::string& p) { write_gz(p, image_file(3)); },
                   "is not a Fashion-MNIST label file"},
        DamageCase{"LabelOutOfRange", "train-labels-idx1-ubyte.gz",
                   [](const std::string& p) {
                     write_gz(p, label_file({1, 10, 2}));
                   },
                   "holds label 10, but Fashion-MNIST labels are 0..9"},
        DamageCase{"TruncatedImages", "train-images-idx3-ubyte.gz",
                   [](const std::string& p) {
                     Bytes bytes = image_file(3);
                     bytes.resize(bytes.size() - 100);
                     write_gz(p, bytes);
                   },
                   "is truncated: its header declares 3x28x28 uint8 values (2352 bytes), but "
                   "only 2252"},
        DamageCase{"NotGzipNorIdx", "train-images-idx3-ubyte.gz",
                   [](const std::string& p) {
                     write_plain(p, {'<', 'h', 't', 'm', 'l', '>'});
                   },
                   "is not an IDX file"}),
    [](const ::testing::TestParamInfo<DamageCase>& info) { return std::string(info.param.name); });

// The real data set, from Debian's dataset-fashion-mnist package; skipped where not installed.
class FashionMnistRealTest : public ::testing::Test {
 protected:
  void SetUp() override {
    // scripts/setup.sh installs the package; its absence is a broken setup, not a skip.
    ASSERT_TRUE(std::filesystem::is_directory(FashionMnist::kDefaultRoot))
        << FashionMnist::kDefaultRoot << " is absent; apt-get install dataset-fashion-mnist";
  }
};

TEST_F(FashionMnistRealTest, SplitsHaveTheOfficialSizesAndBalancedClasses) {
  struct Split {
    FashionMnist::Mode mode;
    int64_t size;
  };
  for (const Split split : {Split{FashionMnist::Mode::kTrain, FashionMnist::kTrainSize},
                            Split{FashionMnist::Mode::kTest, FashionMnist::kTestSize}}) {
    FashionMnist dataset(FashionMnist::kDefaultRoot, split.mode);
    ASSERT_EQ(dataset.size(), torch::optional<size_t>(static_cast<size_t>(split.size)));
    EXPECT_EQ(dataset.images().sizes(), (std::vector<int64_t>{split.size, 1, 28, 28}));
    EXPECT_GE(dataset.images().min().item<float>(), 0.0f);
    EXPECT_LE(dataset.images().max().item<float>(), 1.0f);
    EXPECT_EQ(dataset.images().max().item<float>(), 1.0f);
    EXPECT_EQ(dataset.labels().min().item<int64_t>(), 0);
    EXPECT_EQ(dataset.labels().max().item<int64_t>(), 9);
    // Both official splits hold exactly size / 10 examples of each class.
    const torch::Tensor counts = torch::bincount(dataset.labels(), {}, FashionMnist::kNumClasses);
    EXPECT_TRUE(torch::equal(counts, torch::full({10}, split.size / 10, torch::kInt64))) << counts;
    const auto first = dataset.get(0);
    EXPECT_EQ(first.data.sizes(), (std::vector<int64_t>{1, 28, 28}));
    EXPECT_EQ(first.target.dim(), 0);
  }
}

}  // namespace
}  // namespace dptorch::data
