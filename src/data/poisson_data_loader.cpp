#include "dptorch/data/poisson_data_loader.h"

#include <algorithm>

namespace dptorch::data {

TensorPairDataset::TensorPairDataset(torch::Tensor data, torch::Tensor targets)
    : data_(std::move(data)), targets_(std::move(targets)) {
  TORCH_CHECK_VALUE(data_.defined() && targets_.defined(),
                    "TensorPairDataset needs defined data and targets tensors");
  TORCH_CHECK_VALUE(data_.dim() >= 1 && targets_.dim() >= 1,
                    "data and targets need dimension 0 to index the examples, but have shapes ",
                    data_.sizes(), " and ", targets_.sizes());
  TORCH_CHECK_VALUE(data_.size(0) == targets_.size(0), "data has ", data_.size(0),
                    " examples but targets has ", targets_.size(0),
                    "; dimension 0 of both must index the same examples");
  TORCH_CHECK_VALUE(data_.device() == targets_.device(), "data is on ", data_.device(),
                    " but targets is on ", targets_.device(), "; move both to one device");
}

torch::data::Example<> TensorPairDataset::get(size_t index) {
  TORCH_CHECK_INDEX(static_cast<int64_t>(index) < data_.size(0), "index ", index,
                    " is out of range for a TensorPairDataset of ", data_.size(0), " examples");
  const auto i = static_cast<int64_t>(index);
  return {data_[i], targets_[i]};
}

torch::optional<size_t> TensorPairDataset::size() const {
  return static_cast<size_t>(data_.size(0));
}

torch::data::Example<> TensorPairDataset::gather(const torch::Tensor& indices) const {
  TORCH_CHECK_VALUE(indices.dim() == 1 && !indices.is_floating_point() && !indices.is_complex(),
                    "indices must be a 1-D integer tensor, but has shape ", indices.sizes(),
                    " and dtype ", indices.scalar_type());
  const torch::Tensor index = indices.to(data_.device(), torch::kInt64);
  return {data_.index_select(0, index), targets_.index_select(0, index)};
}

namespace detail {

torch::Tensor index_tensor(const std::vector<int64_t>& indices) {
  torch::Tensor result =
      torch::empty({static_cast<int64_t>(indices.size())},
                   torch::TensorOptions().dtype(torch::kInt64).device(torch::kCPU));
  std::copy(indices.begin(), indices.end(), result.data_ptr<int64_t>());
  return result;
}

int64_t checked_dataset_size(const torch::optional<size_t>& size) {
  TORCH_CHECK_VALUE(size.has_value(),
                    "PoissonDataLoader needs a dataset whose size() is known, but it is nullopt");
  return static_cast<int64_t>(*size);
}

torch::data::Example<> empty_batch_like(const torch::data::Example<>& example) {
  const auto empty_like = [](const torch::Tensor& tensor) {
    std::vector<int64_t> shape{0};
    shape.insert(shape.end(), tensor.sizes().begin(), tensor.sizes().end());
    return torch::empty(shape, tensor.options());
  };
  return {empty_like(example.data), empty_like(example.target)};
}

torch::data::Example<> stack_examples(const std::vector<torch::data::Example<>>& examples) {
  std::vector<torch::Tensor> data;
  std::vector<torch::Tensor> targets;
  data.reserve(examples.size());
  targets.reserve(examples.size());
  for (const auto& example : examples) {
    data.push_back(example.data);
    targets.push_back(example.target);
  }
  return {torch::stack(data), torch::stack(targets)};
}

}  // namespace detail
}  // namespace dptorch::data
