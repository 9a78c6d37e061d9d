#include <dptorch/grad_sample/rules.h>

#include <torch/torch.h>

#include <ATen/Parallel.h>

#include "cpu_kernels.h"
#include "grad_sample/rules_internal.h"

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
  return x.reshape({B, T, groups, c}).permute({0, 2, 1, 3}).reshape({B * groups, T, c});
}

// Per-sample weights w [B] broadcast over a [B, ...] tensor.
torch::Tensor broadcast_weights(const torch::Tensor& w, const torch::Tensor& like) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape[0] = w.size(0);
  return w.to(like.scalar_type()).view(shape);
}

// bmm of [N, n, k] by [N, k, m]. On the CPU with several threads, the batch is split over the
// threads and each part multiplied by one thread: torch's own bmm runs its small products one
// after another, each split over the threads by the BLAS, which for the [T, T] and [p, d]
// products of the norms costs more in synchronisation than it gains.
torch::Tensor batched_matmul(const torch::Tensor& x, const torch::Tensor& y) {
  const int64_t n = x.size(0);
  if (!x.device().is_cpu() || at::get_num_threads() == 1 || n < 2 || at::in_parallel_region()) {
    return torch::bmm(x, y);
  }
  auto out = torch::empty({n, x.size(1), y.size(2)}, x.options());
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    auto part = out.narrow(0, begin, end - begin);
    at::bmm_out(part, x.narrow(0, begin, end - begin), y.narrow(0, begin, end - begin));
  });
  return out;
}

}  // namespace

torch::Tensor ghost_norm_sq(const torch::Tensor& a, const torch::Tensor& g, int64_t groups) {
  const int64_t B = a.size(0), T = a.size(1);
  if (T == 1) {
    // ‖g aᵀ‖² = ‖a‖²‖g‖², per group.
    auto aa = at::linalg_vector_norm(a.reshape({B, groups, a.size(2) / groups}), 2, {2});
    auto gg = at::linalg_vector_norm(g.reshape({B, groups, g.size(2) / groups}), 2, {2});
    return aa.mul_(gg).square_().sum(1);
  }
  auto ag = by_group(a, groups), gg = by_group(g, groups);
  auto gram_a = batched_matmul(ag, ag.transpose(1, 2));  // [B·G, T, T]
  auto gram_g = batched_matmul(gg, gg.transpose(1, 2));
  return gram_a.mul_(gram_g).view({B, groups * T * T}).sum(1);
}

