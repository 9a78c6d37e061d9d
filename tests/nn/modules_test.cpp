#include <dptorch/dptorch.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace dptorch {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;
namespace tnn = torch::nn;

// Runs the same input through a torch layer and its detached dp twin (weights copied), and checks
// outputs and all gradients are bit-identical.
template <typename TorchLayer, typename DpLayer>
void expect_bit_identical(TorchLayer torch_layer, DpLayer dp_layer, const torch::Tensor& input) {
  {
    torch::NoGradGuard no_grad;
    auto dst = dp_layer->named_parameters();
    for (const auto& p : torch_layer->named_parameters()) dst[p.key()].copy_(p.value());
  }
  auto x1 = input.is_floating_point() ? input.clone().requires_grad_() : input;
  auto x2 = input.is_floating_point() ? input.clone().requires_grad_() : input;
  auto y1 = torch_layer(x1), y2 = dp_layer(x2);
  ASSERT_TRUE(torch::equal(y1, y2));
  auto r = torch::randn_like(y1);
  (y1 * r).sum().backward();
  (y2 * r).sum().backward();
  if (input.is_floating_point()) {
    EXPECT_TRUE(torch::equal(x1.grad(), x2.grad()));
  }
  auto p2 = dp_layer->named_parameters();
  for (const auto& p : torch_layer->named_parameters()) {
    SCOPED_TRACE(p.key());
    EXPECT_TRUE(torch::equal(p.value().grad(), p2[p.key()].grad()));
  }
}

TEST(DetachedLayers, AreBitIdenticalToTheirTorchTwins) {
  torch::manual_seed(0);
  expect_bit_identical(tnn::Linear(5, 3), nn::Linear(5, 3), torch::randn({4, 2, 5}));
  expect_bit_identical(tnn::Conv1d(tnn::Conv1dOptions(2, 3, 4).padding(torch::kSame)),
                       nn::Conv1d(tnn::Conv1dOptions(2, 3, 4).padding(torch::kSame)),
                       torch::randn({2, 2, 9}));
  auto c2 =
      tnn::Conv2dOptions(4, 6, 3).groups(2).stride(2).padding(1).padding_mode(torch::kReflect);
  expect_bit_identical(tnn::Conv2d(c2), nn::Conv2d(c2), torch::randn({2, 4, 9, 9}));
  expect_bit_identical(tnn::Conv3d(2, 3, 2), nn::Conv3d(2, 3, 2), torch::randn({2, 2, 4, 4, 4}));
  auto e = tnn::EmbeddingOptions(10, 4).padding_idx(2);
  expect_bit_identical(tnn::Embedding(e), nn::Embedding(e), torch::randint(10, {3, 5}));
  auto eb = tnn::EmbeddingBagOptions(10, 4).mode(torch::kMean);
  expect_bit_identical(tnn::EmbeddingBag(eb), nn::EmbeddingBag(eb), torch::randint(10, {3, 5}));
  expect_bit_identical(tnn::LayerNorm(tnn::LayerNormOptions({5})),
                       nn::LayerNorm(tnn::LayerNormOptions({5})), torch::randn({3, 4, 5}));
  expect_bit_identical(tnn::GroupNorm(2, 4), nn::GroupNorm(2, 4), torch::randn({3, 4, 5}));
  auto in = tnn::InstanceNormOptions(3).affine(true);
  expect_bit_identical(tnn::InstanceNorm2d(in), nn::InstanceNorm2d(in), torch::randn({2, 3, 4, 4}));
}

