#include <dptorch/dptorch.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <sstream>

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
  EXPECT_EQ(stats.thresholds, std::vector<double>(6, C));
  EXPECT_EQ(stats.max_norm, std::vector<double>(6, C));
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

// The seed's dynamic clipper, method by method (Opacus 0.10–0.13 clipping.py): the static
// threshold, the p-value (kthvalue at max(1, ⌊n(1 − ratio)⌋)), mean + ratio·std (at least the
// smallest norm), and the median added here; momentum averages with the previous threshold.
TEST(DynamicClipper, MethodsFollowTheSeed) {
  const auto norms = torch::arange(1, 11, torch::kDouble);  // 1, 2, ..., 10
  auto threshold = [&](DynamicClipperOptions options, const torch::Tensor& n) {
    DynamicClipper clipper(options);
    const auto f = clipper.clipping_factors({n});
    const double t = clipper.thresholds()[0];
    EXPECT_TRUE(tensors_close(f[0], torch::clamp_max(t / (n + 1e-6), 1.0), 1e-12));
    return t;
  };
  const DynamicClipperOptions base(4.5);
  EXPECT_EQ(threshold(base, norms), 4.5);  // kStatic is the default, as in the seed
  auto pvalue = DynamicClipperOptions(base).method(DynamicClipping::kPValue);
  EXPECT_EQ(threshold(DynamicClipperOptions(pvalue).ratio(0.25), norms), 7.0);  // 7th smallest
  EXPECT_EQ(threshold(DynamicClipperOptions(pvalue).ratio(0.05), norms), 9.0);  // ⌊9.5⌋ = 9
  EXPECT_EQ(threshold(DynamicClipperOptions(pvalue).ratio(0.0), norms), 10.0);
  EXPECT_EQ(threshold(DynamicClipperOptions(pvalue).ratio(1.0), norms), 1.0);  // at least the 1st
  const auto three = torch::tensor({1.0, 3.0, 5.0});
  auto mean = DynamicClipperOptions(base).method(DynamicClipping::kMean);
  EXPECT_NEAR(threshold(DynamicClipperOptions(mean).ratio(1.0), three), 5.0 + 1e-8, 1e-12);
  EXPECT_EQ(threshold(DynamicClipperOptions(mean).ratio(-5.0), three), 1.0);  // the smallest
  EXPECT_EQ(threshold(DynamicClipperOptions(mean).ratio(1.0), torch::tensor({2.5})), 2.5);
  auto median = DynamicClipperOptions(base).method(DynamicClipping::kMedian);
  EXPECT_EQ(threshold(median, three), 3.0);
  EXPECT_EQ(threshold(median, torch::tensor({1.0, 2.0, 3.0, 4.0})), 2.0);
  EXPECT_EQ(threshold(DynamicClipperOptions(median).momentum(0.5), three), 0.5 * 4.5 + 0.5 * 3.0);
  EXPECT_THAT([] { DynamicClipper c(DynamicClipperOptions(1.0).momentum(1.0)); },
              ThrowsMessage<c10::Error>(HasSubstr("momentum must be in [0, 1), but is 1")));
  EXPECT_THAT(
      [] {
        DynamicClipper c(DynamicClipperOptions(1.0).method(DynamicClipping::kPValue).ratio(2));
      },
      ThrowsMessage<c10::Error>(HasSubstr("must be in [0, 1], but is 2")));
}

TEST(DynamicClipper, PerLayerKeepsOneThresholdPerParameter) {
  DynamicClipper clipper(
      DynamicClipperOptions(1.0).method(DynamicClipping::kMedian).per_layer(true));
  const auto f = clipper.clipping_factors({torch::tensor({1.0, 2.0, 3.0}), torch::tensor({9.0})});
  EXPECT_EQ(clipper.thresholds(), (std::vector<double>{2.0, 9.0}));
  EXPECT_EQ(f.size(), 2u);
  EXPECT_FALSE(clipper.thresholds_fixed());
}

