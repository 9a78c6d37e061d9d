#include <dptorch/nn/modules.h>

#include <torch/torch.h>

#include <sstream>

namespace dptorch::nn {
namespace {

namespace F = torch::nn::functional;
using grad_sample::PerSampleGrads;

// The twin's description with our namespace: "torch::nn::Linear(...)" ->
// "dptorch::nn::Linear(...)".
void print_as_twin(std::ostream& stream, const torch::nn::Module& twin) {
  std::ostringstream text;
  twin.pretty_print(text);
  std::string s = text.str();
  if (s.rfind("torch::nn::", 0) == 0) s = "dptorch::nn::" + s.substr(11);
  stream << s;
}

// Registers the twin's tensor under `name`; undefined tensors are registered undefined, as the twin
// does, so named_parameters() and state dicts match.
torch::Tensor mirror_parameter(torch::nn::Module& self, const std::string& name,
                               const torch::Tensor& tensor) {
  return self.register_parameter(name, tensor, tensor.defined() && tensor.requires_grad());
}

int64_t product(at::IntArrayRef sizes) {
  int64_t n = 1;
  for (auto s : sizes) n *= s;
  return n;
}

// x with samples in dimension `batch_dim` and `trailing` feature dimensions -> [B, R, P], where R
// collects every other leading dimension (sequence positions, extra dimensions).
torch::Tensor to_brp(const torch::Tensor& x, int64_t batch_dim, int64_t trailing) {
  auto y = x.movedim(batch_dim, 0);
  const auto sizes = y.sizes();
  const int64_t lead = y.dim() - trailing;
  return y.reshape({sizes[0], product(sizes.slice(1, lead - 1)), product(sizes.slice(lead))});
}

torch::Tensor cat_along(std::vector<torch::Tensor> parts, int64_t dim) {
  return parts.size() == 1 ? std::move(parts.front()) : torch::cat(parts, dim);
}

std::vector<int64_t> shape_if_trainable(const torch::Tensor& p) {
  return p.defined() && p.requires_grad() ? p.sizes().vec() : std::vector<int64_t>{};
}

bool trainable(const torch::Tensor& p) { return p.defined() && p.requires_grad(); }

// Linear-like rule from records whose input and grad_output are already [B, T, ·].
std::unique_ptr<PerSampleGrads> linear_like(std::vector<torch::Tensor> a,
                                            std::vector<torch::Tensor> g, int64_t groups,
                                            const torch::Tensor& weight, const torch::Tensor& bias,
                                            NormMethod method) {
  return std::make_unique<grad_sample::LinearLikeGrads>(
      cat_along(std::move(a), 1), cat_along(std::move(g), 1), groups, shape_if_trainable(weight),
      trainable(bias), method);
}

// Affine rule of a norm layer: per-sample gradients from the normalised input and grad_output,
// both as [B, R, P] (sum over R) with the parameters shaped `param_shape`.
std::unique_ptr<PerSampleGrads> affine_grads(
    const std::vector<Record>& records, const torch::Tensor& weight, const torch::Tensor& bias,
    const std::function<torch::Tensor(const torch::Tensor&, int64_t)>& to_brp_layout) {
  torch::Tensor gw, gb;
  for (const auto& r : records) {
    auto xh = to_brp_layout(r.input, r.batch_dim);
    auto g = to_brp_layout(r.grad_output, r.batch_dim);
    auto w = (g * xh).sum(1), b = g.sum(1);
    gw = gw.defined() ? gw + w : w;
    gb = gb.defined() ? gb + b : b;
  }
  std::vector<std::string> names;
  std::vector<torch::Tensor> samples;
  const int64_t B = records.front().batch_size;
  auto shaped = [B](const torch::Tensor& s, const torch::Tensor& param) {
    std::vector<int64_t> shape{B};
    for (auto d : param.sizes()) shape.push_back(d);
    return s.reshape(shape);
  };
  if (trainable(weight)) {
    names.emplace_back("weight");
    samples.push_back(shaped(gw, weight));
  }
  if (trainable(bias)) {
    names.emplace_back("bias");
    samples.push_back(shaped(gb, bias));
  }
  return std::make_unique<grad_sample::MaterializedGrads>(std::move(names), std::move(samples));
}

// [B, C, spatial...] -> [B, spatial, C]: the layout of per-channel affine parameters.
torch::Tensor channels_last_brp(const torch::Tensor& x, int64_t /*batch_dim*/) {
  return x.reshape({x.size(0), x.size(1), product(x.sizes().slice(2))}).transpose(1, 2);
}

// A per-channel parameter [C] viewed to broadcast over [B, C, spatial...].
torch::Tensor per_channel(const torch::Tensor& p, int64_t input_dim) {
  if (!p.defined()) return p;
  std::vector<int64_t> shape(input_dim - 1, 1);
  shape[0] = p.size(0);
  return p.view(shape);
}

torch::Tensor affine(const torch::Tensor& xhat, const torch::Tensor& w, const torch::Tensor& b) {
  auto y = w.defined() ? xhat * w : xhat.clone();
  return b.defined() ? y + b : y;
}

}  // namespace

// ----------------------------------------------------------------------------------- Linear

LinearImpl::LinearImpl(const torch::nn::LinearOptions& options_)
    : torch::nn::Cloneable<LinearImpl>("dptorch::nn::Linear"), options(options_) {
  reset();
}

void LinearImpl::reset() {
  twin_ = torch::nn::Linear(options);
  weight = mirror_parameter(*this, "weight", twin_->weight);
  bias = mirror_parameter(*this, "bias", twin_->bias);
}

void LinearImpl::pretty_print(std::ostream& stream) const { print_as_twin(stream, *twin_); }

torch::Tensor LinearImpl::forward(const torch::Tensor& input) {
  if (!recording({&weight, &bias})) return twin_->forward(input);
  TORCH_CHECK(input.dim() >= 2, "dptorch::nn::Linear needs a batch dimension to record per-sample ",
              "gradients, but got an input of shape ", input.sizes());
  Record r;
  r.input = input.detach();
  r.batch_dim = batch_dim(input.dim() - 1);
  r.batch_size = input.size(r.batch_dim);
  const auto w = weight.detach();
  return taped(
      input, weight, bias, [&] { return F::linear(input, weight, bias); },
      [w](const torch::Tensor& g) { return g.matmul(w); }, std::move(r));
}

std::unique_ptr<PerSampleGrads> LinearImpl::make_grads(std::vector<Record> records) {
  std::vector<torch::Tensor> a, g;
  for (const auto& r : records) {
    a.push_back(to_brp(r.input, r.batch_dim, 1));
    g.push_back(to_brp(r.grad_output, r.batch_dim, 1));
  }
  return linear_like(std::move(a), std::move(g), 1, weight, bias, norm_method());
}

// ----------------------------------------------------------------------------------- Conv

template <size_t D>
ConvImpl<D>::ConvImpl(const torch::nn::ConvOptions<D>& options_)
    : torch::nn::Cloneable<ConvImpl<D>>("dptorch::nn::Conv" + std::to_string(D) + "d"),
      options(options_) {
  reset();
}

template <size_t D>
void ConvImpl<D>::reset() {
  twin_ = detail::TorchConv<D>(options);
  weight = mirror_parameter(*this, "weight", twin_->weight);
  bias = mirror_parameter(*this, "bias", twin_->bias);
  const auto& kernel = *options.kernel_size();
  const auto& dilation = *options.dilation();
  for (size_t d = 0; d < D; ++d) {
    if (const auto* p = c10::get_if<torch::ExpandingArray<D>>(&options.padding())) {
      pad_left_[d] = pad_right_[d] = (**p)[d];
    } else if (c10::get_if<torch::enumtype::kValid>(&options.padding())) {
      pad_left_[d] = pad_right_[d] = 0;
    } else {  // "same": the odd one out goes to the right, as in torch
      const int64_t total = dilation[d] * (kernel[d] - 1);
      pad_left_[d] = total / 2;
      pad_right_[d] = total - pad_left_[d];
    }
  }
}

template <size_t D>
void ConvImpl<D>::pretty_print(std::ostream& stream) const {
  print_as_twin(stream, *twin_);
}

template <size_t D>
torch::Tensor ConvImpl<D>::forward(const torch::Tensor& input) {
  if (!this->recording({&weight, &bias})) return twin_->forward(input);
  TORCH_CHECK(input.dim() == static_cast<int64_t>(D) + 2, this->name(),
              " records per-sample gradients of batched input [B, C, ", D,
              " spatial dims], but got shape ", input.sizes());
  torch::Tensor x = input;
  std::vector<int64_t> conv_pad(pad_left_.begin(), pad_left_.end());
  const bool zeros = c10::get_if<torch::enumtype::kZeros>(&options.padding_mode()) != nullptr;
  if (!zeros || pad_left_ != pad_right_) {
    // Pad explicitly (autograd differentiates it) and convolve without padding.
    std::vector<int64_t> pads;
    for (int64_t d = D - 1; d >= 0; --d) {
      pads.push_back(pad_left_[d]);
      pads.push_back(pad_right_[d]);
    }
    F::PadFuncOptions::mode_t mode = torch::kConstant;
    if (c10::get_if<torch::enumtype::kReflect>(&options.padding_mode())) mode = torch::kReflect;
    if (c10::get_if<torch::enumtype::kReplicate>(&options.padding_mode())) mode = torch::kReplicate;
    if (c10::get_if<torch::enumtype::kCircular>(&options.padding_mode())) mode = torch::kCircular;
    x = F::pad(x, F::PadFuncOptions(pads).mode(mode));
    std::fill(conv_pad.begin(), conv_pad.end(), 0);
  }
  const std::vector<int64_t> stride(options.stride()->begin(), options.stride()->end());
  const std::vector<int64_t> dilation(options.dilation()->begin(), options.dilation()->end());
  const std::vector<int64_t> output_padding(D, 0);
  const int64_t groups = options.groups();
  Record r;
  r.input = x.detach();
  r.batch_size = x.size(0);
  r.extra = {torch::tensor(conv_pad, torch::kLong)};
  const auto w = weight.detach();
  const auto saved = r.input;
  return this->taped(
      x, weight, bias,
      [&] {
        return at::convolution(x, weight, bias, stride, conv_pad, dilation, false, output_padding,
                               groups);
      },
      [=](const torch::Tensor& g) {
        return std::get<0>(at::convolution_backward(g, saved, w, c10::nullopt, stride, conv_pad,
                                                    dilation, false, output_padding, groups,
                                                    {true, false, false}));
      },
      std::move(r));
}

template <size_t D>
std::unique_ptr<PerSampleGrads> ConvImpl<D>::make_grads(std::vector<Record> records) {
  std::vector<torch::Tensor> inputs, grad_outputs;
  for (auto& r : records) {
    inputs.push_back(std::move(r.input));
    grad_outputs.push_back(std::move(r.grad_output));
  }
  // Every call pads alike: the padding passed to the convolution is the first record's.
  const auto pad = records.front().extra.at(0);
  grad_sample::ConvGeometry geometry;
  geometry.kernel = at::IntArrayRef(options.kernel_size()).vec();
  geometry.stride = at::IntArrayRef(options.stride()).vec();
  geometry.padding.assign(pad.data_ptr<int64_t>(), pad.data_ptr<int64_t>() + D);
  geometry.dilation = at::IntArrayRef(options.dilation()).vec();
  geometry.groups = options.groups();
  return std::make_unique<grad_sample::ConvGrads>(
      std::move(inputs), std::move(grad_outputs), weight.detach(), trainable(weight),
      trainable(bias), std::move(geometry), this->norm_method());
}

template class ConvImpl<1>;
template class ConvImpl<2>;
template class ConvImpl<3>;

// ----------------------------------------------------------------------------------- Embedding

EmbeddingImpl::EmbeddingImpl(const torch::nn::EmbeddingOptions& options_)
    : torch::nn::Cloneable<EmbeddingImpl>("dptorch::nn::Embedding"), options(options_) {
  TORCH_CHECK_VALUE(!options.max_norm().has_value(),
                    "dptorch::nn::Embedding does not support max_norm (it rewrites the table "
                    "during forward); leave max_norm unset");
  TORCH_CHECK_VALUE(!options.scale_grad_by_freq(),
                    "dptorch::nn::Embedding does not support scale_grad_by_freq (it scales each "
                    "sample's gradient by counts over the whole batch); leave it false");
  reset();
}

void EmbeddingImpl::reset() {
  twin_ = torch::nn::Embedding(options);
  options.padding_idx(twin_->options.padding_idx());  // the twin normalises negative indices
  weight = mirror_parameter(*this, "weight", twin_->weight);
}

void EmbeddingImpl::pretty_print(std::ostream& stream) const { print_as_twin(stream, *twin_); }

torch::Tensor EmbeddingImpl::forward(const torch::Tensor& input) {
  if (!recording({&weight})) return twin_->forward(input);
  TORCH_CHECK(input.dim() >= 1, "dptorch::nn::Embedding needs a batch dimension to record ",
              "per-sample gradients, but got a scalar index");
  Record r;
  r.input = input;
  r.batch_dim = batch_dim(input.dim());
  r.batch_size = input.size(r.batch_dim);
  return taped(
      input, weight, torch::Tensor(), [&] { return twin_->forward(input); }, nullptr, std::move(r));
}

std::unique_ptr<PerSampleGrads> EmbeddingImpl::make_grads(std::vector<Record> records) {
  std::vector<torch::Tensor> index, sample, g;
  const int64_t B = records.front().batch_size;
  for (const auto& r : records) {
    auto idx = to_brp(r.input.unsqueeze(-1), r.batch_dim, 1);  // [B, T, 1]
    const int64_t T = idx.size(1);
    // [B, T, dim] as recorded: an output gradient expanded over the positions (a mean after the
    // lookup) stays a view, which the rule reads without copying.
    auto rows = to_brp(r.grad_output, r.batch_dim, 1);
    if (records.size() > 1 || options.padding_idx().has_value()) {
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
      cat_along(std::move(index), 0), cat_along(std::move(sample), 0), cat_along(std::move(g), 0),
      B, options.num_embeddings());
}

// ----------------------------------------------------------------------------------- EmbeddingBag

EmbeddingBagImpl::EmbeddingBagImpl(const torch::nn::EmbeddingBagOptions& options_)
    : torch::nn::Cloneable<EmbeddingBagImpl>("dptorch::nn::EmbeddingBag"), options(options_) {
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

void EmbeddingBagImpl::reset() {
  twin_ = torch::nn::EmbeddingBag(options);
  options.padding_idx(twin_->options.padding_idx());
  weight = mirror_parameter(*this, "weight", twin_->weight);
}

void EmbeddingBagImpl::pretty_print(std::ostream& stream) const { print_as_twin(stream, *twin_); }

torch::Tensor EmbeddingBagImpl::forward(const torch::Tensor& input, const torch::Tensor& offsets,
                                        const torch::Tensor& per_sample_weights) {
  if (!recording({&weight})) return twin_->forward(input, offsets, per_sample_weights);
  TORCH_CHECK(!per_sample_weights.defined() || !per_sample_weights.requires_grad(),
              "dptorch::nn::EmbeddingBag: per_sample_weights that require grad are not supported");
  auto output = [&] { return twin_->forward(input, offsets, per_sample_weights); };
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
  Record r;
  r.input = index;
  r.extra = {sample, factor};
  r.batch_size = B;
  return taped(input, weight, torch::Tensor(), output, nullptr, std::move(r));
}

std::unique_ptr<PerSampleGrads> EmbeddingBagImpl::make_grads(std::vector<Record> records) {
  std::vector<torch::Tensor> index, sample, g;
  for (const auto& r : records) {
    index.push_back(r.input);
    sample.push_back(r.extra.at(0));
    g.push_back(r.grad_output.index_select(0, r.extra.at(0)) * r.extra.at(1).unsqueeze(1));
  }
  return std::make_unique<grad_sample::EmbeddingGrads>(
      cat_along(std::move(index), 0), cat_along(std::move(sample), 0), cat_along(std::move(g), 0),
      records.front().batch_size, options.num_embeddings());
}

// ----------------------------------------------------------------------------------- LayerNorm

LayerNormImpl::LayerNormImpl(const torch::nn::LayerNormOptions& options_)
    : torch::nn::Cloneable<LayerNormImpl>("dptorch::nn::LayerNorm"), options(options_) {
  reset();
}

void LayerNormImpl::reset() {
  twin_ = torch::nn::LayerNorm(options);
  weight = mirror_parameter(*this, "weight", twin_->weight);
  bias = mirror_parameter(*this, "bias", twin_->bias);
}

void LayerNormImpl::pretty_print(std::ostream& stream) const { print_as_twin(stream, *twin_); }

torch::Tensor LayerNormImpl::forward(const torch::Tensor& input) {
  if (!recording({&weight, &bias})) return twin_->forward(input);
  const auto& shape = options.normalized_shape();
  const int64_t leading = input.dim() - static_cast<int64_t>(shape.size());
  TORCH_CHECK(leading >= 1, "dptorch::nn::LayerNorm needs a batch dimension before the ",
              "normalized shape to record per-sample gradients, but got shape ", input.sizes());
  auto xhat = torch::layer_norm(input, shape, {}, {}, options.eps());
  Record r;
  r.input = xhat.detach();
  r.batch_dim = batch_dim(leading);
  r.batch_size = input.size(r.batch_dim);
  const auto w = weight.detach();
  return taped(
      xhat, weight, bias, [&] { return affine(xhat, weight, bias); },
      [w](const torch::Tensor& g) { return g * w; }, std::move(r));
}

std::unique_ptr<PerSampleGrads> LayerNormImpl::make_grads(std::vector<Record> records) {
  const auto trailing = static_cast<int64_t>(options.normalized_shape().size());
  return affine_grads(records, weight, bias, [trailing](const torch::Tensor& x, int64_t bd) {
    return to_brp(x, bd, trailing);
  });
}

// ----------------------------------------------------------------------------------- GroupNorm

GroupNormImpl::GroupNormImpl(const torch::nn::GroupNormOptions& options_)
    : torch::nn::Cloneable<GroupNormImpl>("dptorch::nn::GroupNorm"), options(options_) {
  reset();
}

void GroupNormImpl::reset() {
  twin_ = torch::nn::GroupNorm(options);
  weight = mirror_parameter(*this, "weight", twin_->weight);
  bias = mirror_parameter(*this, "bias", twin_->bias);
}

void GroupNormImpl::pretty_print(std::ostream& stream) const { print_as_twin(stream, *twin_); }

torch::Tensor GroupNormImpl::forward(const torch::Tensor& input) {
  if (!recording({&weight, &bias})) return twin_->forward(input);
  TORCH_CHECK(input.dim() >= 2, "dptorch::nn::GroupNorm needs input [B, C, *], got shape ",
              input.sizes());
  auto xhat = torch::group_norm(input, options.num_groups(), {}, {}, options.eps());
  Record r;
  r.input = xhat.detach();
  r.batch_size = input.size(0);
  const auto w = per_channel(weight, input.dim()), b = per_channel(bias, input.dim());
  const auto wd = w.detach();
  return taped(
      xhat, weight, bias, [&] { return affine(xhat, w, b); },
      [wd](const torch::Tensor& g) { return g * wd; }, std::move(r));
}

std::unique_ptr<PerSampleGrads> GroupNormImpl::make_grads(std::vector<Record> records) {
  return affine_grads(records, weight, bias, channels_last_brp);
}

// ----------------------------------------------------------------------------------- InstanceNorm

template <size_t D>
InstanceNormImpl<D>::InstanceNormImpl(const torch::nn::InstanceNormOptions& options_)
    : torch::nn::Cloneable<InstanceNormImpl<D>>("dptorch::nn::InstanceNorm" + std::to_string(D) +
                                                "d"),
      options(options_) {
  reset();
}

template <size_t D>
void InstanceNormImpl<D>::reset() {
  twin_ = detail::TorchInstanceNorm<D>(options);
  twin_->train(this->is_training());
  weight = mirror_parameter(*this, "weight", twin_->weight);
  bias = mirror_parameter(*this, "bias", twin_->bias);
  running_mean = this->register_buffer("running_mean", twin_->running_mean);
  running_var = this->register_buffer("running_var", twin_->running_var);
  num_batches_tracked = this->register_buffer("num_batches_tracked", twin_->num_batches_tracked);
}

template <size_t D>
void InstanceNormImpl<D>::pretty_print(std::ostream& stream) const {
  print_as_twin(stream, *twin_);
}

template <size_t D>
void InstanceNormImpl<D>::train(bool on) {
  torch::nn::Module::train(on);
  twin_->train(on);
}

template <size_t D>
torch::Tensor InstanceNormImpl<D>::forward(const torch::Tensor& input) {
  if (!this->recording({&weight, &bias})) return twin_->forward(input);
  TORCH_CHECK(input.dim() == static_cast<int64_t>(D) + 2, this->name(),
              " records per-sample gradients of batched input [B, C, ", D,
              " spatial dims], but got shape ", input.sizes());
  const bool use_input_stats = this->is_training() || !options.track_running_stats();
  auto xhat = torch::instance_norm(input, {}, {}, running_mean, running_var, use_input_stats,
                                   options.momentum(), options.eps(), false);
  Record r;
  r.input = xhat.detach();
  r.batch_size = input.size(0);
  const auto w = per_channel(weight, input.dim()), b = per_channel(bias, input.dim());
  const auto wd = w.detach();
  return this->taped(
      xhat, weight, bias, [&] { return affine(xhat, w, b); },
      [wd](const torch::Tensor& g) { return g * wd; }, std::move(r));
}

template <size_t D>
std::unique_ptr<PerSampleGrads> InstanceNormImpl<D>::make_grads(std::vector<Record> records) {
  return affine_grads(records, weight, bias, channels_last_brp);
}

template class InstanceNormImpl<1>;
template class InstanceNormImpl<2>;
template class InstanceNormImpl<3>;

}  // namespace dptorch::nn