// An attached GroupNorm forms its input gradient from the per-sample affine gradients (a CPU loop):
// it equals torch's GroupNorm backward for every group size, in float and double, with the
// weight trainable or frozen.
TEST(AttachedGroupNorm, InputGradientEqualsTorchs) {
  for (const auto dtype : {torch::kFloat, torch::kDouble}) {
    for (const int64_t groups : {1, 2, 6}) {
      for (const bool frozen : {false, true}) {
        SCOPED_TRACE(std::to_string(groups) + (frozen ? " frozen" : "") +
                     (dtype == torch::kFloat ? " float" : " double"));
        torch::manual_seed(3);
        nn::GroupNorm dp(tnn::GroupNormOptions(groups, 6));
        tnn::GroupNorm ref(tnn::GroupNormOptions(groups, 6));
        dp->to(dtype);
        ref->to(dtype);
        torch::NoGradGuard no_grad;
        dp->weight.uniform_(0.5, 1.5);
        dp->bias.uniform_(-0.5, 0.5);
        ref->weight.copy_(dp->weight);
        ref->bias.copy_(dp->bias);
        if (frozen) dp->weight.set_requires_grad(false);
        GradSampleModule gsm(dp.ptr());
        auto x = torch::randn({4, 6, 5, 3}, torch::TensorOptions().dtype(dtype)) * 2 + 1;
        auto g = torch::randn({4, 6, 5, 3}, torch::TensorOptions().dtype(dtype));
        torch::AutoGradMode enable(true);
        auto x1 = x.clone().requires_grad_(true), x2 = x.clone().requires_grad_(true);
        (dp->forward(x1) * g).sum().backward();
        (ref->forward(x2) * g).sum().backward();
        const double tol = dtype == torch::kFloat ? 1e-5 : 1e-12;
        EXPECT_TRUE(torch::allclose(x1.grad(), x2.grad(), tol, tol));
      }
    }
  }
}

TEST(DetachedLayers, InitialiseLikeTheirTwinsFromTheSameSeed) {
  torch::manual_seed(11);
  tnn::Conv2d a(3, 8, 5);
  torch::manual_seed(11);
  nn::Conv2d b(3, 8, 5);
  EXPECT_TRUE(torch::equal(a->weight, b->weight));
  EXPECT_TRUE(torch::equal(a->bias, b->bias));
}

TEST(DpLayers, StateDictsInterchangeWithTorchLayers) {
  tnn::Sequential torch_model(tnn::Conv2d(1, 4, 3), tnn::GroupNorm(2, 4), tnn::Flatten(),
                              tnn::Linear(4 * 6 * 6, 3));
  tnn::Sequential dp_model(nn::Conv2d(1, 4, 3), nn::GroupNorm(2, 4), tnn::Flatten(),
                           nn::Linear(4 * 6 * 6, 3));
  std::stringstream stream;
  torch::save(torch_model, stream);
  torch::load(dp_model, stream);
  auto x = torch::randn({2, 1, 8, 8});
  EXPECT_TRUE(torch::equal(torch_model->forward(x), dp_model->forward(x)));
  EXPECT_EQ(torch_model->named_parameters().keys(), dp_model->named_parameters().keys());
}

TEST(Convert, CopiesWeightsIntoDpTwins) {
  tnn::Sequential model(tnn::Conv2d(tnn::Conv2dOptions(1, 4, 3).stride(2)), tnn::GroupNorm(2, 4),
                        tnn::Tanh(), tnn::Flatten(), tnn::Linear(36, 10));
  auto converted = nn::convert(model);
  ASSERT_EQ(converted->size(), model->size());
  EXPECT_NE(converted[0]->as<nn::Conv2d>(), nullptr);
  EXPECT_NE(converted[1]->as<nn::GroupNorm>(), nullptr);
  EXPECT_NE(converted[4]->as<nn::Linear>(), nullptr);
  auto x = torch::randn({3, 1, 8, 8});
  EXPECT_TRUE(torch::equal(model->forward(x), converted->forward(x)));
  // The copy shares nothing with the original.
  torch::NoGradGuard no_grad;
  converted[4]->as<nn::Linear>()->weight.zero_();
  EXPECT_GT(model[4]->as<tnn::Linear>()->weight.abs().sum().item<double>(), 0);
}

