#include <dptorch/dptorch.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "support/per_sample_reference.h"
#include "support/tensor_assert.h"

namespace dptorch {
namespace {

using ::testing::HasSubstr;
using testing::tensors_close;
using ::testing::ThrowsMessage;
namespace tnn = torch::nn;

tnn::Sequential small_cnn() {
  return tnn::Sequential(nn::Conv2d(tnn::Conv2dOptions(1, 3, 3).stride(2)), nn::GroupNorm(1, 3),
                         tnn::Tanh(), tnn::Flatten(), nn::Linear(27, 4));
}

class ClipperTest : public ::testing::Test {
 protected:
  void SetUp() override { torch::manual_seed(1234); }
  torch::Tensor x_ = torch::randn({12, 1, 7, 7}) * 3;
  torch::Tensor y_ = torch::randint(4, {12});
};

torch::Tensor loss_of(tnn::Sequential& m, const torch::Tensor& x, const torch::Tensor& y,
                      const std::string& reduction) {
  auto out = torch::log_softmax(m->forward(x), 1);
  return reduction == "mean" ? torch::nll_loss(out, y)
                             : torch::nll_loss(out, y, {}, at::Reduction::Sum);
}

TEST_F(ClipperTest, FlatClippingBoundsEveryPerSampleNorm) {
  auto m = small_cnn();
  const double C = 0.05;
  PerSampleGradientClipper clipper(m, std::make_shared<ConstantFlatClipper>(C));
  std::map<std::string, torch::Tensor> clipped;
  int ends = 0;
  clipper.set_on_batch_clip_func(
      [&](const ClipEvent& e) {
        if (e.name.empty()) {
          ++ends;
          return;
        }
        EXPECT_EQ(e.threshold, C);
        EXPECT_EQ(e.per_sample_norm.size(0), 12);
        std::vector<int64_t> shape(e.grad_sample.dim(), 1);
        shape[0] = 12;
        clipped[e.name] = e.grad_sample * e.clip_factor.view(shape);
      },
      /*with_grad_sample=*/true);
  loss_of(m, x_, y_, "mean").backward();
  clipper.clip_and_accumulate();
  EXPECT_EQ(ends, 1);
  ASSERT_EQ(clipped.size(), 6u);
  torch::Tensor sq = torch::zeros({12});
  for (auto& [name, g] : clipped) sq += g.flatten(1).square().sum(1);
  EXPECT_TRUE((sq.sqrt() <= C * (1 + 1e-6)).all().item<bool>()) << sq.sqrt();
  // Most samples are clipped at this threshold; their norm is C up to the 1e-6 guard.
  EXPECT_GT((sq.sqrt() > C * 0.99).sum().item<int64_t>(), 6);
  // pre_step writes the mean of the clipped gradients.
  auto stats = clipper.pre_step();
  EXPECT_EQ(stats.batch_size, 12);
  EXPECT_EQ(stats.max_norms, std::vector<double>(6, C));
  for (auto& p : m->named_parameters()) {
    EXPECT_TRUE(tensors_close(p.value().grad(), clipped[p.key()].sum(0) / 12, 1e-5)) << p.key();
  }
}

TEST_F(ClipperTest, PerLayerThresholdsHoldPerParameter) {
  auto m = small_cnn();
  std::vector<double> C{0.1, 0.02, 0.03, 0.04, 0.2, 0.01};
  PerSampleGradientClipper clipper(m, std::make_shared<ConstantPerLayerClipper>(C), true, "sum");
  std::vector<double> worst;
  clipper.set_on_batch_clip_func(
      [&](const ClipEvent& e) {
        if (e.name.empty()) return;
        std::vector<int64_t> shape(e.grad_sample.dim(), 1);
        shape[0] = -1;
        auto n = (e.grad_sample * e.clip_factor.view(shape)).flatten(1).norm(2, 1);
        worst.push_back(n.max().item<double>() / e.threshold);
      },
      true);
  loss_of(m, x_, y_, "sum").backward();
  clipper.clip_and_accumulate();
  ASSERT_EQ(worst.size(), C.size());
  for (double r : worst) EXPECT_LE(r, 1 + 1e-6);
  EXPECT_NEAR(clipper.norm_clipper()->noise_scale_norm(),
              std::sqrt(0.01 + 0.0004 + 0.0009 + 0.0016 + 0.04 + 0.0001), 1e-12);
}

TEST_F(ClipperTest, VirtualStepsEqualOneStepOverTheWholeBatch) {
  for (const std::string reduction : {"mean", "sum"}) {
    SCOPED_TRACE(reduction);
    auto m = small_cnn();
    auto m2 = std::dynamic_pointer_cast<tnn::SequentialImpl>(m->clone());
    tnn::Sequential m_pieces(m2);
    PerSampleGradientClipper whole(m, std::make_shared<ConstantFlatClipper>(0.1), true, reduction);
    loss_of(m, x_, y_, reduction).backward();
    whole.clip_and_accumulate();
    auto s1 = whole.pre_step();

    PerSampleGradientClipper pieces(m_pieces, std::make_shared<ConstantFlatClipper>(0.1), true,
                                    reduction);
    for (auto [begin, end] : {std::pair{0, 5}, std::pair{5, 7}, std::pair{7, 12}}) {
      loss_of(m_pieces, x_.slice(0, begin, end), y_.slice(0, begin, end), reduction).backward();
      pieces.clip_and_accumulate();
    }
    EXPECT_EQ(pieces.accumulated_iterations(), 3);
    auto s2 = pieces.pre_step();
    EXPECT_EQ(s1.batch_size, s2.batch_size);
    auto p2 = m_pieces->named_parameters();
    for (const auto& p : m->named_parameters()) {
      EXPECT_TRUE(tensors_close(p2[p.key()].grad(), p.value().grad(), 1e-5)) << p.key();
    }
  }
}

// The norm method is the clipper's choice too; every method gives the same clipped gradients.
TEST_F(ClipperTest, EveryNormMethodGivesTheSameClippedGradients) {
  std::vector<std::vector<torch::Tensor>> grads;
  for (auto method : {NormMethod::kAuto, NormMethod::kGhost, NormMethod::kMaterialize}) {
    torch::manual_seed(9);
    auto m = small_cnn();
    m->to(torch::kDouble);
    PerSampleGradientClipper clipper(
        m, std::make_shared<ConstantFlatClipper>(0.05),
        GradSampleOptions().norm_method(method).loss_reduction(LossReduction::kSum));
    EXPECT_EQ(clipper.grad_sample_module().options().norm_method(), method);
    loss_of(m, x_.to(torch::kDouble), y_, "sum").backward();
    clipper.clip_and_accumulate();
    (void)clipper.pre_step();
    std::vector<torch::Tensor> g;
    for (const auto& p : m->parameters()) g.push_back(p.grad().clone());
    grads.push_back(g);
  }
  for (size_t k = 0; k < grads[0].size(); ++k) {
    EXPECT_TRUE(tensors_close(grads[1][k], grads[0][k], 1e-10)) << k;
    EXPECT_TRUE(tensors_close(grads[2][k], grads[0][k], 1e-10)) << k;
  }
}

TEST_F(ClipperTest, PreStepBeforeAccumulationIsAnError) {
  auto m = small_cnn();
  PerSampleGradientClipper clipper(m, std::make_shared<ConstantFlatClipper>(1.0));
  EXPECT_THAT([&] { (void)clipper.pre_step(); },
              ThrowsMessage<c10::Error>(HasSubstr("call clip_and_accumulate()")));
}

TEST_F(ClipperTest, ZeroGradDropsEverything) {
  auto m = small_cnn();
  PerSampleGradientClipper clipper(m, std::make_shared<ConstantFlatClipper>(1.0));
  loss_of(m, x_, y_, "mean").backward();
  clipper.clip_and_accumulate();
  clipper.zero_grad();
  EXPECT_EQ(clipper.accumulated_iterations(), 0);
  EXPECT_THROW((void)clipper.pre_step(), c10::Error);
  loss_of(m, x_, y_, "mean").backward();  // a fresh pass is accepted
  clipper.clip_and_accumulate();
  EXPECT_EQ(clipper.pre_step().batch_size, 12);
}

TEST_F(ClipperTest, BadArgumentsAreRefusedAndNothingStaysAttached) {
  auto m = small_cnn();
  EXPECT_THAT(
      [] { ConstantFlatClipper c(0.0); },
      ThrowsMessage<c10::Error>(HasSubstr("max_grad_norm must be finite and > 0, but is 0")));
  EXPECT_THAT(
      [] {
        ConstantPerLayerClipper c({1.0, -2.0});
      },
      ThrowsMessage<c10::Error>(HasSubstr("but is -2")));
  EXPECT_THAT(
      [&] {
        PerSampleGradientClipper c(
            m, std::make_shared<ConstantPerLayerClipper>(std::vector<double>{1.0, 1.0}));
      },
      ThrowsMessage<c10::Error>(HasSubstr("2 thresholds but the module has 6 trainable")));
  EXPECT_THAT(
      [&] {
        PerSampleGradientClipper c(m, std::make_shared<ConstantFlatClipper>(1.0), true, "avg");
      },
      ThrowsMessage<c10::Error>(HasSubstr("loss_reduction must be \"mean\" or \"sum\"")));
  EXPECT_FALSE(m[0]->as<nn::Conv2d>()->attached());
  EXPECT_FALSE(m[4]->as<nn::Linear>()->attached());
}

TEST_F(ClipperTest, CloseDetaches) {
  auto m = small_cnn();
  PerSampleGradientClipper clipper(m, std::make_shared<ConstantFlatClipper>(1.0));
  clipper.close();
  loss_of(m, x_, y_, "mean").backward();
  EXPECT_TRUE(m[4]->as<nn::Linear>()->weight.grad().defined());
}

TEST(DynamicClipper, FollowsTheMedianWithMomentum) {
  DynamicClipper clipper(DynamicClipperOptions(1.0).method(DynamicClipping::kMedian).momentum(0.5));
  auto norms = torch::tensor({1.0, 3.0, 5.0});
  auto f = clipper.clipping_factors({norms});
  EXPECT_DOUBLE_EQ(clipper.thresholds()[0], 0.5 * 1.0 + 0.5 * 3.0);
  EXPECT_TRUE(tensors_close(f[0], torch::clamp_max(2.0 / (norms + 1e-6), 1.0), 1e-12));
  DynamicClipper mean(
      DynamicClipperOptions(1.0).method(DynamicClipping::kMean).ratio(1.0).momentum(0));
  (void)mean.clipping_factors({norms});
  EXPECT_NEAR(mean.thresholds()[0], 3.0 + 2.0, 1e-9);
  DynamicClipper pct(
      DynamicClipperOptions(1.0).method(DynamicClipping::kPercentile).ratio(1.0).momentum(0));
  (void)pct.clipping_factors({norms});
  EXPECT_NEAR(pct.thresholds()[0], 5.0, 1e-9);
  EXPECT_THAT([] { DynamicClipper c(DynamicClipperOptions(1.0).momentum(1.0)); },
              ThrowsMessage<c10::Error>(HasSubstr("momentum must be in [0, 1)")));
}

}  // namespace
}  // namespace dptorch
