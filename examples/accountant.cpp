// accountant: the privacy accountants on their own, for planning a run before training.
//
// An accountant records the (noise multiplier σ, sample rate q) of each DP-SGD step and answers
// the ε spent for a δ. "prv" (Gopi et al. 2021, the default) gives an upper bound close to the
// true ε; "rdp" (Mironov et al. 2019) a looser one; "gdp" (Dong et al. 2019) a central-limit
// approximation that can underestimate ε, for comparison only.
// noise_multiplier_for_epsilon goes the other way: the σ that keeps a planned run within ε.
//
//   build/examples/accountant

#include <dptorch/dptorch.h>

#include <iostream>
#include <string>

int main() {
  namespace acc = dptorch::accounting;
  const double sample_rate = 256.0 / 60000;  // expected batch 256 out of 60,000 examples
  const int64_t steps = 2340;                // 10 epochs
  const double delta = 1e-5;

  // One step at a time, as a training loop would report them.
  for (const std::string& name : acc::accountant_names()) {
    auto accountant = acc::make_accountant(name);
    for (int64_t i = 0; i < steps; ++i) accountant->step(/*noise_multiplier=*/1.1, sample_rate);
    std::cout << name << ": epsilon " << accountant->epsilon(delta) << " after "
              << accountant->total_steps() << " steps (sigma 1.1)\n";
  }

  // A schedule that changes: each (σ, q) block is composed exactly. The state survives a restart.
  auto prv = acc::make_accountant("prv");
  prv->step(/*noise_multiplier=*/1.1, sample_rate, /*steps=*/1170);
  prv->step(/*noise_multiplier=*/1.5, sample_rate, /*steps=*/1170);
  auto restored = acc::load_accountant(prv->serialize());
  std::cout << "prv, sigma 1.1 then 1.5: epsilon " << restored->epsilon(delta) << "\n";

  // The PRV accountant's bounds: the true ε lies between lower and upper (epsilon() is upper).
  acc::PrvAccountant bounded(acc::PrvOptions().eps_error(0.05));
  bounded.step(/*noise_multiplier=*/1.1, sample_rate, steps);
  const acc::PrvEpsilon bounds = bounded.epsilon_bounds(delta);
  std::cout << "prv bounds at eps_error 0.05: " << bounds.lower << " <= epsilon <= " << bounds.upper
            << "\n";

  // Calibration: the smallest σ (to within the bisection's tolerance) that spends at most ε = 3.
  const double sigma = acc::noise_multiplier_for_epsilon(acc::CalibrationOptions()
                                                             .target_epsilon(3)
                                                             .delta(delta)
                                                             .sample_rate(sample_rate)
                                                             .steps(steps));
  const double check = acc::epsilon_for(acc::EpsilonOptions()
                                            .noise_multiplier(sigma)
                                            .sample_rate(sample_rate)
                                            .steps(steps)
                                            .delta(delta));
  std::cout << "for epsilon 3: sigma " << sigma << " (which spends " << check << ")\n";
  return check <= 3 ? 0 : 1;
}
