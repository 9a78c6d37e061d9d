#include <dptorch/grad_sample/conv.h>

#include <torch/torch.h>

#include "cost_model.h"
#include "cpu_kernels.h"
#include "grad_sample/rules_internal.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace dptorch::grad_sample {

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

}  // namespace detail

namespace {

using detail::broadcast_weights;
using detail::cpu_kernel_dtype;
using detail::row_norm_sq;

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

// ‖G_i‖² of a convolution's weight by cpu::conv_weight_samples_tiled, and with `store` G_i too
// ([B, p, C·k...] in the weight's shape); undefined tensors where that loop does not apply
// (groups, device, dtype, number of spatial dimensions).
std::pair<torch::Tensor, torch::Tensor> tiled_conv_samples(
    const std::vector<torch::Tensor>& inputs, const std::vector<torch::Tensor>& grad_outputs,
    const torch::Tensor& weight, const ConvGeometry& geometry, bool store) {
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
  const int64_t B = inputs.front().size(0);
  const auto options = weight.options().requires_grad(false);
  auto norms = torch::empty({B}, options);
  torch::Tensor samples;
  if (store) {
    std::vector<int64_t> shape{B};
    for (int64_t i = 0; i < weight.dim(); ++i) shape.push_back(weight.size(i));
    samples = torch::empty(shape, options);
  }
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "conv_weight_samples_tiled", [&] {
    std::vector<cpu::ConvRecord<scalar_t>> records;
    for (size_t r = 0; r < xs.size(); ++r) {
      records.push_back({xs[r].data_ptr<scalar_t>(), gs[r].data_ptr<scalar_t>(), geos[r]});
    }
    cpu::conv_weight_samples_tiled(records, B, p, norms.data_ptr<scalar_t>(),
                                   store ? samples.data_ptr<scalar_t>() : nullptr);
  });
  return {norms, samples};
}

}  // namespace

const char* to_string(ConvPath path) {
  switch (path) {
    case ConvPath::kMaterialize: return "materialize";
    case ConvPath::kFused: return "fused";
    case ConvPath::kGhost: return "ghost";
  }
  return "?";
}

namespace {

// The cost model, fitted to the per-layer timings of bench/grad_sample_rules_bench --cases
// conv-paths on one core (docs/performance.md has the table). Speeds are multiply-adds per ns
// (GMAC/s), streams bytes per ns; only their ratios matter for the choice.
// The weight-gradient kernel of the non-private backward: the clipped sum of kFused, kGhost and
// of kMaterialize when it could not keep G_i.
constexpr double kWeightGradSpeed = 80;
// Gram products of kGhost (batched, small): detail::kGramSpeed.
using detail::kGramSpeed;
// Reading input and output gradient once more (every path but a kept kMaterialize passes over
// them twice: norms, then the sum), and the unfold of kGhost.
constexpr double kReadSpeed = 10, kUnfoldSpeed = 15;
// The norms and the sum over kept G_i: detail::kKeptPassSpeed.
constexpr double kKeptSpeed = detail::kKeptPassSpeed;
// Fixed cost of one sample's group in the grouped convolution (ns).
constexpr double kGroupOverhead = 2000;
// The register tile on AVX-512 (16 lanes, 8 rows of output channels; multiply-adds per ns), its
// speed-up over AVX2 (8 lanes, 6 rows), and the cost of copying one kernel row of a patch (ns).
constexpr double kTileSpeed = 75, kWideTile = 1.6, kPatchRowNs = 0.86;

// kMaterialize's grouped convolution: the kernel runs at full speed on groups of 16 input
// channels or more over 256 output positions or more; fewer positions shorten its inner loops,
// fewer channels leave vector lanes idle.
double grouped_speed(double T, int64_t channels_per_group) {
  const double full = std::min(65.0, 80.0 * std::sqrt(T / 256.0));
  if (channels_per_group >= 16) return full;
  if (channels_per_group >= 8) return 0.6 * full;
  // Under 8 channels per group conv_weight_samples runs one ungrouped kernel per sample.
  return channels_per_group >= 3 ? 16.0 : 8.0;
}

// The register tile (kFused's norms; the kTiled kernel, which also stores G_i): multiply-adds
// over the patch and channel counts padded to whole tiles, and one copy per kernel row of each
// patch it builds.
double tile_ms(const ConvShape& s) {
  if (!s.fused_available) return std::numeric_limits<double>::infinity();
  auto round_up = [](int64_t n, int64_t m) { return static_cast<double>((n + m - 1) / m * m); };
  const bool wide = cpu::tile_vector_bytes() == 64;
  const double B = static_cast<double>(s.batch), T = static_cast<double>(s.positions);
  const double macs = B * T * round_up(s.patch, 32) * round_up(s.out_channels, wide ? 8 : 6);
  const double rows = B * T * static_cast<double>(s.patch / std::max<int64_t>(1, s.kernel_width));
  return (macs / (wide ? kTileSpeed : kTileSpeed / kWideTile) + rows * kPatchRowNs) * 1e-6;
}

// Forming G_i (all samples) by each kernel of conv_weight_samples.
double grouped_kernel_ms(const ConvShape& s) {
  const double B = static_cast<double>(s.batch), T = static_cast<double>(s.positions);
  const double macs = B * T * static_cast<double>(s.patch) * static_cast<double>(s.out_channels);
  const int64_t per_group = s.in_channels / std::max<int64_t>(1, s.groups);
  return (macs / grouped_speed(T, per_group) + B * kGroupOverhead) * 1e-6;
}

// kGhost's batched Gram products: tiny [T, T] products below 64 positions run slower.
double gram_speed(double T) { return kGramSpeed * std::min(1.0, std::sqrt(T / 64.0)); }

}  // namespace

