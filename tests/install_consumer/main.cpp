// Builds against an installed dptorch (installed headers only): takes one clipped step with a
// dptorch layer, then checks a layer of the user's own, ScaleShift exactly as docs/extending.md
// shows it, against plain autograd, through the clipper and through the engine.
#include <dptorch/dptorch.h>

#include <algorithm>
#include <exception>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

// ------------------------------------------------------------ as docs/extending.md shows it

namespace my_layers {

/// `x` with its samples in dimension `batch_dim`, as [B, T, features]: T collects every other
/// dimension before the features (1 when there is none).
inline torch::Tensor by_sample(const torch::Tensor& x, int64_t batch_dim) {
  const auto y = x.movedim(batch_dim, 0);
  return y.dim() == 2 ? y.unsqueeze(1) : y.flatten(1, -2);
}

/// What ScaleShift saves per call: its input and the input's batch dimension.
struct ScaleShiftSaved {
  torch::Tensor input;
  int64_t batch_dim = 0;
};

/// y = x ⊙ weight + bias over the last dimension of x [*, features].
class ScaleShiftImpl : public torch::nn::Cloneable<ScaleShiftImpl>,
                       public dptorch::nn::RecordingLayer<ScaleShiftSaved> {
 public:
  explicit ScaleShiftImpl(int64_t features)
      : torch::nn::Cloneable<ScaleShiftImpl>("my_layers::ScaleShift"), features_(features) {
    reset();
  }

  void reset() override {
    weight = register_parameter("weight", torch::ones({features_}));
    bias = register_parameter("bias", torch::zeros({features_}));
  }

  torch::nn::Module& as_module() override { return *this; }

  torch::Tensor forward(const torch::Tensor& input) {
    if (!recording({&weight, &bias})) return input * weight + bias;
    TORCH_CHECK(input.dim() >= 2, "ScaleShift needs a batch dimension to record per-sample ",
                "gradients, but got an input of shape ", input.sizes());
    ScaleShiftSaved saved{input.detach(), batch_dim(input.dim() - 1)};
    const int64_t batch_size = input.size(saved.batch_dim);
    const auto w = weight.detach();
    return record(
        input, {weight, bias}, [&] { return input * weight + bias; },
        [w](const torch::Tensor& g) { return g * w; }, std::move(saved), batch_size);
  }

  torch::Tensor weight, bias;

 protected:
  std::unique_ptr<dptorch::grad_sample::PerSampleGrads> make_grads(
      std::vector<dptorch::nn::Call<ScaleShiftSaved>> calls) override {
    torch::Tensor grad_weight, grad_bias;  // [B, features]: summed over positions and calls
    for (const auto& call : calls) {
      const auto x = by_sample(call.saved.input, call.saved.batch_dim);
      const auto g = by_sample(call.grad_outputs.at(0), call.saved.batch_dim);
      const auto gw = (g * x).sum(1), gb = g.sum(1);
      grad_weight = grad_weight.defined() ? grad_weight + gw : gw;
      grad_bias = grad_bias.defined() ? grad_bias + gb : gb;
    }
    std::vector<std::string> names;
    std::vector<torch::Tensor> samples;
    if (weight.requires_grad()) {
      names.emplace_back("weight");
      samples.push_back(grad_weight);
    }
    if (bias.requires_grad()) {
      names.emplace_back("bias");
      samples.push_back(grad_bias);
    }
    return std::make_unique<dptorch::grad_sample::MaterializedGrads>(std::move(names),
                                                                     std::move(samples));
  }

 private:
  int64_t features_;
};
TORCH_MODULE(ScaleShift);

}  // namespace my_layers

// ------------------------------------------------------------------------------- the checks

