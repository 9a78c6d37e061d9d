#include <dptorch/nn/attention.h>

#include <torch/torch.h>

#include "nn/layers_internal.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace dptorch::nn {
namespace {

namespace F = torch::nn::functional;

// The slots of an attention layer (see MultiheadAttentionImpl::adopt).
enum Slot : size_t { kQKV = 0, kQ = 1, kK = 2, kV = 3, kBiasK = 4, kBiasV = 5 };

// A copy of `m` (weights included) whose parameters are frozen where m's are: Module::clone
// makes every parameter trainable.
std::shared_ptr<torch::nn::Module> frozen_alike(const torch::nn::Module& m) {
  auto copy = m.clone();
  auto params = copy->named_parameters();
  for (const auto& p : m.named_parameters()) {
    params[p.key()].set_requires_grad(p.value().requires_grad());
  }
  return copy;
}

// A mask hiding one more key (an appended bias_k or zero key): a zero column at the end.
torch::Tensor with_one_more_key(const torch::Tensor& mask) {
  if (!mask.defined()) return mask;
  auto shape = mask.sizes().vec();
  shape.back() = 1;
  return torch::cat({mask, torch::zeros(shape, mask.options())}, -1);
}

}  // namespace

// ----------------------------------------------------------------------------------- attention

MultiheadAttentionImpl::MultiheadAttentionImpl(const torch::nn::MultiheadAttentionOptions& options_)
    : TwinLayer("dptorch::nn::MultiheadAttention", options_) {
  reset();
}

bool MultiheadAttentionImpl::same_embed_dim() const {
  return options.kdim() == options.embed_dim() && options.vdim() == options.embed_dim();
}

void MultiheadAttentionImpl::adopt() {
  auto& t = twin();
  const int64_t E = options.embed_dim();
  const bool same = same_embed_dim();
  in_proj_weight = adopt_parameter("in_proj_weight", same ? t.in_proj_weight : torch::Tensor());
  q_proj_weight = adopt_parameter("q_proj_weight", same ? torch::Tensor() : t.q_proj_weight);
  k_proj_weight = adopt_parameter("k_proj_weight", same ? torch::Tensor() : t.k_proj_weight);
  v_proj_weight = adopt_parameter("v_proj_weight", same ? torch::Tensor() : t.v_proj_weight);
  in_proj_bias = adopt_parameter("in_proj_bias", t.in_proj_bias);
  out_proj =
      register_module("out_proj", Linear(torch::nn::LinearOptions(E, E).bias(options.bias())));
  detail::copy_state(*t.out_proj, *out_proj);
  bias_k = adopt_parameter("bias_k", t.bias_k);
  bias_v = adopt_parameter("bias_v", t.bias_v);

  auto product = [&](const torch::Tensor& weight, const char* weight_name, int64_t row,
                     int64_t bias_row) {
    ProductSlot s;
    s.weight_name = weight_name;
    s.weight = weight;
    s.weight_row = row;
    s.bias_name = "in_proj_bias";
    s.bias = in_proj_bias;
    s.bias_row = bias_row;
    return s;
  };
  auto added = [](const torch::Tensor& bias, const char* name) {
    ProductSlot s;
    s.bias_name = name;
    s.bias = bias;
    return s;
  };
  slots_.clear();
  if (same) {
    slots_.push_back(product(in_proj_weight, "in_proj_weight", 0, 0));
    slots_.push_back(product(in_proj_weight, "in_proj_weight", 0, 0));
    slots_.push_back(product(in_proj_weight, "in_proj_weight", E, E));
    slots_.push_back(product(in_proj_weight, "in_proj_weight", 2 * E, 2 * E));
  } else {
    slots_.push_back(ProductSlot{});
    slots_.push_back(product(q_proj_weight, "q_proj_weight", 0, 0));
    slots_.push_back(product(k_proj_weight, "k_proj_weight", 0, E));
    slots_.push_back(product(v_proj_weight, "v_proj_weight", 0, 2 * E));
  }
  slots_.push_back(added(bias_k, "bias_k"));
  slots_.push_back(added(bias_v, "bias_v"));
}

