// The clipped sum against its definition on a batch where some samples are clipped and some are
// not: Σ_i min(1, C / (‖G_i‖ + 1e-6)) G_i (flat), or per parameter l with C_l and ‖G_{i,l}‖
// (per-layer), with G_i from plain autograd on batches of one. A clip factor above 1, a changed
// guard or a wrong divisor shows on the unclipped samples, which a batch that clips every sample
// cannot see.

#include <dptorch/dptorch.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "support/per_sample_reference.h"
#include "support/tensor_assert.h"

namespace dptorch {
namespace {

namespace tnn = torch::nn;
using testing::per_sample_loss;
using testing::reference_grad_samples;
using testing::Scenario;
using testing::tensors_close;

constexpr int64_t kBatch = 12;
constexpr double kExpectedBatch = 16;  // ≠ kBatch: the optimiser divides by E[B]
constexpr double kGuard = 1e-6;        // the clip factor's guard, C / (‖G‖ + 1e-6)

// A double-precision MLP and a batch whose rows are scaled from 0.1 to 4, so per-sample norms
// spread over more than an order of magnitude.
struct Fixture {
  tnn::Sequential model{nullptr};
  torch::Tensor x;
  torch::Tensor r;
  std::vector<torch::Tensor> grad_samples;  // per parameter [B, ...], from batches of one

  Fixture() {
    torch::manual_seed(77);
    model = tnn::Sequential(nn::Linear(5, 4), tnn::Tanh(), nn::Linear(4, 3));
    model->to(torch::kDouble);
    x = torch::randn({kBatch, 5}, torch::kDouble) *
        torch::linspace(0.1, 4.0, kBatch, torch::kDouble).unsqueeze(1);
    r = torch::randn({kBatch, 3}, torch::kDouble);
    Scenario s;
    s.model = model.ptr();
    s.forward = [this](const torch::Tensor& in) { return model->forward(in); };
    s.input = x;
    grad_samples = reference_grad_samples(s, r);
  }