TEST(AutomaticClipper, NormalisesEveryGradient) {
  AutomaticClipper clipper(2.0, 0.01);
  const auto norms = torch::tensor({0.001, 1.0, 50.0}, torch::kDouble);
  const auto f = clipper.clipping_factors({norms});
  EXPECT_TRUE(tensors_close(f[0], 2.0 / (norms + 0.01), 1e-15));
  // Every clipped norm is below C, and small gradients are scaled up (factor > 1).
  EXPECT_TRUE(((f[0] * norms) < 2.0).all().item<bool>());
  EXPECT_GT(f[0][0].item<double>(), 1.0);
  EXPECT_EQ(clipper.thresholds(), std::vector<double>{2.0});
  EXPECT_THAT([] { AutomaticClipper c(1.0, 0.0); },
              ThrowsMessage<c10::Error>(HasSubstr("stability must be finite and > 0, but is 0")));
}

// pre_step() returns the seed's pair: the noise bound ‖aggregated thresholds‖₂ once per
// parameter, and the batch size; per-parameter thresholds come separately. A single per-layer
// value is every parameter's threshold.
TEST_F(ClipperTest, PreStepReturnsTheSeedsNoiseBoundPerParameter) {
  {
    auto m = small_cnn();
    const std::vector<double> C{0.1, 0.02, 0.03, 0.04, 0.2, 0.01};
    PerSampleGradientClipper clipper(m, std::make_shared<ConstantPerLayerClipper>(C));
    loss_of(m, x_, y_, "mean").backward();
    clipper.clip_and_accumulate();
    const double bound = std::sqrt(0.01 + 0.0004 + 0.0009 + 0.0016 + 0.04 + 0.0001);
    EXPECT_NEAR(clipper.noise_bound(), bound, 1e-15);
    const auto stats = clipper.pre_step();
    EXPECT_EQ(stats.batch_size, 12);
    EXPECT_EQ(stats.thresholds, C);
    ASSERT_EQ(stats.max_norm.size(), 6u);
    for (double b : stats.max_norm) EXPECT_NEAR(b, bound, 1e-15);
  }
  {
    auto m = small_cnn();
    PerSampleGradientClipper clipper(
        m, std::make_shared<ConstantPerLayerClipper>(std::vector<double>{0.5}));
    EXPECT_NEAR(clipper.noise_bound(), 0.5 * std::sqrt(6.0), 1e-15);  // before any batch too
    std::vector<double> seen;
    clipper.set_on_batch_clip_func([&](const ClipEvent& e) {
      if (!e.name.empty()) seen.push_back(e.threshold);
    });
    loss_of(m, x_, y_, "mean").backward();
    clipper.clip_and_accumulate();
    EXPECT_EQ(seen, std::vector<double>(6, 0.5));
    const auto stats = clipper.pre_step();
    EXPECT_EQ(stats.thresholds, std::vector<double>(6, 0.5));
    for (double b : stats.max_norm) EXPECT_NEAR(b, 0.5 * std::sqrt(6.0), 1e-15);
  }
  {
    // Virtual steps with a threshold that changes: the largest one each parameter saw counts.
    auto m = small_cnn();
    PerSampleGradientClipper clipper(
        m, std::make_shared<DynamicClipper>(
               DynamicClipperOptions(1.0).method(DynamicClipping::kMedian).per_layer(true)));
    std::vector<double> largest(6, 0.0);
    for (auto [begin, end] : {std::pair{0, 6}, std::pair{6, 12}}) {
      loss_of(m, x_.slice(0, begin, end), y_.slice(0, begin, end), "mean").backward();
      clipper.clip_and_accumulate();
      const auto t = clipper.norm_clipper()->thresholds();
      for (size_t k = 0; k < 6; ++k) largest[k] = std::max(largest[k], t[k]);
    }
    const auto stats = clipper.pre_step();
    EXPECT_EQ(stats.thresholds, largest);
    double sq = 0;
    for (double t : largest) sq += t * t;
    for (double b : stats.max_norm) EXPECT_NEAR(b, std::sqrt(sq), 1e-12);
  }
}

