#include <dptorch/nn/recurrent.h>

#include <torch/torch.h>

#include <string>
#include <type_traits>

namespace dptorch::nn {
namespace detail {
namespace {

namespace F = torch::nn::functional;
namespace rnn = torch::nn::utils::rnn;

template <class Nonlinearity>
RecurrentKind rnn_kind(const Nonlinearity& n) {
  return c10::get_if<torch::enumtype::kReLU>(&n) ? RecurrentKind::kRNNReLU
                                                 : RecurrentKind::kRNNTanh;
}

template <class Options>
RecurrentShape stack_shape(const Options& o, RecurrentKind kind) {
  RecurrentShape s;
  s.kind = kind;
  s.input_size = o.input_size();
  s.hidden_size = o.hidden_size();
  s.num_layers = o.num_layers();
  s.bias = o.bias();
  s.batch_first = o.batch_first();
  s.bidirectional = o.bidirectional();
  s.dropout = o.dropout();
  return s;
}

template <class Options>
RecurrentShape cell_shape(const Options& o, RecurrentKind kind) {
  RecurrentShape s;
  s.kind = kind;
  s.input_size = o.input_size();
  s.hidden_size = o.hidden_size();
  s.bias = o.bias();
  s.batch_first = true;
  return s;
}

RecurrentShape shape_of(const torch::nn::RNNOptions& o) {
  return stack_shape(o, rnn_kind(o.nonlinearity()));
}
RecurrentShape shape_of(const torch::nn::LSTMOptions& o) {
  return stack_shape(o, RecurrentKind::kLSTM);
}
RecurrentShape shape_of(const torch::nn::GRUOptions& o) {
  return stack_shape(o, RecurrentKind::kGRU);
}
RecurrentShape shape_of(const torch::nn::RNNCellOptions& o) {
  return cell_shape(o, rnn_kind(o.nonlinearity()));
}
RecurrentShape shape_of(const torch::nn::LSTMCellOptions& o) {
  return cell_shape(o, RecurrentKind::kLSTM);
}
RecurrentShape shape_of(const torch::nn::GRUCellOptions& o) {
  return cell_shape(o, RecurrentKind::kGRU);
}

// The order a reverse direction reads x [B, T, ...]: each sample's first lengths[i] steps
// reversed, the padding after them left in place (an involution).
torch::Tensor reverse_steps(const torch::Tensor& x, const torch::Tensor& lengths) {
  if (!lengths.defined()) return x.flip(1);
  const int64_t B = x.size(0), T = x.size(1);
  auto t = torch::arange(T, lengths.options()).unsqueeze(0);
  auto len = lengths.unsqueeze(1);
  auto index = torch::where(t < len, len - 1 - t, t);  // [B, T]
  std::vector<int64_t> shape{B, T};
  for (int64_t d = 2; d < x.dim(); ++d) shape.push_back(1);
  return x.gather(1, index.view(shape).expand(x.sizes()));
}

// One step of the cell from the two products' outputs [B, G·H]; returns (h', c').
std::pair<torch::Tensor, torch::Tensor> cell_step(RecurrentKind kind, const torch::Tensor& xw,
                                                  const torch::Tensor& hw, const torch::Tensor& h,
                                                  const torch::Tensor& c) {
  switch (kind) {
    case RecurrentKind::kRNNTanh: return {torch::tanh(xw + hw), c};
    case RecurrentKind::kRNNReLU: return {torch::relu(xw + hw), c};
    case RecurrentKind::kLSTM: {
      auto gates = (xw + hw).chunk(4, 1);
      auto c1 = torch::sigmoid(gates[1]) * c + torch::sigmoid(gates[0]) * torch::tanh(gates[2]);
      return {torch::sigmoid(gates[3]) * torch::tanh(c1), c1};
    }
    case RecurrentKind::kGRU: {
      auto x3 = xw.chunk(3, 1), h3 = hw.chunk(3, 1);
      auto r = torch::sigmoid(x3[0] + h3[0]);
      auto z = torch::sigmoid(x3[1] + h3[1]);
      auto n = torch::tanh(x3[2] + r * h3[2]);
      return {n + z * (h - n), c};
    }
  }
  return {h, c};
}

torch::Tensor state_or_zeros(const torch::Tensor& state, int64_t layers, int64_t batch,
                             int64_t hidden, const torch::Tensor& like) {
  if (state.defined()) return state;
  return torch::zeros({layers, batch, hidden}, like.options().requires_grad(false));
}

}  // namespace

template <class Derived, class Twin>
RecurrentShape RecurrentBase<Derived, Twin>::shape() const {
  return shape_of(this->options);
}

template <class Derived, class Twin>
void RecurrentBase<Derived, Twin>::adopt() {
  for (const auto& p : this->twin().named_parameters(/*recurse=*/false)) {
    this->adopt_parameter(p.key(), p.value());
  }
  const auto s = shape();
  auto params = this->named_parameters(/*recurse=*/false);
  auto find = [&](const std::string& name) {
    auto* p = params.find(name);
    return p == nullptr ? torch::Tensor() : *p;
  };
  auto slot = [&](const std::string& kind, const std::string& suffix) {
    ProductSlot out;
    out.weight_name = "weight_" + kind + suffix;
    out.weight = find(out.weight_name);
    out.bias_name = "bias_" + kind + suffix;
    out.bias = find(out.bias_name);
    return out;
  };
  slots_.clear();
  const bool cell = std::is_same_v<Twin, torch::nn::RNNCell> ||
                    std::is_same_v<Twin, torch::nn::LSTMCell> ||
                    std::is_same_v<Twin, torch::nn::GRUCell>;
  if (cell) {
    slots_ = {slot("ih", ""), slot("hh", "")};
    return;
  }
  for (int64_t l = 0; l < s.num_layers; ++l) {
    for (int d = 0; d < (s.bidirectional ? 2 : 1); ++d) {
      const std::string suffix = "_l" + std::to_string(l) + (d == 1 ? "_reverse" : "");
      slots_.push_back(slot("ih", suffix));
      slots_.push_back(slot("hh", suffix));
    }
  }
}

template <class Derived, class Twin>
void RecurrentBase<Derived, Twin>::check_lengths(const torch::Tensor& lengths, int64_t batch,
                                                 int64_t steps) const {
  TORCH_CHECK_VALUE(lengths.dim() == 1 && lengths.size(0) == batch, this->name(),
                    ": lengths must hold one length per sample (", batch, "), but got shape ",
                    lengths.sizes());
  TORCH_CHECK_VALUE(!lengths.is_floating_point() && !lengths.is_complex(), this->name(),
                    ": lengths must be integers, but got ", lengths.scalar_type());
  if (batch == 0) return;
  const auto lo = lengths.min().item<int64_t>(), hi = lengths.max().item<int64_t>();
  TORCH_CHECK_VALUE(lo >= 1 && hi <= steps, this->name(), ": lengths must be in [1, ", steps,
                    "] (the padded steps), but range over [", lo, ", ", hi, "]");
}

template <class Derived, class Twin>
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> RecurrentBase<Derived, Twin>::run(
    const torch::Tensor& x, const torch::Tensor& lengths, torch::Tensor h0, torch::Tensor c0) {
  const auto s = shape();
  TORCH_CHECK(x.dim() == 3 && x.size(2) == s.input_size, this->name(),
              " expects input features of size ", s.input_size, ", but got shape ", x.sizes());
  const int64_t B = x.size(0), T = x.size(1), H = s.hidden_size;
  const int64_t D = s.bidirectional ? 2 : 1, L = s.num_layers;
  const bool lstm = s.kind == RecurrentKind::kLSTM, gru = s.kind == RecurrentKind::kGRU;
  torch::Tensor lens, mask;  // mask [B, T]: the steps each sample has
  if (lengths.defined()) {
    check_lengths(lengths, B, T);
    lens = lengths.to(x.device(), torch::kLong);
    mask = torch::arange(T, lens.options()).unsqueeze(0) < lens.unsqueeze(1);
  }
  h0 = state_or_zeros(h0, L * D, B, H, x);
  if (lstm) c0 = state_or_zeros(c0, L * D, B, H, x);
  TORCH_CHECK_VALUE(h0.sizes() == torch::IntArrayRef({L * D, B, H}), this->name(),
                    ": the initial hidden state must have shape [", L * D, ", ", B, ", ", H,
                    "], but got ", h0.sizes());
  TORCH_CHECK_VALUE(!lstm || c0.sizes() == h0.sizes(), this->name(),
                    ": the initial cell state must have shape ", h0.sizes(), ", but got ",
                    c0.sizes());

  // Padded steps read zeros (whatever the padding holds), so nothing of them reaches a norm.
  torch::Tensor layer_in = mask.defined() ? x.masked_fill(mask.logical_not().unsqueeze(2), 0) : x;
  std::vector<torch::Tensor> h_n, c_n;
  for (int64_t l = 0; l < L; ++l) {
    std::vector<torch::Tensor> outputs;
    for (int64_t d = 0; d < D; ++d) {
      const int64_t index = l * D + d;
      const auto& ih = slots_.at(2 * index);
      const auto& hh = slots_.at(2 * index + 1);
      const auto in = d == 1 ? reverse_steps(layer_in, lens) : layer_in;

      RecurrentSaved saved;
      saved.ih_slot = 2 * index;
      saved.hh_slot = 2 * index + 1;
      saved.input = in.detach();
      saved.hidden = std::make_shared<torch::Tensor>();
      if (gru) saved.hidden_grads = std::make_shared<std::vector<torch::Tensor>>(T);
      const auto hidden = saved.hidden;
      const auto hidden_grads = saved.hidden_grads;
      const auto w_ih = ih.weight.detach(), w_hh = hh.weight.detach();
      auto product_grad = [](const torch::Tensor& w) {
        return [w](const TensorList& g, const std::vector<bool>& needed) {
          TensorList out(needed.size());
          if (needed[0]) out[0] = g[0].matmul(w);
          return out;
        };
      };
      // Every step's input-to-hidden product at once: one record over B·T rows.
      const auto xw = this->record(
                              // hh's parameters too: the call files the gates' gradient,
                              // which hh's rule needs even when ih is frozen.
                              {in, ih.weight, ih.bias, hh.weight, hh.bias},
                              [&] { return TensorList{F::linear(in, ih.weight, ih.bias)}; },
                              product_grad(w_ih), std::move(saved), B)
                          .front();
      // One unbind (its backward stacks every step's gradient once), not a select per step
      // (each of which would scatter into a zero tensor of the whole sequence in backward).
      const auto xw_steps = xw.unbind(1);
      torch::Tensor h = h0[index], c = lstm ? c0[index] : torch::Tensor();
      std::vector<torch::Tensor> steps(T), previous(T);
      for (int64_t t = 0; t < T; ++t) {
        previous[t] = h.detach();
        std::function<void(TensorList)> file = [](TensorList) {};
        if (gru) file = [hidden_grads, t](TensorList g) { (*hidden_grads)[t] = std::move(g[0]); };
        const auto hw = this->taped(
                                {h, hh.weight, hh.bias},
                                [&] { return TensorList{F::linear(h, hh.weight, hh.bias)}; },
                                product_grad(w_hh), std::move(file))
                            .front();
        auto [h1, c1] = cell_step(s.kind, xw_steps[t], hw, h, c);
        if (mask.defined()) {
          const auto m = mask.select(1, t).unsqueeze(1);
          h1 = torch::where(m, h1, h);
          if (lstm) c1 = torch::where(m, c1, c);
        }
        h = h1;
        c = c1;
        steps[t] = h;
      }
      *hidden = torch::stack(previous, 1);
      auto out = torch::stack(steps, 1);
      if (mask.defined()) out = out.masked_fill(mask.logical_not().unsqueeze(2), 0);
      if (d == 1) out = reverse_steps(out, lens);
      outputs.push_back(out);
      h_n.push_back(h);
      if (lstm) c_n.push_back(c);
    }
    layer_in = D == 2 ? torch::cat(outputs, 2) : outputs.front();
    if (l + 1 < L && s.dropout > 0) {
      layer_in = F::dropout(layer_in, F::DropoutFuncOptions().p(s.dropout).training(true));
    }
  }
  return {layer_in, torch::stack(h_n), lstm ? torch::stack(c_n) : torch::Tensor()};
}

template <class Derived, class Twin>
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> RecurrentBase<Derived, Twin>::run_sequence(
    const torch::Tensor& input, const torch::Tensor& lengths, const torch::Tensor& h0,
    const torch::Tensor& c0) {
  const auto s = shape();
  TORCH_CHECK_VALUE(input.dim() == 3 || (input.dim() == 2 && !lengths.defined()), this->name(),
                    " expects input [T, B, features] (or [B, T, features] with batch_first",
                    lengths.defined() ? "" : ", or [T, features] unbatched", "), but got shape ",
                    input.sizes());
  const bool batched = input.dim() == 3;
  if (batched && s.batch_first != this->batch_first()) {
    TORCH_WARN_ONCE(this->name(), " reads its input ", s.batch_first ? "batch" : "time",
                    " first but its tape reads ", this->batch_first() ? "batch" : "time",
                    " first: a dp layer fed its output sequence would take the wrong dimension "
                    "for the batch. Build it with batch_first(",
                    this->batch_first(), ") or attach with GradSampleOptions().batch_first(",
                    s.batch_first, "), unless only its final state is used");
  }
  auto x = batched ? input : input.unsqueeze(s.batch_first ? 0 : 1);
  if (!s.batch_first) x = x.transpose(0, 1);
  auto batch = [batched](const torch::Tensor& state) {
    return batched || !state.defined() ? state : state.unsqueeze(1);
  };
  auto [out, hn, cn] = run(x, lengths, batch(h0), batch(c0));
  if (!s.batch_first) out = out.transpose(0, 1);
  if (!batched) {
    out = out.squeeze(s.batch_first ? 0 : 1);
    hn = hn.squeeze(1);
    if (cn.defined()) cn = cn.squeeze(1);
  }
  return {out, hn, cn};
}

template <class Derived, class Twin>
std::tuple<rnn::PackedSequence, torch::Tensor, torch::Tensor>
RecurrentBase<Derived, Twin>::run_packed(const rnn::PackedSequence& input, const torch::Tensor& h0,
                                         const torch::Tensor& c0) {
  // Padded in the samples' own order (as the states are given); then packed back in the input's.
  auto [padded, lengths] = rnn::pad_packed_sequence(input, /*batch_first=*/true);
  auto [out, hn, cn] = run(padded, lengths, h0, c0);
  const int64_t B = out.size(0), T = out.size(1);
  const auto batch_sizes = input.batch_sizes().to(torch::kCPU, torch::kLong);
  const auto sorted = input.sorted_indices().defined()
                          ? input.sorted_indices().to(torch::kCPU, torch::kLong)
                          : torch::arange(B, torch::kLong);
  std::vector<int64_t> rows;
  rows.reserve(input.data().size(0));
  const auto* bs = batch_sizes.data_ptr<int64_t>();
  const auto* order = sorted.data_ptr<int64_t>();
  for (int64_t t = 0; t < batch_sizes.numel(); ++t) {
    for (int64_t b = 0; b < bs[t]; ++b) rows.push_back(order[b] * T + t);
  }
  auto data = out.reshape({B * T, out.size(2)})
                  .index_select(0, torch::tensor(rows, torch::kLong).to(out.device()));
  return {rnn::PackedSequence(data, input.batch_sizes(), input.sorted_indices(),
                              input.unsorted_indices()),
          hn, cn};
}

template <class Derived, class Twin>
rnn::PackedSequence RecurrentBase<Derived, Twin>::pack(const torch::Tensor& input,
                                                       const torch::Tensor& lengths) const {
  TORCH_CHECK_VALUE(input.dim() == 3, this->name(),
                    " takes lengths with a batched input only, but got shape ", input.sizes());
  const bool batch_first = shape().batch_first;
  check_lengths(lengths, input.size(batch_first ? 0 : 1), input.size(batch_first ? 1 : 0));
  return rnn::pack_padded_sequence(input, lengths.to(torch::kCPU, torch::kLong),
                                   shape().batch_first, /*enforce_sorted=*/false);
}

template <class Derived, class Twin>
torch::Tensor RecurrentBase<Derived, Twin>::unpack(const rnn::PackedSequence& packed,
                                                   int64_t steps) const {
  return std::get<0>(rnn::pad_packed_sequence(packed, shape().batch_first, 0.0, steps));
}

template <class Derived, class Twin>
std::unique_ptr<grad_sample::PerSampleGrads> RecurrentBase<Derived, Twin>::make_grads(
    std::vector<Call<RecurrentSaved>> calls) {
  std::vector<ProductRecord> records;
  const int64_t B = calls.front().batch_size;
  for (auto& c : calls) {
    const auto g = c.grad_outputs.at(0);  // [B, T, G·H]: the gates' gradient at every step
    torch::Tensor g_hidden = g;
    if (c.saved.hidden_grads) {
      auto& steps = *c.saved.hidden_grads;
      for (auto& step : steps) {
        if (!step.defined()) step = torch::zeros({B, g.size(2)}, g.options());
      }
      g_hidden = torch::stack(steps, 1);
    }
    records.push_back({c.saved.hh_slot, *c.saved.hidden, std::move(g_hidden)});
    records.push_back({c.saved.ih_slot, std::move(c.saved.input), g});
  }
  return products_rule(slots_, std::move(records), B, this->norm_method());
}

template <class Derived, class Twin>
std::tuple<torch::Tensor, torch::Tensor> SingleStateRecurrent<Derived, Twin>::forward(
    const torch::Tensor& input, torch::Tensor hx) {
  if (!this->recording()) return this->twin().forward(input, hx);
  auto [out, hn, cn] = this->run_sequence(input, {}, hx, {});
  return {out, hn};
}

template <class Derived, class Twin>
std::tuple<rnn::PackedSequence, torch::Tensor>
SingleStateRecurrent<Derived, Twin>::forward_with_packed_input(const rnn::PackedSequence& input,
                                                               torch::Tensor hx) {
  if (!this->recording()) return this->twin().forward_with_packed_input(input, hx);
  auto [out, hn, cn] = this->run_packed(input, hx, {});
  return {out, hn};
}

template <class Derived, class Twin>
std::tuple<torch::Tensor, torch::Tensor> SingleStateRecurrent<Derived, Twin>::forward_with_lengths(
    const torch::Tensor& input, const torch::Tensor& lengths, torch::Tensor hx) {
  if (!this->recording()) {
    auto [out, hn] = this->twin().forward_with_packed_input(this->pack(input, lengths), hx);
    return {this->unpack(out, input.size(this->options.batch_first() ? 1 : 0)), hn};
  }
  auto [out, hn, cn] = this->run_sequence(input, lengths, hx, {});
  return {out, hn};
}

template class SingleStateRecurrent<RNNImpl, torch::nn::RNN>;
template class SingleStateRecurrent<GRUImpl, torch::nn::GRU>;
template class RecurrentBase<RNNImpl, torch::nn::RNN>;
template class RecurrentBase<LSTMImpl, torch::nn::LSTM>;
template class RecurrentBase<GRUImpl, torch::nn::GRU>;
template class RecurrentBase<RNNCellImpl, torch::nn::RNNCell>;
template class RecurrentBase<LSTMCellImpl, torch::nn::LSTMCell>;
template class RecurrentBase<GRUCellImpl, torch::nn::GRUCell>;

}  // namespace detail

// ----------------------------------------------------------------------------------- layers

RNNImpl::RNNImpl(const torch::nn::RNNOptions& options_)
    : SingleStateRecurrent("dptorch::nn::RNN", options_) {
  reset();
}

LSTMImpl::LSTMImpl(const torch::nn::LSTMOptions& options_)
    : RecurrentBase("dptorch::nn::LSTM", options_) {
  TORCH_CHECK_VALUE(options.proj_size() == 0,
                    "dptorch::nn::LSTM does not support proj_size; leave it 0");
  reset();
}

std::tuple<torch::Tensor, LSTMImpl::State> LSTMImpl::forward(const torch::Tensor& input,
                                                             torch::optional<State> hx) {
  if (!recording()) return twin().forward(input, hx);
  const auto [h0, c0] = hx.value_or(State{});
  auto [out, hn, cn] = run_sequence(input, {}, h0, c0);
  return {out, {hn, cn}};
}

std::tuple<PackedSequence, LSTMImpl::State> LSTMImpl::forward_with_packed_input(
    const PackedSequence& input, torch::optional<State> hx) {
  if (!recording()) return twin().forward_with_packed_input(input, hx);
  const auto [h0, c0] = hx.value_or(State{});
  auto [out, hn, cn] = run_packed(input, h0, c0);
  return {out, {hn, cn}};
}

std::tuple<torch::Tensor, LSTMImpl::State> LSTMImpl::forward_with_lengths(
    const torch::Tensor& input, const torch::Tensor& lengths, torch::optional<State> hx) {
  if (!recording()) {
    auto [out, state] = twin().forward_with_packed_input(pack(input, lengths), hx);
    return {unpack(out, input.size(options.batch_first() ? 1 : 0)), state};
  }
  const auto [h0, c0] = hx.value_or(State{});
  auto [out, hn, cn] = run_sequence(input, lengths, h0, c0);
  return {out, {hn, cn}};
}

GRUImpl::GRUImpl(const torch::nn::GRUOptions& options_)
    : SingleStateRecurrent("dptorch::nn::GRU", options_) {
  reset();
}

// ----------------------------------------------------------------------------------- cells

namespace {

// A cell's input as a batch of one-step sequences [B, 1, features], and its state as [1, B, H].
torch::Tensor one_step(const torch::Tensor& input, bool batched) {
  return (batched ? input : input.unsqueeze(0)).unsqueeze(1);
}
torch::Tensor cell_state(const torch::nn::Module& cell, const torch::Tensor& state,
                         const torch::Tensor& input, int64_t hidden) {
  if (!state.defined()) return state;
  const bool batched = input.dim() == 2;
  const bool fits =
      batched ? state.dim() == 2 && state.size(0) == input.size(0) && state.size(1) == hidden
              : state.dim() == 1 && state.size(0) == hidden;
  TORCH_CHECK_VALUE(fits, cell.name(), ": the state must have shape ",
                    batched ? "[B, hidden_size] = [" + std::to_string(input.size(0)) + ", "
                            : std::string("[hidden_size] = ["),
                    hidden, "], but got ", state.sizes());
  return (batched ? state : state.unsqueeze(0)).unsqueeze(0);
}
torch::Tensor cell_output(const torch::Tensor& state, bool batched) {
  return batched ? state[0] : state[0][0];
}
bool cell_batched(const torch::nn::Module& cell, const torch::Tensor& input) {
  TORCH_CHECK_VALUE(input.dim() == 1 || input.dim() == 2, cell.name(),
                    " expects input [B, features] or [features], but got shape ", input.sizes());
  return input.dim() == 2;
}

}  // namespace

RNNCellImpl::RNNCellImpl(const torch::nn::RNNCellOptions& options_)
    : RecurrentBase("dptorch::nn::RNNCell", options_) {
  reset();
}

torch::Tensor RNNCellImpl::forward(const torch::Tensor& input, torch::Tensor hx) {
  if (!recording()) return twin().forward(input, hx);
  const bool batched = cell_batched(*this, input);
  auto [out, hn, cn] =
      run(one_step(input, batched), {}, cell_state(*this, hx, input, options.hidden_size()), {});
  return cell_output(hn, batched);
}

LSTMCellImpl::LSTMCellImpl(const torch::nn::LSTMCellOptions& options_)
    : RecurrentBase("dptorch::nn::LSTMCell", options_) {
  reset();
}

LSTMCellImpl::State LSTMCellImpl::forward(const torch::Tensor& input, torch::optional<State> hx) {
  if (!recording()) return twin().forward(input, hx);
  const bool batched = cell_batched(*this, input);
  const auto [h0, c0] = hx.value_or(State{});
  const int64_t H = options.hidden_size();
  auto [out, hn, cn] = run(one_step(input, batched), {}, cell_state(*this, h0, input, H),
                           cell_state(*this, c0, input, H));
  return {cell_output(hn, batched), cell_output(cn, batched)};
}

GRUCellImpl::GRUCellImpl(const torch::nn::GRUCellOptions& options_)
    : RecurrentBase("dptorch::nn::GRUCell", options_) {
  reset();
}

torch::Tensor GRUCellImpl::forward(const torch::Tensor& input, torch::Tensor hx) {
  if (!recording()) return twin().forward(input, hx);
  const bool batched = cell_batched(*this, input);
  auto [out, hn, cn] =
      run(one_step(input, batched), {}, cell_state(*this, hx, input, options.hidden_size()), {});
  return cell_output(hn, batched);
}

}  // namespace dptorch::nn