ConvSampleKernel sample_kernel(const ConvShape& shape) {
  return tile_ms(shape) < grouped_kernel_ms(shape) ? ConvSampleKernel::kTiled
                                                   : ConvSampleKernel::kGrouped;
}

ConvPlan plan_conv(const ConvShape& s, NormMethod method, bool may_keep) {
  const double B = static_cast<double>(s.batch), T = static_cast<double>(s.positions);
  const double d = static_cast<double>(s.patch), p = static_cast<double>(s.out_channels);
  const double G = static_cast<double>(std::max<int64_t>(1, s.groups));
  const double macs = B * T * d * p;  // the weight gradient's multiply-adds (all groups)
  const double to_ms = 1e-6;          // ns -> ms
  // The second pass over input and output gradient, and the sum by the non-private kernel.
  const double reread_ms = B * (p * T + static_cast<double>(s.input_size)) * 4 / kReadSpeed * to_ms;
  const double sum_ms = macs / kWeightGradSpeed * to_ms + reread_ms;
  ConvPlan plan;
  plan.kernel = sample_kernel(s);
  const double samples_ms =
      plan.kernel == ConvSampleKernel::kTiled ? tile_ms(s) : grouped_kernel_ms(s);
  // Kept: the sum passes over G_i, and so do the norms unless the tile formed them; not kept: the
  // norms pass over each chunk of G_i, and the sum is the non-private kernel's.
  const double pass_ms = B * p * d * 4 / kKeptSpeed * to_ms;
  const bool tiled = plan.kernel == ConvSampleKernel::kTiled;
  plan.materialize_ms = samples_ms + (may_keep ? (tiled ? 1 : 2) * pass_ms : pass_ms + sum_ms);
  plan.fused_ms = tile_ms(s) + sum_ms;
  // Gram matrices of one group's patches [T, d] and output gradients [T, p/G], and the unfold.
  plan.ghost_ms = (B * G * T * T * (d + p / G)) / gram_speed(T) * to_ms +
                  B * T * d * G * 4 / kUnfoldSpeed * to_ms + sum_ms;
  switch (method) {
    case NormMethod::kMaterialize: plan.path = ConvPath::kMaterialize; break;
    case NormMethod::kGhost: plan.path = ConvPath::kGhost; break;
    case NormMethod::kAuto:
      plan.path = ConvPath::kMaterialize;
      if (plan.fused_ms < plan.materialize_ms) plan.path = ConvPath::kFused;
      if (plan.ghost_ms < std::min(plan.materialize_ms, plan.fused_ms)) {
        plan.path = ConvPath::kGhost;
      }
      break;
  }
  plan.keep = may_keep && plan.path == ConvPath::kMaterialize;
  return plan;
}

bool fused_conv_available(const torch::Tensor& input, int64_t spatial_dims, int64_t groups) {
  return groups == 1 && (spatial_dims == 1 || spatial_dims == 2) && cpu_kernel_dtype(input);
}

