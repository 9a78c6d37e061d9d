#pragma once

#include <dptorch/nn/layer.h>
#include <dptorch/nn/linear.h>

#include <torch/nn/modules/rnn.h>
#include <torch/nn/utils/rnn.h>

#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

/// The recurrent family: RNN (tanh, relu), LSTM, GRU and their cells. Every weight enters through
/// products, so the rule is products_rule (linear.h): the input-to-hidden products of all time
/// steps are one record (one product over B·T rows), the hidden-to-hidden products of the steps
/// one more sequence of the same length; per-sample norms by ghost norms over the sequence or
/// materialisation, by the cost model, and the clipped sum one product over all B·T rows per
/// weight. A padded step (lengths, PackedSequence) contributes nothing to a sample's gradient.
namespace dptorch::nn {

/// The cell a recurrent layer repeats.
enum class RecurrentKind { kRNNTanh, kRNNReLU, kLSTM, kGRU };

/// What a recurrent layer saves per call of one layer in one direction.
struct RecurrentSaved {
  /// The products' slots (see ProductSlot): input-to-hidden and hidden-to-hidden.
  size_t ih_slot = 0, hh_slot = 0;
  /// The layer's input [B, T, d], in the order the steps ran.
  torch::Tensor input;
  /// The hidden state each step started from [B, T, H], set once the steps have run.
  std::shared_ptr<torch::Tensor> hidden;
  /// GRU only: the gradient of each step's hidden-to-hidden product [B, 3H], set in backward.
  /// (For RNN and LSTM it equals the input-to-hidden product's, which the call's grad_outputs
  /// hold once.)
  std::shared_ptr<std::vector<torch::Tensor>> hidden_grads;
};

namespace detail {

/// The shape of a recurrent layer, read from its options.
struct RecurrentShape {
  RecurrentKind kind = RecurrentKind::kLSTM;
  int64_t input_size = 0, hidden_size = 0, num_layers = 1;
  bool bias = true, batch_first = false, bidirectional = false;
  double dropout = 0;
};

/// The part every recurrent twin shares: adopting the twin's parameters (torch's names), the
/// attached forward of the stacked layers, and the rule.
template <class Derived, class Twin>
class RecurrentBase : public TwinLayer<Derived, Twin, RecurrentSaved> {
  using Base = TwinLayer<Derived, Twin, RecurrentSaved>;

 protected:
  using typename Base::Options;
  RecurrentBase(std::string name, Options options) : Base(std::move(name), std::move(options)) {}

  friend Base;
  void adopt();
  [[nodiscard]] RecurrentShape shape() const;
  std::unique_ptr<grad_sample::PerSampleGrads> make_grads(
      std::vector<Call<RecurrentSaved>> calls) override;

  /// The attached forward of the stack over x [B, T, input_size] (batch first): `lengths` [B]
  /// (or undefined: every sample runs T steps), initial states [L·D, B, H] (undefined: zeros;
  /// `c0` for LSTM only). Returns the output [B, T, D·H] (zero at padded steps), h_n and c_n.
  std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> run(const torch::Tensor& x,
                                                              const torch::Tensor& lengths,
                                                              torch::Tensor h0, torch::Tensor c0);
  /// The same for a sequence in the layer's own layout (batch_first or not, batched or not),
  /// with states [L·D, B, H] (or [L·D, H] unbatched); the output in the input's layout.
  std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> run_sequence(const torch::Tensor& input,
                                                                       const torch::Tensor& lengths,
                                                                       const torch::Tensor& h0,
                                                                       const torch::Tensor& c0);
  /// The same for a PackedSequence; the output packed alike.
  std::tuple<torch::nn::utils::rnn::PackedSequence, torch::Tensor, torch::Tensor> run_packed(
      const torch::nn::utils::rnn::PackedSequence& input, const torch::Tensor& h0,
      const torch::Tensor& c0);
  /// The detached forward over padded `input` with `lengths`: packs, runs the twin, pads again.
  torch::nn::utils::rnn::PackedSequence pack(const torch::Tensor& input,
                                             const torch::Tensor& lengths) const;
  torch::Tensor unpack(const torch::nn::utils::rnn::PackedSequence& packed, int64_t steps) const;
  /// Refuses lengths that are not one integer in [1, steps] per sample, naming the layer.
  void check_lengths(const torch::Tensor& lengths, int64_t batch, int64_t steps) const;

 private:
  std::vector<ProductSlot> slots_;
};

}  // namespace detail

namespace detail {

/// The forwards of RNN and GRU, whose state is one tensor h.
template <class Derived, class Twin>
class SingleStateRecurrent : public RecurrentBase<Derived, Twin> {
 public:
  /// (output, h_n) for `input` [T, B, input_size] ([B, T, ·] with batch_first; [T, ·] unbatched),
  /// from `hx` [L·D, B, H] (zeros when undefined).
  std::tuple<torch::Tensor, torch::Tensor> forward(const torch::Tensor& input,
                                                   torch::Tensor hx = {});
  /// forward() over a PackedSequence; the output packed alike.
  std::tuple<torch::nn::utils::rnn::PackedSequence, torch::Tensor> forward_with_packed_input(
      const torch::nn::utils::rnn::PackedSequence& input, torch::Tensor hx = {});
  /// forward() over a padded batch whose sample i has `lengths[i]` steps; the output is zero
  /// past each sample's length and h_n is each sample's state after its last step.
  std::tuple<torch::Tensor, torch::Tensor> forward_with_lengths(const torch::Tensor& input,
                                                                const torch::Tensor& lengths,
                                                                torch::Tensor hx = {});

