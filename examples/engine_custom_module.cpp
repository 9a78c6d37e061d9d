// engine_custom_module: private training of a model you define yourself.
//
// A torch::nn::Module whose trainable layers are dptorch's twins of torch's (dptorch::nn::Conv2d,
// dptorch::nn::Linear: same options, same parameter names) is made private by
// dptorch::PrivacyEngine::make_private, which wraps the optimiser (per-sample clipping, Gaussian
// noise, accounting) and samples the batches (Poisson sampling). The data are synthetic: 1x8x8
// "images" labelled by the sign of their mean, so it runs in seconds.
//
//   build/examples/engine_custom_module

#include <dptorch/dptorch.h>

#include <iostream>

// Layers with parameters must be dptorch's: they record what per-sample gradients need
// (make_private refuses a model with other trainable parameters). Parameter-free steps may be
// anything.
struct NetImpl : torch::nn::Module {
  NetImpl()
      : conv(register_module("conv",
                             dptorch::nn::Conv2d(torch::nn::Conv2dOptions(1, 8, 3).padding(1)))),
        fc(register_module("fc", dptorch::nn::Linear(8 * 4 * 4, 2))) {}

  torch::Tensor forward(torch::Tensor x) {
    x = torch::max_pool2d(torch::relu(conv->forward(x)), 2);  // [B, 8, 4, 4]
    return fc->forward(x.flatten(1));
  }

  dptorch::nn::Conv2d conv;
  dptorch::nn::Linear fc;
};
TORCH_MODULE(Net);

int main() {
  torch::manual_seed(0);
  const auto images = torch::randn({2000, 1, 8, 8});
  const auto labels = (images.mean({1, 2, 3}) > 0).to(torch::kLong);

  Net model;
  auto sgd = std::make_shared<torch::optim::SGD>(model->parameters(),
                                                 torch::optim::SGDOptions(0.5).momentum(0.5));
  dptorch::PrivacyEngine engine;
  // σ is calibrated so that the planned steps (epochs / sample rate) spend at most ε = 3.
  auto run = engine.make_private(model, sgd, dptorch::data::TensorPairDataset(images, labels),
                                 dptorch::PrivacyOptions()
                                     .target_epsilon(3)
                                     .delta(1e-5)
                                     .max_grad_norm(1.0)
                                     .epochs(3)
                                     .expected_batch_size(200)
                                     .seed(0));
  std::cout << "noise multiplier " << run.settings.noise_multiplier << ", sample rate "
            << run.settings.sample_rate << ", " << run.settings.steps << " steps\n";

  for (int64_t step = 0; step < run.settings.steps; ++step) {
    auto batch = run.loader.next();  // Poisson sampling: the batch size varies
    torch::nn::functional::cross_entropy(model->forward(batch.data), batch.target).backward();
    run.optimizer->step();  // clip each sample's gradient, add noise, step, account
  }

  torch::NoGradGuard no_grad;
  const double accuracy =
      (model->forward(images).argmax(1) == labels).to(torch::kDouble).mean().item<double>();
  std::cout << "training accuracy " << accuracy << "\n";
  std::cout << "epsilon " << engine.epsilon(1e-5) << " at delta 1e-5\n";
  return 0;
}