bool MultiheadAttentionImpl::runs_as_torch(const torch::Tensor& attn_mask) const {
  // The output projection records on its own when attached, training, with grad mode on.
  const bool out_records =
      out_proj->attached() && out_proj->is_training() && torch::GradMode::is_enabled() &&
      (detail::trainable(out_proj->weight) || detail::trainable(out_proj->bias));
  // torch 1.13's functional attention cannot add a per-head [B·heads, Tq, Tk] mask.
  return !out_records && (!attn_mask.defined() || attn_mask.dim() != 3);
}

std::tuple<torch::Tensor, torch::Tensor> MultiheadAttentionImpl::functional(
    const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
    const torch::Tensor& key_padding_mask, bool need_weights, const torch::Tensor& attn_mask,
    bool average_attn_weights) {
  return F::detail::multi_head_attention_forward(
      query, key, value, options.embed_dim(), options.num_heads(), in_proj_weight, in_proj_bias,
      bias_k, bias_v, options.add_zero_attn(), options.dropout(), out_proj->weight, out_proj->bias,
      is_training(), key_padding_mask, need_weights, attn_mask, !same_embed_dim(), q_proj_weight,
      k_proj_weight, v_proj_weight, {}, {}, average_attn_weights);
}

std::tuple<torch::Tensor, torch::Tensor> MultiheadAttentionImpl::forward(
    const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
    const torch::Tensor& key_padding_mask, bool need_weights, const torch::Tensor& attn_mask,
    bool average_attn_weights) {
  const bool rec = recording();
  if (!rec && runs_as_torch(attn_mask)) {
    return functional(query, key, value, key_padding_mask, need_weights, attn_mask,
                      average_attn_weights);
  }
  TORCH_CHECK_VALUE(query.dim() == 3 && key.dim() == 3 && value.dim() == 3, name(),
                    " takes batched query, key and value [T, B, features], but got shapes ",
                    query.sizes(), ", ", key.sizes(), " and ", value.sizes());
  const bool self = query.is_same(key) && key.is_same(value);
  const auto q = query.transpose(0, 1);
  auto [out, weights] =
      attend(q, self ? q : key.transpose(0, 1), self ? q : value.transpose(0, 1), self, rec,
             key_padding_mask, need_weights, attn_mask, average_attn_weights);
  return {out.transpose(0, 1), weights};
}

std::tuple<torch::Tensor, torch::Tensor> MultiheadAttentionImpl::forward_batch_first(
    const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
    const torch::Tensor& key_padding_mask, bool need_weights, const torch::Tensor& attn_mask,
    bool average_attn_weights) {
  const bool self = query.is_same(key) && key.is_same(value);
  const bool rec = recording();
  if (!rec && runs_as_torch(attn_mask)) {
    const auto q = query.transpose(0, 1);
    auto [out, weights] =
        functional(q, self ? q : key.transpose(0, 1), self ? q : value.transpose(0, 1),
                   key_padding_mask, need_weights, attn_mask, average_attn_weights);
    return {out.transpose(0, 1), weights};
  }
  return attend(query, key, value, self, rec, key_padding_mask, need_weights, attn_mask,
                average_attn_weights);
}

