// One rank of the distributed tests (tests/distributed/distributed_test.cpp starts it as a
// process): private training of a small double-precision MLP on a synthetic data set through
// PrivacyEngine, alone or as a rank of a job described by torchrun's environment variables.
// Rank 0 (or the only process) saves the parameters after make_private (to OUT.init) and at
// the end (to OUT) with torch::save; every rank prints a
// line "rank=R empty_local_batches=K steps=S" on success. Errors go to stderr as one line, exit 1.
#include <dptorch/distributed/group.h>
#include <dptorch/dptorch.h>

#include <chrono>
#include <cstdlib>
#include <iostream>
#include <string>
#include <thread>

namespace {

struct Args {
  int64_t steps = 12;
  int64_t physical = 0;  // > 0: physical batches of at most this many examples (virtual steps)
  int64_t dataset = 40;
  double batch = 4;  // expected logical batch size
  uint64_t seed = 7;
  std::string clipping = "flat";
  bool noise_only = false;  // a zero loss over a wide layer: the update is the noise alone
  std::string out;          // rank 0 writes the final parameters here
  std::string checkpoint;   // saved after every step when set
  bool resume = false;
  int64_t delay_ms = 0;  // sleep per step (to give a test time to kill a rank mid-run)
  int64_t timeout_ms = 10000;
};

Args parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) throw std::invalid_argument(k + " needs a value");
      return argv[++i];
    };
    if (k == "--steps")
      a.steps = std::stoll(next());
    else if (k == "--physical")
      a.physical = std::stoll(next());
    else if (k == "--dataset")
      a.dataset = std::stoll(next());
    else if (k == "--batch")
      a.batch = std::stod(next());
    else if (k == "--seed")
      a.seed = std::stoull(next());
    else if (k == "--clipping")
      a.clipping = next();
    else if (k == "--noise-only")
      a.noise_only = true;
    else if (k == "--out")
      a.out = next();
    else if (k == "--checkpoint")
      a.checkpoint = next();
    else if (k == "--resume")
      a.resume = true;
    else if (k == "--delay-ms")
      a.delay_ms = std::stoll(next());
    else if (k == "--timeout-ms")
      a.timeout_ms = std::stoll(next());
    else
      throw std::invalid_argument("unknown argument " + k);
  }
  return a;
}

int run(const Args& a, const std::shared_ptr<dptorch::distributed::Group>& group) {
  torch::set_num_threads(1);
  torch::manual_seed(static_cast<uint64_t>(a.seed));
  const int64_t in = a.noise_only ? 1000 : 6;
  const int64_t out = a.noise_only ? 100 : 3;
  auto x = torch::randn({a.dataset, in}, torch::kDouble);
  auto y = torch::randint(0, out, {a.dataset}, torch::kLong);
  torch::nn::Sequential model;
  if (a.noise_only) {
    model->push_back(dptorch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false)));
  } else {
    model->push_back(dptorch::nn::Linear(in, 8));
    model->push_back(torch::nn::Tanh());
    model->push_back(dptorch::nn::Linear(8, out));
  }
  model->to(torch::kDouble);
  // Rank 1 starts from other parameters: make_private must hand it rank 0's.
  if (group && group->rank() != 0) {
    torch::NoGradGuard no_grad;
    for (auto& p : model->parameters()) p.normal_();
  }
  auto sgd = std::make_shared<torch::optim::SGD>(
      model->parameters(),
      torch::optim::SGDOptions(a.noise_only ? 1.0 : 0.2).momentum(a.noise_only ? 0.0 : 0.5));
  dptorch::PrivacyOptions options;
  options.noise_multiplier(1.0)
      .max_grad_norm(a.noise_only ? 1.0 : 0.5)
      .expected_batch_size(a.batch)
      .epochs(1)
      .accountant("rdp")
      .seed(a.seed)
      .loss_reduction(a.noise_only ? "sum" : "mean")
      .group(group);
  if (a.clipping == "adaptive") {
    options.clipping(dptorch::ClippingMode::kAdaptive).unclipped_num_std(2.0);
  }
  if (a.clipping == "per-layer") options.clipping(dptorch::ClippingMode::kPerLayer);
  dptorch::PrivacyEngine engine;
  auto run = engine.make_private(model, sgd, dptorch::data::TensorPairDataset(x, y), options);
  if (a.resume) (void)engine.load_checkpoint(a.checkpoint, run);
  const int64_t rank = group ? group->rank() : 0;
  auto save_params = [&](const std::string& path) {
    std::vector<torch::Tensor> params;
    for (const auto& p : model->parameters()) params.push_back(p.detach().clone());
    torch::save(params, path);
  };
  if (rank == 0 && !a.out.empty()) save_params(a.out + ".init");

  int64_t empty = 0;
  while (run.loader.position() < a.steps) {
    auto batch = run.loader.next();
    const int64_t B = batch.data.size(0);
    if (B == 0) ++empty;
    const int64_t cap = a.physical > 0 ? a.physical : std::max<int64_t>(B, 1);
    for (const auto& chunk : dptorch::data::physical_batches(batch, cap)) {
      if (chunk.data.size(0) == 0) continue;
      auto logits = model->forward(chunk.data);
      auto loss = a.noise_only ? (logits * 0).sum()
                               : torch::nn::functional::cross_entropy(logits, chunk.target);
      loss.backward();
      run.optimizer->accumulate();
    }
    run.optimizer->step();
    if (!a.checkpoint.empty()) engine.save_checkpoint(a.checkpoint, run);
    if (a.delay_ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(a.delay_ms));
  }
  if (rank == 0 && !a.out.empty()) save_params(a.out);
  // A digest of this rank's parameters: every rank must print the same one.
  double digest = 0;
  for (const auto& p : model->parameters()) digest += p.detach().abs().sum().item<double>();
  std::cout.precision(17);
  std::cout << "rank=" << rank << " empty_local_batches=" << empty
            << " steps=" << run.optimizer->steps() << " digest=" << digest
            << " epsilon=" << engine.epsilon(1e-5) << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::shared_ptr<dptorch::distributed::Group> group;
  try {
    const Args args = parse(argc, argv);
    if (dptorch::distributed::environment_is_distributed()) {
      group = dptorch::distributed::Group::connect(dptorch::distributed::options_from_environment(
          std::chrono::milliseconds(args.timeout_ms)));
    }
    return run(args, group);
  } catch (const dptorch::distributed::RankFailure& e) {
    std::cerr << "dist_worker: error: " << e.what() << " (failed rank " << e.failed_rank() << ")"
              << std::endl;
    dptorch::distributed::exit_after_failure(group, 1, e.failed_rank());
  } catch (const std::exception& e) {
    std::string what = e.what();
    what = what.substr(0, what.find('\n'));
    if (group) group->fail(what);
    std::cerr << "dist_worker: error: " << what << std::endl;
    if (group) dptorch::distributed::exit_after_failure(group, 1, group->rank());
    return 1;
  }
}
