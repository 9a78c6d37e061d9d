#include <dptorch/dptorch.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "support/ground_truth.h"
#include "support/per_sample_reference.h"
#include "support/tensor_assert.h"

namespace dptorch {
namespace {

using testing::all_variants;
using testing::expect_ground_truth;
using ::testing::HasSubstr;
using testing::Scenario;
using testing::tensors_close;
using ::testing::ThrowsMessage;
using testing::Variant;
using testing::variant_name;
namespace tnn = torch::nn;

// A layer applied twice in one forward pass (shared weights).
struct SharedLinearImpl : tnn::Module {
  SharedLinearImpl() { lin = register_module("lin", nn::Linear(5, 5)); }
  torch::Tensor forward(const torch::Tensor& x) { return lin(torch::tanh(lin(x))); }
  nn::Linear lin{nullptr};
};
TORCH_MODULE(SharedLinear);

// A convolution applied twice (two records of one layer, summed per sample).
struct SharedConvImpl : tnn::Module {
  SharedConvImpl() {
    conv = register_module("conv", nn::Conv2d(tnn::Conv2dOptions(2, 2, 3).padding(1)));
  }
  torch::Tensor forward(const torch::Tensor& x) { return conv(torch::tanh(conv(x))); }
  nn::Conv2d conv{nullptr};
};
TORCH_MODULE(SharedConv);

template <typename M>
Scenario seq_setup(M model, torch::Tensor input, int64_t batch_dim = 0) {
  Scenario s;
  s.model = model.ptr();
  s.forward = [model](const torch::Tensor& x) mutable { return model->forward(x); };
  s.input = std::move(input);
  s.batch_dim = batch_dim;
  return s;
}

torch::Tensor ints(int64_t high, at::IntArrayRef shape) { return torch::randint(high, shape); }

struct Case {
  std::string name;
  std::function<Scenario()> make;  // built in double; the test converts
};

std::vector<Case> cases() {
  std::vector<Case> c;
  c.push_back({"linear", [] { return seq_setup(nn::Linear(5, 3), torch::randn({4, 5})); }});
  c.push_back({"linear_sequence", [] {
                 return seq_setup(nn::Linear(5, 3), torch::randn({4, 6, 5}));
               }});
  c.push_back({"linear_extra_dims", [] {
                 return seq_setup(nn::Linear(5, 3), torch::randn({4, 2, 3, 5}));
               }});
  c.push_back({"linear_no_bias", [] {
                 return seq_setup(nn::Linear(tnn::LinearOptions(5, 3).bias(false)),
                                  torch::randn({4, 6, 5}));
               }});
  c.push_back({"linear_batch_second", [] {
                 return seq_setup(nn::Linear(5, 3), torch::randn({6, 4, 5}), 1);
               }});
  // Over enough positions the last layer forms and keeps its per-sample gradients as backward
  // files its call (grad_sample::keep_is_cheaper; the tape's budget admits it); the first is
  // refused (the budget is spent) and goes to the rule after backward.
  c.push_back({"linear_sequence_kept", [] {
                 return seq_setup(
                     tnn::Sequential(nn::Linear(64, 64), tnn::Tanh(), nn::Linear(64, 64)),
                     torch::randn({2, 30, 64}));
               }});
  c.push_back({"linear_batch_of_one", [] {
                 return seq_setup(nn::Linear(5, 3), torch::randn({1, 5}));
               }});
  c.push_back({"mlp", [] {
                 return seq_setup(tnn::Sequential(nn::Linear(5, 8), tnn::Tanh(), nn::Linear(8, 3)),
                                  torch::randn({7, 5}));
               }});
  c.push_back({"shared_layer", [] { return seq_setup(SharedLinear(), torch::randn({4, 3, 5})); }});
  c.push_back({"shared_conv", [] { return seq_setup(SharedConv(), torch::randn({3, 2, 5, 5})); }});
  c.push_back({"frozen_parameters", [] {
                 tnn::Sequential m(nn::Linear(5, 8), tnn::Tanh(), nn::Linear(8, 3));
                 m->named_parameters()["0.weight"].set_requires_grad(false);
                 m->named_parameters()["2.bias"].set_requires_grad(false);
                 return seq_setup(m, torch::randn({4, 5}));
               }});
  c.push_back({"conv1d_stride_padding", [] {
                 return seq_setup(nn::Conv1d(tnn::Conv1dOptions(3, 4, 3).stride(2).padding(1)),
                                  torch::randn({4, 3, 11}));
               }});
  c.push_back({"conv1d_same_even_kernel", [] {
                 return seq_setup(nn::Conv1d(tnn::Conv1dOptions(2, 3, 4).padding(torch::kSame)),
                                  torch::randn({3, 2, 9}));
               }});
  c.push_back({"conv2d_groups_dilation", [] {
                 return seq_setup(
                     nn::Conv2d(tnn::Conv2dOptions(4, 6, 3).groups(2).dilation(2).padding(2)),
                     torch::randn({3, 4, 9, 8}));
               }});
  c.push_back({"conv2d_depthwise_no_bias", [] {
                 return seq_setup(
                     nn::Conv2d(tnn::Conv2dOptions(3, 3, 3).groups(3).stride(2).bias(false)),
                     torch::randn({3, 3, 9, 9}));
               }});
  c.push_back({"conv2d_reflect", [] {
                 return seq_setup(nn::Conv2d(tnn::Conv2dOptions(2, 3, 3).padding(1).padding_mode(
                                      torch::kReflect)),
                                  torch::randn({3, 2, 6, 7}));
               }});
  c.push_back({"conv2d_circular_rect_kernel", [] {
                 return seq_setup(nn::Conv2d(tnn::Conv2dOptions(2, 3, {2, 3})
                                                 .stride({2, 1})
                                                 .padding({1, 2})
                                                 .padding_mode(torch::kCircular)),
                                  torch::randn({2, 2, 6, 7}));
               }});
  // Per-sample gradients (576 per sample) larger than the activations the pass records (80):
  // the tape's budget refuses to keep them, so the rule takes the chunked path after backward.
  c.push_back({"conv2d_wider_than_its_activations", [] {
                 return seq_setup(nn::Conv2d(8, 8, 3), torch::randn({3, 8, 3, 3}));
               }});
  c.push_back({"conv2d_valid", [] {
                 return seq_setup(nn::Conv2d(tnn::Conv2dOptions(2, 3, 3).padding(torch::kValid)),
                                  torch::randn({3, 2, 5, 5}));
               }});
  c.push_back(
      {"conv3d", [] {
         return seq_setup(
             nn::Conv3d(tnn::Conv3dOptions(2, 3, {2, 3, 2}).stride({1, 2, 1}).padding({1, 0, 1})),
             torch::randn({2, 2, 4, 5, 4}));
       }});
  c.push_back({"embedding_padding_idx", [] {
                 return seq_setup(nn::Embedding(tnn::EmbeddingOptions(6, 4).padding_idx(0)),
                                  ints(6, {4, 7}));
               }});
  c.push_back({"embedding_batch_second", [] {
                 return seq_setup(nn::Embedding(6, 4), ints(6, {7, 4}), 1);
               }});
  c.push_back({"embedding_bag_sum", [] {
                 return seq_setup(
                     nn::EmbeddingBag(tnn::EmbeddingBagOptions(6, 4).mode(torch::kSum)),
                     ints(6, {4, 5}));
               }});
  c.push_back({"embedding_bag_mean_offsets", [] {
                 nn::EmbeddingBag bag(
                     tnn::EmbeddingBagOptions(8, 3).mode(torch::kMean).padding_idx(1));
                 auto input = torch::tensor({1, 2, 2, 5, 7, 1, 3, 3, 3, 0}, torch::kLong);
                 auto offsets = torch::tensor({0, 3, 3, 6}, torch::kLong);  // bag 1 is empty
                 Scenario s;
                 s.model = bag.ptr();
                 s.forward = [bag, offsets](const torch::Tensor& x) mutable {
                   return bag->forward(x, offsets);
                 };
                 s.input = input;
                 s.batch_size = 4;
                 s.forward_one = [bag, input, offsets](int64_t i) mutable {
                   const int64_t start = offsets[i].item<int64_t>();
                   const int64_t end = i + 1 < 4 ? offsets[i + 1].item<int64_t>() : input.size(0);
                   return bag->forward(input.slice(0, start, end), torch::zeros({1}, torch::kLong));
                 };
                 return s;
               }});
  c.push_back({"embedding_bag_per_sample_weights", [] {
                 nn::EmbeddingBag bag(tnn::EmbeddingBagOptions(6, 3).mode(torch::kSum));
                 auto input = ints(6, {3, 4});
                 auto weights = torch::rand({3, 4}, torch::kDouble);
                 Scenario s;
                 s.model = bag.ptr();
                 s.forward = [bag, weights](const torch::Tensor& x) mutable {
                   return bag->forward(x, {}, weights.to(bag->weight.scalar_type()));
                 };
                 s.input = input;
                 s.forward_one = [bag, input, weights](int64_t i) mutable {
                   return bag->forward(input.narrow(0, i, 1), {},
                                       weights.narrow(0, i, 1).to(bag->weight.scalar_type()));
                 };
                 return s;
               }});
  c.push_back({"layer_norm", [] {
                 return seq_setup(
                     tnn::Sequential(nn::Linear(5, 5), nn::LayerNorm(std::vector<int64_t>{5})),
                     torch::randn({4, 3, 5}));
               }});
  c.push_back(
      {"layer_norm_2d_shape", [] {
         return seq_setup(nn::LayerNorm(std::vector<int64_t>{3, 5}), torch::randn({4, 3, 5}));
       }});
  c.push_back(
      {"layer_norm_batch_second", [] {
         return seq_setup(nn::LayerNorm(std::vector<int64_t>{5}), torch::randn({3, 4, 5}), 1);
       }});
  c.push_back({"group_norm", [] {
                 return seq_setup(tnn::Sequential(nn::Conv2d(2, 4, 3), nn::GroupNorm(2, 4)),
                                  torch::randn({3, 2, 6, 6}));
               }});
  c.push_back({"instance_norm1d", [] {
                 return seq_setup(
                     tnn::Sequential(nn::Conv1d(tnn::Conv1dOptions(2, 3, 2).bias(false)),
                                     nn::InstanceNorm1d(tnn::InstanceNormOptions(3).affine(true))),
                     torch::randn({4, 2, 7}));
               }});
  c.push_back(
      {"instance_norm2d_running_stats", [] {
         return seq_setup(
             nn::InstanceNorm2d(tnn::InstanceNormOptions(3).affine(true).track_running_stats(true)),
             torch::randn({3, 3, 4, 5}));
       }});
  c.push_back({"instance_norm3d", [] {
                 return seq_setup(nn::InstanceNorm3d(tnn::InstanceNormOptions(2).affine(true)),
                                  torch::randn({3, 2, 3, 4, 3}));
               }});
  c.push_back({"cnn", [] {
                 return seq_setup(
                     tnn::Sequential(nn::Conv2d(tnn::Conv2dOptions(1, 4, 3).stride(2)),
                                     nn::GroupNorm(2, 4), tnn::Tanh(), tnn::MaxPool2d(2),
                                     tnn::Flatten(), nn::Linear(16, 3)),
                     torch::randn({5, 1, 10, 10}));
               }});
  return c;
}

class GroundTruth : public ::testing::TestWithParam<std::tuple<Case, Variant>> {};

TEST_P(GroundTruth, MatchesAutogradOnBatchesOfOne) {
  const auto& [c, v] = GetParam();
  torch::manual_seed(7);
  expect_ground_truth(c.make(), v);
}

INSTANTIATE_TEST_SUITE_P(Layers, GroundTruth,
                         ::testing::Combine(::testing::ValuesIn(cases()),
                                            ::testing::ValuesIn(all_variants())),
                         [](const ::testing::TestParamInfo<std::tuple<Case, Variant>>& info) {
                           return std::get<0>(info.param).name + "_" +
                                  variant_name(std::get<1>(info.param));
                         });

TEST(GradSampleModule, GhostAndMaterializedNormsAgree) {
  torch::manual_seed(3);
  auto x = torch::randn({6, 9, 7}, torch::kDouble);
  nn::Linear lin(7, 4);
  lin->to(torch::kDouble);
  std::vector<torch::Tensor> results;
  for (auto method : {NormMethod::kGhost, NormMethod::kMaterialize}) {
    GradSampleModule gsm(lin, GradSampleOptions().norm_method(method));
    lin(x).square().sum().backward();
    results.push_back(gsm.flat_norm());
  }
  EXPECT_TRUE(tensors_close(results[0], results[1], 1e-12));
}

// The conv rule unfolds a few samples at a time; any chunking gives the one-chunk results (which
// the ground-truth suite checks against autograd).
TEST(ConvGrads, ChunksOfSamplesGiveTheSameResults) {
  torch::manual_seed(5);
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto weight = torch::randn({6, 2, 3, 2}, opts);  // groups 2: [G·p, C/G, k1, k2]
  grad_sample::ConvGeometry geo;
  geo.kernel = {3, 2};
  geo.stride = {2, 1};
  geo.padding = {1, 0};
  geo.dilation = {1, 2};
  geo.groups = 2;
  std::vector<torch::Tensor> inputs, grads;
  for (int r = 0; r < 2; ++r) {  // two records: a layer called twice
    inputs.push_back(torch::randn({7, 4, 9, 8}, opts));
    auto out = at::convolution(inputs.back(), weight, {}, geo.stride, geo.padding, geo.dilation,
                               false, {0, 0}, geo.groups);
    grads.push_back(torch::randn_like(out));
  }
  auto w = torch::rand({7}, opts);
  for (auto method : {grad_sample::ConvPath::kGhost, grad_sample::ConvPath::kMaterialize}) {
    SCOPED_TRACE(grad_sample::to_string(method));
    grad_sample::ConvGrads whole(inputs, grads, weight, true, true, geo, method, int64_t{1} << 40);
    for (int64_t bytes : {1, 20000}) {  // one sample per chunk; chunks of 2-3 samples
      grad_sample::ConvGrads chunked(inputs, grads, weight, true, true, geo, method, bytes);
      ASSERT_EQ(chunked.names(), whole.names());
      const auto n0 = whole.norm_sq(), n1 = chunked.norm_sq();
      const auto s0 = whole.weighted_sum({w, w}), s1 = chunked.weighted_sum({w, w});
      const auto m0 = whole.materialize(), m1 = chunked.materialize();
      for (size_t k = 0; k < 2; ++k) {
        EXPECT_TRUE(tensors_close(n1[k], n0[k], 1e-12));
        EXPECT_TRUE(tensors_close(s1[k], s0[k], 1e-12));
        EXPECT_TRUE(tensors_close(m1[k], m0[k], 1e-12));
      }
      // Norms of the materialised gradients are the norms.
      EXPECT_TRUE(tensors_close(m1[0].flatten(1).square().sum(1), n1[0], 1e-10));
    }
  }
}

TEST(GradSampleModule, CostModelPicksTheCheaperMethod) {
  EXPECT_FALSE(grad_sample::materialize_is_cheaper(1, 784, 512));  // MLP layer: ghost
  EXPECT_TRUE(grad_sample::materialize_is_cheaper(169, 64, 16));   // first conv: materialise
}

TEST(GradSampleModule, EmbeddingNormsAddRepeatedRowsOfASample) {
  nn::Embedding emb(100000, 16);
  auto idx = torch::randint(100000, {8, 16});
  idx.select(1, 3).copy_(idx.select(1, 5));  // repeated rows within a sample
  GradSampleModule gsm(emb);
  auto out = emb(idx);
  out.square().sum().backward();
  auto norms = gsm.flat_norm();
  // ‖G_i‖² = Σ_v ‖Σ_{t: idx_t = v} g_t‖² with g = 2·out (× B for the mean: here "mean" scales by
  // 8).
  auto g = 2 * out.detach() * 8;
  for (int64_t i = 0; i < 2; ++i) {
    std::map<int64_t, torch::Tensor> rows;
    for (int64_t t = 0; t < 16; ++t) {
      auto v = idx[i][t].item<int64_t>();
      rows[v] = rows.count(v) ? rows[v] + g[i][t] : g[i][t];
    }
    double sq = 0;
    for (auto& kv : rows) sq += kv.second.square().sum().item<double>();
    EXPECT_NEAR(norms[i].item<double>(), std::sqrt(sq), 1e-3 * std::sqrt(sq));
  }
}

TEST(GradSampleModule, RefusesBatchNormNamingThePath) {
  tnn::Sequential m(nn::Conv2d(1, 2, 3), tnn::BatchNorm2d(2));
  EXPECT_THAT([&] { GradSampleModule gsm(m); },
              ThrowsMessage<c10::Error>(AllOf(HasSubstr("1 (torch::nn::BatchNorm2dImpl)"),
                                              HasSubstr("dptorch::nn::GroupNorm"))));
  // Nothing is left attached: the conv is still its torch twin.
  EXPECT_FALSE(m[0]->as<nn::Conv2d>()->attached());
}

TEST(GradSampleModule, RefusesTrainableParameterOutsideDpLayers) {
  tnn::Sequential m(nn::Linear(3, 3), tnn::Linear(3, 2));
  EXPECT_THAT([&] { GradSampleModule gsm(m); },
              ThrowsMessage<c10::Error>(
                  AllOf(HasSubstr("parameter 1.weight of 1"), HasSubstr("dptorch::nn::convert"))));
  EXPECT_FALSE(m[0]->as<nn::Linear>()->attached());
  m[1]->as<tnn::Linear>()->weight.set_requires_grad(false);
  m[1]->as<tnn::Linear>()->bias.set_requires_grad(false);
  EXPECT_NO_THROW({ GradSampleModule gsm(m); });
}

// A trainable parameter reached by two paths of the module tree (one layer registered twice, as
// tied weights are in C++) would get two slots and two rules' contributions; it is refused.
TEST(GradSampleModule, RefusesTiedTrainableParameters) {
  nn::Linear lin(4, 4);
  tnn::Sequential m(lin, tnn::Tanh(), lin);
  EXPECT_THAT([&] { GradSampleModule gsm(m.ptr()); },
              ThrowsMessage<c10::ValueError>(HasSubstr("tied weights")));
  for (auto& p : lin->parameters()) p.set_requires_grad(false);
  EXPECT_NO_THROW(GradSampleModule gsm(m.ptr()));
}

// What a call saved may not change in place before backward, as with torch's saved tensors.
TEST(GradSampleModule, RefusesInputsModifiedInPlaceAfterTheCall) {
  nn::Linear lin(3, 2);
  GradSampleModule gsm(lin);
  auto x = torch::randn({4, 3}).requires_grad_(false);
  auto h = x * 1.0;
  auto y = lin(h);
  h.mul_(2);
  EXPECT_THAT([&] { y.sum().backward(); }, ThrowsMessage<c10::Error>(HasSubstr("in-place")));
}

TEST(GradSampleModule, RefusesInconsistentBatchSizes) {
  struct TwoInputs : tnn::Module {
    TwoInputs() {
      a = register_module("a", nn::Linear(3, 2));
      b = register_module("b", nn::Linear(3, 2));
    }
    nn::Linear a{nullptr}, b{nullptr};
  };
  auto m = std::make_shared<TwoInputs>();
  GradSampleModule gsm(m);
  (m->a(torch::randn({4, 3})).sum() + m->b(torch::randn({5, 3})).sum()).backward();
  EXPECT_THAT([&] { (void)gsm.flat_norm(); },
              ThrowsMessage<c10::Error>(AllOf(HasSubstr("inconsistent batch sizes"),
                                              HasSubstr("a saw 4"), HasSubstr("b saw 5"))));
}

TEST(GradSampleModule, RefusesASecondBackwardBeforeTheFirstIsUsed) {
  nn::Linear lin(3, 2);
  GradSampleModule gsm(lin);
  auto x = torch::randn({4, 3});
  lin(x).sum().backward();
  EXPECT_THAT([&] { lin(x).sum().backward(); },
              ThrowsMessage<c10::Error>(HasSubstr("call clip_and_accumulate()")));
  gsm.clear();
  auto y = lin(x).sum();
  y.backward(/*gradient=*/{}, /*retain_graph=*/true);
  gsm.clear();
  EXPECT_THAT([&] { y.backward(); }, ThrowsMessage<c10::Error>(HasSubstr("backward ran twice")));
}

TEST(GradSampleModule, NoGradForwardRecordsNothing) {
  nn::Linear lin(3, 2);
  GradSampleModule gsm(lin);
  {
    torch::NoGradGuard no_grad;
    lin(torch::randn({4, 3}));
  }
  EXPECT_FALSE(gsm.has_pass());
  EXPECT_THAT([&] { (void)gsm.flat_norm(); },
              ThrowsMessage<c10::Error>(HasSubstr("no per-sample gradients were recorded")));
}

TEST(GradSampleModule, CloseDetaches) {
  nn::Linear lin(3, 2);
  {
    GradSampleModule gsm(lin);
    EXPECT_TRUE(lin->attached());
  }
  EXPECT_FALSE(lin->attached());
  lin(torch::randn({4, 3})).sum().backward();
  EXPECT_TRUE(lin->weight.grad().defined());  // plain autograd again
}

}  // namespace
}  // namespace dptorch
