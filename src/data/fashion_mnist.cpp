#include "dptorch/data/fashion_mnist.h"

#include <filesystem>
#include <sstream>

#include "dptorch/data/idx.h"

namespace dptorch::data {
namespace {

constexpr const char* kInstallHint =
    "`apt-get install dataset-fashion-mnist` provides the four files in "
    "/usr/share/datasets/fashion-mnist";

std::string describe(const torch::Tensor& tensor) {
  std::ostringstream out;
  out << tensor.sizes() << " " << tensor.scalar_type();
  return out.str();
}

// The .gz file if present, else the plain one (as torchvision leaves them after extraction).
std::string locate(const std::filesystem::path& root, const std::string& name) {
  const std::filesystem::path gz = root / (name + ".gz");
  const std::filesystem::path plain = root / name;
  if (std::filesystem::exists(gz)) {
    return gz.string();
  }
  TORCH_CHECK(std::filesystem::exists(plain), "Fashion-MNIST file '", gz.string(),
              "' is missing (and so is the plain '", name, "'); ", kInstallHint,
              ", or pass the directory that holds them");
  return plain.string();
}

}  // namespace

FashionMnist::FashionMnist(const std::string& root, Mode mode) : mode_(mode) {
  const std::filesystem::path dir(root);
  TORCH_CHECK(std::filesystem::is_directory(dir), "Fashion-MNIST directory '", root,
              "' does not exist; ", kInstallHint, ", or pass the directory that holds them");
  const std::string prefix = mode == Mode::kTrain ? "train" : "t10k";
  const std::string images_path = locate(dir, prefix + "-images-idx3-ubyte");
  const std::string labels_path = locate(dir, prefix + "-labels-idx1-ubyte");

  const torch::Tensor images = read_idx(images_path);
  TORCH_CHECK(images.scalar_type() == torch::kUInt8 && images.dim() == 3 &&
                  images.size(1) == kImageSize && images.size(2) == kImageSize,
              "'", images_path, "' is not a Fashion-MNIST image file: it holds ", describe(images),
              " values, but images are [N, 28, 28] uint8 (magic number 0x00000803)");
  const torch::Tensor labels = read_idx(labels_path);
  TORCH_CHECK(labels.scalar_type() == torch::kUInt8 && labels.dim() == 1, "'", labels_path,
              "' is not a Fashion-MNIST label file: it holds ", describe(labels),
              " values, but labels are [N] uint8 (magic number 0x00000801)");
  TORCH_CHECK(images.size(0) == labels.size(0), "'", images_path, "' holds ", images.size(0),
              " images but '", labels_path, "' holds ", labels.size(0),
              " labels; both files must come from the same, complete split");
  if (labels.numel() > 0) {
    const int64_t max_label = labels.max().item<int64_t>();
    TORCH_CHECK(max_label < kNumClasses, "'", labels_path, "' holds label ", max_label,
                ", but Fashion-MNIST labels are 0..", kNumClasses - 1, "; the file is corrupt");
  }
  images_ = images.to(torch::kFloat32).div_(255.0).unsqueeze(1);
  labels_ = labels.to(torch::kInt64);
}

torch::data::Example<> FashionMnist::get(size_t index) {
  TORCH_CHECK_INDEX(static_cast<int64_t>(index) < images_.size(0), "index ", index,
                    " is out of range for a Fashion-MNIST split of ", images_.size(0), " examples");
  const auto i = static_cast<int64_t>(index);
  return {images_[i], labels_[i]};
}

torch::optional<size_t> FashionMnist::size() const { return static_cast<size_t>(images_.size(0)); }

torch::data::Example<> FashionMnist::gather(const torch::Tensor& indices) const {
  TORCH_CHECK_VALUE(indices.dim() == 1 && !indices.is_floating_point() && !indices.is_complex(),
                    "indices must be a 1-D integer tensor, but is ", describe(indices));
  const torch::Tensor index = indices.to(images_.device(), torch::kInt64);
  return {images_.index_select(0, index), labels_.index_select(0, index)};
}

}  // namespace dptorch::data