namespace {

// conv_weight_samples, and with `norms` ‖G_i‖² into *norms.
torch::Tensor samples_and_norms(const torch::Tensor& input, const torch::Tensor& grad_output,
                                const torch::Tensor& weight, const ConvGeometry& geometry,
                                ConvSampleKernel kernel, torch::Tensor* norms) {
  const int64_t B = input.size(0), p = grad_output.size(1);
  TORCH_CHECK(grad_output.size(0) == B && p == weight.size(0), "conv_weight_samples: input ",
              input.sizes(), ", output gradient ", grad_output.sizes(), " and weight ",
              weight.sizes(), " do not fit together");
  if (kernel == ConvSampleKernel::kAuto) {
    kernel = sample_kernel(conv_shape(input, grad_output, weight, geometry));
  }
  if (kernel == ConvSampleKernel::kTiled) {
    auto [tile_norms, samples] = tiled_conv_samples({input}, {grad_output}, weight, geometry, true);
    TORCH_CHECK(samples.defined(),
                "conv_weight_samples: the tiled kernel needs a CPU float or double input, groups 1 "
                "and 1 or 2 spatial dimensions, got input ",
                input.sizes(), " (", input.scalar_type(), ", ", input.device(), ") with groups ",
                geometry.groups, "; use ConvSampleKernel::kGrouped or kAuto");
    if (norms != nullptr) *norms = tile_norms;
    return samples;
  }
  // [B, C, S...] -> [1, B·C, S...] and [B, p, L...] -> [1, B·p, L...]: sample b's channels form
  // groups b·G .. b·G + G - 1 of a convolution with B·G groups, whose weight gradient
  // [B·p, C/G, k...] is every sample's own.
  auto folded = [B](const torch::Tensor& t) {
    std::vector<int64_t> shape{1, B * t.size(1)};
    for (int64_t i = 2; i < t.dim(); ++i) shape.push_back(t.size(i));
    return t.contiguous().view(shape);
  };
  const int64_t per_group = weight.size(1);
  const std::vector<int64_t> output_padding(geometry.kernel.size(), 0);
  if (per_group < 8 && B > 1) {
    // On groups of few input channels the grouped kernel leaves its vector lanes idle and runs
    // on one thread; one ungrouped weight gradient per sample, samples spread over the threads,
    // is faster (docs/performance.md, per-layer table). Each sample alone: the result does not
    // depend on the number of threads.
    std::vector<int64_t> shape{B};
    for (int64_t i = 0; i < weight.dim(); ++i) shape.push_back(weight.size(i));
    auto samples = torch::empty(shape, weight.options());
    const auto x = input.contiguous(), g = grad_output.contiguous();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        samples[b].copy_(std::get<1>(at::convolution_backward(
            g.narrow(0, b, 1), x.narrow(0, b, 1), weight, c10::nullopt, geometry.stride,
            geometry.padding, geometry.dilation, /*transposed=*/false, output_padding,
            geometry.groups, {false, true, false})));
      }
    });
    if (norms != nullptr) *norms = row_norm_sq(samples);
    return samples;
  }
  std::vector<int64_t> weight_shape{B * p};
  for (int64_t i = 1; i < weight.dim(); ++i) weight_shape.push_back(weight.size(i));
  // The kernel reads only the weight's shape when it computes the weight gradient alone.
  const auto weight_like = torch::zeros({1}, weight.options()).expand(weight_shape);
  auto samples = std::get<1>(at::convolution_backward(
      folded(grad_output), folded(input), weight_like, c10::nullopt, geometry.stride,
      geometry.padding, geometry.dilation, /*transposed=*/false, output_padding,
      geometry.groups * B, {false, true, false}));
  std::vector<int64_t> shape{B};
  for (int64_t i = 0; i < weight.dim(); ++i) shape.push_back(weight.size(i));
  if (norms != nullptr) *norms = row_norm_sq(samples.view({B, -1}));
  return samples.view(shape);
}

}  // namespace

torch::Tensor conv_weight_samples(const torch::Tensor& input, const torch::Tensor& grad_output,
                                  const torch::Tensor& weight, const ConvGeometry& geometry,
                                  ConvSampleKernel kernel) {
  return samples_and_norms(input, grad_output, weight, geometry, kernel, nullptr);
}

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

std::vector<torch::Tensor> conv_weight_sample_chunks(const torch::Tensor& input,
                                                     const torch::Tensor& grad_output,
                                                     const torch::Tensor& weight,
                                                     const ConvGeometry& geometry,
                                                     int64_t chunk_bytes, ConvSampleKernel kernel,
                                                     torch::Tensor* norms_sq) {
  const int64_t B = input.size(0);
  const int64_t sample_bytes = std::max<int64_t>(1, weight.numel() * weight.element_size());
  const int64_t step = std::clamp<int64_t>(chunk_bytes / sample_bytes, 1, std::max<int64_t>(1, B));
  std::vector<torch::Tensor> chunks, norms;
  for (int64_t b = 0; b < B; b += step) {
    const int64_t n = std::min(step, B - b);
    torch::Tensor chunk_norms;
    chunks.push_back(samples_and_norms(input.narrow(0, b, n), grad_output.narrow(0, b, n), weight,
                                       geometry, kernel, norms_sq ? &chunk_norms : nullptr));
    norms.push_back(chunk_norms);
  }
  if (norms_sq != nullptr) *norms_sq = norms.size() == 1 ? norms.front() : torch::cat(norms);
  return chunks;
}

