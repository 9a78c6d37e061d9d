// clipper_virtual_steps: DP-SGD written out by hand with the clipper API, each logical batch
// accumulated over several physical batches ("virtual steps", for batches larger than memory).
//
// dptorch::PerSampleGradientClipper clips each sample's gradient to norm C and sums them over the
// physical batches; pre_step() hands the sum to the parameters' .grad (divided by the batch size
// for a mean loss). The Gaussian noise is yours to add here; dptorch::optim::DPOptimizer (which
// PrivacyEngine sets up) does all of this for you, with Poisson sampling and an accountant. The
// data are synthetic, so it runs in seconds.
//
//   build/examples/clipper_virtual_steps

#include <dptorch/dptorch.h>

#include <iostream>

int main() {
  torch::manual_seed(0);
  constexpr int64_t kPhysicalBatch = 50;
  constexpr int64_t kVirtualSteps = 4;      // physical batches per logical batch (of 200)
  constexpr int64_t kSteps = 25;            // logical batches: one pass over the data
  constexpr double kMaxGradNorm = 1.0;      // C
  constexpr double kNoiseMultiplier = 1.0;  // σ: the noise on the clipped sum has std σ·C

  // Two classes of 10-dimensional points: the label is the sign of a fixed projection.
  const auto x = torch::randn({kSteps * kVirtualSteps * kPhysicalBatch, 10});
  const auto y = (x.matmul(torch::linspace(-1, 1, 10)) > 0).to(torch::kLong);

  auto model = torch::nn::Sequential(dptorch::nn::Linear(10, 32), torch::nn::Tanh(),
                                     dptorch::nn::Linear(32, 2));
  torch::optim::SGD optimizer(model->parameters(), torch::optim::SGDOptions(1.0));
  dptorch::PerSampleGradientClipper clipper(
      model, std::make_shared<dptorch::ConstantFlatClipper>(kMaxGradNorm));

  // Runs after every clip_and_accumulate(): here, reports the first batch's gradient norms.
  bool reported = false;
  clipper.set_on_batch_clip_func([&reported](const dptorch::ClipEvent& event) {
    if (reported) return;
    reported = true;
    std::cout << "first physical batch: per-sample gradient norms up to "
              << event.per_sample_norm.max().item<double>() << ", clipped to " << kMaxGradNorm
              << "\n";
  });

  const auto batches = x.split(kPhysicalBatch);
  const auto targets = y.split(kPhysicalBatch);
  for (int64_t step = 0; step < kSteps; ++step) {
    for (int64_t v = 0; v < kVirtualSteps; ++v) {
      const size_t b = static_cast<size_t>(step * kVirtualSteps + v);
      torch::nn::functional::cross_entropy(model->forward(batches[b]), targets[b]).backward();
      clipper.clip_and_accumulate();  // clip each sample's gradient, add to the running sums
    }
    // .grad = Σ clipped gradients / batch size (a mean loss), over the whole logical batch.
    auto stats = clipper.pre_step();
    // N(0, σ²C²) on the sum is N(0, (σC / B)²) on the mean, with C the noise bound pre_step()
    // returns for each parameter (here kMaxGradNorm). (B is public here: fixed batches.)
    const double stddev =
        kNoiseMultiplier * stats.max_norm[0] / static_cast<double>(stats.batch_size);
    {
      torch::NoGradGuard no_grad;
      for (auto& p : model->parameters()) p.mutable_grad().add_(torch::randn_like(p) * stddev);
    }
    optimizer.step();
    clipper.zero_grad();
  }

  torch::NoGradGuard no_grad;
  const double accuracy =
      (model->forward(x).argmax(1) == y).to(torch::kDouble).mean().item<double>();
  std::cout << kSteps << " noisy steps of " << kVirtualSteps << " x " << kPhysicalBatch
            << " samples; training accuracy " << accuracy << "\n";
  return 0;
}