 protected:
  using RecurrentBase<Derived, Twin>::RecurrentBase;
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())})
};

}  // namespace detail

/// Twin of torch::nn::RNN (tanh or relu): num_layers, bias, batch_first, dropout between layers,
/// bidirectional; initial state; variable lengths by `forward_with_lengths` or PackedSequence.
class RNNImpl : public detail::SingleStateRecurrent<RNNImpl, torch::nn::RNN> {
 public:
  RNNImpl(int64_t input_size, int64_t hidden_size)
      : RNNImpl(torch::nn::RNNOptions(input_size, hidden_size)) {}
  explicit RNNImpl(const torch::nn::RNNOptions& options);
};
TORCH_MODULE(RNN);

using PackedSequence = torch::nn::utils::rnn::PackedSequence;

/// Twin of torch::nn::LSTM (proj_size is not supported).
class LSTMImpl : public detail::RecurrentBase<LSTMImpl, torch::nn::LSTM> {
 public:
  using State = std::tuple<torch::Tensor, torch::Tensor>;
  LSTMImpl(int64_t input_size, int64_t hidden_size)
      : LSTMImpl(torch::nn::LSTMOptions(input_size, hidden_size)) {}
  explicit LSTMImpl(const torch::nn::LSTMOptions& options);
  /// (output, (h_n, c_n)) for `input` [T, B, input_size] ([B, T, ·] with batch_first).
  std::tuple<torch::Tensor, State> forward(const torch::Tensor& input,
                                           torch::optional<State> hx = {});
  std::tuple<PackedSequence, State> forward_with_packed_input(const PackedSequence& input,
                                                              torch::optional<State> hx = {});
  /// forward() over a padded batch whose sample i has `lengths[i]` steps (see RNN).
  std::tuple<torch::Tensor, State> forward_with_lengths(const torch::Tensor& input,
                                                        const torch::Tensor& lengths,
                                                        torch::optional<State> hx = {});

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::optional<State>())})
};
TORCH_MODULE(LSTM);

/// Twin of torch::nn::GRU (the same options and forwards as RNN).
class GRUImpl : public detail::SingleStateRecurrent<GRUImpl, torch::nn::GRU> {
 public:
  GRUImpl(int64_t input_size, int64_t hidden_size)
      : GRUImpl(torch::nn::GRUOptions(input_size, hidden_size)) {}
  explicit GRUImpl(const torch::nn::GRUOptions& options);
};
TORCH_MODULE(GRU);

/// Twin of torch::nn::RNNCell: one step, input [B, input_size] (or [input_size]).
class RNNCellImpl : public detail::RecurrentBase<RNNCellImpl, torch::nn::RNNCell> {
 public:
  RNNCellImpl(int64_t input_size, int64_t hidden_size)
      : RNNCellImpl(torch::nn::RNNCellOptions(input_size, hidden_size)) {}
  explicit RNNCellImpl(const torch::nn::RNNCellOptions& options);
  torch::Tensor forward(const torch::Tensor& input, torch::Tensor hx = {});

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())})
};
TORCH_MODULE(RNNCell);

/// Twin of torch::nn::LSTMCell.
class LSTMCellImpl : public detail::RecurrentBase<LSTMCellImpl, torch::nn::LSTMCell> {
 public:
  using State = std::tuple<torch::Tensor, torch::Tensor>;
  LSTMCellImpl(int64_t input_size, int64_t hidden_size)
      : LSTMCellImpl(torch::nn::LSTMCellOptions(input_size, hidden_size)) {}
  explicit LSTMCellImpl(const torch::nn::LSTMCellOptions& options);
  State forward(const torch::Tensor& input, torch::optional<State> hx = {});

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::optional<State>())})
};
TORCH_MODULE(LSTMCell);

/// Twin of torch::nn::GRUCell.
class GRUCellImpl : public detail::RecurrentBase<GRUCellImpl, torch::nn::GRUCell> {
 public:
  GRUCellImpl(int64_t input_size, int64_t hidden_size)
      : GRUCellImpl(torch::nn::GRUCellOptions(input_size, hidden_size)) {}
  explicit GRUCellImpl(const torch::nn::GRUCellOptions& options);
  torch::Tensor forward(const torch::Tensor& input, torch::Tensor hx = {});

 protected:
  FORWARD_HAS_DEFAULT_ARGS({1, torch::nn::AnyValue(torch::Tensor())})
};
TORCH_MODULE(GRUCell);

}  // namespace dptorch::nn