TEST(Convert, NamesWhatItCannotConvert) {
  tnn::Sequential with_bn(tnn::Conv2d(1, 4, 3), tnn::BatchNorm2d(4));
  EXPECT_THAT([&] { (void)nn::convert(with_bn); },
              ThrowsMessage<c10::Error>(
                  AllOf(HasSubstr("1 (torch::nn::BatchNorm2dImpl)"), HasSubstr("GroupNorm"))));
  tnn::Sequential with_bilinear(tnn::Bilinear(2, 2, 2));
  EXPECT_THAT([&] { (void)nn::convert(with_bilinear); },
              ThrowsMessage<c10::Error>(HasSubstr("0 (torch::nn::BilinearImpl) has parameters")));
}

// LibTorch nests containers in ModuleList and ModuleDict (a Sequential holds only modules with a
// plain forward): convert reaches into every level, and the copy shares nothing.
TEST(Convert, ConvertsNestedModuleListsAndDicts) {
  torch::manual_seed(2);
  tnn::ModuleList list(
      tnn::Linear(3, 3),
      tnn::Sequential(tnn::Linear(3, 2), tnn::ReLU(), tnn::LayerNorm(tnn::LayerNormOptions({2}))),
      tnn::ModuleList(tnn::Conv1d(1, 2, 3)));
  tnn::ModuleDict dict(std::vector<std::pair<std::string, std::shared_ptr<tnn::Module>>>{
      {"body", list.ptr()}, {"head", tnn::Linear(2, 1).ptr()}});
  auto converted = nn::convert(dict);
  auto body = converted["body"]->as<tnn::ModuleList>();
  ASSERT_NE(body, nullptr);
  EXPECT_NE(body->ptr<nn::LinearImpl>(0), nullptr);
  auto seq = body->ptr<tnn::SequentialImpl>(1);
  ASSERT_NE(seq, nullptr);
  EXPECT_NE(seq->ptr<nn::LinearImpl>(0), nullptr);
  EXPECT_NE(seq->ptr<nn::LayerNormImpl>(2), nullptr);
  EXPECT_NE(body->ptr<tnn::ModuleListImpl>(2)->ptr<nn::Conv1dImpl>(0), nullptr);
  EXPECT_NE(converted["head"]->as<nn::Linear>(), nullptr);
  // Same names, same values, and a forward through the converted Sequential is the same.
  const auto before = dict->named_parameters();
  const auto after = converted->named_parameters();
  ASSERT_EQ(after.keys(), before.keys());
  for (const auto& p : before) EXPECT_TRUE(torch::equal(after[p.key()], p.value())) << p.key();
  const auto x = torch::randn({4, 3});
  EXPECT_TRUE(torch::equal(seq->forward(x), list->ptr<tnn::SequentialImpl>(1)->forward(x)));
  torch::NoGradGuard no_grad;
  after["head.weight"].zero_();
  EXPECT_GT(before["head.weight"].abs().sum().item<double>(), 0);
  // The converted model trains privately: every trainable parameter has a rule.
  EXPECT_NO_THROW(validate(*converted));
}

struct BlockImpl : tnn::SequentialImpl {
  using SequentialImpl::SequentialImpl;
  torch::Tensor forward(torch::Tensor x) { return SequentialImpl::forward(x); }
};
TORCH_MODULE(Block);

// A Sequential subclass inside a Sequential cannot be copied as its own type, so it is converted
// in place; it keeps its type and runs its converted elements.
TEST(Convert, ConvertsASequentialSubclassInPlace) {
  torch::manual_seed(3);
  tnn::Sequential model(Block(tnn::Linear(4, 4), tnn::Tanh()), tnn::Linear(4, 2));
  auto block = model->ptr<BlockImpl>(0);
  const auto x = torch::randn({5, 4});
  const auto expected = model->forward(x);
  nn::convert_(*model);
  EXPECT_EQ(model->ptr<BlockImpl>(0), block);
  EXPECT_NE(block->ptr<nn::LinearImpl>(0), nullptr);
  EXPECT_NE(model->ptr<nn::LinearImpl>(1), nullptr);
  EXPECT_EQ(model->named_parameters()["0.0.weight"].data_ptr(),
            block->ptr<nn::LinearImpl>(0)->weight.data_ptr());
  EXPECT_TRUE(torch::equal(model->forward(x), expected));
  EXPECT_NO_THROW(validate(*model));
}