// Everything the on-batch-clip callback offers, against plain autograd on batches of one: the
// per-sample gradients and norms, the clip factors of a threshold that clips some samples and
// not others, this call's clipped gradient and its unclipped gradient, both scaled as the
// seed scales them (÷ the call's batch size for "mean"); then one call with no name.
TEST_F(ClipperTest, CallbackOffersWhatTheSeedsDidAgainstBatchOfOneAutograd) {
  for (const std::string reduction : {"mean", "sum"}) {
    SCOPED_TRACE(reduction);
    torch::manual_seed(3);
    auto m = small_cnn();
    m->to(torch::kDouble);
    const auto x = x_.to(torch::kDouble);
    auto plain = std::dynamic_pointer_cast<tnn::SequentialImpl>(m->clone());
    // Ground truth on the detached copy: G_i by autograd on sample i alone, and the batch's
    // plain gradient.
    const auto params = plain->parameters();
    std::vector<std::vector<torch::Tensor>> G;  // [sample][parameter]
    std::vector<double> norms;
    for (int64_t i = 0; i < 12; ++i) {
      tnn::Sequential one(plain);
      G.push_back(torch::autograd::grad(
          {loss_of(one, x.narrow(0, i, 1), y_.narrow(0, i, 1), reduction)}, params));
      double sq = 0;
      for (const auto& g : G.back()) sq += g.square().sum().item<double>();
      norms.push_back(std::sqrt(sq));
    }
    tnn::Sequential whole(plain);
    const auto batch_grads = torch::autograd::grad({loss_of(whole, x, y_, reduction)}, params);
    auto sorted = norms;
    std::sort(sorted.begin(), sorted.end());
    const double C = sorted[6];  // half the samples are clipped, half are not
    const double divisor = reduction == "mean" ? 12.0 : 1.0;

    PerSampleGradientClipper clipper(m, std::make_shared<ConstantFlatClipper>(C), true, reduction);
    std::vector<ClipEvent> events;
    clipper.set_on_batch_clip_func([&](const ClipEvent& e) { events.push_back(e); },
                                   ClipCallbackOptions().grad_sample(true).grad_before_clip(true));
    loss_of(m, x, y_, reduction).backward();
    clipper.clip_and_accumulate();
    ASSERT_EQ(events.size(), 7u);
    EXPECT_TRUE(events.back().name.empty());
    const auto names = clipper.grad_sample_module().parameter_names();
    std::vector<double> factors(12);
    for (int64_t i = 0; i < 12; ++i) factors[i] = std::min(1.0, C / (norms[i] + 1e-6));
    int clipped = 0;
    for (double f : factors) clipped += f < 1 ? 1 : 0;
    ASSERT_GT(clipped, 0);
    ASSERT_LT(clipped, 12);
    for (size_t k = 0; k < 6; ++k) {
      const auto& e = events[k];
      SCOPED_TRACE(e.name);
      EXPECT_EQ(e.name, names[k]);
      EXPECT_EQ(e.threshold, C);
      std::vector<torch::Tensor> per_sample;
      auto after = torch::zeros_like(params[k]);
      for (int64_t i = 0; i < 12; ++i) {
        per_sample.push_back(G[i][k]);
        after += factors[i] * G[i][k];
      }
      EXPECT_TRUE(tensors_close(e.grad_sample, torch::stack(per_sample), 1e-10));
      EXPECT_TRUE(tensors_close(e.per_sample_norm, torch::tensor(norms, torch::kDouble), 1e-10));
      EXPECT_TRUE(tensors_close(e.clip_factor, torch::tensor(factors, torch::kDouble), 1e-10));
      EXPECT_TRUE(tensors_close(e.grad_after_clip, after / divisor, 1e-10));
      EXPECT_TRUE(tensors_close(e.grad_before_clip, batch_grads[k], 1e-10));
    }
    // The accumulated gradient is the same clipped sum.
    (void)clipper.pre_step();
    const auto trained = m->parameters();
    for (size_t k = 0; k < 6; ++k) {
      EXPECT_TRUE(tensors_close(trained[k].grad(), events[k].grad_after_clip, 1e-10)) << k;
    }
  }
}

TEST_F(ClipperTest, PrintingSaysWhatItIsAttachedTo) {
  auto m = small_cnn();
  PerSampleGradientClipper clipper(m, std::make_shared<ConstantFlatClipper>(1.0));
  std::ostringstream out;
  out << clipper;
  EXPECT_THAT(out.str(), HasSubstr("PerSampleGradientClipper on torch::nn::Sequential"));
  EXPECT_THAT(out.str(), HasSubstr("dptorch::nn::Linear"));
  clipper.close();
  std::ostringstream closed;
  closed << clipper;
  EXPECT_THAT(closed.str(), HasSubstr("(closed)"));
}

