// Builds against an installed dptorch and takes one private step.
#include <dptorch/dptorch.h>

#include <iostream>

int main() {
  dptorch::nn::Linear model(4, 2);
  dptorch::PerSampleGradientClipper clipper(model,
                                            std::make_shared<dptorch::ConstantFlatClipper>(1.0));
  model->forward(torch::randn({8, 4})).sum().backward();
  clipper.clip_and_accumulate();
  const auto stats = clipper.pre_step();
  std::cout << "consumer: clipped a batch of " << stats.batch_size << "\n";
  return stats.batch_size == 8 ? 0 : 1;
}