struct HoldsALinearImpl : tnn::Module {
  HoldsALinearImpl() { fc = register_module("fc", tnn::Linear(2, 2)); }
  tnn::Linear fc{nullptr};
};

TEST(Convert, RefusesWhatItCannotSwapAndChangesNothing) {
  HoldsALinearImpl user;
  EXPECT_THAT([&] { nn::convert_(user); },
              ThrowsMessage<c10::Error>(HasSubstr("fc (torch::nn::LinearImpl) is a member of")));
  tnn::Sequential half(tnn::Linear(2, 2), tnn::Bilinear(2, 2, 2));
  EXPECT_THROW(nn::convert_(*half), c10::Error);
  EXPECT_NE(half->ptr<tnn::LinearImpl>(0), nullptr);  // the first element was not replaced
}

// BatchNorm is replaced only when asked, by GroupNorm over the same channels with the largest
// group count ≤ 32 that divides them; eps and the affine parameters are kept, and the
// replacement is reported.
TEST(Convert, FixesBatchNormWhenAsked) {
  torch::manual_seed(4);
  tnn::Sequential model(tnn::Conv2d(3, 48, 3),
                        tnn::BatchNorm2d(tnn::BatchNorm2dOptions(48).eps(1e-3)), tnn::ReLU(),
                        tnn::Conv2d(48, 64, 1), tnn::BatchNorm2d(64));
  model[1]->as<tnn::BatchNorm2d>()->weight.data().uniform_();
  EXPECT_THROW((void)nn::convert(model), c10::Error);
  std::vector<nn::Replacement> replaced;
  auto fixed = nn::convert(model, nn::ConvertOptions().fix_batch_norm(true), &replaced);
  ASSERT_EQ(replaced.size(), 2u);
  EXPECT_EQ(replaced[0].path, "1");
  EXPECT_EQ(replaced[0].to, "dptorch::nn::GroupNorm(24 groups, 48 channels)");
  EXPECT_EQ(replaced[1].to, "dptorch::nn::GroupNorm(32 groups, 64 channels)");
  auto gn = fixed->ptr<nn::GroupNormImpl>(1);
  ASSERT_NE(gn, nullptr);
  EXPECT_EQ(gn->options.num_groups(), 24);
  EXPECT_EQ(gn->options.eps(), 1e-3);
  EXPECT_TRUE(torch::equal(gn->weight, model[1]->as<tnn::BatchNorm2d>()->weight));
  EXPECT_NO_THROW(validate(*fixed));
}

TEST(DpLayers, RefuseOptionsThatMixSamples) {
  EXPECT_THAT([] { nn::Embedding(tnn::EmbeddingOptions(5, 2).scale_grad_by_freq(true)); },
              ThrowsMessage<c10::Error>(HasSubstr("scale_grad_by_freq")));
  EXPECT_THAT([] { nn::EmbeddingBag(tnn::EmbeddingBagOptions(5, 2).mode(torch::kMax)); },
              ThrowsMessage<c10::Error>(HasSubstr("kSum and kMean")));
}

TEST(DpLayers, CloneIsDetachedAndIndependent) {
  nn::Linear lin(3, 2);
  GradSampleModule gsm(lin);
  auto copy = std::dynamic_pointer_cast<nn::LinearImpl>(lin->clone());
  ASSERT_NE(copy, nullptr);
  EXPECT_FALSE(copy->attached());
  EXPECT_TRUE(torch::equal(copy->weight, lin->weight));
  EXPECT_NE(copy->weight.data_ptr(), lin->weight.data_ptr());
}

}  // namespace
}  // namespace dptorch