namespace {

namespace F = torch::nn::functional;

// The package's first check: a dptorch layer through the clipper.
int check_linear_clipper() {
  dptorch::nn::Linear model(4, 2);
  dptorch::PerSampleGradientClipper clipper(model,
                                            std::make_shared<dptorch::ConstantFlatClipper>(1.0));
  model->forward(torch::randn({8, 4})).sum().backward();
  clipper.clip_and_accumulate();
  const auto stats = clipper.pre_step();
  std::cout << "consumer: clipped a batch of " << stats.batch_size << "\n";
  return stats.batch_size == 8 ? 0 : 1;
}

// Linear(5, 4), ScaleShift(4), Tanh, Linear(4, 3) in double; `scale` is its ScaleShift.
struct Model {
  torch::nn::Sequential net;
  my_layers::ScaleShift scale;
};

Model make_model() {
  my_layers::ScaleShift scale(4);
  torch::nn::Sequential net(dptorch::nn::Linear(5, 4), scale, torch::nn::Tanh(),
                            dptorch::nn::Linear(4, 3));
  net->to(torch::kDouble);
  torch::NoGradGuard no_grad;  // a scale and shift away from the identity
  scale->weight.uniform_(0.5, 1.5);
  scale->bias.uniform_(-0.5, 0.5);
  return {net, scale};
}

// Cross-entropy (a mean over the batch) of the output averaged over positions: x [B, 3, 5].
torch::Tensor loss_of(Model& m, const torch::Tensor& x, const torch::Tensor& y) {
  return F::cross_entropy(m.net->forward(x).mean(1), y);
}

// Each sample's gradient by plain autograd on a batch of one (the model must be detached):
// parameter name -> [B, parameter shape...].
std::map<std::string, torch::Tensor> autograd_per_sample(Model& m, const torch::Tensor& x,
                                                         const torch::Tensor& y) {
  const auto params = m.net->named_parameters();
  std::vector<std::vector<torch::Tensor>> grads(params.size());
  for (int64_t i = 0; i < x.size(0); ++i) {
    const auto g =
        torch::autograd::grad({loss_of(m, x.narrow(0, i, 1), y.narrow(0, i, 1))}, params.values());
    for (size_t k = 0; k < g.size(); ++k) grads[k].push_back(g[k]);
  }
  std::map<std::string, torch::Tensor> out;
  for (size_t k = 0; k < params.size(); ++k) out[params[k].key()] = torch::stack(grads[k]);
  return out;
}

double max_difference(const torch::Tensor& a, const torch::Tensor& b) {
  return (a - b).abs().max().item<double>();
}

// (a) GradSampleModule's per-sample gradients of every parameter, ScaleShift's included, equal
// plain autograd on batches of one.
int check_per_sample_gradients() {
  torch::manual_seed(0);
  auto m = make_model();
  const auto x = torch::randn({8, 3, 5}, torch::kDouble);  // 8 samples of 3 positions
  const auto y = torch::randint(3, {8});
  dptorch::GradSampleModule gsm(m.net);
  loss_of(m, x, y).backward();
  const auto per_sample = gsm.grad_samples();
  gsm.close();  // the layers compute as plain torch again
  const auto expected = autograd_per_sample(m, x, y);
  double worst = 0;
  for (const auto& [name, grads] : expected) {
    const auto* found = per_sample.find(name);
    if (found == nullptr) {
      std::cerr << "consumer: FAILED: GradSampleModule has no per-sample gradient of " << name
                << "\n";
      return 1;
    }
    worst = std::max(worst, max_difference(*found, grads));
  }
  const bool ok = per_sample.size() == expected.size() && worst < 1e-10;
  (ok ? std::cout : std::cerr) << "consumer: " << (ok ? "" : "FAILED: ")
                               << "per-sample gradients of a model with ScaleShift ("
                               << expected.size() << " parameters) against autograd: max "
                               << "difference " << worst << " (tolerance 1e-10)\n";
  return ok ? 0 : 1;
}

// (b) A PerSampleGradientClipper attached to the model clips each sample's whole gradient to C
// and pre_step() writes the mean of the clipped gradients into every .grad.
int check_clipper() {
  torch::manual_seed(1);
  auto m = make_model();
  const int64_t batch = 8;
  const auto x = torch::randn({batch, 3, 5}, torch::kDouble);
  const auto y = torch::randint(3, {batch});
  const auto expected = autograd_per_sample(m, x, y);
  auto norm_sq = torch::zeros({batch}, torch::kDouble);
  for (const auto& item : expected) norm_sq += item.second.reshape({batch, -1}).square().sum(1);
  const auto norms = norm_sq.sqrt();
  // C between the 4th and 5th smallest norm: half the samples are clipped.
  const auto sorted = std::get<0>(norms.sort());
  const double C = 0.5 * (sorted[3].item<double>() + sorted[4].item<double>());
  const auto factors = torch::clamp_max(C / norms, 1.0);

  dptorch::PerSampleGradientClipper clipper(m.net,
                                            std::make_shared<dptorch::ConstantFlatClipper>(C));
  loss_of(m, x, y).backward();
  clipper.clip_and_accumulate();
  const auto stats = clipper.pre_step();
  clipper.close();
  double worst = 0;
  for (const auto& p : m.net->named_parameters()) {
    const auto& grads = expected.at(p.key());
    if (!p.value().grad().defined()) {
      std::cerr << "consumer: FAILED: pre_step() left no gradient in " << p.key() << "\n";
      return 1;
    }
    std::vector<int64_t> shape(grads.dim(), 1);
    shape[0] = batch;
    const auto want = (grads * factors.view(shape)).sum(0) / batch;
    worst = std::max(worst, max_difference(p.value().grad(), want));
  }
  // 1e-5: the clipper guards its division by a norm, so its factors differ from C / ‖G_i‖ in
  // about the sixth digit.
  const bool ok = stats.batch_size == batch && worst < 1e-5;
  (ok ? std::cout : std::cerr) << "consumer: " << (ok ? "" : "FAILED: ")
                               << "the clipper clipped a batch of " << stats.batch_size
                               << " with ScaleShift (" << (norms > C).sum().item<int64_t>()
                               << " samples above C = " << C << "); its gradients against "
                               << "autograd: max difference " << worst << " (tolerance 1e-5)\n";
  return ok ? 0 : 1;
}

// (c) The engine makes the model private and one private step changes ScaleShift's parameters.
int check_engine() {
  torch::manual_seed(2);
  auto m = make_model();
  const int64_t n = 64;
  dptorch::data::TensorPairDataset data(torch::randn({n, 3, 5}, torch::kDouble),
                                        torch::randint(3, {n}));
  dptorch::PrivacyEngine engine;
  const auto options = dptorch::PrivacyOptions()
                           .noise_multiplier(1.0)
                           .max_grad_norm(1.0)
                           .expected_batch_size(16)
                           .seed(3);
  auto run = engine.make_private(
      m.net,
      std::make_shared<torch::optim::SGD>(m.net->parameters(), torch::optim::SGDOptions(0.1)), data,
      options);
  const auto weight = m.scale->weight.detach().clone();
  const auto bias = m.scale->bias.detach().clone();
  const auto batch = run.loader.next();
  loss_of(m, batch.data, batch.target).backward();
  run.optimizer->step();
  const bool changed = !torch::equal(weight, m.scale->weight) && !torch::equal(bias, m.scale->bias);
  const int64_t steps = engine.accountant()->total_steps();
  const bool ok = changed && steps == 1;
  (ok ? std::cout : std::cerr) << "consumer: " << (ok ? "" : "FAILED: ") << "the engine took "
                               << steps << " private step(s) on a batch of " << batch.data.size(0)
                               << "; ScaleShift's weight and bias "
                               << (changed ? "changed" : "did not both change") << "\n";
  return ok ? 0 : 1;
}

// Runs a check; an exception is a failure, reported with its message.
int run_check(const char* name, const std::function<int()>& check) {
  try {
    return check();
  } catch (const std::exception& e) {
    std::cerr << "consumer: FAILED: " << name << " threw: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace

int main() {
  int failures = 0;
  failures += run_check("the Linear clipper check", check_linear_clipper);
  failures += run_check("the per-sample gradient check", check_per_sample_gradients);
  failures += run_check("the clipper check", check_clipper);
  failures += run_check("the engine check", check_engine);
  return failures == 0 ? 0 : 1;
}