ConvGrads::ConvGrads(std::vector<torch::Tensor> inputs, std::vector<torch::Tensor> grad_outputs,
                     torch::Tensor weight, bool train_weight, bool has_bias, ConvGeometry geometry,
                     ConvPath path, int64_t chunk_bytes)
    : inputs_(std::move(inputs)),
      grad_outputs_(std::move(grad_outputs)),
      weight_(std::move(weight)),
      train_weight_(train_weight),
      has_bias_(has_bias),
      geometry_(std::move(geometry)),
      path_(path),
      chunk_bytes_(chunk_bytes) {
  TORCH_CHECK(!inputs_.empty() && inputs_.size() == grad_outputs_.size(),
              "ConvGrads needs one output gradient per recorded input, got ", inputs_.size(),
              " inputs and ", grad_outputs_.size(), " output gradients");
  if (path_ == ConvPath::kFused &&
      !fused_conv_available(inputs_.front(), static_cast<int64_t>(geometry_.kernel.size()),
                            geometry_.groups)) {
    path_ = ConvPath::kMaterialize;
  }
}

ConvGrads::ConvGrads(std::vector<torch::Tensor> inputs, std::vector<torch::Tensor> grad_outputs,
                     torch::Tensor weight, bool train_weight, bool has_bias, ConvGeometry geometry,
                     NormMethod method, int64_t chunk_bytes)
    : ConvGrads(std::move(inputs), std::move(grad_outputs), std::move(weight), train_weight,
                has_bias, std::move(geometry), ConvPath::kMaterialize, chunk_bytes) {
  path_ = plan_conv(shape(), method, /*may_keep=*/false).path;
}

ConvShape conv_shape(const torch::Tensor& input, const torch::Tensor& grad_output,
                     const torch::Tensor& weight, const ConvGeometry& geometry) {
  ConvShape s;
  s.batch = input.size(0);
  s.out_channels = weight.size(0);
  s.patch = weight.numel() / std::max<int64_t>(1, weight.size(0));
  s.groups = geometry.groups;
  s.in_channels = input.size(1);
  s.positions = grad_output.numel() / std::max<int64_t>(1, grad_output.size(0) * weight.size(0));
  s.input_size = input.numel() / std::max<int64_t>(1, input.size(0));
  s.kernel_width = geometry.kernel.back();
  s.fused_available =
      fused_conv_available(input, static_cast<int64_t>(geometry.kernel.size()), geometry.groups);
  return s;
}

ConvShape ConvGrads::shape() const {
  auto s = conv_shape(inputs_.front(), grad_outputs_.front(), weight_, geometry_);
  for (size_t r = 1; r < grad_outputs_.size(); ++r) {
    s.positions += conv_shape(inputs_[r], grad_outputs_[r], weight_, geometry_).positions;
  }
  return s;
}

torch::Tensor ConvGrads::samples(int64_t begin, int64_t end) const {
  torch::Tensor sum;
  for (size_t r = 0; r < inputs_.size(); ++r) {
    auto part = conv_weight_samples(inputs_[r].slice(0, begin, end),
                                    grad_outputs_[r].slice(0, begin, end), weight_, geometry_);
    sum = sum.defined() ? sum.add_(part) : part;
  }
  return sum;
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
          with_bias,        NormMethod::kGhost};
}

int64_t ConvGrads::chunk_size() const {
  const int64_t B = inputs_.front().size(0), G = geometry_.groups;
  int64_t T = 0;
  for (const auto& g : grad_outputs_) T += g.numel() / std::max<int64_t>(1, g.size(0) * g.size(1));
  const int64_t p = weight_.size(0) / G, d = weight_.numel() / weight_.size(0);
  // kMaterialize: the per-sample gradients (and the kernel's copies of input and output
  // gradient); kGhost: patches and output gradients, plus the two Gram matrices.
  const int64_t per_sample = path_ == ConvPath::kMaterialize
                                 ? G * p * d + inputs_.front()[0].numel() + T * G * p
                                 : T * G * (d + p) + 2 * G * T * T;
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
    torch::Tensor norms;
    if (path_ == ConvPath::kFused)
      norms = tiled_conv_samples(inputs_, grad_outputs_, weight_, geometry_, false).first;
    if (!norms.defined() && path_ == ConvPath::kGhost) {
      norms = by_chunks([](LinearLikeGrads& g) { return g.norm_sq().at(0); });
    }
    if (!norms.defined()) {
      const int64_t B = inputs_.front().size(0), step = chunk_size();
      std::vector<torch::Tensor> parts;
      for (int64_t b = 0; b < B; b += step)
        parts.push_back(row_norm_sq(samples(b, std::min(B, b + step))));
      norms = parts.size() == 1 ? parts.front() : torch::cat(parts);
    }
    out.push_back(norms);
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
  if (train_weight_) out.push_back(samples(0, inputs_.front().size(0)));
  if (has_bias_) out.push_back(bias_samples());
  return out;
}

}  // namespace dptorch::grad_sample
