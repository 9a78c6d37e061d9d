#include <dptorch/grad_sample/rules.h>

#include <torch/torch.h>

namespace dptorch::grad_sample {
namespace {

// ‖x_i‖² over every dimension but the first, without forming x².
torch::Tensor row_norm_sq(const torch::Tensor& x) {
  return at::linalg_vector_norm(x.flatten(1), 2, {1}).square();
}

// [B, T, G·c] -> [B·G, T, c]
torch::Tensor by_group(const torch::Tensor& x, int64_t groups) {
  const int64_t B = x.size(0), T = x.size(1), c = x.size(2) / groups;
  if (groups == 1) return x;
  return x.view({B, T, groups, c}).permute({0, 2, 1, 3}).reshape({B * groups, T, c});
}

// Per-sample weights w [B] broadcast over a [B, ...] tensor.
torch::Tensor broadcast_weights(const torch::Tensor& w, const torch::Tensor& like) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape[0] = w.size(0);
  return w.to(like.scalar_type()).view(shape);
}

}  // namespace

torch::Tensor ghost_norm_sq(const torch::Tensor& a, const torch::Tensor& g, int64_t groups) {
  const int64_t B = a.size(0), T = a.size(1);
  if (T == 1) {
    // ‖g aᵀ‖² = ‖a‖²‖g‖², per group.
    auto aa = a.view({B, groups, a.size(2) / groups}).square().sum(2);
    auto gg = g.view({B, groups, g.size(2) / groups}).square().sum(2);
    return (aa * gg).sum(1);
  }
  auto ag = by_group(a, groups), gg = by_group(g, groups);
  auto gram_a = torch::bmm(ag, ag.transpose(1, 2));  // [B·G, T, T]
  auto gram_g = torch::bmm(gg, gg.transpose(1, 2));
  return (gram_a * gram_g).view({B, groups * T * T}).sum(1);
}

torch::Tensor materialize(const torch::Tensor& a, const torch::Tensor& g, int64_t groups) {
  const int64_t B = a.size(0);
  auto ag = by_group(a, groups), gg = by_group(g, groups);
  auto samples = torch::bmm(gg.transpose(1, 2), ag);  // [B·G, p, d]
  return samples.view({B, groups * samples.size(1), samples.size(2)});
}

torch::Tensor weighted_sum(const torch::Tensor& a, const torch::Tensor& g, const torch::Tensor& w,
                           int64_t groups) {
  const int64_t rows = a.size(0) * a.size(1);
  const int64_t d = a.size(2) / groups, p = g.size(2) / groups;
  auto gw = g * broadcast_weights(w, g);
  if (groups == 1) return torch::mm(gw.reshape({rows, p}).t(), a.reshape({rows, d}));
  auto gw_g = gw.reshape({rows, groups, p}).permute({1, 2, 0});  // [G, p, rows]
  auto a_g = a.reshape({rows, groups, d}).transpose(0, 1);       // [G, rows, d]
  return torch::bmm(gw_g, a_g).reshape({groups * p, d});
}

bool materialize_is_cheaper(int64_t T, int64_t d, int64_t p) { return d * p <= T * (d + p); }

torch::Tensor unfold_patches(const torch::Tensor& input, at::IntArrayRef kernel,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  const int64_t D = static_cast<int64_t>(kernel.size());
  TORCH_CHECK(input.dim() == D + 2, "unfold_patches: expected a [B, C, ", D,
              " spatial dims] input, got shape ", input.sizes());
  torch::Tensor x = input;
  bool padded = false;
  std::vector<int64_t> pads;  // constant_pad_nd takes the last dimension first
  for (int64_t d = D - 1; d >= 0; --d) {
    pads.push_back(padding[d]);
    pads.push_back(padding[d]);
    padded = padded || padding[d] != 0;
  }
  if (padded) x = torch::constant_pad_nd(x, pads, 0);
  for (int64_t d = 0; d < D; ++d) x = x.unfold(2 + d, dilation[d] * (kernel[d] - 1) + 1, stride[d]);
  for (int64_t d = 0; d < D; ++d) {
    if (dilation[d] != 1) x = x.slice(2 + D + d, 0, c10::nullopt, dilation[d]);
  }
  // [B, C, L1..LD, k1..kD] -> [B, L1..LD, C, k1..kD]
  std::vector<int64_t> perm{0};
  for (int64_t d = 0; d < D; ++d) perm.push_back(2 + d);
  perm.push_back(1);
  for (int64_t d = 0; d < D; ++d) perm.push_back(2 + D + d);
  const int64_t B = input.size(0);
  int64_t T = 1, cols = input.size(1);
  for (int64_t d = 0; d < D; ++d) {
    T *= x.size(2 + d);
    cols *= kernel[d];
  }
  return x.permute(perm).reshape({B, T, cols});
}

