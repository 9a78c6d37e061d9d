// Ground truth for the attention dp layers (MultiheadAttention, TransformerEncoderLayer,
// TransformerEncoder): per-sample gradients against plain autograd on batches of one (run by the
// detached model, i.e. torch's own functional attention), under both tape layouts; attached and
// detached outputs against the torch twins; names, state dicts and conversion.
#include <dptorch/dptorch.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "support/ground_truth.h"
#include "support/per_sample_reference.h"
#include "support/tensor_assert.h"

#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

namespace dptorch {
namespace {

using testing::all_variants;
using testing::as_model;
using testing::copy_parameters;
using testing::expect_ground_truth;
using ::testing::HasSubstr;
using testing::kDoubleSumAuto;
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

// ------------------------------------------------------------------------------------ helpers

// ----------------------------------------------------------------------- attention plumbing

// Where key and value come from: the query itself (self-attention: one tensor passed three
// times), one memory tensor passed as both (encoder-decoder), or two different tensors.
enum class Source { kSelf, kEncoderDecoder, kCross };
enum class Mask { kNone, kCausal, kRandom };

// key_padding_mask [B, Tk] (true hides a key): sample 0 sees every key, sample 1 not its last
// two, sample 2 not key 1, sample 3 not key 0 — never a whole row.
Tensor padding_mask(int64_t B, int64_t Tk) {
  auto m = torch::zeros({B, Tk}, torch::kBool);
  if (B > 1) m[1].slice(0, Tk - 2).fill_(true);
  if (B > 2) m[2][1] = true;
  if (B > 3) m[3][0] = true;
  return m;
}

// An additive float mask [Tq, Tk]: -1e9 above the diagonal (causal), or random scores.
Tensor attn_mask(Mask kind, int64_t Tq, int64_t Tk) {
  const auto dbl = torch::TensorOptions().dtype(torch::kDouble);
  if (kind == Mask::kCausal) return torch::ones({Tq, Tk}, dbl).triu(1) * -1e9;
  if (kind == Mask::kRandom) return torch::randn({Tq, Tk}, dbl);
  return {};
}

// The inputs of one attention call (sequence first), in double.
struct AttentionInputs {
  Tensor query, key, value, key_padding_mask, mask;
  Source source = Source::kSelf;
};

struct MhaSetup {
  int64_t B = 3, Tq = 4, Tk = 5;
  Source source = Source::kSelf;
  bool padding = false;
  Mask mask = Mask::kNone;
  bool need_weights = true;
};

AttentionInputs attention_inputs(const tnn::MultiheadAttentionOptions& o, const MhaSetup& st) {
  const auto dbl = torch::TensorOptions().dtype(torch::kDouble);
  AttentionInputs in;
  in.source = st.source;
  in.query = torch::randn({st.Tq, st.B, o.embed_dim()}, dbl);
  const int64_t Tk = st.source == Source::kSelf ? st.Tq : st.Tk;
  if (st.source != Source::kSelf) {
    in.key = torch::randn({Tk, st.B, o.kdim()}, dbl);
    in.value = st.source == Source::kCross ? torch::randn({Tk, st.B, o.vdim()}, dbl) : in.key;
  }
  if (st.padding) in.key_padding_mask = padding_mask(st.B, Tk);
  in.mask = attn_mask(st.mask, st.Tq, Tk);
  return in;
}

// Calls `m` (dp or torch) with query `q` and the rest of `in` (already in the model's dtype);
// self-attention passes q three times, encoder-decoder the key twice.
template <class M>
std::tuple<Tensor, Tensor> call_attention(M& m, const Tensor& q, const Tensor& key,
                                          const Tensor& value, const Tensor& kpm,
                                          const Tensor& mask, Source source, bool need_weights) {
  if (source == Source::kSelf) return m->forward(q, q, q, kpm, need_weights, mask);
  if (source == Source::kEncoderDecoder) return m->forward(q, key, key, kpm, need_weights, mask);
  return m->forward(q, key, value, kpm, need_weights, mask);
}

// A scenario over dp attention `m` (double) on `in`: the batch at dim 1 of query, key, value and
// output; the key padding mask's row is sliced per sample, the attn_mask shared.
Scenario mha_scenario(nn::MultiheadAttention m, const AttentionInputs& in, bool need_weights) {
  Scenario s;
  s.model = m.ptr();
  s.input = in.query;
  s.batch_dim = 1;
  s.forward = [m, in, need_weights](const Tensor& q) mutable {
    return std::get<0>(call_attention(m, q, as_model(in.key, *m), as_model(in.value, *m),
                                      in.key_padding_mask, as_model(in.mask, *m), in.source,
                                      need_weights));
  };
  s.forward_one = [m, in, need_weights](int64_t i) mutable {
    auto slice = [i](const Tensor& t, int64_t d) { return t.defined() ? t.narrow(d, i, 1) : t; };
    return std::get<0>(
        call_attention(m, slice(as_model(in.query, *m), 1), slice(as_model(in.key, *m), 1),
                       slice(as_model(in.value, *m), 1), slice(in.key_padding_mask, 0),
                       as_model(in.mask, *m), in.source, need_weights));
  };
  return s;
}

Scenario mha_scenario(const tnn::MultiheadAttentionOptions& o, const MhaSetup& st) {
  nn::MultiheadAttention m(o);
  m->to(torch::kDouble);
  perturb(*m);
  return mha_scenario(m, attention_inputs(o, st), st.need_weights);
}

// A scenario over an encoder (layer) `m` (double): src [S, B, E], the src_key_padding_mask's row
// sliced per sample, src_mask shared.
template <class M>
Scenario encoder_scenario(M m, int64_t E, bool padding, Mask mask, int64_t B = 3, int64_t S = 4) {
  m->to(torch::kDouble);
  perturb(*m);
  const auto src = torch::randn({S, B, E}, torch::kDouble);
  const auto kpm = padding ? padding_mask(B, S) : Tensor();
  const auto src_mask = attn_mask(mask, S, S);
  Scenario s;
  s.model = m.ptr();
  s.input = src;
  s.batch_dim = 1;
  s.forward = [m, kpm, src_mask](const Tensor& x) mutable {
    return m->forward(x, as_model(src_mask, *m), kpm);
  };
  s.forward_one = [m, kpm, src_mask, src](int64_t i) mutable {
    return m->forward(as_model(src, *m).narrow(1, i, 1), as_model(src_mask, *m),
                      kpm.defined() ? kpm.narrow(0, i, 1) : kpm);
  };
  return s;
}

tnn::TransformerEncoderLayerOptions layer_opts(bool gelu) {
  auto o = tnn::TransformerEncoderLayerOptions(8, 2).dim_feedforward(16).dropout(0.0);
  if (gelu) o.activation(torch::kGELU);
  return o;
}

// torch's TransformerEncoder options: `layers` copies of a torch layer, then a LayerNorm.
tnn::TransformerEncoderOptions encoder_opts(bool gelu, int64_t layers = 2) {
  return tnn::TransformerEncoderOptions(tnn::TransformerEncoderLayer(layer_opts(gelu)), layers)
      .norm(tnn::AnyModule(tnn::LayerNorm(tnn::LayerNormOptions({8}))));
}

// ------------------------------------------------------------------------------ ground truth

struct Case {
  std::string name;
  std::function<Scenario()> make;
  bool tape_batch_first = false;
  bool all_variants = false;
};

MhaSetup mha(Source source, bool padding = false, Mask mask = Mask::kNone, int64_t B = 3) {
  MhaSetup s;
  s.source = source;
  s.padding = padding;
  s.mask = mask;
  s.B = B;
  if (source != Source::kSelf) s.Tq = 3;  // Tq != Tk
  return s;
}

tnn::MultiheadAttentionOptions mha_opts() { return tnn::MultiheadAttentionOptions(6, 2); }

std::vector<Case> cases() {
  std::vector<Case> c;
  auto add_mha = [&](const std::string& name, tnn::MultiheadAttentionOptions o, MhaSetup st,
                     bool all = false) {
    for (bool tape_bf : {false, true}) {
      c.push_back({name + (tape_bf ? "_tape_batch_first" : "_tape_batch_second"),
                   [o, st] { return mha_scenario(o, st); }, tape_bf, all});
    }
  };
  // Self-attention under both tape layouts: every variant.
  add_mha("mha_self", mha_opts(), mha(Source::kSelf), true);
  add_mha("mha_self_padding_causal", mha_opts(), mha(Source::kSelf, true, Mask::kCausal));
  add_mha("mha_cross_padding", mha_opts(), mha(Source::kCross, true), /*all=*/true);
  add_mha("mha_encoder_decoder_random_mask", mha_opts(),
          mha(Source::kEncoderDecoder, false, Mask::kRandom));
  add_mha("mha_kdim_vdim_cross_padding_random_mask", mha_opts().kdim(4).vdim(4),
          mha(Source::kCross, true, Mask::kRandom));
  add_mha("mha_kdim_vdim_encoder_decoder", mha_opts().kdim(5).vdim(5),
          mha(Source::kEncoderDecoder));
  add_mha("mha_bias_kv_self", mha_opts().add_bias_kv(true), mha(Source::kSelf));
  add_mha("mha_bias_kv_cross_padding_random_mask", mha_opts().add_bias_kv(true),
          mha(Source::kCross, true, Mask::kRandom));
  add_mha("mha_zero_attn_cross", mha_opts().add_zero_attn(true), mha(Source::kCross));
  add_mha("mha_zero_attn_bias_kv_self_padding", mha_opts().add_zero_attn(true).add_bias_kv(true),
          mha(Source::kSelf, true, Mask::kCausal));
  add_mha("mha_no_bias_self", mha_opts().bias(false), mha(Source::kSelf));
  add_mha("mha_no_bias_bias_kv_kdim_cross",
          mha_opts().bias(false).add_bias_kv(true).kdim(4).vdim(4), mha(Source::kCross, true));
  add_mha("mha_self_four_heads_batch_of_4", tnn::MultiheadAttentionOptions(8, 4),
          mha(Source::kSelf, true, Mask::kRandom, 4));
  add_mha("mha_self_batch_of_one", mha_opts().add_bias_kv(true),
          mha(Source::kSelf, false, Mask::kCausal, 1));
  {
    auto st = mha(Source::kCross, true);
    st.need_weights = false;
    add_mha("mha_cross_padding_no_weights", mha_opts(), st);
  }
  auto add_encoder = [&](const std::string& name, std::function<Scenario()> make,
                         bool all = false) {
    for (bool tape_bf : {false, true}) {
      c.push_back(
          {name + (tape_bf ? "_tape_batch_first" : "_tape_batch_second"), make, tape_bf, all});
    }
  };
  add_encoder(
      "encoder_layer_relu_padding",
      [] {
        return encoder_scenario(nn::TransformerEncoderLayer(layer_opts(false)), 8, true,
                                Mask::kNone);
      },
      true);
  add_encoder("encoder_layer_gelu_padding_causal", [] {
    return encoder_scenario(nn::TransformerEncoderLayer(layer_opts(true)), 8, true, Mask::kCausal);
  });
  add_encoder("encoder_layer_relu_no_mask", [] {
    return encoder_scenario(nn::TransformerEncoderLayer(layer_opts(false)), 8, false, Mask::kNone);
  });
  add_encoder(
      "encoder_relu_norm_padding",
      [] {
        return encoder_scenario(nn::TransformerEncoder(encoder_opts(false)), 8, true, Mask::kNone);
      },
      true);
  add_encoder("encoder_gelu_norm_padding_causal", [] {
    return encoder_scenario(nn::TransformerEncoder(encoder_opts(true)), 8, true, Mask::kCausal);
  });
  add_encoder("encoder_from_dp_layer_and_norm", [] {
    return encoder_scenario(nn::TransformerEncoder(nn::TransformerEncoderLayer(layer_opts(true)), 2,
                                                   nn::LayerNorm(tnn::LayerNormOptions({8}))),
                            8, true, Mask::kRandom);
  });
  return c;
}

using Param = std::tuple<Case, Variant>;

std::vector<Param> params() { return testing::variant_params(cases()); }

class AttentionGroundTruth : public ::testing::TestWithParam<Param> {};

TEST_P(AttentionGroundTruth, MatchesAutogradOnBatchesOfOne) {
  const auto& [c, v] = GetParam();
  torch::manual_seed(7);
  (void)expect_ground_truth(c.make(), v, c.tape_batch_first);
}

INSTANTIATE_TEST_SUITE_P(Layers, AttentionGroundTruth, ::testing::ValuesIn(params()),
                         [](const ::testing::TestParamInfo<Param>& info) {
                           return std::get<0>(info.param).name + "_" +
                                  variant_name(std::get<1>(info.param));
                         });

// ---------------------------------------------------------------------- a hidden key is inert

// With key_padding_mask hiding key j of sample i, changing the memory at position j of sample i
// changes nothing: not sample i's output, not any per-sample gradient (and both runs are the
// batch-of-one truth). Changing a visible key does change sample i's gradients, and only its.
TEST(AttentionPadding, AHiddenKeyContributesNothing) {
  for (bool tape_bf : {false, true}) {
    for (auto o : {mha_opts(), mha_opts().kdim(4).vdim(4).add_bias_kv(true)}) {
      SCOPED_TRACE(tape_bf ? "tape batch first" : "tape batch second");
      torch::manual_seed(31);
      nn::MultiheadAttention m(o);
      m->to(torch::kDouble);
      perturb(*m);
      auto in = attention_inputs(o, mha(Source::kEncoderDecoder, true));  // Tq 3, Tk 5, B 3
      const int64_t i = 1, hidden = 4, visible = 0;
      ASSERT_TRUE(in.key_padding_mask[i][hidden].item<bool>());
      ASSERT_FALSE(in.key_padding_mask[i][visible].item<bool>());
      const auto r = torch::randn({3, 3, 6}, torch::kDouble);

      const auto base = expect_ground_truth(mha_scenario(m, in, true), kDoubleSumAuto, tape_bf, r);
      auto changed = in;
      changed.key = in.key.clone();
      changed.key[hidden][i] += 5 * torch::randn({o.kdim()}, torch::kDouble);
      changed.value = changed.key;
      const auto same =
          expect_ground_truth(mha_scenario(m, changed, true), kDoubleSumAuto, tape_bf, r);
      {
        torch::NoGradGuard no_grad;
        auto a = std::get<0>(call_attention(m, in.query, in.key, in.key, in.key_padding_mask, {},
                                            Source::kEncoderDecoder, false));
        auto b =
            std::get<0>(call_attention(m, in.query, changed.key, changed.key, in.key_padding_mask,
                                       {}, Source::kEncoderDecoder, false));
        EXPECT_TRUE(tensors_close(b, a, 1e-14));
      }
      ASSERT_EQ(same.keys(), base.keys());
      for (const auto& key : base.keys()) {
        EXPECT_TRUE(tensors_close(same[key], base[key], 1e-12)) << key;
      }

      auto visible_change = in;
      visible_change.key = in.key.clone();
      visible_change.key[visible][i] += 5 * torch::randn({o.kdim()}, torch::kDouble);
      visible_change.value = visible_change.key;
      const auto moved =
          expect_ground_truth(mha_scenario(m, visible_change, true), kDoubleSumAuto, tape_bf, r);
      const std::string weight = o.kdim() == o.embed_dim() ? "in_proj_weight" : "k_proj_weight";
      ASSERT_TRUE(moved.contains(weight));
      EXPECT_FALSE(tensors_close(moved[weight][i], base[weight][i], 1e-6)) << "vacuous test";
      for (int64_t other : {0, 2}) {
        EXPECT_TRUE(tensors_close(moved[weight][other], base[weight][other], 1e-12));
      }
    }
  }
}

// ------------------------------------------------------------------- outputs against twins

// The dp attention, detached and attached under either tape layout, gives the torch twin's output
// and averaged weights (weights copied by name); forward_batch_first gives them transposed.
void expect_mha_twin(const tnn::MultiheadAttentionOptions& o, const MhaSetup& st,
                     torch::Dtype dtype) {
  std::ostringstream what;
  what << "kdim " << o.kdim() << ", bias " << o.bias() << ", add_bias_kv " << o.add_bias_kv()
       << ", add_zero_attn " << o.add_zero_attn() << ", source " << static_cast<int>(st.source)
       << ", padding " << st.padding << ", mask " << static_cast<int>(st.mask) << ", "
       << (dtype == torch::kDouble ? "double" : "float");
  SCOPED_TRACE(what.str());
  tnn::MultiheadAttention twin(o);
  perturb(*twin);
  nn::MultiheadAttention dp(o);
  copy_parameters(*twin, *dp);
  twin->to(dtype);
  dp->to(dtype);
  const double tol = dtype == torch::kDouble ? 1e-10 : 1e-5;
  auto in = attention_inputs(o, st);
  const auto q = in.query.to(dtype);
  const auto k = in.key.defined() ? in.key.to(dtype) : in.key;
  const auto v = in.source == Source::kCross ? in.value.to(dtype) : k;
  const auto mask = in.mask.defined() ? in.mask.to(dtype) : in.mask;
  const auto& kpm = in.key_padding_mask;
  auto run = [&](auto& m) { return call_attention(m, q, k, v, kpm, mask, in.source, true); };
  auto run_batch_first = [&]() {
    const auto qb = q.transpose(0, 1);
    if (in.source == Source::kSelf) return dp->forward_batch_first(qb, qb, qb, kpm, true, mask);
    const auto kb = k.transpose(0, 1);
    const auto vb = in.source == Source::kCross ? v.transpose(0, 1) : kb;
    return dp->forward_batch_first(qb, kb, vb, kpm, true, mask);
  };
  std::tuple<Tensor, Tensor> want;
  {
    torch::NoGradGuard no_grad;
    want = run(twin);
  }
  auto expect_same = [&](const std::tuple<Tensor, Tensor>& got, bool transposed, double t) {
    const auto& out = std::get<0>(got);
    EXPECT_TRUE(tensors_close(transposed ? out.transpose(0, 1) : out, std::get<0>(want), t));
    EXPECT_TRUE(tensors_close(std::get<1>(got), std::get<1>(want), t));
  };
  {
    SCOPED_TRACE("detached");
    expect_same(run(dp), false, dtype == torch::kDouble ? 1e-12 : 1e-6);
    expect_same(run_batch_first(), true, tol);
  }
  for (bool tape_bf : {false, true}) {
    SCOPED_TRACE(tape_bf ? "attached, tape batch first" : "attached, tape batch second");
    GradSampleModule gsm(dp, GradSampleOptions().batch_first(tape_bf));
    expect_same(run(dp), false, tol);
    gsm.clear();
    expect_same(run_batch_first(), true, tol);
  }
}

TEST(AttentionTwins, MultiheadAttentionOutputsEqualTorch) {
  torch::manual_seed(41);
  std::vector<tnn::MultiheadAttentionOptions> options{
      mha_opts(),
      mha_opts().kdim(4).vdim(4),
      mha_opts().add_bias_kv(true),
      mha_opts().add_zero_attn(true),
      mha_opts().add_bias_kv(true).add_zero_attn(true).kdim(5).vdim(5),
      mha_opts().bias(false),
      mha_opts().bias(false).add_bias_kv(true)};
  for (const auto& o : options) {
    const bool same_dims = o.kdim() == o.embed_dim();
    for (Source source : {Source::kSelf, Source::kEncoderDecoder, Source::kCross}) {
      if (source == Source::kSelf && !same_dims) continue;  // a query has embed_dim features
      for (bool padding : {false, true}) {
        for (Mask mask : {Mask::kNone, Mask::kCausal, Mask::kRandom}) {
          expect_mha_twin(o, mha(source, padding, mask), torch::kDouble);
        }
      }
      expect_mha_twin(o, mha(source, true, Mask::kRandom), torch::kFloat);
    }
  }
}

// The encoder (layer), detached and attached under either tape layout, gives its torch twin's
// output (weights copied by name).
template <class Dp, class Torch, class Options>
void expect_encoder_twin(const Options& o, bool padding, Mask mask_kind, torch::Dtype dtype) {
  SCOPED_TRACE(std::string(dtype == torch::kDouble ? "double" : "float") + ", padding " +
               std::to_string(padding) + ", mask " + std::to_string(static_cast<int>(mask_kind)));
  Torch twin(o);
  perturb(*twin);
  Dp dp(o);
  copy_parameters(*twin, *dp);
  twin->to(dtype);
  dp->to(dtype);
  const double tol = dtype == torch::kDouble ? 1e-10 : 1e-5;
  const int64_t B = 3, S = 5;
  const auto src = torch::randn({S, B, 8}, torch::TensorOptions().dtype(dtype));
  const auto kpm = padding ? padding_mask(B, S) : Tensor();
  auto mask = attn_mask(mask_kind, S, S);
  if (mask.defined()) mask = mask.to(dtype);
  Tensor want;
  {
    torch::NoGradGuard no_grad;
    want = twin->forward(src, mask, kpm);
  }
  EXPECT_TRUE(tensors_close(dp->forward(src, mask, kpm), want, tol)) << "detached";
  for (bool tape_bf : {false, true}) {
    GradSampleModule gsm(dp, GradSampleOptions().batch_first(tape_bf));
    EXPECT_TRUE(tensors_close(dp->forward(src, mask, kpm), want, tol))
        << "attached, tape batch_first " << tape_bf;
    EXPECT_TRUE(gsm.unrecorded_layer().empty());
  }
}

TEST(AttentionTwins, EncoderLayerOutputsEqualTorch) {
  torch::manual_seed(42);
  for (bool gelu : {false, true}) {
    for (bool padding : {false, true}) {
      for (Mask mask : {Mask::kNone, Mask::kCausal}) {
        expect_encoder_twin<nn::TransformerEncoderLayer, tnn::TransformerEncoderLayer>(
            layer_opts(gelu), padding, mask, torch::kDouble);
      }
    }
    expect_encoder_twin<nn::TransformerEncoderLayer, tnn::TransformerEncoderLayer>(
        layer_opts(gelu), true, Mask::kRandom, torch::kFloat);
  }
}

TEST(AttentionTwins, EncoderOutputsEqualTorch) {
  torch::manual_seed(43);
  for (bool gelu : {false, true}) {
    for (bool padding : {false, true}) {
      expect_encoder_twin<nn::TransformerEncoder, tnn::TransformerEncoder>(
          encoder_opts(gelu), padding, Mask::kCausal, torch::kDouble);
    }
    expect_encoder_twin<nn::TransformerEncoder, tnn::TransformerEncoder>(
        encoder_opts(gelu), true, Mask::kNone, torch::kFloat);
  }
  // Without a final norm, and with three layers.
  expect_encoder_twin<nn::TransformerEncoder, tnn::TransformerEncoder>(
      tnn::TransformerEncoderOptions(tnn::TransformerEncoderLayer(layer_opts(false)), 3), true,
      Mask::kRandom, torch::kDouble);
}

// A bool attn_mask: the dp layer's attached forward must compute what its detached forward (the
// torch twin) computes, whatever torch 1.13's C++ functional makes of a bool mask.
TEST(AttentionTwins, BoolAttnMaskAttachedEqualsDetached) {
  torch::manual_seed(44);
  const auto o = mha_opts();
  tnn::MultiheadAttention twin(o);
  perturb(*twin);
  nn::MultiheadAttention dp(o);
  copy_parameters(*twin, *dp);
  twin->to(torch::kDouble);
  dp->to(torch::kDouble);
  const auto x = torch::randn({4, 3, 6}, torch::kDouble);
  const auto mask = torch::ones({4, 4}, torch::kBool).triu(1);
  Tensor want;
  {
    torch::NoGradGuard no_grad;
    want = std::get<0>(twin->forward(x, x, x, {}, false, mask));
  }
  EXPECT_TRUE(tensors_close(std::get<0>(dp->forward(x, x, x, {}, false, mask)), want, 1e-12));
  GradSampleModule gsm(dp, GradSampleOptions().batch_first(false));
  EXPECT_TRUE(tensors_close(std::get<0>(dp->forward(x, x, x, {}, false, mask)), want, 1e-10));
}

// --------------------------------------------------------------------- names, state dicts

template <class Dp, class Torch, class Options>
void expect_same_names(const Options& o) {
  Torch twin(o);
  Dp dp(o);
  EXPECT_EQ(dp->named_parameters().keys(), twin->named_parameters().keys());
  EXPECT_EQ(dp->named_buffers().keys(), twin->named_buffers().keys());
}

TEST(AttentionStateDicts, ParameterNamesAreTorchs) {
  for (const auto& o :
       {mha_opts(), mha_opts().kdim(4).vdim(4), mha_opts().add_bias_kv(true),
        mha_opts().bias(false), mha_opts().bias(false).add_bias_kv(true).kdim(3).vdim(3)}) {
    expect_same_names<nn::MultiheadAttention, tnn::MultiheadAttention>(o);
  }
  expect_same_names<nn::TransformerEncoderLayer, tnn::TransformerEncoderLayer>(layer_opts(true));
  expect_same_names<nn::TransformerEncoder, tnn::TransformerEncoder>(encoder_opts(false));

  using Names = std::vector<std::string>;
  EXPECT_EQ(nn::MultiheadAttention(mha_opts().add_bias_kv(true))->named_parameters().keys(),
            (Names{"in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "out_proj.weight",
                   "out_proj.bias"}));
  EXPECT_EQ(nn::MultiheadAttention(mha_opts().kdim(4).vdim(4))->named_parameters().keys(),
            (Names{"q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
                   "out_proj.weight", "out_proj.bias"}));
  EXPECT_EQ(nn::MultiheadAttention(mha_opts().bias(false))->named_parameters().keys(),
            (Names{"in_proj_weight", "out_proj.weight"}));
  const auto layer = nn::TransformerEncoderLayer(layer_opts(false))->named_parameters().keys();
  EXPECT_EQ(layer, (Names{"self_attn.in_proj_weight", "self_attn.in_proj_bias",
                          "self_attn.out_proj.weight", "self_attn.out_proj.bias", "linear1.weight",
                          "linear1.bias", "linear2.weight", "linear2.bias", "norm1.weight",
                          "norm1.bias", "norm2.weight", "norm2.bias"}));
  const auto encoder = nn::TransformerEncoder(encoder_opts(false))->named_parameters();
  EXPECT_EQ(encoder.size(), 2 * layer.size() + 2);
  EXPECT_TRUE(encoder.contains("layers.0.self_attn.in_proj_weight"));
  EXPECT_TRUE(encoder.contains("layers.1.norm2.bias"));
  EXPECT_TRUE(encoder.contains("norm.weight"));
  EXPECT_TRUE(encoder.contains("norm.bias"));
}

TEST(AttentionStateDicts, InterchangeWithTorch) {
  torch::manual_seed(45);
  const auto src = torch::randn({4, 3, 8});
  const auto kpm = padding_mask(3, 4);
  {
    tnn::TransformerEncoder twin(encoder_opts(true));
    perturb(*twin);
    nn::TransformerEncoder dp(encoder_opts(true));
    std::stringstream stream;
    torch::save(twin, stream);
    torch::load(dp, stream);
    torch::NoGradGuard no_grad;
    EXPECT_TRUE(tensors_close(dp->forward(src, {}, kpm), twin->forward(src, {}, kpm), 1e-6));
  }
  {
    const auto o = mha_opts().add_bias_kv(true).kdim(4).vdim(4);
    nn::MultiheadAttention dp(o);
    perturb(*dp);
    tnn::MultiheadAttention twin(o);
    std::stringstream stream;
    torch::save(dp, stream);
    torch::load(twin, stream);
    for (const auto& p : dp->named_parameters()) {
      EXPECT_TRUE(torch::equal(twin->named_parameters()[p.key()], p.value())) << p.key();
    }
  }
}

// ------------------------------------------------------------------------------- convert

TEST(AttentionConvert, ConvertsAttentionAndEncoderLayerInAModuleList) {
  torch::manual_seed(46);
  tnn::ModuleList list(tnn::MultiheadAttention(mha_opts().add_bias_kv(true)),
                       tnn::TransformerEncoderLayer(layer_opts(true)));
  perturb(*list);
  auto converted = nn::convert(list);
  ASSERT_EQ(converted->size(), 2u);
  auto mha = converted->ptr<nn::MultiheadAttentionImpl>(0);
  auto layer = converted->ptr<nn::TransformerEncoderLayerImpl>(1);
  ASSERT_NE(mha, nullptr);
  ASSERT_NE(layer, nullptr);
  EXPECT_TRUE(mha->options.add_bias_kv());
  EXPECT_TRUE(c10::get_if<torch::enumtype::kGELU>(&layer->options.activation()) != nullptr);
  const auto before = list->named_parameters();
  const auto after = converted->named_parameters();
  ASSERT_EQ(after.keys(), before.keys());
  for (const auto& p : before) EXPECT_TRUE(torch::equal(after[p.key()], p.value())) << p.key();
  {
    torch::NoGradGuard no_grad;
    const auto x = torch::randn({4, 3, 6});
    EXPECT_TRUE(tensors_close(
        std::get<0>(mha->forward(x, x, x)),
        std::get<0>(list->ptr<tnn::MultiheadAttentionImpl>(0)->forward(x, x, x)), 1e-6));
    const auto src = torch::randn({4, 3, 8});
    const auto kpm = padding_mask(3, 4);
    EXPECT_TRUE(tensors_close(layer->forward(src, {}, kpm),
                              list->ptr<tnn::TransformerEncoderLayerImpl>(1)->forward(src, {}, kpm),
                              1e-6));
  }
  // The copy trains privately and shares nothing.
  EXPECT_NO_THROW(validate(*converted));
  EXPECT_NO_THROW({ GradSampleModule gsm(converted); });
  torch::NoGradGuard no_grad;
  after["1.linear1.weight"].zero_();
  EXPECT_GT(before["1.linear1.weight"].abs().sum().item<double>(), 0);
}

// A converted encoder is a dp encoder with the same weights, layers included.
TEST(AttentionConvert, ConvertsATorchEncoder) {
  torch::manual_seed(47);
  tnn::ModuleList list(tnn::TransformerEncoder(encoder_opts(false)));
  perturb(*list);
  auto converted = nn::convert(list);
  auto encoder = converted->ptr<nn::TransformerEncoderImpl>(0);
  ASSERT_NE(encoder, nullptr);
  const auto before = list->named_parameters();
  const auto after = converted->named_parameters();
  ASSERT_EQ(after.keys(), before.keys());
  for (const auto& p : before) EXPECT_TRUE(torch::equal(after[p.key()], p.value())) << p.key();
  torch::NoGradGuard no_grad;
  const auto src = torch::randn({4, 3, 8});
  EXPECT_TRUE(tensors_close(encoder->forward(src),
                            list->ptr<tnn::TransformerEncoderImpl>(0)->forward(src), 1e-6));
}

// One attention layer called as self-attention and as cross-attention in one pass: the fused
// q/k/v product and the three separate ones touch the same rows of in_proj_weight, and a sample's
// norm is that of their sum.
struct SelfAndCrossImpl : tnn::Module {
  SelfAndCrossImpl() {
    mha = register_module("mha", nn::MultiheadAttention(tnn::MultiheadAttentionOptions(4, 2)));
  }
  Tensor forward(const Tensor& x) {  // [T, B, 4]
    auto self = std::get<0>(mha(x, x, x));
    auto memory = torch::tanh(x.flip(0));
    return self + std::get<0>(mha(x, memory, memory));
  }
  nn::MultiheadAttention mha{nullptr};
};
TORCH_MODULE(SelfAndCross);

TEST(AttentionSharedUse, SelfAndCrossInOnePassMatchAutograd) {
  torch::manual_seed(41);
  SelfAndCross m;
  m->to(torch::kDouble);
  perturb(*m);
  Scenario s;
  s.model = m.ptr();
  s.input = torch::randn({3, 4, 4}, torch::kDouble);
  s.batch_dim = 1;
  s.forward = [m](const Tensor& x) mutable { return m->forward(x); };
  for (const auto& v : all_variants()) {
    SCOPED_TRACE(variant_name(v));
    expect_ground_truth(s, v, false);
  }
}

// A per-head attn_mask [B·heads, Tq, Tk] (which torch 1.13's attention cannot add) works detached
// and attached alike, and a key_padding_mask of the wrong shape is refused naming the layer.
TEST(AttentionMasks, PerHeadMaskAndBadPaddingMask) {
  torch::manual_seed(42);
  nn::MultiheadAttention mha(tnn::MultiheadAttentionOptions(4, 2));
  mha->to(torch::kDouble);
  const auto x = torch::randn({3, 2, 4}, torch::kDouble);
  const auto mask = torch::randn({2 * 2, 3, 3}, torch::kDouble);
  const auto detached = std::get<0>(mha->forward(x, x, x, Tensor(), false, mask));
  GradSampleModule gsm(mha, GradSampleOptions().batch_first(false));
  const auto attached = std::get<0>(mha->forward(x, x, x, Tensor(), false, mask));
  EXPECT_TRUE(tensors_close(attached, detached, 1e-12));
  EXPECT_THAT(
      [&] {
        mha(x, x, x, torch::zeros({2, 4}, torch::kBool));
      },
      ThrowsMessage<c10::Error>(HasSubstr("key_padding_mask")));
}

}  // namespace
}  // namespace dptorch
