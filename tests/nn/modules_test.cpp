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
