#include <dptorch/nn/embedding.h>

#include <torch/torch.h>

#include "nn/layers_internal.h"

namespace dptorch::nn {

using grad_sample::PerSampleGrads;

EmbeddingImpl::EmbeddingImpl(const torch::nn::EmbeddingOptions& options_)
    : TwinLayer("dptorch::nn::Embedding", options_) {
  TORCH_CHECK_VALUE(!options.max_norm().has_value(),
                    "dptorch::nn::Embedding does not support max_norm (it rewrites the table "
                    "during forward); leave max_norm unset");
  TORCH_CHECK_VALUE(!options.scale_grad_by_freq(),
                    "dptorch::nn::Embedding does not support scale_grad_by_freq (it scales each "
                    "sample's gradient by counts over the whole batch); leave it false");
  reset();
}

void EmbeddingImpl::adopt() {
  options.padding_idx(twin().options.padding_idx());  // the twin normalises negative indices
  weight = adopt_parameter("weight", twin().weight);
}

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& input) {
  if (!recording({&weight})) return twin().forward(input);
  TORCH_CHECK(input.dim() >= 1, "dptorch::nn::Embedding needs a batch dimension to record ",
              "per-sample gradients, but got a scalar index");
  EmbeddingSaved saved{input, batch_dim(input.dim())};
  const int64_t B = input.size(saved.batch_dim);
  return record(
      input, {weight}, [&] { return twin().forward(input); }, nullptr, std::move(saved), B);
}

std::unique_ptr<PerSampleGrads> EmbeddingImpl::make_grads(std::vector<Call<EmbeddingSaved>> calls) {
  std::vector<torch::Tensor> index, sample, g;
  const int64_t B = calls.front().batch_size;
  for (const auto& c : calls) {
    auto idx = detail::to_brp(c.saved.input.unsqueeze(-1), c.saved.batch_dim, 1);  // [B, T, 1]
    const int64_t T = idx.size(1);
    // [B, T, dim] as recorded: an output gradient expanded over the positions (a mean after the
    // lookup) stays a view, which the rule reads without copying.
    auto rows = detail::to_brp(c.grad_outputs.at(0), c.saved.batch_dim, 1);
    if (calls.size() > 1 || options.padding_idx().has_value()) {
      rows = rows.reshape({B * T, weight.size(1)});
    }
    auto flat = idx.reshape({B * T});
    auto who = torch::arange(B, flat.options()).repeat_interleave(T);
    if (options.padding_idx().has_value()) {
      auto keep = (flat != *options.padding_idx()).nonzero().squeeze(1);
      flat = flat.index_select(0, keep);
      who = who.index_select(0, keep);
      rows = rows.index_select(0, keep);
    }
    index.push_back(flat);
    sample.push_back(who);
    g.push_back(rows);
  }
  return std::make_unique<grad_sample::EmbeddingGrads>(
      detail::cat_along(std::move(index), 0), detail::cat_along(std::move(sample), 0),
      detail::cat_along(std::move(g), 0), B, options.num_embeddings());
}

// ----------------------------------------------------------------------------------- EmbeddingBag

EmbeddingBagImpl::EmbeddingBagImpl(const torch::nn::EmbeddingBagOptions& options_)
    : TwinLayer("dptorch::nn::EmbeddingBag", options_) {
  TORCH_CHECK_VALUE(!c10::get_if<torch::enumtype::kMax>(&options.mode()),
                    "dptorch::nn::EmbeddingBag supports modes kSum and kMean, not kMax");
  TORCH_CHECK_VALUE(!options.max_norm().has_value(),
                    "dptorch::nn::EmbeddingBag does not support max_norm (it rewrites the table "
                    "during forward); leave max_norm unset");
  TORCH_CHECK_VALUE(!options.scale_grad_by_freq(),
                    "dptorch::nn::EmbeddingBag does not support scale_grad_by_freq (it scales "
                    "each sample's gradient by counts over the whole batch); leave it false");
  reset();
}

void EmbeddingBagImpl::adopt() {
  options.padding_idx(twin().options.padding_idx());
  weight = adopt_parameter("weight", twin().weight);
}

torch::Tensor EmbeddingBagImpl::forward(const torch::Tensor& input, const torch::Tensor& offsets,
                                        const torch::Tensor& per_sample_weights) {
  if (!recording({&weight})) return twin().forward(input, offsets, per_sample_weights);
  TORCH_CHECK(!per_sample_weights.defined() || !per_sample_weights.requires_grad(),
              "dptorch::nn::EmbeddingBag: per_sample_weights that require grad are not supported");
  auto output = [&] { return twin().forward(input, offsets, per_sample_weights); };
  // Which bag (sample) each lookup belongs to, and the factor its row enters the bag with.
  torch::Tensor index, sample;
  int64_t B = 0;
  const auto long_opts = input.options().dtype(torch::kLong);
  if (input.dim() == 2) {
    B = input.size(0);
    index = input.reshape({-1}).to(torch::kLong);
    sample = torch::arange(B, long_opts).repeat_interleave(input.size(1));
  } else {
    TORCH_CHECK(input.dim() == 1 && offsets.defined(),
                "dptorch::nn::EmbeddingBag takes a [B, L] input, or a 1-D input with offsets");
    index = input.to(torch::kLong);
    auto offs = offsets.to(torch::kLong);
    const int64_t n = input.numel();
    B = options.include_last_offset() ? offs.numel() - 1 : offs.numel();
    auto starts = offs.slice(0, 0, B);
    auto ends = options.include_last_offset()
                    ? offs.slice(0, 1, B + 1)
                    : torch::cat({offs.slice(0, 1), torch::full({1}, n, long_opts)});
    sample = torch::arange(B, long_opts).repeat_interleave(ends - starts);
  }
  auto factor = per_sample_weights.defined()
                    ? per_sample_weights.detach().reshape({-1}).to(weight.scalar_type())
                    : torch::ones({index.numel()}, weight.options().requires_grad(false));
  if (options.padding_idx().has_value()) {
    auto keep = (index != *options.padding_idx()).nonzero().squeeze(1);
    index = index.index_select(0, keep);
    sample = sample.index_select(0, keep);
    factor = factor.index_select(0, keep);
  }
  if (c10::get_if<torch::enumtype::kMean>(&options.mode())) {
    auto count =
        torch::zeros({B}, factor.options()).index_add_(0, sample, torch::ones_like(factor));
    factor = factor / count.index_select(0, sample);
  }
  return record(input, {weight}, output, nullptr, EmbeddingBagSaved{index, sample, factor}, B);
}

std::unique_ptr<PerSampleGrads> EmbeddingBagImpl::make_grads(
    std::vector<Call<EmbeddingBagSaved>> calls) {
  std::vector<torch::Tensor> index, sample, g;
  for (const auto& c : calls) {
    index.push_back(c.saved.index);
    sample.push_back(c.saved.sample);
    g.push_back(c.grad_outputs.at(0).index_select(0, c.saved.sample) * c.saved.factor.unsqueeze(1));
  }
  return std::make_unique<grad_sample::EmbeddingGrads>(
      detail::cat_along(std::move(index), 0), detail::cat_along(std::move(sample), 0),
      detail::cat_along(std::move(g), 0), calls.front().batch_size, options.num_embeddings());
}

}  // namespace dptorch::nn