std::tuple<torch::Tensor, torch::Tensor> MultiheadAttentionImpl::attend(
    const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value, bool self,
    bool rec, const torch::Tensor& key_padding_mask, bool need_weights,
    const torch::Tensor& attn_mask, bool average_attn_weights) {
  const int64_t B = query.size(0), Tq = query.size(1), E = options.embed_dim();
  const int64_t heads = options.num_heads(), hd = E / heads;
  TORCH_CHECK_VALUE(
      query.size(2) == E && key.size(2) == options.kdim() && value.size(2) == options.vdim() &&
          key.size(0) == B && value.size(0) == B && key.size(1) == value.size(1),
      name(), ": query, key and value must have features ", E, ", ", options.kdim(), " and ",
      options.vdim(), ", one batch size, and key and value one length; got shapes ", query.sizes(),
      ", ", key.sizes(), " and ", value.sizes());
  // One projection: a recorded product of its slot when recording.
  auto project = [&](size_t slot, const torch::Tensor& x, int64_t rows) {
    const auto& s = slots_[slot];
    const auto w = s.weight.narrow(0, s.weight_row, rows);
    const auto b = s.bias.defined() ? s.bias.narrow(0, s.bias_row, rows) : torch::Tensor();
    if (!rec) return F::linear(x, w, b);
    const auto wd = w.detach();
    return record(
               {x, s.weight, s.bias}, [&] { return TensorList{F::linear(x, w, b)}; },
               [wd](const TensorList& g, const std::vector<bool>& needed) {
                 TensorList out(needed.size());
                 if (needed[0]) out[0] = g[0].matmul(wd);
                 return out;
               },
               ProductsSaved{{{slot, x.detach()}}}, B)
        .front();
  };
  TORCH_CHECK_VALUE(!key_padding_mask.defined() ||
                        (key_padding_mask.dim() == 2 && key_padding_mask.size(0) == B &&
                         key_padding_mask.size(1) == key.size(1) &&
                         (key_padding_mask.scalar_type() == torch::kBool ||
                          key_padding_mask.scalar_type() == torch::kByte)),
                    name(), ": key_padding_mask must be a bool tensor [B, Tk] = [", B, ", ",
                    key.size(1), "] (true hides a key), but got ",
                    key_padding_mask.defined() ? key_padding_mask.scalar_type() : torch::kBool,
                    " of shape ",
                    key_padding_mask.defined() ? key_padding_mask.sizes() : torch::IntArrayRef{});
  torch::Tensor q, k, v;
  if (self && same_embed_dim()) {
    auto qkv = project(kQKV, query, 3 * E).chunk(3, -1);
    q = qkv[0];
    k = qkv[1];
    v = qkv[2];
  } else {
    q = project(kQ, query, E);
    k = project(kK, key, E);
    v = project(kV, value, E);
  }
  q = q * (1.0 / std::sqrt(static_cast<double>(hd)));
  auto mask = attn_mask;
  auto padding = key_padding_mask;
  // An added key and value: the bias as a position of every sample.
  auto append = [&](const torch::Tensor& x, const torch::Tensor& bias, size_t slot) {
    auto row = [&] { return bias.reshape({1, 1, E}).expand({B, 1, E}).contiguous(); };
    auto added = rec && detail::trainable(bias)
                     ? record(
                           {bias}, [&] { return TensorList{row()}; }, nullptr,
                           ProductsSaved{{{slot, torch::Tensor()}}}, B)
                           .front()
                     : row();
    return torch::cat({x, added}, 1);
  };
  if (bias_k.defined()) {
    k = append(k, bias_k, kBiasK);
    v = append(v, bias_v, kBiasV);
    mask = with_one_more_key(mask);
    padding = with_one_more_key(padding);
  }
  if (options.add_zero_attn()) {
    k = torch::cat({k, torch::zeros({B, 1, E}, k.options())}, 1);
    v = torch::cat({v, torch::zeros({B, 1, E}, v.options())}, 1);
    mask = with_one_more_key(mask);
    padding = with_one_more_key(padding);
  }
  const int64_t Tk = k.size(1);
  auto split = [&](const torch::Tensor& x) {
    return x.reshape({B, x.size(1), heads, hd}).transpose(1, 2);  // [B, heads, T, hd]
  };
  auto scores = torch::matmul(split(q), split(k).transpose(-2, -1));  // [B, heads, Tq, Tk]
  if (mask.defined()) {
    // Added to the scores whatever its type, as torch 1.13's attention does (a bool mask adds
    // one where it is true); the twins must compute the same.
    mask = mask.to(scores.scalar_type());
    TORCH_CHECK_VALUE(mask.dim() == 2 || (mask.dim() == 3 && mask.size(0) == B * heads), name(),
                      ": attn_mask must be [Tq, Tk] or [B·num_heads, Tq, Tk], but got shape ",
                      attn_mask.sizes());
    scores = scores + (mask.dim() == 2 ? mask : mask.view({B, heads, Tq, Tk}));
  }
  if (padding.defined()) {
    scores = scores.masked_fill(padding.to(torch::kBool).view({B, 1, 1, Tk}),
                                -std::numeric_limits<double>::infinity());
  }
  auto weights = torch::softmax(scores, -1);
  weights =
      F::dropout(weights, F::DropoutFuncOptions().p(options.dropout()).training(is_training()));
  auto out = torch::matmul(weights, split(v)).transpose(1, 2).reshape({B, Tq, E});
  // The output projection records itself, in the layout its tape reads.
  out = out_proj->batch_first() ? out_proj(out) : out_proj(out.transpose(0, 1)).transpose(0, 1);
  if (!need_weights) return {out, torch::Tensor()};
  return {out, average_attn_weights ? weights.sum(1) / heads : weights};
}

