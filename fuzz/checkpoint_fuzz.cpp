// PrivacyEngine::load_checkpoint on arbitrary bytes: refused with an exception, and a refused
// checkpoint changes nothing (parameters, accountant, loader position).
#include <dptorch/dptorch.h>

#include <cstdlib>
#include <memory>

#include "fuzz_util.h"

namespace {

struct Run {
  torch::nn::Sequential model{dptorch::nn::Linear(4, 3), torch::nn::LogSoftmax(1)};
  dptorch::PrivacyEngine engine;
  std::unique_ptr<dptorch::PrivateTraining<dptorch::data::TensorPairDataset>> training;
  Run() {
    torch::manual_seed(0);
    auto x = torch::randn({32, 4});
    training = std::make_unique<dptorch::PrivateTraining<dptorch::data::TensorPairDataset>>(
        engine.make_private(
            model,
            std::make_shared<torch::optim::SGD>(model->parameters(), torch::optim::SGDOptions(0.1)),
            dptorch::data::TensorPairDataset(x, x.argmax(1).clamp_max(2)),
            dptorch::PrivacyOptions()
                .noise_multiplier(1.0)
                .expected_batch_size(8)
                .accountant("rdp")
                .seed(1)));
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static Run run;
  const std::string path = dptorch::fuzz::scratch_file(data, size, ".pt");
  const auto weight = run.model->parameters()[0].clone();
  const auto history = run.engine.accountant()->history();
  const auto position = run.training->loader.position();
  try {
    (void)run.engine.load_checkpoint(path, *run.training);
  } catch (const c10::Error&) {
    if (!torch::equal(weight, run.model->parameters()[0]) ||
        run.engine.accountant()->history() != history ||
        run.training->loader.position() != position) {
      std::abort();  // a refused checkpoint changed the run
    }
  }
  return 0;
}
