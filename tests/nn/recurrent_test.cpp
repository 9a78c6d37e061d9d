// Ground truth for the recurrent dp layers (RNN tanh/relu, LSTM, GRU and their cells): per-sample
// gradients against plain autograd on batches of one (run by the detached model, i.e. torch's own
// layers), attached and detached outputs against the torch twins, names, conversion and the
// refusals.
#include <dptorch/dptorch.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "support/ground_truth.h"
#include "support/per_sample_reference.h"
#include "support/tensor_assert.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

namespace dptorch {
namespace {

using testing::all_variants;
using ::testing::AllOf;
using testing::as_model;
using testing::copy_parameters;
using testing::expect_ground_truth;
using ::testing::HasSubstr;
using testing::per_sample_loss;
using testing::perturb;
using testing::reference_grad_samples;
using testing::Scenario;
using testing::tensors_close;
using ::testing::ThrowsMessage;
using testing::Variant;
using testing::variant_name;
using torch::Tensor;
namespace tnn = torch::nn;
namespace rnn = torch::nn::utils::rnn;

// ------------------------------------------------------------------------------------ helpers

// ------------------------------------------------------------------------ recurrent plumbing

template <class M>
constexpr bool kIsLstm = std::is_same_v<M, nn::LSTM> || std::is_same_v<M, tnn::LSTM>;
template <class M>
constexpr bool kIsDp = std::is_base_of_v<nn::PerSampleLayer, typename M::ContainedType>;

// How a sequence reaches the layer: padded (every sample T steps), padded with lengths
// (forward_with_lengths), or packed (forward_with_packed_input).
enum class Feed { kPadded, kLengths, kPacked };

std::string feed_name(Feed f) {
  return f == Feed::kPadded ? "padded" : f == Feed::kLengths ? "lengths" : "packed";
}

// A recurrent layer's results: the output padded to T steps in the layer's layout (zero past each
// sample's length), the packed output's data (packed feed only) and the final states.
struct RnnOut {
  Tensor out;
  Tensor data;
  std::vector<Tensor> states;  // h_n (and c_n), [L·D, B, H]
};

template <class M>
RnnOut run_padded(M& m, const Tensor& x, const Tensor& h0, const Tensor& c0) {
  if constexpr (kIsLstm<M>) {
    torch::optional<std::tuple<Tensor, Tensor>> hx;
    if (h0.defined()) hx = std::make_tuple(h0, c0);
    auto [out, state] = m->forward(x, hx);
    return {out, {}, {std::get<0>(state), std::get<1>(state)}};
  } else {
    auto [out, hn] = m->forward(x, h0);
    return {out, {}, {hn}};
  }
}

template <class M>
RnnOut run_packed(M& m, const rnn::PackedSequence& packed, const Tensor& h0, const Tensor& c0,
                  bool batch_first, int64_t steps) {
  auto pad = [&](const rnn::PackedSequence& p) {
    return std::get<0>(rnn::pad_packed_sequence(p, batch_first, 0.0, steps));
  };
  if constexpr (kIsLstm<M>) {
    torch::optional<std::tuple<Tensor, Tensor>> hx;
    if (h0.defined()) hx = std::make_tuple(h0, c0);
    auto [out, state] = m->forward_with_packed_input(packed, hx);
    return {pad(out), out.data(), {std::get<0>(state), std::get<1>(state)}};
  } else {
    auto [out, hn] = m->forward_with_packed_input(packed, h0);
    return {pad(out), out.data(), {hn}};
  }
}

// Runs `m` (a dp layer or its torch twin) on x in the layer's layout. Torch has no
// forward_with_lengths: for it the lengths feed packs, runs and pads (what the dp layer promises
// to equal).
template <class M>
RnnOut run_feed(M& m, const Tensor& x, Feed feed, const Tensor& lengths, const Tensor& h0,
                const Tensor& c0, bool batch_first) {
  const int64_t steps = x.size(batch_first ? 1 : 0);
  if (feed == Feed::kPadded) return run_padded(m, x, h0, c0);
  if (feed == Feed::kLengths) {
    if constexpr (kIsDp<M>) {
      if constexpr (kIsLstm<M>) {
        torch::optional<std::tuple<Tensor, Tensor>> hx;
        if (h0.defined()) hx = std::make_tuple(h0, c0);
        auto [out, state] = m->forward_with_lengths(x, lengths, hx);
        return {out, {}, {std::get<0>(state), std::get<1>(state)}};
      } else {
        auto [out, hn] = m->forward_with_lengths(x, lengths, h0);
        return {out, {}, {hn}};
      }
    }
  }
  auto packed = rnn::pack_padded_sequence(x, lengths, batch_first, /*enforce_sorted=*/false);
  auto r = run_packed(m, packed, h0, c0, batch_first, steps);
  if (feed == Feed::kLengths) r.data = Tensor();
  return r;
}

// One tensor per scenario with the batch at dim 0 (batch_first) or 1: each sample's output
// sequence and its final states, flattened and concatenated.
Tensor per_sample_output(const RnnOut& r, bool batch_first) {
  std::vector<Tensor> parts{(batch_first ? r.out : r.out.transpose(0, 1)).flatten(1)};
  for (const auto& s : r.states) parts.push_back(s.transpose(0, 1).flatten(1));
  auto out = torch::cat(parts, 1);  // [B, N]
  return batch_first ? out : out.t().contiguous();
}

// Unequal lengths, at most T, in no particular order (CPU int64, as packing wants).
Tensor unequal_lengths(int64_t B, int64_t T) {
  const std::vector<int64_t> pattern{2, T, 1, T - 1, 3};
  std::vector<int64_t> out;
  for (int64_t i = 0; i < B; ++i) out.push_back(std::min<int64_t>(pattern[i % 5], T));
  if (B == 1) out = {T - 1};
  return torch::tensor(out, torch::kLong);
}

struct RnnSetup {
  int64_t B = 3, T = 4, H = 4;
  bool h0 = false;
  Feed feed = Feed::kPadded;
};

// A scenario over recurrent layer `m` (dp, double) with the batch at the layer's own batch
// dimension; the initial state [L·D, B, H] and lengths are sliced per sample for the batches of
// one.
template <class M, class Options>
Scenario rnn_scenario(M m, const Options& o, const RnnSetup& st) {
  m->to(torch::kDouble);
  perturb(*m);
  const bool bf = o.batch_first();
  const int64_t bd = bf ? 0 : 1;
  const int64_t F = o.input_size(), H = o.hidden_size();
  const int64_t LD = o.num_layers() * (o.bidirectional() ? 2 : 1);
  const auto dbl = torch::TensorOptions().dtype(torch::kDouble);
  auto x = bf ? torch::randn({st.B, st.T, F}, dbl) : torch::randn({st.T, st.B, F}, dbl);
  Tensor h0, c0;
  if (st.h0) {
    h0 = torch::randn({LD, st.B, H}, dbl);
    if (kIsLstm<M>) c0 = torch::randn({LD, st.B, H}, dbl);
  }
  const Tensor lengths = st.feed == Feed::kPadded ? Tensor() : unequal_lengths(st.B, st.T);
  const Feed feed = st.feed;
  Scenario s;
  s.model = m.ptr();
  s.input = x;
  s.batch_dim = bd;
  s.forward = [m, feed, lengths, h0, c0, bf](const Tensor& in) mutable {
    return per_sample_output(run_feed(m, in, feed, lengths, as_model(h0, *m), as_model(c0, *m), bf),
                             bf);
  };
  s.forward_one = [m, feed, lengths, h0, c0, bf, bd, x](int64_t i) mutable {
    auto slice = [i](const Tensor& t, int64_t d) { return t.defined() ? t.narrow(d, i, 1) : t; };
    return per_sample_output(run_feed(m, as_model(x, *m).narrow(bd, i, 1), feed, slice(lengths, 0),
                                      slice(as_model(h0, *m), 1), slice(as_model(c0, *m), 1), bf),
                             bf);
  };
  return s;
}

// Cells called in a loop over the steps of a sequence (one record per step, shared weights).
enum class CellKind { kRNNTanh, kRNNReLU, kLSTM, kGRU };

struct CellLoopImpl : tnn::Module {
  CellLoopImpl(CellKind kind, bool time_first) : time_first(time_first) {
    switch (kind) {
      case CellKind::kRNNTanh: rnn_cell = register_module("cell", nn::RNNCell(3, 4)); break;
      case CellKind::kRNNReLU:
        rnn_cell = register_module(
            "cell", nn::RNNCell(tnn::RNNCellOptions(3, 4).nonlinearity(torch::kReLU)));
        break;
      case CellKind::kLSTM: lstm_cell = register_module("cell", nn::LSTMCell(3, 4)); break;
      case CellKind::kGRU: gru_cell = register_module("cell", nn::GRUCell(3, 4)); break;
    }
  }
  // x [B, T, 3] ([T, B, 3] time first) -> the states after each step, stacked along time.
  Tensor forward(const Tensor& x) {
    const int64_t tdim = time_first ? 0 : 1;
    Tensor h, c;
    std::vector<Tensor> outs;
    for (int64_t t = 0; t < x.size(tdim); ++t) {
      const auto xt = x.select(tdim, t);
      if (lstm_cell) {
        torch::optional<std::tuple<Tensor, Tensor>> hx;
        if (h.defined()) hx = std::make_tuple(h, c);
        std::tie(h, c) = lstm_cell->forward(xt, hx);
        outs.push_back(c);
      } else if (gru_cell) {
        h = gru_cell->forward(xt, h);
      } else {
        h = rnn_cell->forward(xt, h);
      }
      outs.push_back(h);
    }
    return torch::stack(outs, tdim);
  }
  bool time_first;
  nn::RNNCell rnn_cell{nullptr};
  nn::LSTMCell lstm_cell{nullptr};
  nn::GRUCell gru_cell{nullptr};
};
TORCH_MODULE(CellLoop);

Scenario cell_scenario(CellKind kind, bool time_first) {
  CellLoop m(kind, time_first);
  m->to(torch::kDouble);
  perturb(*m);
  Scenario s;
  s.model = m.ptr();
  s.input = time_first ? torch::randn({3, 4, 3}, torch::kDouble)
                       : torch::randn({4, 3, 3}, torch::kDouble);
  s.batch_dim = time_first ? 1 : 0;
  s.forward = [m](const Tensor& x) mutable { return m->forward(x); };
  return s;
}

// A keyboard language model: Embedding -> LSTM -> Linear, the head applied to every step and to
// the last hidden state (the Linear records twice, in two layouts).
struct KeyboardLMImpl : tnn::Module {
  explicit KeyboardLMImpl(bool batch_first) : batch_first(batch_first) {
    embed = register_module("embed", nn::Embedding(10, 4));
    lstm = register_module("lstm", nn::LSTM(tnn::LSTMOptions(4, 5).batch_first(batch_first)));
    head = register_module("head", nn::Linear(5, 10));
  }
  Tensor forward(const Tensor& tokens) {
    auto [out, state] = lstm->forward(embed(tokens));
    auto last = head(std::get<0>(state).select(0, -1));  // [B, V]
    auto steps = head(out);                              // [B, T, V] or [T, B, V]
    auto per_sample =
        torch::cat({last, (batch_first ? steps : steps.transpose(0, 1)).flatten(1)}, 1);
    return batch_first ? per_sample : per_sample.t().contiguous();
  }
  bool batch_first;
  nn::Embedding embed{nullptr};
  nn::LSTM lstm{nullptr};
  nn::Linear head{nullptr};
};
TORCH_MODULE(KeyboardLM);

Scenario keyboard_scenario(bool batch_first) {
  KeyboardLM m(batch_first);
  m->to(torch::kDouble);
  perturb(*m);
  Scenario s;
  s.model = m.ptr();
  s.input = batch_first ? torch::randint(10, {4, 5}) : torch::randint(10, {5, 4});
  s.batch_dim = batch_first ? 0 : 1;
  s.forward = [m](const Tensor& x) mutable { return m->forward(x); };
  return s;
}

// ------------------------------------------------------------------------------ ground truth

struct Case {
  std::string name;
  std::function<Scenario()> make;
  bool all_variants = false;
};

tnn::RNNOptions rnn_opts(bool relu, int64_t layers, bool bidir, bool bf) {
  auto o = tnn::RNNOptions(3, 4).num_layers(layers).bidirectional(bidir).batch_first(bf);
  if (relu) o.nonlinearity(torch::kReLU);
  return o;
}
tnn::LSTMOptions lstm_opts(int64_t layers, bool bidir, bool bf) {
  return tnn::LSTMOptions(3, 4).num_layers(layers).bidirectional(bidir).batch_first(bf);
}
tnn::GRUOptions gru_opts(int64_t layers, bool bidir, bool bf) {
  return tnn::GRUOptions(3, 4).num_layers(layers).bidirectional(bidir).batch_first(bf);
}

RnnSetup setup(bool h0, Feed feed, int64_t B = 3) {
  RnnSetup s;
  s.h0 = h0;
  s.feed = feed;
  s.B = B;
  return s;
}

std::vector<Case> cases() {
  std::vector<Case> c;
  auto add_rnn = [&](const std::string& name, bool relu, int64_t L, bool bidir, bool bf,
                     RnnSetup st, bool all = false) {
    c.push_back({name,
                 [=] {
                   auto o = rnn_opts(relu, L, bidir, bf);
                   return rnn_scenario(nn::RNN(o), o, st);
                 },
                 all});
  };
  auto add_lstm = [&](const std::string& name, int64_t L, bool bidir, bool bf, RnnSetup st,
                      bool all = false) {
    c.push_back({name,
                 [=] {
                   auto o = lstm_opts(L, bidir, bf);
                   return rnn_scenario(nn::LSTM(o), o, st);
                 },
                 all});
  };
  auto add_gru = [&](const std::string& name, int64_t L, bool bidir, bool bf, RnnSetup st,
                     bool all = false) {
    c.push_back({name,
                 [=] {
                   auto o = gru_opts(L, bidir, bf);
                   return rnn_scenario(nn::GRU(o), o, st);
                 },
                 all});
  };
  // Key cases: every variant.
  add_lstm("lstm_l2_bidir_batch_first_h0", 2, true, true, setup(true, Feed::kPadded), true);
  add_gru("gru_l2_bidir_time_first_lengths_h0", 2, true, false, setup(true, Feed::kLengths), true);
  add_lstm("lstm_l1_bidir_time_first_packed_h0", 1, true, false, setup(true, Feed::kPacked), true);
  add_rnn("rnn_relu_l2_time_first_h0", true, 2, false, false, setup(true, Feed::kPadded), true);
  // The rest: double/sum/auto and float/mean/ghost.
  add_rnn("rnn_tanh_l1_time_first", false, 1, false, false, setup(false, Feed::kPadded));
  add_rnn("rnn_tanh_l2_bidir_batch_first_h0", false, 2, true, true, setup(true, Feed::kPadded));
  add_rnn("rnn_tanh_l2_bidir_batch_first_lengths", false, 2, true, true,
          setup(false, Feed::kLengths));
  add_rnn("rnn_relu_l1_bidir_batch_first_packed", true, 1, true, true, setup(false, Feed::kPacked));
  add_rnn("rnn_relu_l1_batch_first_lengths_h0", true, 1, false, true, setup(true, Feed::kLengths));
  add_rnn("rnn_tanh_l2_time_first_packed_h0", false, 2, false, false, setup(true, Feed::kPacked));
  add_lstm("lstm_l1_time_first", 1, false, false, setup(false, Feed::kPadded));
  add_lstm("lstm_l1_bidir_batch_first", 1, true, true, setup(false, Feed::kPadded));
  add_lstm("lstm_l2_time_first_h0", 2, false, false, setup(true, Feed::kPadded));
  add_lstm("lstm_l2_batch_first_lengths_h0", 2, false, true, setup(true, Feed::kLengths));
  add_lstm("lstm_l2_bidir_time_first_lengths", 2, true, false, setup(false, Feed::kLengths));
  add_lstm("lstm_l2_bidir_batch_first_packed_h0", 2, true, true, setup(true, Feed::kPacked));
  add_lstm("lstm_batch_of_one_bidir_h0", 1, true, true, setup(true, Feed::kPadded, 1));
  add_lstm("lstm_batch_of_one_lengths", 2, false, false, setup(false, Feed::kLengths, 1));
  add_gru("gru_l1_batch_first_h0", 1, false, true, setup(true, Feed::kPadded));
  add_gru("gru_l1_bidir_time_first", 1, true, false, setup(false, Feed::kPadded));
  add_gru("gru_l2_batch_first_lengths", 2, false, true, setup(false, Feed::kLengths));
  add_gru("gru_l2_batch_first_packed", 2, false, true, setup(false, Feed::kPacked));
  add_gru("gru_l1_bidir_batch_first_packed_h0", 1, true, true, setup(true, Feed::kPacked));
  add_gru("gru_l2_bidir_batch_first_h0_batch_of_4", 2, true, true, setup(true, Feed::kPadded, 4));
  c.push_back({"gru_no_bias_l2_bidir_lengths", [] {
                 auto o = gru_opts(2, true, true).bias(false);
                 return rnn_scenario(nn::GRU(o), o, setup(true, Feed::kLengths));
               }});
  c.push_back({"lstm_no_bias_time_first_packed", [] {
                 auto o = lstm_opts(1, false, false).bias(false);
                 return rnn_scenario(nn::LSTM(o), o, setup(false, Feed::kPacked));
               }});
  c.push_back({"lstm_frozen_weight_hh_l0", [] {
                 auto o = lstm_opts(2, true, true);
                 nn::LSTM m(o);
                 m->named_parameters()["weight_hh_l0"].set_requires_grad(false);
                 return rnn_scenario(m, o, setup(true, Feed::kLengths));
               }});
  // Input-to-hidden frozen (and the layer's input data): the gates' gradient must still reach
  // the hidden-to-hidden rule.
  c.push_back({"lstm_frozen_ih_l0",
               [] {
                 auto o = lstm_opts(2, true, true);
                 nn::LSTM m(o);
                 m->named_parameters()["weight_ih_l0"].set_requires_grad(false);
                 m->named_parameters()["bias_ih_l0"].set_requires_grad(false);
                 return rnn_scenario(m, o, setup(true, Feed::kLengths));
               },
               true});
  c.push_back({"gru_cell_loop_frozen_ih", [] {
                 auto s = cell_scenario(CellKind::kGRU, false);
                 s.model->named_parameters()["cell.weight_ih"].set_requires_grad(false);
                 s.model->named_parameters()["cell.bias_ih"].set_requires_grad(false);
                 return s;
               }});
  c.push_back({"rnn_cell_tanh_loop", [] { return cell_scenario(CellKind::kRNNTanh, false); }});
  c.push_back(
      {"rnn_cell_relu_loop_time_first", [] { return cell_scenario(CellKind::kRNNReLU, true); }});
  c.push_back({"lstm_cell_loop", [] { return cell_scenario(CellKind::kLSTM, false); }, true});
  c.push_back({"gru_cell_loop", [] { return cell_scenario(CellKind::kGRU, false); }, true});
  c.push_back({"gru_cell_loop_time_first", [] { return cell_scenario(CellKind::kGRU, true); }});
  c.push_back({"lstm_cell_loop_time_first", [] { return cell_scenario(CellKind::kLSTM, true); }});
  c.push_back({"keyboard_lm_batch_first", [] { return keyboard_scenario(true); }, true});
  c.push_back({"keyboard_lm_time_first", [] { return keyboard_scenario(false); }});
  return c;
}

using Param = std::tuple<Case, Variant>;

std::vector<Param> params() { return testing::variant_params(cases()); }

class RecurrentGroundTruth : public ::testing::TestWithParam<Param> {};

TEST_P(RecurrentGroundTruth, MatchesAutogradOnBatchesOfOne) {
  const auto& [c, v] = GetParam();
  torch::manual_seed(7);
  (void)expect_ground_truth(c.make(), v);
}

INSTANTIATE_TEST_SUITE_P(Layers, RecurrentGroundTruth, ::testing::ValuesIn(params()),
                         [](const ::testing::TestParamInfo<Param>& info) {
                           return std::get<0>(info.param).name + "_" +
                                  variant_name(std::get<1>(info.param));
                         });

// A frozen weight has no per-sample gradient and no name; the others are still right (the
// ground-truth case lstm_frozen_weight_hh_l0 checks their values).
TEST(RecurrentFrozen, FrozenWeightIsAbsentFromParameterNames) {
  torch::manual_seed(1);
  nn::LSTM lstm(lstm_opts(2, true, true));
  lstm->to(torch::kDouble);
  lstm->named_parameters()["weight_hh_l0"].set_requires_grad(false);
  GradSampleModule gsm(lstm);
  const auto names = gsm.parameter_names();
  EXPECT_EQ(std::count(names.begin(), names.end(), "weight_hh_l0"), 0);
  EXPECT_EQ(std::count(names.begin(), names.end(), "weight_hh_l0_reverse"), 1);
  EXPECT_EQ(names.size(), 15u);
  auto [out, state] = lstm->forward(torch::randn({3, 4, 3}, torch::kDouble));
  (out.square().sum() + std::get<0>(state).sum()).backward();
  const auto samples = gsm.grad_samples();
  EXPECT_FALSE(samples.contains("weight_hh_l0"));
  EXPECT_TRUE(samples.contains("weight_ih_l0"));
  EXPECT_FALSE(lstm->named_parameters()["weight_hh_l0"].grad().defined());
}

// ------------------------------------------------------------------- outputs against twins

struct TwinConfig {
  Feed feed;
  bool h0;
  torch::Dtype dtype;
};

// The dp layer detached, and attached in training mode, gives the torch twin's outputs (the
// twin's weights copied by name) for the same feed and initial state.
template <class Dp, class Torch, class Options>
void expect_twin_outputs(const Options& o, const TwinConfig& tc) {
  std::ostringstream what;
  what << "layers " << o.num_layers() << ", bidirectional " << o.bidirectional() << ", batch_first "
       << o.batch_first() << ", feed " << feed_name(tc.feed) << ", h0 " << tc.h0 << ", "
       << (tc.dtype == torch::kDouble ? "double" : "float");
  SCOPED_TRACE(what.str());
  Torch twin(o);
  perturb(*twin);
  Dp dp(o);
  copy_parameters(*twin, *dp);
  twin->to(tc.dtype);
  dp->to(tc.dtype);
  const double tol = tc.dtype == torch::kDouble ? 1e-10 : 1e-5;
  const bool bf = o.batch_first();
  const int64_t B = 3, T = 5, LD = o.num_layers() * (o.bidirectional() ? 2 : 1);
  const auto opts = torch::TensorOptions().dtype(tc.dtype);
  auto x =
      bf ? torch::randn({B, T, o.input_size()}, opts) : torch::randn({T, B, o.input_size()}, opts);
  Tensor h0, c0;
  if (tc.h0) {
    h0 = torch::randn({LD, B, o.hidden_size()}, opts);
    if (kIsLstm<Torch>) c0 = torch::randn({LD, B, o.hidden_size()}, opts);
  }
  const auto lengths = torch::tensor({3, 5, 1}, torch::kLong);
  auto expect_same = [&](const RnnOut& got, const RnnOut& want, double t) {
    EXPECT_TRUE(tensors_close(got.out, want.out, t));
    if (tc.feed == Feed::kPacked) {
      EXPECT_TRUE(tensors_close(got.data, want.data, t));
    }
    ASSERT_EQ(got.states.size(), want.states.size());
    for (size_t k = 0; k < got.states.size(); ++k) {
      EXPECT_TRUE(tensors_close(got.states[k], want.states[k], t)) << "state " << k;
    }
  };
  RnnOut want;
  {
    torch::NoGradGuard no_grad;
    want = run_feed(twin, x, tc.feed, lengths, h0, c0, bf);
  }
  if (tc.feed != Feed::kPadded) {  // the padded output is zero past each sample's length
    auto t = torch::arange(T).unsqueeze(0) >= lengths.unsqueeze(1);  // [B, T]
    auto out = bf ? want.out : want.out.transpose(0, 1);
    EXPECT_EQ(out.masked_select(t.unsqueeze(2).expand_as(out)).abs().max().item<double>(), 0.0);
  }
  {
    SCOPED_TRACE("detached");
    const auto got = run_feed(dp, x, tc.feed, lengths, h0, c0, bf);
    expect_same(got, want, tc.dtype == torch::kDouble ? 1e-12 : 1e-6);
  }
  {
    SCOPED_TRACE("attached");
    GradSampleModule gsm(dp, GradSampleOptions().batch_first(bf));
    ASSERT_TRUE(dp->is_training());
    const auto got = run_feed(dp, x, tc.feed, lengths, h0, c0, bf);
    expect_same(got, want, tol);
    EXPECT_TRUE(gsm.unrecorded_layer().empty());
  }
}

template <class Dp, class Torch, class Options>
void expect_twin_outputs_all(const std::function<Options(int64_t, bool, bool)>& make) {
  for (int64_t L : {1, 2}) {
    for (bool bidir : {false, true}) {
      for (bool bf : {true, false}) {
        for (Feed feed : {Feed::kPadded, Feed::kLengths, Feed::kPacked}) {
          for (bool h0 : {false, true}) {
            expect_twin_outputs<Dp, Torch>(make(L, bidir, bf), {feed, h0, torch::kDouble});
          }
        }
        // A float subset: the widest stack, every feed.
        if (L == 2 && bidir) {
          for (Feed feed : {Feed::kPadded, Feed::kLengths, Feed::kPacked}) {
            expect_twin_outputs<Dp, Torch>(make(L, bidir, bf), {feed, true, torch::kFloat});
          }
        }
      }
    }
  }
}

TEST(RecurrentTwins, RnnTanhOutputsEqualTorch) {
  torch::manual_seed(11);
  expect_twin_outputs_all<nn::RNN, tnn::RNN, tnn::RNNOptions>(
      [](int64_t L, bool bidir, bool bf) { return rnn_opts(false, L, bidir, bf); });
}

TEST(RecurrentTwins, RnnReluOutputsEqualTorch) {
  torch::manual_seed(12);
  expect_twin_outputs_all<nn::RNN, tnn::RNN, tnn::RNNOptions>(
      [](int64_t L, bool bidir, bool bf) { return rnn_opts(true, L, bidir, bf); });
}

TEST(RecurrentTwins, LstmOutputsEqualTorch) {
  torch::manual_seed(13);
  expect_twin_outputs_all<nn::LSTM, tnn::LSTM, tnn::LSTMOptions>(
      [](int64_t L, bool bidir, bool bf) { return lstm_opts(L, bidir, bf); });
}

TEST(RecurrentTwins, GruOutputsEqualTorch) {
  torch::manual_seed(14);
  expect_twin_outputs_all<nn::GRU, tnn::GRU, tnn::GRUOptions>(
      [](int64_t L, bool bidir, bool bf) { return gru_opts(L, bidir, bf); });
}

TEST(RecurrentTwins, NoBiasOutputsEqualTorch) {
  torch::manual_seed(15);
  for (Feed feed : {Feed::kPadded, Feed::kLengths, Feed::kPacked}) {
    expect_twin_outputs<nn::LSTM, tnn::LSTM>(lstm_opts(2, true, false).bias(false),
                                             {feed, true, torch::kDouble});
    expect_twin_outputs<nn::GRU, tnn::GRU>(gru_opts(2, true, true).bias(false),
                                           {feed, true, torch::kDouble});
    expect_twin_outputs<nn::RNN, tnn::RNN>(rnn_opts(true, 1, true, true).bias(false),
                                           {feed, false, torch::kDouble});
  }
}

// Cells, detached and attached, give the torch cells' next state, with and without a state.
template <class Dp, class Torch>
void expect_cell_outputs(torch::Dtype dtype) {
  SCOPED_TRACE(dtype == torch::kDouble ? "double" : "float");
  Torch twin(3, 4);
  perturb(*twin);
  Dp dp(3, 4);
  copy_parameters(*twin, *dp);
  twin->to(dtype);
  dp->to(dtype);
  const double tol = dtype == torch::kDouble ? 1e-10 : 1e-5;
  const auto opts = torch::TensorOptions().dtype(dtype);
  const auto x = torch::randn({3, 3}, opts), h = torch::randn({3, 4}, opts),
             c = torch::randn({3, 4}, opts);
  auto call = [&](auto& m, bool with_state) -> std::vector<Tensor> {
    if constexpr (std::is_same_v<Torch, tnn::LSTMCell>) {
      torch::optional<std::tuple<Tensor, Tensor>> hx;
      if (with_state) hx = std::make_tuple(h, c);
      auto [h1, c1] = m->forward(x, hx);
      return {h1, c1};
    } else {
      return {m->forward(x, with_state ? h : Tensor())};
    }
  };
  for (bool with_state : {false, true}) {
    SCOPED_TRACE(with_state ? "with state" : "zero state");
    std::vector<Tensor> want;
    {
      torch::NoGradGuard no_grad;
      want = call(twin, with_state);
    }
    const auto detached = call(dp, with_state);
    GradSampleModule gsm(dp);
    const auto attached = call(dp, with_state);
    ASSERT_EQ(detached.size(), want.size());
    ASSERT_EQ(attached.size(), want.size());
    for (size_t k = 0; k < want.size(); ++k) {
      EXPECT_TRUE(tensors_close(detached[k], want[k], tol));
      EXPECT_TRUE(tensors_close(attached[k], want[k], tol));
    }
  }
}

TEST(RecurrentTwins, CellOutputsEqualTorch) {
  torch::manual_seed(16);
  for (auto dtype : {torch::kDouble, torch::kFloat}) {
    expect_cell_outputs<nn::RNNCell, tnn::RNNCell>(dtype);
    expect_cell_outputs<nn::LSTMCell, tnn::LSTMCell>(dtype);
    expect_cell_outputs<nn::GRUCell, tnn::GRUCell>(dtype);
  }
}

// --------------------------------------------------------------------- names, state dicts

template <class Dp, class Torch, class Options>
void expect_same_names(const Options& o) {
  Torch twin(o);
  Dp dp(o);
  EXPECT_EQ(dp->named_parameters().keys(), twin->named_parameters().keys());
  EXPECT_EQ(dp->named_buffers().keys(), twin->named_buffers().keys());
}

TEST(RecurrentStateDicts, ParameterNamesAreTorchs) {
  expect_same_names<nn::RNN, tnn::RNN>(rnn_opts(false, 2, true, false));
  expect_same_names<nn::LSTM, tnn::LSTM>(lstm_opts(2, true, true));
  expect_same_names<nn::LSTM, tnn::LSTM>(lstm_opts(1, false, false).bias(false));
  expect_same_names<nn::GRU, tnn::GRU>(gru_opts(2, true, false));
  expect_same_names<nn::RNNCell, tnn::RNNCell>(tnn::RNNCellOptions(3, 4));
  expect_same_names<nn::LSTMCell, tnn::LSTMCell>(tnn::LSTMCellOptions(3, 4));
  expect_same_names<nn::GRUCell, tnn::GRUCell>(tnn::GRUCellOptions(3, 4).bias(false));
  // Spelled out for the widest stack.
  nn::LSTM lstm(lstm_opts(2, true, true));
  const std::vector<std::string> expected{
      "weight_ih_l0",         "weight_hh_l0",         "bias_ih_l0",         "bias_hh_l0",
      "weight_ih_l0_reverse", "weight_hh_l0_reverse", "bias_ih_l0_reverse", "bias_hh_l0_reverse",
      "weight_ih_l1",         "weight_hh_l1",         "bias_ih_l1",         "bias_hh_l1",
      "weight_ih_l1_reverse", "weight_hh_l1_reverse", "bias_ih_l1_reverse", "bias_hh_l1_reverse"};
  const auto params = lstm->named_parameters();
  EXPECT_EQ(params.keys(), expected);
  EXPECT_EQ(params["weight_ih_l1"].sizes(), torch::IntArrayRef({16, 8}));
  nn::GRUCell cell(3, 4);
  EXPECT_EQ(cell->named_parameters().keys(),
            (std::vector<std::string>{"weight_ih", "weight_hh", "bias_ih", "bias_hh"}));
}

TEST(RecurrentStateDicts, InterchangeWithTorchBothWays) {
  torch::manual_seed(17);
  const auto o = lstm_opts(2, true, false);
  tnn::LSTM twin(o);
  perturb(*twin);
  nn::LSTM dp(o);
  {
    std::stringstream stream;
    torch::save(twin, stream);
    torch::load(dp, stream);
  }
  const auto x = torch::randn({4, 3, 3});
  {
    torch::NoGradGuard no_grad;
    auto [want, want_state] = twin->forward(x);
    auto [got, got_state] = dp->forward(x);
    EXPECT_TRUE(torch::equal(got, want));
    EXPECT_TRUE(torch::equal(std::get<1>(got_state), std::get<1>(want_state)));
  }
  // And back: a dp state dict loads into torch's LSTM.
  perturb(*dp);
  tnn::LSTM back(o);
  {
    std::stringstream stream;
    torch::save(dp, stream);
    torch::load(back, stream);
  }
  for (const auto& p : dp->named_parameters()) {
    EXPECT_TRUE(torch::equal(back->named_parameters()[p.key()], p.value())) << p.key();
  }
  // The loaded weights are the ones the attached forward uses too.
  GradSampleModule gsm(dp, GradSampleOptions().batch_first(false));
  auto [got, got_state] = dp->forward(x);
  torch::NoGradGuard no_grad;
  auto [want, want_state] = back->forward(x);
  EXPECT_TRUE(tensors_close(got, want, 1e-5));
}

// ------------------------------------------------------------------------------- convert

TEST(RecurrentConvert, ConvertsLstmAndGruCellInAModuleList) {
  torch::manual_seed(18);
  tnn::ModuleList list(tnn::LSTM(lstm_opts(2, true, true)), tnn::GRUCell(3, 4));
  perturb(*list);
  auto converted = nn::convert(list);
  ASSERT_EQ(converted->size(), 2u);
  auto lstm = converted->ptr<nn::LSTMImpl>(0);
  auto cell = converted->ptr<nn::GRUCellImpl>(1);
  ASSERT_NE(lstm, nullptr);
  ASSERT_NE(cell, nullptr);
  EXPECT_TRUE(lstm->options.bidirectional());
  EXPECT_EQ(lstm->options.num_layers(), 2);
  EXPECT_TRUE(lstm->options.batch_first());
  const auto before = list->named_parameters();
  const auto after = converted->named_parameters();
  ASSERT_EQ(after.keys(), before.keys());
  for (const auto& p : before) EXPECT_TRUE(torch::equal(after[p.key()], p.value())) << p.key();
  // Same outputs.
  const auto x = torch::randn({3, 5, 3});
  {
    torch::NoGradGuard no_grad;
    auto [want, want_state] = list->ptr<tnn::LSTMImpl>(0)->forward(x);
    auto [got, got_state] = lstm->forward(x);
    EXPECT_TRUE(torch::equal(got, want));
    const auto xc = torch::randn({3, 3}), h = torch::randn({3, 4});
    EXPECT_TRUE(torch::equal(cell->forward(xc, h), list->ptr<tnn::GRUCellImpl>(1)->forward(xc, h)));
  }
  // The copy shares nothing, and trains privately.
  EXPECT_NO_THROW(validate(*converted));
  torch::NoGradGuard no_grad;
  after["0.weight_ih_l0"].zero_();
  EXPECT_GT(before["0.weight_ih_l0"].abs().sum().item<double>(), 0);
}

TEST(RecurrentConvert, ConvertedLstmKeepsFrozenWeightsFrozen) {
  tnn::ModuleList list(tnn::LSTM(lstm_opts(1, false, true)));
  list->named_parameters()["0.weight_hh_l0"].set_requires_grad(false);
  auto converted = nn::convert(list);
  EXPECT_FALSE(converted->named_parameters()["0.weight_hh_l0"].requires_grad());
  EXPECT_TRUE(converted->named_parameters()["0.weight_ih_l0"].requires_grad());
}

// ----------------------------------------------------------------- norms: ghost = materialised

TEST(RecurrentNorms, GhostAndMaterializedAgreeForLstm) {
  torch::manual_seed(19);
  const auto o = lstm_opts(2, true, true);
  nn::LSTM lstm(o);
  lstm->to(torch::kDouble);
  perturb(*lstm);
  const auto x = torch::randn({4, 5, 3}, torch::kDouble);
  const auto lengths = torch::tensor({5, 2, 4, 1}, torch::kLong);
  const auto h0 = torch::randn({4, 4, 4}, torch::kDouble), c0 = torch::randn_like(h0);
  const auto w = torch::rand({4}, torch::kDouble);
  std::vector<torch::OrderedDict<std::string, Tensor>> norm_sq, sums;
  std::vector<Tensor> flat;
  for (auto method : {NormMethod::kGhost, NormMethod::kMaterialize}) {
    GradSampleModule gsm(lstm, GradSampleOptions().norm_method(method));
    auto [out, state] = lstm->forward_with_lengths(x, lengths, std::make_tuple(h0, c0));
    (out.square().sum() + std::get<0>(state).sin().sum() + std::get<1>(state).sum()).backward();
    norm_sq.push_back(gsm.norm_sq());
    sums.push_back(gsm.clipped_sum(w));
    flat.push_back(gsm.flat_norm());
  }
  EXPECT_TRUE(tensors_close(flat[0], flat[1], 1e-10));
  ASSERT_EQ(norm_sq[0].keys(), norm_sq[1].keys());
  for (const auto& key : norm_sq[0].keys()) {
    EXPECT_TRUE(tensors_close(norm_sq[0][key], norm_sq[1][key], 1e-10)) << key;
    EXPECT_TRUE(tensors_close(sums[0][key], sums[1][key], 1e-10)) << key;
  }
}

// ------------------------------------------------------------------------------- refusals

// Lengths of the wrong count, or past the padded steps, are refused naming the layer.
void expect_bad_lengths_refused(nn::LSTM& lstm) {
  const auto x = torch::randn({3, 4, 3});
  const auto names_lengths =
      ThrowsMessage<c10::Error>(AllOf(HasSubstr("dptorch::nn::LSTM"), HasSubstr("length")));
  for (const auto& lengths :
       {torch::tensor({4, 2}, torch::kLong), torch::tensor({4, 2, 1, 3}, torch::kLong),
        torch::tensor({4, 5, 1}, torch::kLong)}) {
    EXPECT_THAT([&] { lstm->forward_with_lengths(x, lengths); }, names_lengths);
  }
}

TEST(RecurrentRefusals, AttachedRefusesBadLengthsNamingThem) {
  torch::manual_seed(20);
  nn::LSTM lstm(lstm_opts(1, false, true));
  GradSampleModule gsm(lstm);
  expect_bad_lengths_refused(lstm);
  nn::GRU gru(gru_opts(1, true, false));
  GradSampleModule gsm_gru(gru, GradSampleOptions().batch_first(false));
  EXPECT_THAT(
      [&] {
        gru->forward_with_lengths(torch::randn({4, 3, 3}), torch::tensor({2, 9, 1}));
      },
      ThrowsMessage<c10::Error>(AllOf(HasSubstr("dptorch::nn::GRU"), HasSubstr("length"))));
}

// The detached layer is the same API: bad lengths are refused there too (rather than running on
// fewer samples, or failing deep inside torch's packing).
TEST(RecurrentRefusals, DetachedRefusesBadLengthsNamingThem) {
  torch::manual_seed(21);
  nn::LSTM lstm(lstm_opts(1, false, true));
  expect_bad_lengths_refused(lstm);
}

TEST(RecurrentRefusals, LstmRefusesProjSize) {
  EXPECT_THAT([] { nn::LSTM(tnn::LSTMOptions(3, 4).proj_size(2)); },
              ThrowsMessage<c10::Error>(HasSubstr("proj_size")));
  tnn::ModuleList list(tnn::LSTM(tnn::LSTMOptions(3, 4).proj_size(2)));
  EXPECT_THAT([&] { (void)nn::convert(list); }, ThrowsMessage<c10::Error>(HasSubstr("proj_size")));
}

// Whatever a padded step holds (NaN here) reaches neither the output nor a per-sample gradient:
// the results equal those of zero padding.
TEST(RecurrentLengths, PaddingValuesDoNotMatter) {
  torch::manual_seed(31);
  nn::LSTM lstm(tnn::LSTMOptions(3, 4).batch_first(true).bidirectional(true));
  lstm->to(torch::kDouble);
  const auto lengths = torch::tensor({2, 4, 1}, torch::kLong);
  auto x = torch::randn({3, 4, 3}, torch::kDouble);
  const auto valid = (torch::arange(4).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(2);
  x = x.masked_fill(valid.logical_not(), 0);
  const auto r = torch::randn({3, 4, 8}, torch::kDouble);
  std::vector<torch::OrderedDict<std::string, Tensor>> results;
  for (double pad : {0.0, std::nan("")}) {
    GradSampleModule gsm(lstm);
    auto [out, state] =
        lstm->forward_with_lengths(x.masked_fill(valid.logical_not(), pad), lengths);
    EXPECT_FALSE(out.isnan().any().item<bool>());
    (out * r).sum().backward();
    results.push_back(gsm.grad_samples());
    EXPECT_TRUE(gsm.flat_norm().isfinite().all().item<bool>());
  }
  for (const auto& p : results[0]) {
    SCOPED_TRACE(p.key());
    EXPECT_TRUE(tensors_close(results[1][p.key()], p.value(), 1e-12));
  }
}

}  // namespace
}  // namespace dptorch
