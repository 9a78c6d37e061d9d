#pragma once

// The small model and data set the engine tests train: a 6→8→3 MLP of dp layers and 200
// examples whose label is the largest of their first three features.

#include <dptorch/dptorch.h>

namespace dptorch::testing {

inline torch::nn::Sequential toy_mlp() {
  return torch::nn::Sequential(nn::Linear(6, 8), torch::nn::Tanh(), nn::Linear(8, 3),
                               torch::nn::LogSoftmax(1));
}

inline data::TensorPairDataset toy_data(int64_t n = 200) {
  torch::manual_seed(5);
  auto x = torch::randn({n, 6});
  return data::TensorPairDataset(x, x.slice(1, 0, 3).argmax(1));
}

}  // namespace dptorch::testing