torch::Tensor materialize(const torch::Tensor& a, const torch::Tensor& g, int64_t groups) {
  const int64_t B = a.size(0);
  auto ag = by_group(a, groups), gg = by_group(g, groups);
  auto samples = batched_matmul(gg.transpose(1, 2), ag);  // [B·G, p, d]
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

bool fused_conv_is_cheaper(int64_t T, int64_t d, int64_t p) { return d * p <= 2 * T * (d + p); }

namespace detail {

torch::Tensor unfold_patches_generic(const torch::Tensor& input, at::IntArrayRef kernel,
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
  // [B, C, L1..LD, k1..kD] -> [B, C, k1..kD, L1..LD] -> [B, C·k..., T], transposed as a view:
  // the copy's inner loop then runs along the output positions, which is faster than along the
  // short kernel rows, and bmm reads the transposed layout without another copy.
  std::vector<int64_t> perm{0, 1};
  for (int64_t d = 0; d < D; ++d) perm.push_back(2 + D + d);
  for (int64_t d = 0; d < D; ++d) perm.push_back(2 + d);
  const int64_t B = input.size(0);
  int64_t T = 1, cols = input.size(1);
  for (int64_t d = 0; d < D; ++d) {
    T *= x.size(2 + d);
    cols *= kernel[d];
  }
  return x.permute(perm).reshape({B, cols, T}).transpose(1, 2);
}

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

// Whether the CPU loops of cpu_kernels.h take a tensor: on the CPU, float or double.
bool cpu_kernel_dtype(const torch::Tensor& t) {
  return t.device().is_cpu() &&
         (t.scalar_type() == torch::kFloat || t.scalar_type() == torch::kDouble);
}

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

// The geometry of the CPU loops for a 1-D or 2-D convolution input [B, C, S...] on the CPU in
// float or double; nothing for anything else (the generic operators then take over).
std::optional<cpu::PatchGeometry> cpu_patch_geometry(const torch::Tensor& input,
                                                     at::IntArrayRef kernel, at::IntArrayRef stride,
                                                     at::IntArrayRef padding,
                                                     at::IntArrayRef dilation) {
  const auto D = static_cast<int64_t>(kernel.size());
  if (!cpu_kernel_dtype(input) || (D != 1 && D != 2) || input.dim() != D + 2) return std::nullopt;
  // A 1-D convolution is a 2-D one of height 1.
  auto hw = [&](at::IntArrayRef v, int64_t d, int64_t one) {
    return D == 1 ? (d == 0 ? one : v[0]) : v[d];
  };
  cpu::PatchGeometry geo{};
  geo.channels = input.size(1);
  geo.height = D == 1 ? 1 : input.size(2);
  geo.width = input.size(D + 1);
  geo.kernel_h = hw(kernel, 0, 1);
  geo.kernel_w = hw(kernel, 1, 1);
  geo.stride_h = hw(stride, 0, 1);
  geo.stride_w = hw(stride, 1, 1);
  geo.pad_h = hw(padding, 0, 0);
  geo.pad_w = hw(padding, 1, 0);
  geo.dilation_h = hw(dilation, 0, 1);
  geo.dilation_w = hw(dilation, 1, 1);
  auto positions = [](int64_t size, int64_t k, int64_t s, int64_t p, int64_t d) {
    return (size + 2 * p - d * (k - 1) - 1) / s + 1;
  };
  geo.out_h = positions(geo.height, geo.kernel_h, geo.stride_h, geo.pad_h, geo.dilation_h);
  geo.out_w = positions(geo.width, geo.kernel_w, geo.stride_w, geo.pad_w, geo.dilation_w);
  TORCH_CHECK(geo.out_h > 0 && geo.out_w > 0, "unfold_patches: the kernel ", kernel,
              " does not fit the padded input of shape ", input.sizes());
  return geo;
}

// ‖G_i‖² of a convolution's weight by cpu::conv_weight_norm_sq, or an undefined tensor where that
// loop does not apply (groups, device, dtype, number of spatial dimensions).
torch::Tensor fused_conv_norm_sq(const std::vector<torch::Tensor>& inputs,
                                 const std::vector<torch::Tensor>& grad_outputs,
                                 const torch::Tensor& weight, const ConvGeometry& geometry) {
  if (geometry.groups != 1) return {};
  std::vector<cpu::PatchGeometry> geos;
  std::vector<torch::Tensor> xs, gs;
  const int64_t p = weight.size(0);
  for (size_t r = 0; r < inputs.size(); ++r) {
    const auto geo = cpu_patch_geometry(inputs[r], geometry.kernel, geometry.stride,
                                        geometry.padding, geometry.dilation);
    if (!geo || inputs[r].scalar_type() != weight.scalar_type() ||
        grad_outputs[r].scalar_type() != weight.scalar_type() ||
        !grad_outputs[r].device().is_cpu()) {
      return {};
    }
    TORCH_CHECK(grad_outputs[r].numel() == inputs[r].size(0) * p * geo->out_h * geo->out_w,
                "ConvGrads: output gradient of shape ", grad_outputs[r].sizes(),
                " does not match the input ", inputs[r].sizes(), " and weight ", weight.sizes());
    geos.push_back(*geo);
    xs.push_back(inputs[r].contiguous());
    gs.push_back(grad_outputs[r].contiguous());
  }
  auto norms = torch::empty({inputs.front().size(0)}, weight.options().requires_grad(false));
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "conv_weight_norm_sq", [&] {
    std::vector<cpu::ConvRecord<scalar_t>> records;
    for (size_t r = 0; r < xs.size(); ++r) {
      records.push_back({xs[r].data_ptr<scalar_t>(), gs[r].data_ptr<scalar_t>(), geos[r]});
    }
    cpu::conv_weight_norm_sq(records, norms.size(0), p, norms.data_ptr<scalar_t>());
  });
  return norms;
}

}  // namespace

torch::Tensor unfold_patches(const torch::Tensor& input, at::IntArrayRef kernel,
                             at::IntArrayRef stride, at::IntArrayRef padding,
                             at::IntArrayRef dilation) {
  const auto geo = cpu_patch_geometry(input, kernel, stride, padding, dilation);
  if (!geo) return detail::unfold_patches_generic(input, kernel, stride, padding, dilation);
  const int64_t B = input.size(0), T = geo->out_h * geo->out_w;
  const int64_t cols = geo->channels * geo->kernel_h * geo->kernel_w;
  const auto x = input.contiguous();
  auto out = torch::empty({B, cols, T}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "unfold_patches", [&] {
    cpu::unfold_patches_2d(x.data_ptr<scalar_t>(), B, *geo, out.data_ptr<scalar_t>());
  });
  // [B, C·k..., T] transposed as a view, as the generic path returns it.
  return out.transpose(1, 2);
}

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

