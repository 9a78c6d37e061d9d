#include <dptorch/grad_sample/embedding.h>

#include <torch/torch.h>

#include "cpu_kernels.h"
#include "grad_sample/rules_internal.h"

#include <algorithm>
#include <optional>
#include <vector>

namespace dptorch::grad_sample {

namespace detail {

torch::Tensor embedding_norm_sq_generic(const torch::Tensor& index, const torch::Tensor& sample,
                                        const torch::Tensor& g, int64_t batch_size,
                                        int64_t num_embeddings) {
  auto norms = torch::zeros({batch_size}, g.options());
  if (index.numel() == 0) return norms;
  // Lookups of the same row by the same sample add up before the norm is taken.
  // Sorting the keys and taking runs is faster than a hash-based unique and stays in the public
  // API of LibTorch 2.x.
  const auto sorted = (sample * num_embeddings + index).sort();
  const auto& order = std::get<1>(sorted);
  const auto runs = torch::unique_consecutive(std::get<0>(sorted), /*return_inverse=*/true);
  const auto& keys = std::get<0>(runs);
  const auto& run_of = std::get<1>(runs);
  auto summed = torch::zeros({keys.size(0), g.size(1)}, g.options())
                    .index_add_(0, run_of, g.index_select(0, order));
  return norms.index_add_(0, keys.div(num_embeddings, "floor"), summed.square().sum(1));
}

}  // namespace detail

namespace {

using detail::broadcast_weights;
using detail::cpu_kernel_dtype;
using detail::row_norm_sq;

// Gradient rows of an embedding rule, [N, dim] or [B, T, dim], as [N, dim] (a copy where the
// strides need one).
torch::Tensor rows_2d(const torch::Tensor& g) {
  return g.dim() == 3 ? g.reshape({-1, g.size(2)}) : g;
}

// The CPU loops' view of gradient rows [N, dim] or [B, T, dim] whose last dimension is
// contiguous (`g` is that tensor, kept alive by the caller).
template <typename T>
cpu::Rows<T> cpu_rows(const torch::Tensor& g) {
  if (g.dim() == 3) {
    return {g.data_ptr<T>(), g.size(0) * g.size(1),
            g.size(2),       std::max<int64_t>(1, g.size(1)),
            g.stride(0),     g.stride(1)};
  }
  return {g.data_ptr<T>(), g.size(0), g.size(1), 1, g.stride(0), 0};
}

// `g` with its last dimension contiguous, for cpu_rows.
torch::Tensor unit_inner_stride(const torch::Tensor& g) {
  return g.stride(-1) == 1 ? g : g.contiguous();
}

}  // namespace

torch::Tensor embedding_norm_sq(const torch::Tensor& index, const torch::Tensor& sample,
                                const torch::Tensor& g, int64_t batch_size,
                                int64_t num_embeddings) {
  if (!cpu_kernel_dtype(g) || index.scalar_type() != torch::kLong ||
      sample.scalar_type() != torch::kLong || (g.dim() != 2 && g.dim() != 3)) {
    return detail::embedding_norm_sq_generic(index, sample, rows_2d(g), batch_size, num_embeddings);
  }
  TORCH_CHECK(index.numel() == sample.numel() && index.numel() * g.size(-1) == g.numel(),
              "embedding_norm_sq: ", index.numel(), " lookups but gradient rows of shape ",
              g.sizes());
  auto norms = torch::empty({batch_size}, g.options());
  const auto idx = index.contiguous(), who = sample.contiguous(), rows = unit_inner_stride(g);
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "embedding_norm_sq", [&] {
    cpu::embedding_norm_sq(idx.data_ptr<int64_t>(), who.data_ptr<int64_t>(),
                           cpu_rows<scalar_t>(rows), batch_size, num_embeddings,
                           norms.data_ptr<scalar_t>());
  });
  return norms;
}

EmbeddingGrads::EmbeddingGrads(torch::Tensor index, torch::Tensor sample, torch::Tensor g,
                               int64_t batch_size, int64_t num_embeddings)
    : index_(std::move(index)),
      sample_(std::move(sample)),
      g_(std::move(g)),
      batch_size_(batch_size),
      num_embeddings_(num_embeddings) {}

std::vector<std::string> EmbeddingGrads::names() const { return {"weight"}; }

std::vector<torch::Tensor> EmbeddingGrads::norm_sq() {
  return {embedding_norm_sq(index_, sample_, g_, batch_size_, num_embeddings_)};
}

std::vector<torch::Tensor> EmbeddingGrads::weighted_sum(const std::vector<torch::Tensor>& w) {
  std::vector<torch::Tensor> out{torch::zeros({num_embeddings_, g_.size(-1)}, g_.options())};
  add_weighted_sum_to(w, out);
  return out;
}

void EmbeddingGrads::add_weighted_sum_to(const std::vector<torch::Tensor>& w,
                                         const std::vector<torch::Tensor>& out) {
  const auto& o = out.at(0);
  if (cpu_kernel_dtype(g_) && o.device().is_cpu() && o.scalar_type() == g_.scalar_type() &&
      o.is_contiguous() && o.dim() == 2 && o.size(0) == num_embeddings_ &&
      o.size(1) == g_.size(-1) && index_.scalar_type() == torch::kLong &&
      sample_.scalar_type() == torch::kLong) {
    // One pass: each lookup's row, scaled by its sample's weight, straight into the table.
    const auto wk = w.at(0).to(g_.scalar_type()).contiguous();
    TORCH_CHECK(wk.numel() == batch_size_, "EmbeddingGrads: expected ", batch_size_,
                " weights, got ", wk.numel());
    const auto idx = index_.contiguous(), who = sample_.contiguous(), rows = unit_inner_stride(g_);
    AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "embedding_add_weighted", [&] {
      cpu::embedding_add_weighted(idx.data_ptr<int64_t>(), who.data_ptr<int64_t>(),
                                  cpu_rows<scalar_t>(rows), wk.data_ptr<scalar_t>(), batch_size_,
                                  num_embeddings_, o.data_ptr<scalar_t>());
    });
    return;
  }
  auto rows = rows_2d(g_) * w.at(0).to(g_.scalar_type()).index_select(0, sample_).unsqueeze(1);
  out.at(0).index_add_(0, index_, rows);
}

std::vector<torch::Tensor> EmbeddingGrads::materialize() {
  const int64_t dim = g_.size(-1);
  auto samples = torch::zeros({batch_size_ * num_embeddings_, dim}, g_.options());
  samples.index_add_(0, sample_ * num_embeddings_ + index_, rows_2d(g_));
  return {samples.view({batch_size_, num_embeddings_, dim})};
}

}  // namespace dptorch::grad_sample
