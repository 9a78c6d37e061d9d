#pragma once

#include <dptorch/nn/layer.h>

#include <torch/nn/modules/linear.h>

#include <memory>
#include <string>
#include <vector>

/// The linear family: the Linear twin, and the rule of every layer whose parameters enter only
/// through products y = a Wᵀ + b (recurrent layers, attention projections, a user's own).
namespace dptorch::nn {

/// What Linear saves per call: its input and the input's batch dimension; or, once the call was
/// reduced as backward filed it, its per-sample gradients (the weight's in chunks, with their
/// norms) in place of input and output gradient.
struct LinearSaved {
  torch::Tensor input;
  int64_t batch_dim = 0;
  bool reduced = false;
  std::vector<torch::Tensor> weight_samples;
  torch::Tensor bias_samples;
  torch::Tensor weight_norms_sq;
};

/// Twin of torch::nn::Linear: y = x Wᵀ + b over any leading dimensions.
class LinearImpl : public TwinLayer<LinearImpl, torch::nn::Linear, LinearSaved> {
 public:
  LinearImpl(int64_t in_features, int64_t out_features)
      : LinearImpl(torch::nn::LinearOptions(in_features, out_features)) {}
  explicit LinearImpl(const torch::nn::LinearOptions& options);
  /// Applies the layer to `input` [*, in_features].
  torch::Tensor forward(const torch::Tensor& input);

  /// [out_features, in_features]
  torch::Tensor weight;
  /// [out_features], undefined without bias.
  torch::Tensor bias;

 protected:
  friend class TwinLayer<LinearImpl, torch::nn::Linear, LinearSaved>;
  void adopt();
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(
      std::vector<Call<LinearSaved>> calls) override;
};
TORCH_MODULE(Linear);

/// A weight (or a block of its rows) that a layer uses in products y = a Wᵀ + b: the products
/// recorded for it share a rule. Either tensor may be undefined or frozen; two slots may name
/// the same parameter at different rows (the q, k and v blocks of an attention's in_proj_weight);
/// slots whose rows overlap may not both have records in one pass (products_rule refuses it).
struct ProductSlot {
  std::string weight_name;
  torch::Tensor weight;
  /// The product uses rows [weight_row, weight_row + p) of the weight (viewed as [rows, d]).
  int64_t weight_row = 0;
  std::string bias_name;
  torch::Tensor bias;
  /// ... and elements [bias_row, bias_row + p) of the bias (flattened).
  int64_t bias_row = 0;
};

/// One recorded product of a slot: input a [B, T, d] (undefined for a slot without a weight, a
/// bias added as it is) and the gradient of its output g [B, T, p].
struct ProductRecord {
  size_t slot = 0;
  torch::Tensor input;
  torch::Tensor grad_output;
};

/// The rule of a layer made of products: per slot, its records are one sequence [B, ΣT, ·]
/// (ghost norms over it or materialisation, by the cost model; the clipped sum one product over
/// every row); per parameter, the slots that use it add up. Parameters appear in `names()` in the
/// order the slots first name them, each once.
[[nodiscard]] std::unique_ptr<grad_sample::PerSampleGrads> products_rule(
    const std::vector<ProductSlot>& slots, std::vector<ProductRecord> records, int64_t batch_size,
    NormMethod method);

}  // namespace dptorch::nn

namespace dptorch::nn {

/// What a layer made of products saves per recorded call: for each output of the call, the slot
/// of the product that computed it and the product's input a [B, T, d] (undefined for a slot
/// without a weight). The output's gradient, [B, T, p], is the product's.
struct ProductsSaved {
  std::vector<std::pair<size_t, torch::Tensor>> products;
};

/// The product records of calls saved as ProductsSaved, for products_rule.
[[nodiscard]] std::vector<ProductRecord> product_records(std::vector<Call<ProductsSaved>> calls);

}  // namespace dptorch::nn
