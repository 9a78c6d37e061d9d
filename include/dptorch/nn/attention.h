#pragma once

#include <dptorch/nn/layer.h>
#include <dptorch/nn/linear.h>
#include <dptorch/nn/normalization.h>

#include <torch/nn/modules/activation.h>
#include <torch/nn/modules/dropout.h>
#include <torch/nn/modules/transformercoder.h>
#include <torch/nn/modules/transformerlayer.h>

#include <memory>
#include <tuple>
#include <vector>

/// The attention family: MultiheadAttention, TransformerEncoderLayer and TransformerEncoder as
/// torch 1.13 has them (sequence first: [T, B, E]). The projections are products (linear.h):
/// q, k and v of self-attention are one record of in_proj_weight over [B, T, E], the output
/// projection a dp Linear; a key hidden by key_padding_mask gets no attention, so it contributes
/// nothing to a sample's gradient.
namespace dptorch::nn {

/// Twin of torch::nn::MultiheadAttention: embed_dim, num_heads, dropout, bias, add_bias_kv,
/// add_zero_attn, kdim, vdim; torch's parameter names (in_proj_weight, or q/k/v_proj_weight when
/// kdim or vdim differ from embed_dim; in_proj_bias, bias_k, bias_v, out_proj.weight/bias).
/// attn_mask is added to the scores, as torch 1.13's C++ attention does: to hide a position, give
/// it -inf in a floating-point mask (a bool mask adds 1 where it is true, as in torch 1.13).
class MultiheadAttentionImpl
    : public TwinLayer<MultiheadAttentionImpl, torch::nn::MultiheadAttention, ProductsSaved> {
 public:
  MultiheadAttentionImpl(int64_t embed_dim, int64_t num_heads)
      : MultiheadAttentionImpl(torch::nn::MultiheadAttentionOptions(embed_dim, num_heads)) {}
  explicit MultiheadAttentionImpl(const torch::nn::MultiheadAttentionOptions& options);

  /// (output [Tq, B, E], weights) for query [Tq, B, E], key [Tk, B, kdim], value [Tk, B, vdim];
  /// key_padding_mask [B, Tk] (true hides a key); attn_mask [Tq, Tk] or [B·heads, Tq, Tk];
  /// weights [B, Tq, Tk] averaged over heads (or [B, heads, Tq, Tk]), undefined unless needed.
  std::tuple<torch::Tensor, torch::Tensor> forward(
      const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
      const torch::Tensor& key_padding_mask = {}, bool need_weights = true,
      const torch::Tensor& attn_mask = {}, bool average_attn_weights = true);
  /// forward() on batch-first tensors ([B, T, ·] in and out).
  std::tuple<torch::Tensor, torch::Tensor> forward_batch_first(
      const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
      const torch::Tensor& key_padding_mask = {}, bool need_weights = true,
      const torch::Tensor& attn_mask = {}, bool average_attn_weights = true);

  torch::Tensor in_proj_weight, in_proj_bias, bias_k, bias_v;
  torch::Tensor q_proj_weight, k_proj_weight, v_proj_weight;
  /// The output projection, a dp layer of its own.
  Linear out_proj{nullptr};

 protected:
  FORWARD_HAS_DEFAULT_ARGS({3, torch::nn::AnyValue(torch::Tensor())},
                           {4, torch::nn::AnyValue(true)},
                           {5, torch::nn::AnyValue(torch::Tensor())},
                           {6, torch::nn::AnyValue(true)})
  friend class TwinLayer<MultiheadAttentionImpl, torch::nn::MultiheadAttention, ProductsSaved>;
  void adopt();
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(
      std::vector<Call<ProductsSaved>> calls) override;

 private:
  [[nodiscard]] bool same_embed_dim() const;
  /// Whether a call that records nothing of its own may run torch's functional attention:
  /// the output projection does not record either, and torch can take the mask.
  [[nodiscard]] bool runs_as_torch(const torch::Tensor& attn_mask) const;
  /// The forward on batch-first tensors, recording the projections if `record`; `self` when
  /// query, key and value are one tensor.
  std::tuple<torch::Tensor, torch::Tensor> attend(
      const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value, bool self,
      bool record, const torch::Tensor& key_padding_mask, bool need_weights,
      const torch::Tensor& attn_mask, bool average_attn_weights);
  /// torch's own forward (sequence first), when nothing records.
  std::tuple<torch::Tensor, torch::Tensor> functional(
      const torch::Tensor& query, const torch::Tensor& key, const torch::Tensor& value,
      const torch::Tensor& key_padding_mask, bool need_weights, const torch::Tensor& attn_mask,
      bool average_attn_weights);
  std::vector<ProductSlot> slots_;
};
TORCH_MODULE(MultiheadAttention);

/// Twin of torch::nn::TransformerEncoderLayer (torch 1.13: post-norm, [S, B, E]): self_attn,
/// linear1, dropout, linear2, norm1, norm2, dropout1, dropout2, with torch's names.
class TransformerEncoderLayerImpl : public torch::nn::Cloneable<TransformerEncoderLayerImpl> {
 public:
  TransformerEncoderLayerImpl(int64_t d_model, int64_t nhead)
      : TransformerEncoderLayerImpl(torch::nn::TransformerEncoderLayerOptions(d_model, nhead)) {}
  explicit TransformerEncoderLayerImpl(const torch::nn::TransformerEncoderLayerOptions& options);
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  /// Encodes src [S, B, E]; src_mask [S, S], src_key_padding_mask [B, S] (true: padding).
  torch::Tensor forward(const torch::Tensor& src, const torch::Tensor& src_mask = {},
                        const torch::Tensor& src_key_padding_mask = {});

  torch::nn::TransformerEncoderLayerOptions options;
  MultiheadAttention self_attn{nullptr};
  Linear linear1{nullptr}, linear2{nullptr};
  LayerNorm norm1{nullptr}, norm2{nullptr};
  torch::nn::Dropout dropout{nullptr}, dropout1{nullptr}, dropout2{nullptr};

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())},
                           {2, torch::nn::AnyValue(torch::Tensor())})
};
TORCH_MODULE(TransformerEncoderLayer);

/// Twin of torch::nn::TransformerEncoder: `layers` (copies of the given layer, weights
/// included, as torch clones it) and an optional final LayerNorm `norm`.
class TransformerEncoderImpl : public torch::nn::Cloneable<TransformerEncoderImpl> {
 public:
  /// From torch's options: its encoder_layer is converted (weights copied); a norm must be a
  /// torch::nn::LayerNorm or a dptorch::nn::LayerNorm.
  explicit TransformerEncoderImpl(const torch::nn::TransformerEncoderOptions& options);
  /// `num_layers` copies of `layer`, then `norm` if given.
  TransformerEncoderImpl(const TransformerEncoderLayer& layer, int64_t num_layers,
                         const LayerNorm& norm = LayerNorm(nullptr));
  void reset() override;
  void pretty_print(std::ostream& stream) const override;
  /// Encodes src [S, B, E] through every layer, then the norm.
  torch::Tensor forward(const torch::Tensor& src, const torch::Tensor& src_mask = {},
                        const torch::Tensor& src_key_padding_mask = {});

  torch::nn::ModuleList layers{nullptr};
  LayerNorm norm{nullptr};

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())},
                           {2, torch::nn::AnyValue(torch::Tensor())})

 private:
  TransformerEncoderLayer layer_{nullptr};
  LayerNorm norm_template_{nullptr};
  int64_t num_layers_ = 0;
};
TORCH_MODULE(TransformerEncoder);

}  // namespace dptorch::nn
