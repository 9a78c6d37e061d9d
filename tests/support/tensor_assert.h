#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <sstream>

namespace dptorch::testing {

/// Compares two tensors with a norm-wise relative tolerance: max|a − e| <= rtol · max(max|e|,
/// 1e-30). On failure it reports the largest absolute and relative error and where it is.
inline ::testing::AssertionResult tensors_close(const torch::Tensor& actual,
                                                const torch::Tensor& expected, double rtol) {
  if (!actual.defined() || !expected.defined()) {
    return ::testing::AssertionFailure() << "undefined tensor (actual defined: " << actual.defined()
                                         << ", expected defined: " << expected.defined() << ")";
  }
  if (actual.sizes() != expected.sizes()) {
    return ::testing::AssertionFailure()
           << "shape " << actual.sizes() << " != expected " << expected.sizes();
  }
  if (actual.numel() == 0) return ::testing::AssertionSuccess();
  auto a = actual.detach().to(torch::kDouble).cpu().flatten();
  auto e = expected.detach().to(torch::kDouble).cpu().flatten();
  auto diff = (a - e).abs();
  const double scale = std::max(e.abs().max().item<double>(), 1e-30);
  const int64_t where = diff.argmax().item<int64_t>();
  const double max_abs = diff[where].item<double>();
  if (std::isfinite(max_abs) && max_abs <= rtol * scale) return ::testing::AssertionSuccess();
  std::ostringstream at;
  auto idx = where;
  std::vector<int64_t> coord(actual.dim());
  for (int64_t d = actual.dim() - 1; d >= 0; --d) {
    coord[d] = idx % actual.size(d);
    idx /= actual.size(d);
  }
  at << c10::IntArrayRef(coord);
  return ::testing::AssertionFailure()
         << "largest abs error " << max_abs << " (relative to max|expected| " << max_abs / scale
         << ", tolerance " << rtol << ") at " << at.str() << ": actual " << a[where].item<double>()
         << ", expected " << e[where].item<double>() << ", shape " << actual.sizes();
}

}  // namespace dptorch::testing
