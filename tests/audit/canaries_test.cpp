// The one-run audit: its statistics against closed forms and randomised response, and end to end
// on DP-SGD runs, one correct and two broken in ways the accountant is not told.

#include <dptorch/dptorch.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <random>

namespace dptorch {
namespace {

using ::testing::HasSubstr;
namespace tnn = torch::nn;

// With δ = 0 and every guess right, the p-value is p^r (p = e^ε/(1+e^ε)), so the lower bound at
// 95% solves p^r = 0.05: ε = log(p/(1 − p)) with p = 0.05^(1/r).
TEST(AuditStatistics, AllGuessesRightMatchTheClosedForm) {
  const double p = 1 / (1 + std::exp(-1.0));
  EXPECT_NEAR(audit::audit_p_value(100, 20, 20, 1.0, 0), std::pow(p, 20), 1e-12);
  for (int64_t r : {10, 100, 1000}) {
    const double q = std::pow(0.05, 1.0 / static_cast<double>(r));
    EXPECT_NEAR(audit::epsilon_lower_bound(r, r, r, 0, 0.95), std::log(q / (1 - q)), 1e-5) << r;
  }
  // Chance-level guessing proves nothing; δ only weakens the bound.
  EXPECT_EQ(audit::epsilon_lower_bound(1000, 1000, 500, 1e-5), 0.0);
  EXPECT_LT(audit::epsilon_lower_bound(1000, 100, 100, 1e-3),
            audit::epsilon_lower_bound(1000, 100, 100, 0));
  EXPECT_THAT([] { (void)audit::audit_p_value(10, 20, 5, 1.0, 0); },
              ::testing::ThrowsMessage<c10::Error>(HasSubstr("correct <= guesses <= canaries")));
}

// ε-DP randomised response on m = 10000 canaries (each reported truly with probability
// e^ε/(1+e^ε)) is the run the bound is tight for: over 20 seeds it stays below ε (at 95% it may
// pass ε in about one run of twenty; with 20 seeds at most 3 may), and comes close to it.
TEST(AuditStatistics, RandomisedResponseIsBoundedAndNearlyReached) {
  const double eps = 1.0;
  const int64_t m = 10000;
  int above = 0;
  double best = 0;
  for (uint64_t seed = 0; seed < 20; ++seed) {
    std::mt19937_64 rng(seed);
    std::bernoulli_distribution truthful(1 / (1 + std::exp(-eps)));
    int64_t correct = 0;
    for (int64_t i = 0; i < m; ++i) correct += truthful(rng) ? 1 : 0;
    const double bound = audit::epsilon_lower_bound(m, m, correct, 0);
    above += bound > eps ? 1 : 0;
    best = std::max(best, bound);
  }
  EXPECT_LE(above, 3);
  EXPECT_GT(best, 0.9 * eps);
}

// A NoiseSource that draws a quarter of the noise it is asked for: a bug the accountant cannot
// see.
class QuarterNoise final : public optim::NoiseSource {
 public:
  explicit QuarterNoise(uint64_t seed) : inner_(seed) {}
  torch::Tensor gaussian(at::IntArrayRef shape, double stddev,
                         const torch::TensorOptions& options) override {
    return inner_.gaussian(shape, stddev / 4, options);
  }
  bool is_secure() const noexcept override { return false; }