torch::Tensor embedding_norm_sq(const torch::Tensor& index, const torch::Tensor& sample,
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

// ---------------------------------------------------------------------------------------------

LinearLikeGrads::LinearLikeGrads(torch::Tensor a, torch::Tensor g, int64_t groups,
                                 std::vector<int64_t> weight_shape, bool has_bias,
                                 NormMethod method)
    : a_(std::move(a)),
      g_(std::move(g)),
      groups_(groups),
      weight_shape_(std::move(weight_shape)),
      has_bias_(has_bias) {
  switch (method) {
    case NormMethod::kGhost: materialize_ = false; break;
    case NormMethod::kMaterialize: materialize_ = true; break;
    case NormMethod::kAuto:
      materialize_ = materialize_is_cheaper(a_.size(1), a_.size(2) / groups_, g_.size(2) / groups_);
      break;
  }
}

std::vector<std::string> LinearLikeGrads::names() const {
  std::vector<std::string> names;
  if (!weight_shape_.empty()) names.emplace_back("weight");
  if (has_bias_) names.emplace_back("bias");
  return names;
}

const torch::Tensor& LinearLikeGrads::weight_samples() {
  if (!weight_samples_.defined()) weight_samples_ = grad_sample::materialize(a_, g_, groups_);
  return weight_samples_;
}

const torch::Tensor& LinearLikeGrads::bias_samples() {
  if (!bias_samples_.defined()) bias_samples_ = g_.sum(1);
  return bias_samples_;
}

std::vector<torch::Tensor> LinearLikeGrads::norm_sq() {
  std::vector<torch::Tensor> out;
  if (!weight_shape_.empty()) {
    out.push_back(materialize_ ? row_norm_sq(weight_samples()) : ghost_norm_sq(a_, g_, groups_));
  }
  if (has_bias_) out.push_back(bias_samples().square().sum(1));
  return out;
}

std::vector<torch::Tensor> LinearLikeGrads::weighted_sum(const std::vector<torch::Tensor>& w) {
  std::vector<torch::Tensor> out;
  size_t k = 0;
  if (!weight_shape_.empty()) {
    const auto& wk = w.at(k++);
    // Once G_i exists, Σ w_i G_i is a matrix-vector product; otherwise one matmul over B·T rows.
    auto sum = weight_samples_.defined()
                   ? torch::mv(weight_samples_.flatten(1).t(), wk.to(a_.scalar_type()))
                   : grad_sample::weighted_sum(a_, g_, wk, groups_);
    out.push_back(sum.view(weight_shape_));
  }
  if (has_bias_) out.push_back(torch::mv(bias_samples().t(), w.at(k).to(g_.scalar_type())));
  return out;
}

std::vector<torch::Tensor> LinearLikeGrads::materialize() {
  std::vector<torch::Tensor> out;
  if (!weight_shape_.empty()) {
    std::vector<int64_t> shape{a_.size(0)};
    shape.insert(shape.end(), weight_shape_.begin(), weight_shape_.end());
    out.push_back(weight_samples().view(shape));
  }
  if (has_bias_) out.push_back(bias_samples());
  return out;
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
  auto rows = g_ * w.at(0).to(g_.scalar_type()).index_select(0, sample_).unsqueeze(1);
  return {torch::zeros({num_embeddings_, g_.size(1)}, g_.options()).index_add_(0, index_, rows)};
}

std::vector<torch::Tensor> EmbeddingGrads::materialize() {
  auto samples = torch::zeros({batch_size_ * num_embeddings_, g_.size(1)}, g_.options());
  samples.index_add_(0, sample_ * num_embeddings_ + index_, g_);
  return {samples.view({batch_size_, num_embeddings_, g_.size(1)})};
}

MaterializedGrads::MaterializedGrads(std::vector<std::string> names,
                                     std::vector<torch::Tensor> samples)
    : names_(std::move(names)), samples_(std::move(samples)) {}

std::vector<torch::Tensor> MaterializedGrads::norm_sq() {
  std::vector<torch::Tensor> out;
  for (const auto& s : samples_) out.push_back(row_norm_sq(s));
  return out;
}

std::vector<torch::Tensor> MaterializedGrads::weighted_sum(const std::vector<torch::Tensor>& w) {
  std::vector<torch::Tensor> out;
  for (size_t k = 0; k < samples_.size(); ++k) {
    const auto& s = samples_[k];
    out.push_back(
        torch::mv(s.flatten(1).t(), w.at(k).to(s.scalar_type())).view(s.sizes().slice(1)));
  }
  return out;
}

}  // namespace dptorch::grad_sample