std::unique_ptr<grad_sample::PerSampleGrads> MultiheadAttentionImpl::make_grads(
    std::vector<Call<ProductsSaved>> calls) {
  const int64_t B = calls.front().batch_size;
  auto records = product_records(std::move(calls));
  // Self-attention's fused product covers the rows of the q, k and v products; when one pass
  // has both, the fused records become the three row blocks, so that each block's records are
  // one sequence (the norm of a sum is not the sum of norms).
  const bool mixed = std::any_of(records.begin(), records.end(), [](const ProductRecord& r) {
    return r.slot == kQ || r.slot == kK || r.slot == kV;
  });
  if (mixed) {
    std::vector<ProductRecord> split;
    for (auto& r : records) {
      if (r.slot != kQKV) {
        split.push_back(std::move(r));
        continue;
      }
      const auto g = r.grad_output.chunk(3, -1);
      for (size_t k = 0; k < 3; ++k) split.push_back({kQ + k, r.input, g[k]});
    }
    records = std::move(split);
  }
  return products_rule(slots_, std::move(records), B, norm_method());
}

// ----------------------------------------------------------------------------------- encoder

TransformerEncoderLayerImpl::TransformerEncoderLayerImpl(
    const torch::nn::TransformerEncoderLayerOptions& options_)
    : torch::nn::Cloneable<TransformerEncoderLayerImpl>("dptorch::nn::TransformerEncoderLayer"),
      options(options_) {
  reset();
}

void TransformerEncoderLayerImpl::reset() {
  const int64_t d = options.d_model(), ff = options.dim_feedforward();
  self_attn = register_module(
      "self_attn",
      MultiheadAttention(
          torch::nn::MultiheadAttentionOptions(d, options.nhead()).dropout(options.dropout())));
  linear1 = register_module("linear1", Linear(d, ff));
  dropout = register_module("dropout", torch::nn::Dropout(options.dropout()));
  linear2 = register_module("linear2", Linear(ff, d));
  norm1 = register_module("norm1", LayerNorm(torch::nn::LayerNormOptions({d})));
  norm2 = register_module("norm2", LayerNorm(torch::nn::LayerNormOptions({d})));
  dropout1 = register_module("dropout1", torch::nn::Dropout(options.dropout()));
  dropout2 = register_module("dropout2", torch::nn::Dropout(options.dropout()));
}

void TransformerEncoderLayerImpl::pretty_print(std::ostream& stream) const {
  stream << "dptorch::nn::TransformerEncoderLayer(d_model=" << options.d_model()
         << ", nhead=" << options.nhead() << ", dim_feedforward=" << options.dim_feedforward()
         << ", dropout=" << options.dropout() << ")";
}

