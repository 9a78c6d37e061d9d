#pragma once

#include <torch/data/datasets/base.h>
#include <torch/data/example.h>
#include <torch/types.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace dptorch::data {

/// Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 28x28 grey-scale images of clothing in 10
/// classes, 60000 for training and 10000 for testing, read from its gzip IDX files.
///
/// The whole split is loaded into memory at construction. Images are float in [0, 1], shaped
/// [1, 28, 28] per example; labels are int64 scalars in 0..9.
/// Example:
///   dptorch::data::FashionMnist train;  // Debian's dataset-fashion-mnist, training split
///   auto example = train.get(0);        // example.data: [1, 28, 28], example.target: 9
class FashionMnist : public torch::data::datasets::Dataset<FashionMnist> {
 public:
  /// Which split of the data set to load.
  enum class Mode { kTrain, kTest };

  /// Where Debian's dataset-fashion-mnist package installs the files.
  static constexpr const char* kDefaultRoot = "/usr/share/datasets/fashion-mnist";
  /// Number of classes; labels are 0..kNumClasses-1.
  static constexpr int64_t kNumClasses = 10;
  /// Height and width of an image.
  static constexpr int64_t kImageSize = 28;
  /// Number of examples in the official training split.
  static constexpr int64_t kTrainSize = 60000;
  /// Number of examples in the official test split.
  static constexpr int64_t kTestSize = 10000;
  /// Names of the classes, indexed by label.
  static constexpr std::array<std::string_view, 10> kClassNames = {
      "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
      "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};

  /// Loads the split `mode` from `root`, which holds {train,t10k}-{images-idx3,labels-idx1}-ubyte
  /// files, gzip-compressed (.gz) or plain. Errors name the missing or malformed file.
  explicit FashionMnist(const std::string& root = kDefaultRoot, Mode mode = Mode::kTrain);

  /// The example at `index`: image [1, 28, 28] float in [0, 1], label int64 scalar.
  torch::data::Example<> get(size_t index) override;

  /// Number of examples in the split.
  torch::optional<size_t> size() const override;

  /// The examples at `indices` (1-D, integer), stacked: images [B, 1, 28, 28], labels [B]; an
  /// empty `indices` gives [0, 1, 28, 28] and [0].
  [[nodiscard]] torch::data::Example<> gather(const torch::Tensor& indices) const;

  /// All images of the split, [N, 1, 28, 28] float in [0, 1], on the CPU.
  [[nodiscard]] const torch::Tensor& images() const noexcept { return images_; }

  /// All labels of the split, [N] int64 in 0..9, on the CPU.
  [[nodiscard]] const torch::Tensor& labels() const noexcept { return labels_; }

  /// Whether this is the training split.
  [[nodiscard]] bool is_train() const noexcept { return mode_ == Mode::kTrain; }

 private:
  Mode mode_;
  torch::Tensor images_;
  torch::Tensor labels_;
};

}  // namespace dptorch::data
