// The std of the noise DPOptimizer adds, measured: σ·C/E[B] with C = ‖(C_l)‖₂ for per-layer
// thresholds C_l (McMahan et al. 2018), not σ·C_1 nor σ·C_l per parameter; σ·C without the
// division for a "sum" loss.

#include <dptorch/dptorch.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

namespace dptorch {
namespace {

namespace tnn = torch::nn;

constexpr double kExpectedBatch = 16;
constexpr int64_t kSteps = 20;

// The `.grad` of every parameter after `kSteps` steps whose per-sample gradients are all zero
// (loss 0 · output): pure noise. One vector of draws per parameter, over all steps.
std::vector<torch::Tensor> noise_draws(tnn::Sequential& m, optim::DPOptimizer& opt) {
  std::vector<std::vector<torch::Tensor>> per_param(m->parameters().size());
  for (int64_t s = 0; s < kSteps; ++s) {
    (m->forward(torch::randn({12, 100})) * 0).sum().backward();
    opt.step();
    const auto params = m->parameters();
    for (size_t k = 0; k < params.size(); ++k) {
      per_param[k].push_back(params[k].grad().detach().flatten().to(torch::kDouble));
    }
  }
  std::vector<torch::Tensor> out;
  for (auto& draws : per_param) out.push_back(torch::cat(draws));
  return out;
}

struct NoiseScaleCase {
  std::vector<double> thresholds;  // one: flat; else one per parameter
  std::string loss_reduction;
  std::string name;
};

class NoiseScaleTest : public ::testing::TestWithParam<NoiseScaleCase> {};

// σ = 1.3 on Linear(100, 100), Tanh, Linear(100, 100) (weights of 10000, biases of 100 entries),
// E[B] = 16 (the physical batches hold 12: the divisor is E[B]). Per-layer thresholds
// (0.5, 0.2, 1.0, 0.4) have ‖C‖₂ = √1.45 ≈ 1.204; the first threshold (0.5), the largest (1.0),
// the sum (2.1) and each C_l on its own parameter are all at least 17% away. Seed 31, 20 steps:
// each weight's std within 1.5% (7 standard errors), each bias's within 10% (6), all pooled 1%.
TEST_P(NoiseScaleTest, NoiseStdIsSigmaTimesTheNormOfTheThresholds) {
  const auto& c = GetParam();
  constexpr double kSigma = 1.3;
  torch::manual_seed(31);
  tnn::Sequential m(nn::Linear(100, 100), tnn::Tanh(), nn::Linear(100, 100));
  std::shared_ptr<NormClipper> norm_clipper;
  double bound_sq = 0;
  for (double t : c.thresholds) bound_sq += t * t;
  const double bound = std::sqrt(bound_sq);
  if (c.thresholds.size() == 1) {
    norm_clipper = std::make_shared<ConstantFlatClipper>(c.thresholds[0]);
  } else {
    norm_clipper = std::make_shared<ConstantPerLayerClipper>(c.thresholds);
  }
  auto clipper =
      std::make_shared<PerSampleGradientClipper>(m, norm_clipper, true, c.loss_reduction);
  optim::DPOptimizer opt(
      std::make_shared<torch::optim::SGD>(m->parameters(), torch::optim::SGDOptions(0.0)), clipper,
      optim::DPOptimizerOptions(kSigma, kExpectedBatch), std::make_shared<optim::PhiloxNoise>(31));
  const auto draws = noise_draws(m, opt);
  const double expected = kSigma * bound / (c.loss_reduction == "mean" ? kExpectedBatch : 1.0);
  ASSERT_EQ(draws.size(), 4u);
  for (size_t k = 0; k < draws.size(); ++k) {
    const double tolerance = draws[k].numel() > 10000 ? 0.015 : 0.1;
    EXPECT_NEAR(draws[k].std().item<double>(), expected, tolerance * expected)
        << "parameter " << k << " (" << draws[k].numel() << " draws)";
    EXPECT_NEAR(draws[k].mean().item<double>(), 0.0,
                6 * expected / std::sqrt(static_cast<double>(draws[k].numel())))
        << "parameter " << k;
  }
  EXPECT_NEAR(torch::cat(draws).std().item<double>(), expected, 0.01 * expected);
}

INSTANTIATE_TEST_SUITE_P(
    FlatAndPerLayer, NoiseScaleTest,
    ::testing::Values(NoiseScaleCase{{0.7}, "mean", "Flat_mean"},
                      NoiseScaleCase{{0.7}, "sum", "Flat_sum"},
                      NoiseScaleCase{{0.5, 0.2, 1.0, 0.4}, "mean", "PerLayer_mean"},
                      NoiseScaleCase{{0.5, 0.2, 1.0, 0.4}, "sum", "PerLayer_sum"}),
    [](const ::testing::TestParamInfo<NoiseScaleCase>& info) { return info.param.name; });

// The noise bound a per-layer clipper reports is ‖(C_l)‖₂, whatever the order of the thresholds.
TEST(NoiseScaleTest, PerLayerBoundIsTheEuclideanNormOfTheThresholds) {
  EXPECT_NEAR(ConstantPerLayerClipper({0.5, 0.2, 1.0, 0.4}).noise_scale_norm(), std::sqrt(1.45),
              1e-12);
  EXPECT_NEAR(ConstantPerLayerClipper({0.4, 1.0, 0.2, 0.5}).noise_scale_norm(), std::sqrt(1.45),
              1e-12);
  EXPECT_NEAR(ConstantPerLayerClipper({3.0, 4.0}).noise_scale_norm(), 5.0, 1e-12);
  EXPECT_EQ(ConstantFlatClipper(0.7).noise_scale_norm(), 0.7);
}

// A clipper whose thresholds move with the clipping (DynamicClipper) is noised with the
// thresholds the step clipped at: on the first step of a per-layer DynamicClipper the norm of its
// per-parameter thresholds (four of 0.9: 1.8), not its single initial threshold C0 = 1.
// Seed 37, one step of 20200 draws, tolerance 1.5%.
TEST(NoiseScaleTest, DynamicPerLayerNoiseFollowsTheThresholdsTheStepClippedAt) {
  constexpr double kSigma = 1.3;
  torch::manual_seed(37);
  tnn::Sequential m(nn::Linear(100, 100), tnn::Tanh(), nn::Linear(100, 100));
  // Zero per-sample norms: each threshold moves from 1.0 to 0.9·1.0 + 0.1·0 = 0.9.
  auto norm_clipper = std::make_shared<DynamicClipper>(
      DynamicClipperOptions(1.0).method(DynamicClipping::kMedian).per_layer(true).momentum(0.9));
  auto clipper = std::make_shared<PerSampleGradientClipper>(m, norm_clipper);
  optim::DPOptimizer opt(
      std::make_shared<torch::optim::SGD>(m->parameters(), torch::optim::SGDOptions(0.0)), clipper,
      optim::DPOptimizerOptions(kSigma, kExpectedBatch), std::make_shared<optim::PhiloxNoise>(37));
  (m->forward(torch::randn({12, 100})) * 0).sum().backward();
  opt.step();
  ASSERT_EQ(norm_clipper->thresholds(), std::vector<double>(4, 0.9));
  std::vector<torch::Tensor> draws;
  for (const auto& p : m->parameters()) draws.push_back(p.grad().flatten().to(torch::kDouble));
  const double expected = kSigma * norm_clipper->noise_scale_norm() / kExpectedBatch;
  EXPECT_NEAR(torch::cat(draws).std().item<double>(), expected, 0.015 * expected);
}

}  // namespace
}  // namespace dptorch
