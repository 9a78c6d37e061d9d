// What may run concurrently (docs/reliability.md): separate engines in separate threads, and an
// accountant queried from one thread while another trains.

#include <dptorch/dptorch.h>
#include <dptorch/engine/privacy_engine.h>

#include <gtest/gtest.h>

#include <atomic>
#include <thread>
#include <vector>

#include "support/toy_training.h"

namespace dptorch {
namespace {

// Trains the toy MLP privately for 30 steps with `seed`; its parameters after.
std::vector<torch::Tensor> train(uint64_t seed) {
  auto model = testing::toy_mlp();
  PrivacyEngine engine;
  auto run = engine.make_private(
      model,
      std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1)),
      testing::toy_data(),
      PrivacyOptions().noise_multiplier(1.0).expected_batch_size(20).seed(seed));
  for (int s = 0; s < 30; ++s) {
    auto batch = run.loader.next();
    torch::nll_loss(model->forward(batch.data), batch.target).backward();
    run.optimizer->step();
  }
  std::vector<torch::Tensor> params;
  for (const auto& p : model->parameters()) params.push_back(p.detach().clone());
  return params;
}

// Four engines, each in its own thread, train exactly as each does alone.
TEST(ThreadSafety, EnginesInSeparateThreadsTrainAsTheyDoAlone) {
  const int threads_before = torch::get_num_threads();
  torch::set_num_threads(1);  // the same reduction order in every thread
  std::vector<std::vector<torch::Tensor>> alone;
  for (uint64_t seed = 0; seed < 4; ++seed) alone.push_back(train(seed));
  std::vector<std::vector<torch::Tensor>> together(4);
  std::vector<std::thread> workers;
  for (uint64_t seed = 0; seed < 4; ++seed) {
    workers.emplace_back([&, seed] { together[seed] = train(seed); });
  }
  for (auto& w : workers) w.join();
  torch::set_num_threads(threads_before);
  for (size_t r = 0; r < 4; ++r) {
    ASSERT_EQ(together[r].size(), alone[r].size());
    for (size_t i = 0; i < alone[r].size(); ++i) {
      EXPECT_TRUE(torch::equal(together[r][i], alone[r][i])) << "run " << r << " parameter " << i;
    }
  }
}

// One thread records 2000 steps (in blocks of changing σ, as a noise schedule does) while three
// others query ε and the history: every answer is one the history had at some moment, so ε
// never decreases, and the total steps seen never exceed what was recorded.
TEST(ThreadSafety, AccountantQueriedWhileTraining) {
  auto accountant = accounting::make_accountant("rdp");
  std::atomic<bool> done{false};
  std::atomic<int> queries{0};
  std::vector<std::thread> readers;
  std::atomic<bool> monotone{true};
  for (int r = 0; r < 3; ++r) {
    readers.emplace_back([&] {
      double last = 0;
      int64_t last_steps = 0;
      while (!done.load()) {
        const double eps = accountant->epsilon(1e-5);
        const auto history = accountant->history();
        int64_t steps = 0;
        for (const auto& e : history) steps += e.steps;
        if (eps < last || steps < last_steps || steps > 2000) monotone = false;
        last = eps;
        last_steps = steps;
        (void)accountant->serialize();
        ++queries;
      }
    });
  }
  for (int s = 0; s < 2000; ++s) {
    accountant->step(s < 1000 ? 1.0 : 1.2, 0.01);
    if (s % 100 == 0) std::this_thread::yield();
  }
  done = true;
  for (auto& r : readers) r.join();
  EXPECT_TRUE(monotone.load());
  EXPECT_GT(queries.load(), 3);
  EXPECT_EQ(accountant->total_steps(), 2000);
  ASSERT_EQ(accountant->history().size(), 2u);
}

}  // namespace
}  // namespace dptorch