  // The loss whose per-sample terms are ℓ_i = per_sample_loss(o_i, r_i): their sum, or mean.
  torch::Tensor loss(const std::string& reduction) {
    const auto total = per_sample_loss(model->forward(x), r);
    return reduction == "mean" ? total / kBatch : total;
  }
};

// The median of `norms` ([B]), between the 6th and 7th smallest: half of the samples lie above.
double median_threshold(const torch::Tensor& norms) {
  const auto sorted = std::get<0>(norms.sort());
  return 0.5 * (sorted[kBatch / 2 - 1].item<double>() + sorted[kBatch / 2].item<double>());
}

// Σ_i min(1, C / (‖n_i‖ + 1e-6)) G_i for one parameter's [B, ...] samples and norms [B].
torch::Tensor clipped_sum(const torch::Tensor& samples, const torch::Tensor& norms, double c) {
  const auto factors = torch::clamp_max(c / (norms + kGuard), 1.0);
  std::vector<int64_t> shape(samples.dim(), 1);
  shape[0] = kBatch;
  return (samples * factors.view(shape)).sum(0);
}

// Both kinds of sample exist at threshold `c`: clipped (factor < 1) and untouched (factor 1).
void expect_clipped_and_unclipped(const torch::Tensor& norms, double c, const std::string& what) {
  const auto above = (norms > c).sum().item<int64_t>();
  EXPECT_GE(above, 3) << what << ": too few clipped samples at C = " << c;
  EXPECT_GE(kBatch - above, 3) << what << ": too few unclipped samples at C = " << c;
}

enum class Path { kOptimizer, kPreStep };

struct ReferenceCase {
  bool per_layer;
  std::string reduction;
  Path path;
  std::string name;
};

class ClippedSumReference : public ::testing::TestWithParam<ReferenceCase> {};

// The gradient after DPOptimizer::step() with σ = 0 is the clipped sum / E[B] ("mean") or the
// clipped sum ("sum"); after the clipper's own pre_step() it is the clipped sum / actual batch
// ("mean", the clipper without an optimiser) or the clipped sum ("sum"). Thresholds are the
// medians of the norms (flat, or per parameter), so half of the samples are clipped. Double
// precision; tolerance 1e-9 of the largest entry (the factor's 1e-6 guard moves clipped samples
// by ~1e-6 relative, so it must be the same guard).
TEST_P(ClippedSumReference, GradientIsTheSumOfMinOneClipFactorTimesTheSample) {
  const auto& c = GetParam();
  Fixture f;
  const size_t n = f.grad_samples.size();
  ASSERT_EQ(n, 4u);
  std::vector<torch::Tensor> layer_norms;
  torch::Tensor flat_sq = torch::zeros({kBatch}, torch::kDouble);
  for (const auto& g : f.grad_samples) {
    layer_norms.push_back(g.flatten(1).norm(2, 1));
    flat_sq += g.flatten(1).square().sum(1);
  }
  const auto flat_norms = flat_sq.sqrt();

  std::vector<torch::Tensor> expected;
  std::shared_ptr<NormClipper> norm_clipper;
  if (c.per_layer) {
    std::vector<double> thresholds;
    for (size_t k = 0; k < n; ++k) {
      thresholds.push_back(median_threshold(layer_norms[k]));
      expect_clipped_and_unclipped(layer_norms[k], thresholds[k], "parameter " + std::to_string(k));
      expected.push_back(clipped_sum(f.grad_samples[k], layer_norms[k], thresholds[k]));
    }
    norm_clipper = std::make_shared<ConstantPerLayerClipper>(thresholds);
  } else {
    const double threshold = median_threshold(flat_norms);
    expect_clipped_and_unclipped(flat_norms, threshold, "flat");
    for (size_t k = 0; k < n; ++k) {
      expected.push_back(clipped_sum(f.grad_samples[k], flat_norms, threshold));
    }
    norm_clipper = std::make_shared<ConstantFlatClipper>(threshold);
  }
  double divisor = 1;
  if (c.reduction == "mean") divisor = c.path == Path::kOptimizer ? kExpectedBatch : kBatch;
  for (auto& e : expected) e = e / divisor;

  auto clipper =
      std::make_shared<PerSampleGradientClipper>(f.model, norm_clipper, true, c.reduction);
  f.loss(c.reduction).backward();
  if (c.path == Path::kOptimizer) {
    optim::DPOptimizer opt(
        std::make_shared<torch::optim::SGD>(f.model->parameters(), torch::optim::SGDOptions(0.0)),
        clipper, optim::DPOptimizerOptions(0.0, kExpectedBatch),
        std::make_shared<optim::PhiloxNoise>(1));
    opt.step();
  } else {
    clipper->clip_and_accumulate();
    (void)clipper->pre_step();
  }
  const auto params = f.model->parameters();
  for (size_t k = 0; k < n; ++k) {
    EXPECT_TRUE(tensors_close(params[k].grad(), expected[k], 1e-9)) << "parameter " << k;
  }
}

INSTANTIATE_TEST_SUITE_P(
    FlatAndPerLayer, ClippedSumReference,
    ::testing::Values(ReferenceCase{false, "sum", Path::kOptimizer, "Flat_sum_DPOptimizer"},
                      ReferenceCase{false, "mean", Path::kOptimizer, "Flat_mean_DPOptimizer"},
                      ReferenceCase{false, "sum", Path::kPreStep, "Flat_sum_PreStep"},
                      ReferenceCase{false, "mean", Path::kPreStep, "Flat_mean_PreStep"},
                      ReferenceCase{true, "sum", Path::kOptimizer, "PerLayer_sum_DPOptimizer"},
                      ReferenceCase{true, "mean", Path::kOptimizer, "PerLayer_mean_DPOptimizer"},
                      ReferenceCase{true, "sum", Path::kPreStep, "PerLayer_sum_PreStep"},
                      ReferenceCase{true, "mean", Path::kPreStep, "PerLayer_mean_PreStep"}),
    [](const ::testing::TestParamInfo<ReferenceCase>& info) { return info.param.name; });

}  // namespace
}  // namespace dptorch
