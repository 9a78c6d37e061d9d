// A privacy budget holds: every way of spending past it is refused before anything is drawn.

#include <dptorch/dptorch.h>
#include <dptorch/engine/privacy_engine.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "support/temp_dir.h"
#include "support/toy_training.h"

namespace dptorch {
namespace {

using ::testing::HasSubstr;
using testing::TempDir;
namespace tnn = torch::nn;

tnn::Sequential mlp() { return testing::toy_mlp(); }
using testing::toy_data;

std::shared_ptr<torch::optim::SGD> sgd(const tnn::Sequential& m) {
  return std::make_shared<torch::optim::SGD>(m->parameters(), torch::optim::SGDOptions(0.1));
}

// The steps a budget allows, by brute force: the largest n with ε(history + n steps) <= budget.
int64_t brute_force(const accounting::Accountant& a, double sigma, double q,
                    const accounting::PrivacyBudget& b, int64_t limit) {
  auto probe = a.clone();
  int64_t n = 0;
  while (n < limit) {
    auto h = a.history();
    h.push_back({sigma, q, n + 1});
    probe->set_history(h);
    if (probe->epsilon(b.delta) > b.epsilon) break;
    ++n;
  }
  return n;
}

TEST(PrivacyBudget, StepsWithinBudgetIsTheLargestCountThatFits) {
  for (const char* name : {"rdp", "gdp", "pld"}) {
    auto accountant = accounting::make_accountant(name);
    const accounting::PrivacyBudget budget{1.0, 1e-5};
    EXPECT_EQ(accounting::steps_within_budget(*accountant, 1.0, 0.05, budget, 400),
              brute_force(*accountant, 1.0, 0.05, budget, 400))
        << name;
    accountant->step(1.5, 0.05, 30);  // another (σ, q) first
    EXPECT_EQ(accounting::steps_within_budget(*accountant, 1.0, 0.05, budget, 400),
              brute_force(*accountant, 1.0, 0.05, budget, 400))
        << name;
    EXPECT_EQ(accounting::steps_within_budget(*accountant, 1.0, 0.0, budget, 400), 400) << name;
    EXPECT_EQ(accounting::steps_within_budget(*accountant, 1.0, 0.05, {0.0, 1e-5}, 400), 0) << name;
  }
  EXPECT_THAT(
      [] {
        (void)accounting::steps_within_budget(*accounting::make_accountant("rdp"), 1, 0.1,
                                              {-1, 1e-5});
      },
      ::testing::ThrowsMessage<c10::Error>(HasSubstr("budget's epsilon")));
}

struct BudgetedRun {
  tnn::Sequential model = mlp();
  PrivacyEngine engine;
  data::TensorPairDataset data = toy_data();
  PrivateTraining<data::TensorPairDataset> run;
  explicit BudgetedRun(PrivacyOptions options)
      : run(engine.make_private(model, sgd(model), data, std::move(options))) {}
  void step() {
    auto batch = run.loader.next();
    torch::nll_loss(model->forward(batch.data), batch.target).backward();
    run.optimizer->step();
  }
  // Steps until the budget refuses one (at most `limit`); the number taken.
  int64_t steps_until_refused(int64_t limit) {
    for (int64_t s = 0; s < limit; ++s) {
      try {
        step();
      } catch (const accounting::BudgetExhausted&) {
        return s;
      }
    }
    return limit;
  }
};

PrivacyOptions options_with_budget(double epsilon) {
  return PrivacyOptions()
      .noise_multiplier(1.0)
      .expected_batch_size(20)
      .epochs(100)
      .accountant("rdp")
      .seed(3)
      .budget(accounting::PrivacyBudget{epsilon, 1e-5});
}

// More epochs than the budget allows: the run stops at the last step that fits, nothing of the
// refused step is applied, drawn or accounted, and the message says what was spent.
TEST(PrivacyBudget, TheEngineRefusesTheStepThatWouldPassIt) {
  BudgetedRun r(options_with_budget(5.0));
  const int64_t allowed = r.run.optimizer->steps_within_budget();
  ASSERT_GT(allowed, 5);
  ASSERT_LT(allowed, r.run.settings.steps);  // the plan would overspend
  EXPECT_EQ(r.steps_until_refused(allowed + 10), allowed);
  EXPECT_LE(r.engine.epsilon(1e-5), 5.0);
  EXPECT_EQ(r.engine.accountant()->total_steps(), allowed);
  // The refused step: parameters, noise stream and history unchanged; the same refusal again.
  auto before = r.model->parameters()[0].clone();
  const auto noise_state = r.run.optimizer->noise().state();
  auto batch = r.run.loader.next();
  torch::nll_loss(r.model->forward(batch.data), batch.target).backward();
  EXPECT_THAT([&] { r.run.optimizer->step(); },
              ::testing::ThrowsMessage<accounting::BudgetExhausted>(
                  HasSubstr("privacy budget exhausted: after " + std::to_string(allowed) +
                            " accounted steps the rdp accountant measures epsilon")));
  // The refused batch was dropped: the next forward pass runs, and its accumulation is refused.
  batch = r.run.loader.next();
  torch::nll_loss(r.model->forward(batch.data), batch.target).backward();
  EXPECT_THAT([&] { r.run.optimizer->accumulate(); },
              ::testing::Throws<accounting::BudgetExhausted>());
  EXPECT_TRUE(torch::equal(before, r.model->parameters()[0]));
  EXPECT_EQ(r.run.optimizer->noise().state(), noise_state);
  EXPECT_EQ(r.engine.accountant()->total_steps(), allowed);
}

// A resumed run starts from what the checkpoint spent: it gets only the rest of the budget.
TEST(PrivacyBudget, HoldsAcrossResume) {
  TempDir dir;
  BudgetedRun first(options_with_budget(5.0));
  const int64_t allowed = first.run.optimizer->steps_within_budget();
  for (int64_t s = 0; s < allowed - 3; ++s) first.step();
  first.engine.save_checkpoint(dir.file("ckpt.pt"), first.run);
  BudgetedRun resumed(options_with_budget(5.0));
  (void)resumed.engine.load_checkpoint(dir.file("ckpt.pt"), resumed.run);
  EXPECT_EQ(resumed.run.optimizer->steps_within_budget(), 3);
  EXPECT_EQ(resumed.steps_until_refused(10), 3);
  EXPECT_LE(resumed.engine.epsilon(1e-5), 5.0);
  // A second resume with a larger plan, even from the final state, gets nothing.
  resumed.engine.save_checkpoint(dir.file("end.pt"), resumed.run);
  BudgetedRun again(PrivacyOptions(options_with_budget(5.0)).epochs(1000));
  (void)again.engine.load_checkpoint(dir.file("end.pt"), again.run);
  EXPECT_EQ(again.steps_until_refused(5), 0);
}

// Changing σ or q midway (a new optimiser over the same accountant) is measured at the new
// (σ, q): less noise leaves fewer steps.
TEST(PrivacyBudget, HoldsWhenSigmaOrQChangeMidway) {
  std::shared_ptr<accounting::Accountant> accountant = accounting::make_accountant("rdp");
  const accounting::PrivacyBudget budget{5.0, 1e-5};
  auto m = mlp();
  auto data = toy_data();
  auto clipper =
      std::make_shared<PerSampleGradientClipper>(m, std::make_shared<ConstantFlatClipper>(1.0));
  auto make = [&](double sigma, double q) {
    return std::make_shared<optim::DPOptimizer>(
        sgd(m), clipper, optim::DPOptimizerOptions(sigma, 20).sample_rate(q).budget(budget),
        optim::make_noise_source(optim::NoiseOptions().seed(1)), accountant);
  };
  auto step = [&](optim::DPOptimizer& opt) {
    torch::nll_loss(m->forward(data.data().slice(0, 0, 20)), data.targets().slice(0, 0, 20))
        .backward();
    opt.step();
  };
  auto noisy = make(1.2, 0.1);
  for (int i = 0; i < 20; ++i) step(*noisy);
  auto quiet = make(0.7, 0.1);  // less noise from here
  const int64_t left = quiet->steps_within_budget();
  EXPECT_EQ(left, brute_force(*accountant, 0.7, 0.1, budget, 1000));
  EXPECT_LT(left, noisy->steps_within_budget());
  for (int64_t i = 0; i < left; ++i) step(*quiet);
  EXPECT_THROW(step(*quiet), accounting::BudgetExhausted);
  // The first optimiser sees the history the second wrote: its cheaper steps may still fit,
  // exactly as many as brute force finds, and no more; a larger q gets what brute force allows.
  auto wide = make(1.2, 0.5);
  EXPECT_EQ(wide->steps_within_budget(), brute_force(*accountant, 1.2, 0.5, budget, 1000));
  const int64_t more = noisy->steps_within_budget();
  EXPECT_EQ(more, brute_force(*accountant, 1.2, 0.1, budget, 1000));
  for (int64_t i = 0; i < more; ++i) step(*noisy);
  EXPECT_THROW(step(*noisy), accounting::BudgetExhausted);
  EXPECT_THROW(step(*wide), accounting::BudgetExhausted);
  EXPECT_LE(accountant->epsilon(1e-5), 5.0);
}

TEST(PrivacyBudget, RefusesABudgetItCannotMeasure) {
  auto m = mlp();
  auto clipper =
      std::make_shared<PerSampleGradientClipper>(m, std::make_shared<ConstantFlatClipper>(1.0));
  EXPECT_THAT(
      [&] {
        optim::DPOptimizer(
            sgd(m), clipper,
            optim::DPOptimizerOptions(1.0, 10).budget(accounting::PrivacyBudget{1.0, 1e-5}),
            optim::make_noise_source(optim::NoiseOptions().seed(1)));
      },
      ::testing::ThrowsMessage<c10::Error>(HasSubstr("needs an accountant and a sample rate")));
  EXPECT_THAT(
      [&] {
        PrivacyEngine engine;
        (void)engine.make_private(
            m, sgd(m), toy_data(),
            PrivacyOptions().noise_multiplier(1).expected_batch_size(20).budget(
                accounting::PrivacyBudget{1.0, 2.0}));
      },
      ::testing::ThrowsMessage<c10::Error>(HasSubstr("delta")));
}

// No accountant here analyses shuffled fixed-size batches: an optimiser that would account
// them is refused; without an accountant (nothing reported) they are allowed.
// A release made before training (a private feature statistic) is part of the run's ε: the
// accountant starts with it, a target ε calibrates σ for both, and the budget counts it.
TEST(PriorReleases, CountInTheRunsEpsilonCalibrationAndBudget) {
  const accounting::HistoryEntry release{3.0, 1.0, 1};
  const auto base =
      PrivacyOptions().target_epsilon(4.0).expected_batch_size(20).epochs(5).accountant("rdp").seed(
          3);
  BudgetedRun plain(base);
  BudgetedRun with_prior(PrivacyOptions(base).prior_releases({release}));
  EXPECT_GT(with_prior.run.settings.noise_multiplier, plain.run.settings.noise_multiplier);
  ASSERT_EQ(with_prior.engine.accountant()->history().size(), 1U);
  EXPECT_EQ(with_prior.engine.accountant()->history()[0], release);
  EXPECT_GT(with_prior.engine.epsilon(1e-5), 0.0);  // before any step
  for (int64_t s = 0; s < with_prior.run.settings.steps; ++s) with_prior.step();
  const double eps = with_prior.engine.epsilon(1e-5);
  EXPECT_LE(eps, 4.0);
  EXPECT_GE(eps, 4.0 - 0.01);
  // The same σ without the release spends less.
  auto steps_only = accounting::make_accountant("rdp");
  steps_only->step(with_prior.run.settings.noise_multiplier, with_prior.run.settings.sample_rate,
                   with_prior.run.settings.steps);
  EXPECT_LT(steps_only->epsilon(1e-5), eps - 0.1);

  // A budget below what the release alone spends refuses the first step.
  auto prior_only = accounting::make_accountant("rdp");
  prior_only->set_history({release});
  BudgetedRun refused(
      PrivacyOptions(base)
          .target_epsilon(std::nullopt)
          .noise_multiplier(1.0)
          .prior_releases({release})
          .budget(accounting::PrivacyBudget{prior_only->epsilon(1e-5) * 0.99, 1e-5}));
  EXPECT_EQ(refused.steps_until_refused(3), 0);
}

TEST(SamplerAccounting, ShuffledBatchesAreNotAccountedAsPoisson) {
  auto m = mlp();
  auto clipper =
      std::make_shared<PerSampleGradientClipper>(m, std::make_shared<ConstantFlatClipper>(1.0));
  data::ShuffledSampler shuffled(200, 20, 1);
  const auto options =
      optim::DPOptimizerOptions(1.0, 20).sample_rate(0.1).sampling(shuffled.sampling());
  EXPECT_THAT(
      [&] {
        optim::DPOptimizer(sgd(m), clipper, options,
                           optim::make_noise_source(optim::NoiseOptions().seed(1)),
                           accounting::make_accountant("prv"));
      },
      ::testing::ThrowsMessage<c10::Error>(HasSubstr("each assumes Poisson sampling")));
  EXPECT_NO_THROW(optim::DPOptimizer(sgd(m), clipper, options,
                                     optim::make_noise_source(optim::NoiseOptions().seed(1))));
}

// A noise schedule: each step draws its own σ's noise and tells the accountant that σ, whose
// history then holds one segment per σ. Every update is pure noise (zero per-sample gradients):
// lr · N(0, σ_k² C²) / E[B]. Seed 17; 100×100 weights × 10 steps per σ; 2% of the std.
TEST(NoiseSchedule, EachStepDrawsAndAccountsItsOwnSigma) {
  torch::manual_seed(17);
  tnn::Sequential m(nn::Linear(100, 100));
  const double C = 0.7, E = 50, q = 0.01;
  auto clipper =
      std::make_shared<PerSampleGradientClipper>(m, std::make_shared<ConstantFlatClipper>(C));
  auto sigma_of = [](int64_t step) { return step < 10 ? 2.0 : 0.8; };
  auto gdp = std::make_shared<accounting::GdpAccountant>();
  optim::DPOptimizer opt(
      std::make_shared<torch::optim::SGD>(m->parameters(), torch::optim::SGDOptions(1.0)), clipper,
      optim::DPOptimizerOptions(1.0, E).sample_rate(q).noise_schedule(sigma_of),
      std::make_shared<optim::TorchNoise>(17), gdp);
  std::vector<torch::Tensor> updates[2];
  for (int step = 0; step < 20; ++step) {
    EXPECT_EQ(opt.noise_multiplier(), sigma_of(step));
    auto before = m->parameters()[0].detach().clone();
    (m->forward(torch::randn({10, 100})) * 0).sum().backward();
    opt.step();
    updates[step < 10 ? 0 : 1].push_back((m->parameters()[0].detach() - before).flatten());
  }
  for (int k = 0; k < 2; ++k) {
    const double sigma = k == 0 ? 2.0 : 0.8;
    EXPECT_NEAR(torch::cat(updates[k]).std().item<double>(), sigma * C / E, 0.02 * sigma * C / E);
  }
  EXPECT_THAT(gdp->history(), ::testing::ElementsAre(accounting::HistoryEntry{2.0, q, 10},
                                                     accounting::HistoryEntry{0.8, q, 10}));
  // Gaussian DP composes by adding μ²: the run's μ from the two segments accounted apart.
  accounting::GdpAccountant first, second;
  first.step(2.0, q, 10);
  second.step(0.8, q, 10);
  EXPECT_NEAR(gdp->mu(), std::hypot(first.mu(), second.mu()), 1e-12);
  EXPECT_THAT(
      [&] {
        optim::DPOptimizer(
            std::make_shared<torch::optim::SGD>(m->parameters(), torch::optim::SGDOptions(1.0)),
            clipper, optim::DPOptimizerOptions(1.0, E).noise_schedule([](int64_t) { return -1.0; }),
            std::make_shared<optim::TorchNoise>(17));
      },
      ::testing::ThrowsMessage<c10::Error>(HasSubstr("the noise schedule gave step 0")));
}

// With a budget, a schedule's steps are measured at their own σ: the run stops exactly where
// the accountant, told the schedule's segments, passes the budget.
TEST(NoiseSchedule, TheBudgetMeasuresEachStepAtItsSigma) {
  auto m = mlp();
  auto data = toy_data();
  auto clipper =
      std::make_shared<PerSampleGradientClipper>(m, std::make_shared<ConstantFlatClipper>(1.0));
  std::shared_ptr<accounting::Accountant> rdp = accounting::make_accountant("rdp");
  auto sigma_of = [](int64_t step) { return step < 15 ? 1.5 : 0.9; };
  optim::DPOptimizer opt(
      sgd(m), clipper,
      optim::DPOptimizerOptions(1.0, 20).sample_rate(0.1).noise_schedule(sigma_of).budget(
          accounting::PrivacyBudget{4.0, 1e-5}),
      optim::make_noise_source(optim::NoiseOptions().seed(1)), rdp);
  int64_t taken = 0;
  for (; taken < 1000; ++taken) {
    torch::nll_loss(m->forward(data.data().slice(0, 0, 20)), data.targets().slice(0, 0, 20))
        .backward();
    try {
      opt.step();
    } catch (const accounting::BudgetExhausted&) {
      break;
    }
  }
  // Brute force: the most steps of the schedule whose ε stays within the budget.
  int64_t expected = 0;
  auto probe = accounting::make_accountant("rdp");
  while (true) {
    probe->step(sigma_of(expected), 0.1);
    if (probe->epsilon(1e-5) > 4.0) break;
    ++expected;
  }
  EXPECT_EQ(taken, expected);
  EXPECT_GT(taken, 15);  // past the change of σ
  EXPECT_LE(rdp->epsilon(1e-5), 4.0);
}

// A clipping-norm schedule: step k clips every sample at s_k·C and draws noise σ·s_k·C, and
// the accountant's history is the run's (σ, q, steps), as without the schedule.
TEST(ClippingSchedule, EachStepClipsAndNoisesAtItsThreshold) {
  torch::manual_seed(23);
  tnn::Sequential m(nn::Linear(100, 100));
  const double C = 0.7, E = 50, q = 0.01, B = 10;
  auto clipper =
      std::make_shared<PerSampleGradientClipper>(m, std::make_shared<ConstantFlatClipper>(C));
  auto factor_of = [](int64_t step) { return step < 10 ? 1.0 : 0.25; };
  auto gdp = std::make_shared<accounting::GdpAccountant>();
  const auto make = [&](double sigma, std::shared_ptr<accounting::Accountant> accountant) {
    return optim::DPOptimizer(
        std::make_shared<torch::optim::SGD>(m->parameters(), torch::optim::SGDOptions(1.0)),
        clipper, optim::DPOptimizerOptions(sigma, E).sample_rate(q).clipping_schedule(factor_of),
        std::make_shared<optim::TorchNoise>(23), std::move(accountant));
  };
  // Without noise: B equal samples of a huge gradient, each clipped to norm s_k·C, so the step
  // moves the weight and bias by lr·B·s_k·C/E in norm.
  auto quiet = make(0.0, nullptr);
  const auto x = torch::randn({1, 100}).expand({10, 100}) * 1e3;
  for (int step = 0; step < 20; ++step) {
    std::vector<torch::Tensor> before;
    for (const auto& p : m->parameters()) before.push_back(p.detach().clone());
    m->forward(x).sum().backward();
    quiet.step();
    double moved = 0;
    for (size_t k = 0; k < before.size(); ++k) {
      moved += (m->parameters()[k].detach() - before[k]).pow(2).sum().item<double>();
    }
    EXPECT_NEAR(std::sqrt(moved), B * factor_of(step) * C / E, 1e-4 * B * C / E) << step;
  }
  // With noise and no gradient: each segment's noise std is σ·s_k·C/E.
  auto noisy = make(2.0, gdp);
  std::vector<torch::Tensor> updates[2];
  for (int step = 0; step < 20; ++step) {
    auto before = m->parameters()[0].detach().clone();
    (m->forward(torch::randn({10, 100})) * 0).sum().backward();
    noisy.step();
    updates[step < 10 ? 0 : 1].push_back((m->parameters()[0].detach() - before).flatten());
  }
  for (int k = 0; k < 2; ++k) {
    const double expected = 2.0 * (k == 0 ? 1.0 : 0.25) * C / E;
    EXPECT_NEAR(torch::cat(updates[k]).std().item<double>(), expected, 0.02 * expected);
  }
  EXPECT_THAT(gdp->history(), ::testing::ElementsAre(accounting::HistoryEntry{2.0, q, 20}));
}

TEST(ClippingSchedule, ScalesEveryThresholdOfAScalableClipper) {
  ConstantPerLayerClipper per_layer({0.3, 0.4});
  per_layer.set_threshold_factor(2);
  EXPECT_THAT(per_layer.thresholds(), ::testing::ElementsAre(0.6, 0.8));
  EXPECT_NEAR(per_layer.noise_scale_norm(), 1.0, 1e-12);
  AutomaticClipper automatic(1.0, 0.5);
  automatic.set_threshold_factor(3);
  EXPECT_NEAR(automatic.clipping_factors({torch::tensor({1.5})})[0].item<double>(), 1.5, 1e-12);
  AdaptiveClipper adaptive(AdaptiveClipperOptions(1.0));
  EXPECT_THAT([&] { adaptive.set_threshold_factor(2); },
              ::testing::ThrowsMessage<c10::Error>(HasSubstr("moves its own thresholds")));
  auto m = mlp();
  auto adaptive_clipper = std::make_shared<PerSampleGradientClipper>(
      m, std::make_shared<AdaptiveClipper>(AdaptiveClipperOptions(1.0)));
  EXPECT_THAT(
      [&] {
        optim::DPOptimizer(
            sgd(m), adaptive_clipper,
            optim::DPOptimizerOptions(1.0, 20).clipping_schedule([](int64_t) { return 0.5; }),
            std::make_shared<optim::TorchNoise>(1));
      },
      ::testing::ThrowsMessage<c10::Error>(HasSubstr("use flat, per-layer or automatic")));
  auto other = mlp();
  auto flat =
      std::make_shared<PerSampleGradientClipper>(other, std::make_shared<ConstantFlatClipper>(1.0));
  EXPECT_THAT(
      [&] {
        optim::DPOptimizer(
            sgd(other), flat,
            optim::DPOptimizerOptions(1.0, 20).clipping_schedule([](int64_t) { return 0.0; }),
            std::make_shared<optim::TorchNoise>(1));
      },
      ::testing::ThrowsMessage<c10::Error>(HasSubstr("the clipping schedule gave step 0")));
}

}  // namespace
}  // namespace dptorch