// ---------------------------------------------------------------------------------------------

void PerSampleGrads::add_weighted_sum_to(const std::vector<torch::Tensor>& w,
                                         const std::vector<torch::Tensor>& out) {
  const auto sums = weighted_sum(w);
  for (size_t k = 0; k < sums.size(); ++k) out.at(k).add_(sums[k].reshape(out.at(k).sizes()));
}

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
  // One position (a plain Linear): the rows of g themselves, not a copy.
  if (!bias_samples_.defined()) bias_samples_ = g_.size(1) == 1 ? g_.select(1, 0) : g_.sum(1);
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

void LinearLikeGrads::add_weighted_sum_to(const std::vector<torch::Tensor>& w,
                                          const std::vector<torch::Tensor>& out) {
  for (const auto& o : out) {
    if (!o.is_contiguous()) return PerSampleGrads::add_weighted_sum_to(w, out);
  }
  size_t k = 0;
  if (!weight_shape_.empty()) {
    const auto wk = w.at(k).to(a_.scalar_type());
    const auto& o = out.at(k++);
    if (weight_samples_.defined()) {
      o.view({-1}).addmv_(weight_samples_.flatten(1).t(), wk);
    } else if (groups_ == 1) {
      // The non-private weight gradient's matmul, with the rows of g scaled per sample, a few
      // samples at a time: the scaled copy of g stays near kSumChunkBytes.
      const int64_t B = a_.size(0), T = a_.size(1), d = a_.size(2), p = g_.size(2);
      const int64_t sample_bytes = std::max<int64_t>(1, T * p * g_.element_size());
      const int64_t chunk = std::max<int64_t>(1, kSumChunkBytes / sample_bytes);
      auto o2 = o.view({p, d});
      for (int64_t b = 0; b < B; b += chunk) {
        const int64_t n = std::min(chunk, B - b);
        const auto gc = g_.narrow(0, b, n);
        auto gw = gc * broadcast_weights(wk.narrow(0, b, n), gc);
        o2.addmm_(gw.reshape({n * T, p}).t(), a_.narrow(0, b, n).reshape({n * T, d}));
      }
    } else {
      o.add_(grad_sample::weighted_sum(a_, g_, wk, groups_).view(o.sizes()));
    }
  }
  if (has_bias_) out.at(k).addmv_(bias_samples().t(), w.at(k).to(g_.scalar_type()));
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

ConvGrads::ConvGrads(std::vector<torch::Tensor> inputs, std::vector<torch::Tensor> grad_outputs,
                     torch::Tensor weight, bool train_weight, bool has_bias, ConvGeometry geometry,
                     NormMethod method, int64_t chunk_bytes)
    : inputs_(std::move(inputs)),
      grad_outputs_(std::move(grad_outputs)),
      weight_(std::move(weight)),
      train_weight_(train_weight),
      has_bias_(has_bias),
      geometry_(std::move(geometry)),
      method_(method),
      chunk_bytes_(chunk_bytes) {
  TORCH_CHECK(!inputs_.empty() && inputs_.size() == grad_outputs_.size(),
              "ConvGrads needs one output gradient per recorded input, got ", inputs_.size(),
              " inputs and ", grad_outputs_.size(), " output gradients");
}

std::vector<std::string> ConvGrads::names() const {
  std::vector<std::string> names;
  if (train_weight_) names.emplace_back("weight");
  if (has_bias_) names.emplace_back("bias");
  return names;
}

LinearLikeGrads ConvGrads::chunk(int64_t begin, int64_t end, bool with_bias) const {
  std::vector<torch::Tensor> a, g;
  for (size_t r = 0; r < inputs_.size(); ++r) {
    a.push_back(unfold_patches(inputs_[r].slice(0, begin, end), geometry_.kernel, geometry_.stride,
                               geometry_.padding, geometry_.dilation));
    g.push_back(grad_outputs_[r].slice(0, begin, end).flatten(2).transpose(1, 2));
  }
  auto cat = [](std::vector<torch::Tensor>& parts) {
    return parts.size() == 1 ? parts.front() : torch::cat(parts, 1);
  };
  return {cat(a),           cat(g),
          geometry_.groups, train_weight_ ? weight_.sizes().vec() : std::vector<int64_t>{},
          with_bias,        method_};
}

int64_t ConvGrads::chunk_size() const {
  const int64_t B = inputs_.front().size(0), G = geometry_.groups;
  int64_t T = 0;
  for (const auto& g : grad_outputs_) T += g.numel() / std::max<int64_t>(1, g.size(0) * g.size(1));
  const int64_t p = weight_.size(0) / G, d = weight_.numel() / weight_.size(0);
  const bool mat = method_ == NormMethod::kMaterialize ||
                   (method_ == NormMethod::kAuto && materialize_is_cheaper(T, d, p));
  // Patches and output gradients, plus the per-sample gradients or the two Gram matrices.
  const int64_t per_sample = T * G * (d + p) + (mat ? G * p * d : 2 * G * T * T);
  const int64_t bytes = per_sample * static_cast<int64_t>(weight_.element_size());
  return std::clamp<int64_t>(chunk_bytes_ / std::max<int64_t>(1, bytes), 1,
                             std::max<int64_t>(1, B));
}

const torch::Tensor& ConvGrads::bias_samples() {
  if (!bias_samples_.defined()) {
    for (const auto& g : grad_outputs_) {
      auto b = g.flatten(2).sum(2);
      bias_samples_ = bias_samples_.defined() ? bias_samples_.add_(b) : b;
    }
  }
  return bias_samples_;
}

torch::Tensor ConvGrads::by_chunks(
    const std::function<torch::Tensor(LinearLikeGrads&)>& weight_result) const {
  const int64_t B = inputs_.front().size(0), step = chunk_size();
  std::vector<torch::Tensor> parts;
  for (int64_t b = 0; b < B; b += step) {
    auto rule = chunk(b, std::min(B, b + step), false);
    parts.push_back(weight_result(rule));
  }
  return parts.size() == 1 ? parts.front() : torch::cat(parts);
}

std::vector<torch::Tensor> ConvGrads::norm_sq() {
  std::vector<torch::Tensor> out;
  if (train_weight_) {
    const int64_t p = weight_.size(0), d = weight_.numel() / p;
    int64_t T = 0;
    for (const auto& g : grad_outputs_) T += g.numel() / std::max<int64_t>(1, g.size(0) * p);
    torch::Tensor fused;
    if (method_ == NormMethod::kMaterialize ||
        (method_ == NormMethod::kAuto && fused_conv_is_cheaper(T, d, p))) {
      fused = fused_conv_norm_sq(inputs_, grad_outputs_, weight_, geometry_);
    }
    out.push_back(
        fused.defined() ? fused : by_chunks([](LinearLikeGrads& g) { return g.norm_sq().at(0); }));
  }
  if (has_bias_) out.push_back(at::linalg_vector_norm(bias_samples(), 2, {1}).square());
  return out;
}

std::vector<torch::Tensor> ConvGrads::weighted_sum(const std::vector<torch::Tensor>& w) {
  std::vector<torch::Tensor> out;
  size_t k = 0;
  if (train_weight_) {
    const auto& wk = w.at(k++);
    const std::vector<int64_t> output_padding(geometry_.kernel.size(), 0);
    torch::Tensor sum;
    for (size_t r = 0; r < inputs_.size(); ++r) {
      const auto& g = grad_outputs_[r];
      auto part = std::get<1>(at::convolution_backward(
          g * broadcast_weights(wk, g), inputs_[r], weight_, c10::nullopt, geometry_.stride,
          geometry_.padding, geometry_.dilation, /*transposed=*/false, output_padding,
          geometry_.groups, {false, true, false}));
      sum = sum.defined() ? sum.add_(part) : part;
    }
    out.push_back(sum);
  }
  if (has_bias_) out.push_back(torch::mv(bias_samples().t(), w.at(k).to(weight_.scalar_type())));
  return out;
}

std::vector<torch::Tensor> ConvGrads::materialize() {
  std::vector<torch::Tensor> out;
  if (train_weight_) {
    out.push_back(by_chunks([](LinearLikeGrads& g) { return g.materialize().at(0); }));
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

MaterializedGrads::MaterializedGrads(std::vector<std::string> names,
                                     std::vector<torch::Tensor> samples)
    : names_(std::move(names)), samples_(std::move(samples)) {}

std::vector<torch::Tensor> MaterializedGrads::norm_sq() {
  std::vector<torch::Tensor> out;
  for (const auto& s : samples_) out.push_back(row_norm_sq(s));
  return out;
}

void MaterializedGrads::add_weighted_sum_to(const std::vector<torch::Tensor>& w,
                                            const std::vector<torch::Tensor>& out) {
  for (size_t k = 0; k < samples_.size(); ++k) {
    const auto& s = samples_[k];
    const auto& o = out.at(k);
    const auto wk = w.at(k).to(s.scalar_type());
    if (o.is_contiguous()) {
      o.view({-1}).addmv_(s.flatten(1).t(), wk);
    } else {
      o.add_(torch::mv(s.flatten(1).t(), wk).view(o.sizes()));
    }
  }
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