torch::Tensor TransformerEncoderLayerImpl::forward(const torch::Tensor& src,
                                                   const torch::Tensor& src_mask,
                                                   const torch::Tensor& src_key_padding_mask) {
  // Attached, the dp sublayers read their tape's layout: batch first unless it says otherwise.
  const bool batch_first = self_attn->attached() && self_attn->batch_first();
  const auto x = batch_first ? src.transpose(0, 1) : src;
  const auto attended =
      batch_first ? std::get<0>(self_attn->forward_batch_first(x, x, x, src_key_padding_mask, false,
                                                               src_mask))
                  : std::get<0>(self_attn(x, x, x, src_key_padding_mask, false, src_mask));
  const auto y = norm1(x + dropout1(attended));
  auto h = linear1(y);
  const auto& activation = options.activation();
  if (c10::get_if<torch::enumtype::kReLU>(&activation)) {
    h = F::relu(h);
  } else if (c10::get_if<torch::enumtype::kGELU>(&activation)) {
    h = F::gelu(h);
  } else {
    h = c10::get<std::function<torch::Tensor(const torch::Tensor&)>>(activation)(h);
  }
  const auto out = norm2(y + dropout2(linear2(dropout(h))));
  return batch_first ? out.transpose(0, 1) : out;
}

TransformerEncoderImpl::TransformerEncoderImpl(const torch::nn::TransformerEncoderOptions& options)
    : torch::nn::Cloneable<TransformerEncoderImpl>("dptorch::nn::TransformerEncoder"),
      num_layers_(options.num_layers()) {
  TORCH_CHECK_VALUE(!options.encoder_layer().is_empty(),
                    "dptorch::nn::TransformerEncoder needs an encoder_layer in its options");
  layer_ = TransformerEncoderLayer(options.encoder_layer()->options);
  detail::copy_state(*options.encoder_layer(), *layer_);
  if (!options.norm().is_empty()) {
    const auto module = options.norm().ptr();
    if (auto torch_norm = std::dynamic_pointer_cast<torch::nn::LayerNormImpl>(module)) {
      norm_template_ = LayerNorm(torch_norm->options);
      detail::copy_state(*torch_norm, *norm_template_);
    } else if (auto dp_norm = std::dynamic_pointer_cast<LayerNormImpl>(module)) {
      norm_template_ = LayerNorm(std::dynamic_pointer_cast<LayerNormImpl>(dp_norm->clone()));
    } else {
      TORCH_CHECK_VALUE(false, "dptorch::nn::TransformerEncoder takes a LayerNorm as its norm, ",
                        "but got ", module->name());
    }
  }
  reset();
}

TransformerEncoderImpl::TransformerEncoderImpl(const TransformerEncoderLayer& layer,
                                               int64_t num_layers, const LayerNorm& norm)
    : torch::nn::Cloneable<TransformerEncoderImpl>("dptorch::nn::TransformerEncoder"),
      layer_(layer),
      norm_template_(norm),
      num_layers_(num_layers) {
  TORCH_CHECK_VALUE(!layer.is_empty(), "dptorch::nn::TransformerEncoder needs a layer");
  reset();
}

void TransformerEncoderImpl::reset() {
  TORCH_CHECK_VALUE(num_layers_ >= 1, "dptorch::nn::TransformerEncoder needs num_layers >= 1, ",
                    "but got ", num_layers_);
  layers = register_module("layers", torch::nn::ModuleList());
  for (int64_t i = 0; i < num_layers_; ++i) layers->push_back(frozen_alike(*layer_));
  if (!norm_template_.is_empty()) {
    norm = register_module(
        "norm", LayerNorm(std::dynamic_pointer_cast<LayerNormImpl>(frozen_alike(*norm_template_))));
  }
}

void TransformerEncoderImpl::pretty_print(std::ostream& stream) const {
  stream << "dptorch::nn::TransformerEncoder(num_layers=" << num_layers_ << ")";
}

torch::Tensor TransformerEncoderImpl::forward(const torch::Tensor& src,
                                              const torch::Tensor& src_mask,
                                              const torch::Tensor& src_key_padding_mask) {
  auto x = src;
  for (const auto& layer : *layers) {
    x = layer->as<TransformerEncoderLayerImpl>()->forward(x, src_mask, src_key_padding_mask);
  }
  if (norm.is_empty()) return x;
  return norm->attached() && norm->batch_first() ? norm(x.transpose(0, 1)).transpose(0, 1)
                                                 : norm(x);
}

}  // namespace dptorch::nn