 private:
  optim::TorchNoise inner_;
};

// A flat clipper that says it clips at C and does not.
class NoClipping final : public NormClipper {
 public:
  std::vector<torch::Tensor> clipping_factors(const std::vector<torch::Tensor>& norms) override {
    return {torch::ones_like(norms[0])};
  }
  std::vector<double> thresholds() const override { return {1.0}; }
  bool is_per_layer() const override { return false; }
  bool thresholds_fixed() const override { return true; }
};

struct Audited {
  audit::AuditResult found;
  double epsilon = 0;
};

// 200 DP-SGD steps (σ = 3, q = 0.1, C = 1) of a 4810-parameter MLP on 200 examples, with 1000
// canaries: the accountant's ε at δ = 1e-5 is about 2.0. (The real examples' gradients on the
// canaries' coordinates blur the scores; a small batch keeps that blur below the noise.)
Audited audited_run(std::shared_ptr<optim::NoiseSource> noise,
                    std::shared_ptr<NormClipper> norm_clipper) {
  torch::manual_seed(3);
  tnn::Sequential m(nn::Linear(64, 64), tnn::Tanh(), nn::Linear(64, 10), tnn::LogSoftmax(1));
  const int64_t n = 200;
  const double q = 0.1, sigma = 3;
  auto x = torch::randn({n, 64});
  auto y = x.slice(1, 0, 10).argmax(1);
  auto canaries = std::make_shared<audit::GradientCanaries>(audit::CanaryOptions(1000).seed(11));
  std::shared_ptr<accounting::Accountant> accountant = accounting::make_accountant("prv");
  optim::DPOptimizer opt(
      std::make_shared<torch::optim::SGD>(m->parameters(), torch::optim::SGDOptions(0.5)),
      std::make_shared<PerSampleGradientClipper>(m, std::move(norm_clipper)),
      optim::DPOptimizerOptions(sigma, q * n).sample_rate(q).audit(canaries), std::move(noise),
      accountant);
  data::PoissonSampler sampler(n, q, 5);
  for (int64_t step = 0; step < 200; ++step) {
    const auto batch = torch::tensor(sampler.indices(step), torch::kLong);
    if (batch.numel() > 0) {
      torch::nll_loss(m->forward(x.index_select(0, batch)), y.index_select(0, batch)).backward();
    }
    opt.step();
  }
  return {canaries->result(1e-5), accountant->epsilon(1e-5)};
}

TEST(GradientCanaries, ACorrectRunStaysBelowItsEpsilon) {
  const auto run = audited_run(std::make_shared<optim::TorchNoise>(9),
                               std::make_shared<ConstantFlatClipper>(1.0));
  EXPECT_EQ(run.found.steps, 200);
  EXPECT_EQ(run.found.canaries, 1000);
  EXPECT_NEAR(run.epsilon, 2.0, 0.1);
  EXPECT_LT(run.found.epsilon_lower_bound, run.epsilon);
}

TEST(GradientCanaries, CatchesNoiseSecretlyQuartered) {
  const auto run =
      audited_run(std::make_shared<QuarterNoise>(9), std::make_shared<ConstantFlatClipper>(1.0));
  EXPECT_GT(run.found.epsilon_lower_bound, run.epsilon)
      << run.found.correct << " of " << run.found.guesses << " guesses right";
}

TEST(GradientCanaries, CatchesClippingThatDoesNotClip) {
  const auto run =
      audited_run(std::make_shared<optim::TorchNoise>(9), std::make_shared<NoClipping>());
  EXPECT_GT(run.found.epsilon_lower_bound, run.epsilon)
      << run.found.correct << " of " << run.found.guesses << " guesses right";
}

TEST(GradientCanaries, RefusesWhatItCannotAudit) {
  tnn::Sequential m(nn::Linear(4, 2));  // 10 parameter entries
  auto canaries = std::make_shared<audit::GradientCanaries>(audit::CanaryOptions(11));
  const auto make = [&](std::shared_ptr<NormClipper> c, double q) {
    return optim::DPOptimizer(
        std::make_shared<torch::optim::SGD>(m->parameters(), torch::optim::SGDOptions(0.1)),
        std::make_shared<PerSampleGradientClipper>(m, std::move(c)),
        optim::DPOptimizerOptions(1.0, 10).sample_rate(q).audit(canaries),
        std::make_shared<optim::TorchNoise>(1));
  };
  EXPECT_THAT([&] { make(std::make_shared<ConstantFlatClipper>(1.0), 0.1); },
              ::testing::ThrowsMessage<c10::Error>(HasSubstr("use fewer canaries")));
  EXPECT_THAT([&] { make(std::make_shared<ConstantFlatClipper>(1.0), 0); },
              ::testing::ThrowsMessage<c10::Error>(HasSubstr("needs a sample rate")));
  EXPECT_THAT([&] { audit::GradientCanaries(audit::CanaryOptions(100).norm_multiple(0.5)); },
              ::testing::ThrowsMessage<c10::Error>(HasSubstr("norm_multiple must be")));
}

}  // namespace
}  // namespace dptorch