// As the seed's hooks, layers record in training mode only; a clip after an eval-mode
// backward says why nothing is there, and so does a DPOptimizer step.
TEST_F(ClipperTest, EvalModeRecordsNothingAndTheClipSaysWhy) {
  auto m = small_cnn();
  auto clipper =
      std::make_shared<PerSampleGradientClipper>(m, std::make_shared<ConstantFlatClipper>(1.0));
  m->eval();
  loss_of(m, x_, y_, "mean").backward();
  EXPECT_FALSE(clipper->grad_sample_module().has_pass());
  // Autograd formed the plain gradient, as the torch twin would.
  EXPECT_TRUE(m[4]->as<nn::Linear>()->weight.grad().defined());
  EXPECT_THAT([&] { clipper->clip_and_accumulate(); },
              ThrowsMessage<c10::Error>(AllOf(HasSubstr("nothing was recorded for 0 ("),
                                              HasSubstr("ran a forward pass in eval mode"))));
  optim::DPOptimizer opt(
      std::make_shared<torch::optim::SGD>(m->parameters(), torch::optim::SGDOptions(0.1)), clipper,
      optim::DPOptimizerOptions(1.0, 12), std::make_shared<optim::PhiloxNoise>(1));
  EXPECT_THAT([&] { opt.step(); }, ThrowsMessage<c10::Error>(HasSubstr("call model->train()")));
  // Evaluating without grad mode is fine, and training mode records again.
  opt.zero_grad();
  {
    torch::NoGradGuard no_grad;
    (void)m->forward(x_);
  }
  m->train();
  loss_of(m, x_, y_, "mean").backward();
  opt.step();
  EXPECT_EQ(opt.steps(), 1);
}

// The noise a DPOptimizer step adds, measured: the same step with σ and with σ = 0 from the same
// state differs by the noise alone. Its std must be σ·‖thresholds the step clipped at‖₂ / E[B]
// (seed 31, 64·65 = 4160 draws: the sample std is within 5% with probability > 1 − 1e-5).
double measured_noise_std(const std::shared_ptr<NormClipper>& norm_clipper, double sigma, double E,
                          double* bound) {
  std::vector<torch::Tensor> grads;
  for (double s : {0.0, sigma}) {
    torch::manual_seed(31);
    tnn::Sequential m(nn::Linear(64, 64));
    auto clipper = std::make_shared<PerSampleGradientClipper>(m, norm_clipper);
    optim::DPOptimizer opt(
        std::make_shared<torch::optim::SGD>(m->parameters(), torch::optim::SGDOptions(0.0)),
        clipper, optim::DPOptimizerOptions(s, E), std::make_shared<optim::PhiloxNoise>(31));
    m->forward(torch::randn({16, 64})).square().sum(1).mean().backward();
    opt.step();
    *bound = l2_norm(norm_clipper->thresholds());
    std::vector<torch::Tensor> flat;
    for (const auto& p : m->parameters()) flat.push_back(p.grad().flatten());
    grads.push_back(torch::cat(flat));
  }
  return (grads[1] - grads[0]).std().item<double>();
}

TEST(DPOptimizerNoise, DynamicClippingIsNoisedWithTheThresholdsOfItsOwnStep) {
  const double sigma = 2.0, E = 16;
  // Flat: the initial threshold (1000) is far from the batch's median; the noise must follow the
  // median the step clipped at, not the threshold of the step before.
  double bound = 0;
  const double flat =
      measured_noise_std(std::make_shared<DynamicClipper>(
                             DynamicClipperOptions(1000.0).method(DynamicClipping::kMedian)),
                         sigma, E, &bound);
  ASSERT_LT(bound, 200.0);
  EXPECT_NEAR(flat, sigma * bound / E, 0.05 * sigma * bound / E);
  // Per-layer, first step: the norm of both parameters' thresholds, not one threshold.
  const double per_layer = measured_noise_std(
      std::make_shared<DynamicClipper>(
          DynamicClipperOptions(1000.0).method(DynamicClipping::kMedian).per_layer(true)),
      sigma, E, &bound);
  EXPECT_NEAR(per_layer, sigma * bound / E, 0.05 * sigma * bound / E);
}

TEST(DPOptimizerNoise, AutomaticClippingIsNoisedWithItsBound) {
  double bound = 0;
  const double std =
      measured_noise_std(std::make_shared<AutomaticClipper>(1.0, 0.01), 1.5, 16, &bound);
  EXPECT_EQ(bound, 1.0);
  EXPECT_NEAR(std, 1.5 / 16, 0.05 * 1.5 / 16);
}

}  // namespace
}  // namespace dptorch
