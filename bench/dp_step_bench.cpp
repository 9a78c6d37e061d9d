// dp_step_bench: what a private training step costs next to a non-private one.
//
// For each row (model × batch size) it times, side by side in one process, the non-private step
// (torch::nn layers, torch::optim::SGD: forward + loss + backward + step) and the DP-SGD step of
// the same model built from dptorch::nn layers, through the public API a user calls
// (PerSampleGradientClipper + ConstantFlatClipper, DPOptimizer + the default noise source: forward
// + loss + backward + clip + noise + step). Steps of the two alternate, so that load on a shared
// machine hits both alike; each time is the median over all steps, in wall time and in process CPU
// time. Peak memory is measured per variant in a fresh process of its own (see child_mem). A second
// pass times the stages of each step with manual timers (torch on the CPU is synchronous, so a
// stage's time is its cost) and counts the page faults of each stage. Results and the method are
// recorded in docs/performance.md.
//
//   dp_step_bench                       # all rows, ~2-3 minutes on 2 cores
//   dp_step_bench --quick               # ~20-40 s, fewer repetitions
//   dp_step_bench --threads 1 --rows mlp-1024,cnn-256
//   dp_step_bench --malloc-no-mmap      # glibc keeps freed pages: no fresh-page faults per step
//   dp_step_bench --norm-method ghost   # the clipper with a forced norm method

#include <dptorch/dptorch.h>

#include <ATen/Version.h>
#include <c10/core/Allocator.h>
#include <c10/util/ThreadLocalDebugInfo.h>
#include <torch/torch.h>
#include <torch/version.h>
#include <CLI/CLI.hpp>

#include "measure.h"

#include <dlfcn.h>
#include <malloc.h>
#include <sched.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using dptorch::bench::cpu_ms;
using dptorch::bench::median;
using dptorch::bench::page_faults;

namespace tnn = torch::nn;
namespace F = torch::nn::functional;
using Clock = std::chrono::steady_clock;

constexpr double kNoiseMultiplier = 1.0;
constexpr double kMaxGradNorm = 1.0;
constexpr double kLearningRate = 0.05;
constexpr uint64_t kSeed = 1234;

// ------------------------------------------------------------------------------------ models

// The layer types a model is built from: torch's, or dptorch's twins (same options, same
// parameter names), so one template gives both variants of a custom (non-Sequential) model.
struct TorchLayers {
  using Linear = tnn::Linear;
  using LayerNorm = tnn::LayerNorm;
  using Embedding = tnn::Embedding;
  using LSTM = tnn::LSTM;
  using TransformerEncoderLayer = tnn::TransformerEncoderLayer;
  using Conv1d = tnn::Conv1d;
  using Conv2d = tnn::Conv2d;
  using GroupNorm = tnn::GroupNorm;
};
struct DpLayers {
  using Linear = dptorch::nn::Linear;
  using LayerNorm = dptorch::nn::LayerNorm;
  using Embedding = dptorch::nn::Embedding;
  using LSTM = dptorch::nn::LSTM;
  using TransformerEncoderLayer = dptorch::nn::TransformerEncoderLayer;
  using Conv1d = dptorch::nn::Conv1d;
  using Conv2d = dptorch::nn::Conv2d;
  using GroupNorm = dptorch::nn::GroupNorm;
};

// Embedding(20000, 64) over [B, 128] tokens → mean over the sequence → Linear(64, 2).
template <typename L>
struct TextModelImpl : tnn::Module {
  TextModelImpl()
      : embedding(register_module("embedding", typename L::Embedding(20000, 64))),
        fc(register_module("fc", typename L::Linear(64, 2))) {}
  torch::Tensor forward(const torch::Tensor& tokens) { return fc(embedding(tokens).mean(1)); }
  typename L::Embedding embedding;
  typename L::Linear fc;
};

// One post-norm transformer block on [B, T, d] (single-head attention as matmuls), then the mean
// over T → Linear(d, 2).
template <typename L>
struct BlockModelImpl : tnn::Module {
  static constexpr int64_t kDim = 128, kHidden = 512;
  BlockModelImpl()
      : q(register_module("q", typename L::Linear(kDim, kDim))),
        k(register_module("k", typename L::Linear(kDim, kDim))),
        v(register_module("v", typename L::Linear(kDim, kDim))),
        o(register_module("o", typename L::Linear(kDim, kDim))),
        ln1(register_module("ln1", typename L::LayerNorm(std::vector<int64_t>{kDim}))),
        fc1(register_module("fc1", typename L::Linear(kDim, kHidden))),
        fc2(register_module("fc2", typename L::Linear(kHidden, kDim))),
        ln2(register_module("ln2", typename L::LayerNorm(std::vector<int64_t>{kDim}))),
        head(register_module("head", typename L::Linear(kDim, 2))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    auto scores = q(x).matmul(k(x).transpose(1, 2)) / std::sqrt(static_cast<double>(kDim));
    auto h = ln1(x + o(torch::softmax(scores, -1).matmul(v(x))));
    h = ln2(h + fc2(torch::relu(fc1(h))));
    return head(h.mean(1));
  }
  typename L::Linear q, k, v, o;
  typename L::LayerNorm ln1;
  typename L::Linear fc1, fc2;
  typename L::LayerNorm ln2;
  typename L::Linear head;
};

// Embedding(10000, 128) over [B, 64] tokens → one-layer LSTM 128→256 → last state → Linear(256, 2).
template <typename L>
struct LstmModelImpl : tnn::Module {
  LstmModelImpl()
      : embedding(register_module("embedding", typename L::Embedding(10000, 128))),
        lstm(register_module("lstm",
                             typename L::LSTM(tnn::LSTMOptions(128, 256).batch_first(true)))),
        fc(register_module("fc", typename L::Linear(256, 2))) {}
  torch::Tensor forward(const torch::Tensor& tokens) {
    auto [out, state] = lstm(embedding(tokens));
    return fc(std::get<0>(state)[0]);
  }
  typename L::Embedding embedding;
  typename L::LSTM lstm;
  typename L::Linear fc;
};

// One post-norm encoder layer (d 256, 4 heads, feed-forward 1024) over [B, 128, 256], the mean
// token → Linear(256, 2).
template <typename L>
struct EncoderModelImpl : tnn::Module {
  EncoderModelImpl()
      : encoder(register_module(
            "encoder", typename L::TransformerEncoderLayer(
                           tnn::TransformerEncoderLayerOptions(256, 4).dim_feedforward(1024)))),
        fc(register_module("fc", typename L::Linear(256, 2))) {}
  torch::Tensor forward(const torch::Tensor& x) { return fc(encoder(x.transpose(0, 1)).mean(0)); }
  typename L::TransformerEncoderLayer encoder;
  typename L::Linear fc;
};

// A residual block of two 3x3 convolutions with GroupNorm(8) and ReLU; a 1x1 convolution of
// stride 2 on the shortcut where the block halves the resolution and widens.
template <typename L>
struct ResidualBlockImpl : tnn::Module {
  ResidualBlockImpl(int64_t in, int64_t out, int64_t stride)
      : conv1(register_module(
            "conv1", typename L::Conv2d(
                         tnn::Conv2dOptions(in, out, 3).stride(stride).padding(1).bias(false)))),
        gn1(register_module("gn1", typename L::GroupNorm(tnn::GroupNormOptions(8, out)))),
        conv2(register_module(
            "conv2", typename L::Conv2d(tnn::Conv2dOptions(out, out, 3).padding(1).bias(false)))),
        gn2(register_module("gn2", typename L::GroupNorm(tnn::GroupNormOptions(8, out)))) {
    if (stride != 1 || in != out) {
      shortcut = register_module(
          "shortcut",
          typename L::Conv2d(tnn::Conv2dOptions(in, out, 1).stride(stride).bias(false)));
    }
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = torch::relu(gn1(conv1(x)));
    h = gn2(conv2(h));
    return torch::relu(h + (shortcut.is_empty() ? x : shortcut(x)));
  }
  typename L::Conv2d conv1;
  typename L::GroupNorm gn1;
  typename L::Conv2d conv2;
  typename L::GroupNorm gn2;
  typename L::Conv2d shortcut{nullptr};
};
// A small ResNet on 3x32x32: conv 3x3 (3->16), GroupNorm, ReLU, three stages of two residual
// blocks (16, 32, 64 channels; stride 2 between stages), global average pool, Linear(64, 10).
template <typename L>
struct ResNetModelImpl : tnn::Module {
  ResNetModelImpl()
      : stem(register_module(
            "stem", typename L::Conv2d(tnn::Conv2dOptions(3, 16, 3).padding(1).bias(false)))),
        gn(register_module("gn", typename L::GroupNorm(tnn::GroupNormOptions(8, 16)))),
        fc(register_module("fc", typename L::Linear(64, 10))) {
    const int64_t widths[] = {16, 32, 64};
    int64_t in = 16;
    for (int stage = 0; stage < 3; ++stage) {
      for (int b = 0; b < 2; ++b) {
        const int64_t stride = stage > 0 && b == 0 ? 2 : 1;
        blocks.push_back(
            register_module("block" + std::to_string(stage) + "_" + std::to_string(b),
                            std::make_shared<ResidualBlockImpl<L>>(in, widths[stage], stride)));
        in = widths[stage];
      }
    }
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto h = torch::relu(gn(stem(x)));
    for (auto& block : blocks) h = block->forward(h);
    return fc(h.mean({2, 3}));
  }
  typename L::Conv2d stem;
  typename L::GroupNorm gn;
  std::vector<std::shared_ptr<ResidualBlockImpl<L>>> blocks;
  typename L::Linear fc;
};

// A text CNN: Embedding(20000, 128) over [B, 256] tokens, Conv1d(128, 256, 3), ReLU, the maximum
// over time, Linear(256, 2).
template <typename L>
struct TextCnnModelImpl : tnn::Module {
  TextCnnModelImpl()
      : embedding(register_module("embedding", typename L::Embedding(20000, 128))),
        conv(register_module("conv", typename L::Conv1d(tnn::Conv1dOptions(128, 256, 3)))),
        fc(register_module("fc", typename L::Linear(256, 2))) {}
  torch::Tensor forward(const torch::Tensor& tokens) {
    auto h = torch::relu(conv(embedding(tokens).transpose(1, 2)));
    return fc(std::get<0>(h.max(2)));
  }
  typename L::Embedding embedding;
  typename L::Conv1d conv;
  typename L::Linear fc;
};

// A CIFAR-style CNN on 3x32x32: three 3x3 convolutions (32, 64, 128) each with GroupNorm(8) and
// ReLU, max pooling after the first two, adaptive average pooling to 2x2, Linear(512, 10).
tnn::Sequential make_cifar_cnn() {
  auto block = [](tnn::Sequential& seq, int64_t in, int64_t out) {
    seq->push_back(tnn::Conv2d(tnn::Conv2dOptions(in, out, 3).padding(1)));
    seq->push_back(tnn::GroupNorm(tnn::GroupNormOptions(8, out)));
    seq->push_back(tnn::ReLU());
  };
  tnn::Sequential seq;
  block(seq, 3, 32);
  seq->push_back(tnn::MaxPool2d(tnn::MaxPool2dOptions(2)));
  block(seq, 32, 64);
  seq->push_back(tnn::MaxPool2d(tnn::MaxPool2dOptions(2)));
  block(seq, 64, 128);
  seq->push_back(tnn::AdaptiveAvgPool2d(tnn::AdaptiveAvgPool2dOptions(2)));
  seq->push_back(tnn::Flatten());
  seq->push_back(tnn::Linear(512, 10));
  return seq;
}

tnn::Sequential make_mlp() {
  return tnn::Sequential(tnn::Linear(784, 512), tnn::ReLU(), tnn::Linear(512, 512), tnn::ReLU(),
                         tnn::Linear(512, 10));
}

// The CNN of tools/dptrain (Tramèr & Boneh 2021, Table 9), from torch::nn layers.
tnn::Sequential make_cnn() {
  return tnn::Sequential(tnn::Conv2d(tnn::Conv2dOptions(1, 16, 8).stride(2).padding(2)),
                         tnn::Tanh(), tnn::MaxPool2d(tnn::MaxPool2dOptions(2).stride(1)),
                         tnn::Conv2d(tnn::Conv2dOptions(16, 32, 4).stride(2)), tnn::Tanh(),
                         tnn::MaxPool2d(tnn::MaxPool2dOptions(2).stride(1)), tnn::Flatten(),
                         tnn::Linear(32 * 4 * 4, 32), tnn::Tanh(), tnn::Linear(32, 10));
}

// A model ready to step: its parameters' owner and its forward.
struct Model {
  std::shared_ptr<tnn::Module> module;
  std::function<torch::Tensor(const torch::Tensor&)> forward;
};

template <typename M>
Model as_model(std::shared_ptr<M> m) {
  return {m, [m](const torch::Tensor& x) { return m->forward(x); }};
}

Model as_model(tnn::Sequential seq) {
  auto impl = seq.ptr();
  return {impl, [impl](const torch::Tensor& x) { return impl->forward(x); }};
}

// Copies parameters and buffers by name (the twins' names match torch's).
void copy_state(tnn::Module& from, tnn::Module& to) {
  torch::NoGradGuard no_grad;
  auto params = from.named_parameters();
  for (auto& p : to.named_parameters()) p.value().copy_(params[p.key()]);
  auto buffers = from.named_buffers();
  for (auto& b : to.named_buffers()) b.value().copy_(buffers[b.key()]);
}

// One benchmark row.
struct Row {
  std::string name;
  std::string kind;  // mlp, cnn, text, block, lstm, encoder
  int64_t batch;
  std::string what;
};

const std::vector<Row>& all_rows() {
  static const std::vector<Row> rows{
      {"mlp-256", "mlp", 256, "MLP 784-512-512-10 (ReLU)"},
      {"mlp-1024", "mlp", 1024, "MLP 784-512-512-10 (ReLU)"},
      {"cnn-256", "cnn", 256, "CNN of dptrain on 1x28x28 (Tramer & Boneh 2021)"},
      {"cnn-1024", "cnn", 1024, "CNN of dptrain on 1x28x28 (Tramer & Boneh 2021)"},
      {"text-256", "text", 256, "Embedding(20000,64) x 128 tokens, mean, Linear(64,2)"},
      {"block-64", "block", 64, "transformer block [B,64,128] (Linear+LayerNorm), mean, Linear"},
      {"lstm-128", "lstm", 128, "Embedding(10000,128) x 64 steps, LSTM 128->256, last h, Linear"},
      {"encoder-32", "encoder", 32, "TransformerEncoderLayer(256, 4 heads, ff 1024) x 128, mean"},
      {"resnet-64", "resnet", 64, "ResNet 3x32x32: 3 stages x 2 blocks (16,32,64), GroupNorm"},
      {"cifar-cnn-256", "cifar-cnn", 256, "3x32x32: 3 convs 3x3 (32,64,128)+GroupNorm, Linear"},
      {"textcnn-64", "textcnn", 64, "Embedding(20000,128) x 256, Conv1d(128,256,3), max, Linear"},
  };
  return rows;
}

// A model of torch layers and its twin of dptorch layers, with identical weights.
template <template <typename> class M>
std::pair<Model, Model> make_pair_of() {
  auto plain = std::make_shared<M<TorchLayers>>();
  auto dp = std::make_shared<M<DpLayers>>();
  copy_state(*plain, *dp);
  return {as_model(plain), as_model(dp)};
}

// The non-private and the private model of a row, with identical weights.
std::pair<Model, Model> make_models(const std::string& kind) {
  torch::manual_seed(kSeed);
  if (kind == "mlp" || kind == "cnn" || kind == "cifar-cnn") {
    auto plain = kind == "mlp" ? make_mlp() : kind == "cnn" ? make_cnn() : make_cifar_cnn();
    return {as_model(plain), as_model(dptorch::nn::convert(plain))};
  }
  if (kind == "text") return make_pair_of<TextModelImpl>();
  if (kind == "lstm") return make_pair_of<LstmModelImpl>();
  if (kind == "encoder") return make_pair_of<EncoderModelImpl>();
  if (kind == "resnet") return make_pair_of<ResNetModelImpl>();
  if (kind == "textcnn") return make_pair_of<TextCnnModelImpl>();
  return make_pair_of<BlockModelImpl>();
}

// A fixed batch (the step's cost does not depend on the values).
std::pair<torch::Tensor, torch::Tensor> make_batch(const std::string& kind, int64_t B) {
  torch::manual_seed(kSeed + 1);
  if (kind == "mlp") return {torch::randn({B, 784}), torch::randint(10, {B}, torch::kLong)};
  if (kind == "cnn") return {torch::randn({B, 1, 28, 28}), torch::randint(10, {B}, torch::kLong)};
  if (kind == "text") {
    return {torch::randint(20000, {B, 128}, torch::kLong), torch::randint(2, {B}, torch::kLong)};
  }
  if (kind == "lstm") {
    return {torch::randint(10000, {B, 64}, torch::kLong), torch::randint(2, {B}, torch::kLong)};
  }
  if (kind == "encoder") return {torch::randn({B, 128, 256}), torch::randint(2, {B}, torch::kLong)};
  if (kind == "resnet" || kind == "cifar-cnn") {
    return {torch::randn({B, 3, 32, 32}), torch::randint(10, {B}, torch::kLong)};
  }
  if (kind == "textcnn") {
    return {torch::randint(20000, {B, 256}, torch::kLong), torch::randint(2, {B}, torch::kLong)};
  }
  return {torch::randn({B, 64, 128}), torch::randint(2, {B}, torch::kLong)};
}

// ------------------------------------------------------------------------------------ steppers

double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

// Wall and CPU time of a stretch of work, in ms, and the page faults it took.
struct Span {
  double wall = 0, cpu = 0, faults = 0;
};

class Stopwatch {
 public:
  Stopwatch() : wall_(Clock::now()), cpu_(cpu_ms()), faults_(page_faults()) {}
  Span elapsed() const { return {ms_since(wall_), cpu_ms() - cpu_, page_faults() - faults_}; }

 private:
  Clock::time_point wall_;
  double cpu_, faults_;
};

// Times consecutive stages: lap(k) adds the time since the previous lap to stage k.
class Laps {
 public:
  explicit Laps(std::vector<Span>& out) : out_(out) {}
  void operator()(size_t stage) {
    const Span s = watch_.elapsed();
    out_.at(stage).wall += s.wall;
    out_.at(stage).cpu += s.cpu;
    out_.at(stage).faults += s.faults;
    watch_ = Stopwatch();
  }

 private:
  std::vector<Span>& out_;
  Stopwatch watch_;
};

// One training step of one variant, whole (what a user runs) or with stage timers.
class Stepper {
 public:
  virtual ~Stepper() = default;
  virtual void step() = 0;
  virtual std::vector<std::string> stage_names() const = 0;
  // Adds each stage's times and page faults to `stages` (sized like stage_names()).
  virtual void staged_step(std::vector<Span>& stages) = 0;
};

class NonPrivateStepper final : public Stepper {
 public:
  NonPrivateStepper(Model model, torch::Tensor x, torch::Tensor y)
      : model_(std::move(model)),
        x_(std::move(x)),
        y_(std::move(y)),
        sgd_(model_.module->parameters(), torch::optim::SGDOptions(kLearningRate)) {}

  void step() override {
    sgd_.zero_grad();
    auto loss = F::cross_entropy(model_.forward(x_), y_);
    loss.backward();
    sgd_.step();
  }

  std::vector<std::string> stage_names() const override {
    return {"forward", "backward", "optimizer"};
  }

  void staged_step(std::vector<Span>& stages) override {
    Laps lap(stages);
    sgd_.zero_grad();
    auto loss = F::cross_entropy(model_.forward(x_), y_);
    lap(0);
    loss.backward();
    lap(1);
    sgd_.step();
    lap(2);
  }

 private:
  Model model_;
  torch::Tensor x_, y_;
  torch::optim::SGD sgd_;
};

// Stage names of the private step.
std::vector<std::string> dp_stage_names() {
  return {"forward", "backward", "rules", "norms", "clip+sum", "noise", "optimizer"};
}

// Writes the noise DPOptimizer draws when an accumulation begins (one N(0, σ²C²) tensor per
// parameter) into `buffers` of the parameters' shapes, to time the noise inside the step.
Span time_noise(dptorch::optim::NoiseSource& noise, const std::vector<torch::Tensor>& buffers) {
  Stopwatch watch;
  for (const auto& b : buffers) noise.fill_gaussian_(b, kNoiseMultiplier * kMaxGradNorm);
  return watch.elapsed();
}

// Moves the separately timed noise from the clip+sum stage (4), where the accumulation draws
// it, to the noise stage (5).
void move_noise(std::vector<Span>& stages, Span noise) {
  stages.at(5).wall += noise.wall;
  stages.at(5).cpu += noise.cpu;
  stages.at(4).wall -= noise.wall;
  stages.at(4).cpu -= noise.cpu;
  stages.at(5).faults += noise.faults;
  stages.at(4).faults -= noise.faults;
}

// The private step through the public API: PerSampleGradientClipper + ConstantFlatClipper with
// the norm method asked for (kAuto unless --norm-method), DPOptimizer(SGD) + the default noise
// source (make_noise_source with a seed).
class DpStepper final : public Stepper {
 public:
  DpStepper(Model model, torch::Tensor x, torch::Tensor y, dptorch::NormMethod method)
      : model_(std::move(model)),
        x_(std::move(x)),
        y_(std::move(y)),
        side_noise_(
            dptorch::optim::make_noise_source(dptorch::optim::NoiseOptions().seed(kSeed + 7))) {
    clipper_ = std::make_shared<dptorch::PerSampleGradientClipper>(
        model_.module, std::make_shared<dptorch::ConstantFlatClipper>(kMaxGradNorm),
        dptorch::GradSampleOptions().norm_method(method));
    const double B = static_cast<double>(x_.size(0));
    opt_ = std::make_unique<dptorch::optim::DPOptimizer>(
        std::make_shared<torch::optim::SGD>(model_.module->parameters(),
                                            torch::optim::SGDOptions(kLearningRate)),
        clipper_, dptorch::optim::DPOptimizerOptions(kNoiseMultiplier, B).sample_rate(B / 60000),
        dptorch::optim::make_noise_source(dptorch::optim::NoiseOptions().seed(kSeed)),
        dptorch::accounting::make_accountant("rdp"));
  }

  void step() override {
    opt_->zero_grad();
    auto loss = F::cross_entropy(model_.forward(x_), y_);
    loss.backward();
    opt_->step();
  }

  std::vector<std::string> stage_names() const override { return dp_stage_names(); }

  // The same calls as step(), with the work of clip_and_accumulate() (which step() runs) split
  // by public queries: batch_size() turns the tape's records into rules, flat_norm() computes
  // and caches the norms that clip_and_accumulate() then reuses.
  void staged_step(std::vector<Span>& stages) override {
    auto& gsm = clipper_->grad_sample_module();
    Laps lap(stages);
    opt_->zero_grad();
    auto loss = F::cross_entropy(model_.forward(x_), y_);
    lap(0);
    loss.backward();
    lap(1);
    (void)gsm.batch_size();
    lap(2);
    (void)gsm.flat_norm();
    lap(3);
    opt_->accumulate();  // draws the noise into the accumulators, then clips and sums onto it
    lap(4);
    opt_->step();
    lap(6);
    if (noise_buffers_.empty()) {
      for (const auto& p : gsm.parameters()) noise_buffers_.push_back(torch::empty_like(p));
    }
    move_noise(stages, time_noise(*side_noise_, noise_buffers_));
  }

 private:
  Model model_;
  torch::Tensor x_, y_;
  std::shared_ptr<dptorch::PerSampleGradientClipper> clipper_;
  std::unique_ptr<dptorch::optim::DPOptimizer> opt_;
  std::unique_ptr<dptorch::optim::NoiseSource> side_noise_;
  std::vector<torch::Tensor> noise_buffers_;  // time_noise()'s targets
};

// ------------------------------------------------------------------------------------ options

struct Options {
  int threads = 0;
  bool quick = false;
  std::string rows;
  std::string norm_method;  // empty: the clipper path (kAuto)
  double budget_s = 0;      // timing budget per row (both variants)
  int mem_steps = 0;
  int profile_steps = 0;
  // Child process mode (internal).
  std::string child;  // "", "time", "mem"
  std::string row;
  std::string variant;  // "np", "dp"
  int steps = 20;       // --child loop
  bool malloc_no_mmap = false;
};

std::optional<dptorch::NormMethod> parse_norm_method(const std::string& s) {
  if (s.empty()) return std::nullopt;
  if (s == "auto") return dptorch::NormMethod::kAuto;
  if (s == "ghost") return dptorch::NormMethod::kGhost;
  if (s == "materialize") return dptorch::NormMethod::kMaterialize;
  throw std::invalid_argument("--norm-method must be auto, ghost or materialize, but is '" + s +
                              "'");
}

const Row& find_row(const std::string& name) {
  for (const auto& r : all_rows()) {
    if (r.name == name) return r;
  }
  throw std::invalid_argument("unknown row '" + name + "'");
}

std::unique_ptr<Stepper> make_stepper(const Options& o, const Row& row, bool dp, Model model) {
  auto [x, y] = make_batch(row.kind, row.batch);
  if (!dp) return std::make_unique<NonPrivateStepper>(std::move(model), x, y);
  return std::make_unique<DpStepper>(
      std::move(model), x, y,
      parse_norm_method(o.norm_method).value_or(dptorch::NormMethod::kAuto));
}

// ------------------------------------------------------------------------------------ children

double quantile(std::vector<double> v, double q) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const double pos = q * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(pos);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (pos - static_cast<double>(lo)) * (v[hi] - v[lo]);
}

// A child reports results as "@key value" lines on stdout.
void report(const std::string& key, double value) { std::printf("@%s %.6g\n", key.c_str(), value); }

// Times one row: both variants in this process, steps alternating, then stage breakdowns.
int child_time(const Options& o) {
  const Row& row = find_row(o.row);
  auto [plain, priv] = make_models(row.kind);
  auto np = make_stepper(o, row, false, std::move(plain));
  auto dp = make_stepper(o, row, true, std::move(priv));
  // Warm-up (first-touch allocations, optimiser state), then an estimate of the step times.
  for (int i = 0; i < (o.quick ? 1 : 2); ++i) {
    np->step();
    dp->step();
  }
  Stopwatch w;
  np->step();
  const double est_np = w.elapsed().wall;
  w = Stopwatch();
  dp->step();
  const double est_dp = w.elapsed().wall;
  const int min_rounds = o.quick ? 3 : 5;
  const int rounds =
      std::clamp(static_cast<int>(o.budget_s * 1e3 / (est_np + est_dp)), min_rounds, 400);
  std::vector<double> wall_np, wall_dp, cpu_np, cpu_dp, faults_np, faults_dp, ratios;
  for (int r = 0; r < rounds; ++r) {
    // Alternate which variant goes first, so that neither always follows the other's caches.
    for (int k = 0; k < 2; ++k) {
      const bool np_now = (k == 0) == (r % 2 == 0);
      Stopwatch watch;
      (np_now ? np : dp)->step();
      const Span t = watch.elapsed();
      (np_now ? wall_np : wall_dp).push_back(t.wall);
      (np_now ? cpu_np : cpu_dp).push_back(t.cpu);
      (np_now ? faults_np : faults_dp).push_back(t.faults);
    }
    ratios.push_back(wall_dp.back() / wall_np.back());
  }
  report("steps", rounds);
  report("np_ms", median(wall_np));
  report("dp_ms", median(wall_dp));
  report("np_q25", quantile(wall_np, 0.25));
  report("np_q75", quantile(wall_np, 0.75));
  report("dp_q25", quantile(wall_dp, 0.25));
  report("dp_q75", quantile(wall_dp, 0.75));
  report("np_cpu_ms", median(cpu_np));
  report("dp_cpu_ms", median(cpu_dp));
  report("np_faults", median(faults_np));
  report("dp_faults", median(faults_dp));
  report("ratio_median_of_rounds", median(ratios));
  // Stage breakdowns: medians per stage over profile_steps staged steps of each variant, again
  // alternating.
  struct Staged {
    Stepper* stepper;
    std::string prefix;
    std::vector<std::vector<double>> wall, cpu, faults;
  };
  std::vector<Staged> staged{{np.get(), "np_stage_", {}, {}, {}},
                             {dp.get(), "dp_stage_", {}, {}, {}}};
  for (auto& s : staged) {
    s.wall.resize(s.stepper->stage_names().size());
    s.cpu.resize(s.wall.size());
    s.faults.resize(s.wall.size());
  }
  Stopwatch profile_watch;
  for (int i = 0; i < o.profile_steps; ++i) {
    // At least 3 staged steps; more only while within half the timing budget.
    if (i >= 3 && profile_watch.elapsed().wall > 500 * o.budget_s) break;
    for (auto& s : staged) {
      std::vector<Span> stages(s.wall.size());
      s.stepper->staged_step(stages);
      for (size_t k = 0; k < stages.size(); ++k) {
        s.wall[k].push_back(stages[k].wall);
        s.cpu[k].push_back(stages[k].cpu);
        s.faults[k].push_back(stages[k].faults);
      }
    }
  }
  for (auto& s : staged) {
    const auto names = s.stepper->stage_names();
    for (size_t k = 0; k < names.size(); ++k) {
      report(s.prefix + names[k], median(s.wall[k]));
      report(s.prefix + names[k] + "_cpu", median(s.cpu[k]));
      report(s.prefix + names[k] + "_faults", median(s.faults[k]));
    }
  }
  return 0;
}

// Runs `steps` plain steps of one variant of one row, for a profiler:
//   perf record -g dp_step_bench --child loop --row cnn-1024 --variant dp --steps 20
int child_loop(const Options& o) {
  const Row& row = find_row(o.row);
  const bool dp = o.variant == "dp";
  auto models = make_models(row.kind);
  auto stepper = make_stepper(o, row, dp, dp ? std::move(models.second) : std::move(models.first));
  std::vector<double> cpu;
  for (int i = 0; i < o.steps; ++i) {
    Stopwatch watch;
    stepper->step();
    cpu.push_back(watch.elapsed().cpu);
  }
  report("cpu_ms", median(cpu));
  return 0;
}

// "VmHWM:    1234 kB" → 1234 (kB), or -1.
long status_kb(const std::string& key) {
  std::ifstream in("/proc/self/status");
  std::string line;
  while (std::getline(in, line)) {
    if (line.rfind(key + ":", 0) == 0) return std::stol(line.substr(key.size() + 1));
  }
  return -1;
}

// Peak memory of one variant of one row, alone in this (fresh) process. RSS also counts the pages
// of libtorch's code that a step maps in the first time it runs a kernel, which is not memory the
// step uses; so the first step runs as a warm-up, the peak-RSS mark (VmHWM) is then reset to the
// current RSS (write "5" to /proc/self/clear_refs), `mem_steps` - 1 more steps run, and the
// anonymous part of the peak (VmHWM - RssFile - RssShmem, file-backed pages being constant after
// the warm-up) is compared with the anonymous RSS before the first step. The growth counts what
// a step holds and what it adds at its peak: activations, the autograd graph, gradients,
// optimiser state, per-sample tensors, noise, and allocator slack.
// Peak bytes of live CPU tensors, from the reports torch's CPU allocator sends to a memory
// profiler installed on this thread (the mechanism of torch's own profiler): only tensors
// allocated while it is installed count, so the model, the data and everything made before are
// left out. With several threads, tensors made and freed inside a parallel loop's worker are not
// seen; this benchmark reads it with one thread's worth of allocations in mind.
class PeakTensorBytes final : public c10::MemoryReportingInfoBase {
 public:
  void reportMemoryUsage(void* /*ptr*/, int64_t /*alloc_size*/, int64_t total_allocated,
                         int64_t /*total_reserved*/, c10::Device device) override {
    if (!device.is_cpu()) return;
    current_ = total_allocated;
    peak_ = std::max(peak_, total_allocated);
  }
  bool memoryProfilingEnabled() const override { return true; }
  void reset_peak() { peak_ = current_; }
  [[nodiscard]] int64_t peak() const { return peak_; }

 private:
  int64_t current_ = 0, peak_ = 0;
};

int child_mem(const Options& o) {
  const Row& row = find_row(o.row);
  const bool dp = o.variant == "dp";
  auto models = make_models(row.kind);
  // Keep only the variant measured: drop the other model before the baseline.
  Model model = dp ? std::move(models.second) : std::move(models.first);
  models = {};
  // Return the dropped model's pages to the kernel (glibc keeps them with --malloc-no-mmap):
  // otherwise the step reuses them without showing in the growth, by an amount that depends on
  // where the allocator happened to put them.
  malloc_trim(0);
  auto stepper = make_stepper(o, row, dp, std::move(model));
  const long base_anon = status_kb("RssAnon");
  const long file_before = status_kb("RssFile");
  auto tensors = std::make_shared<PeakTensorBytes>();
  c10::DebugInfoGuard tensor_guard(c10::DebugInfoKind::PROFILER_STATE, tensors);
  stepper->step();
  tensors->reset_peak();  // what the warm-up step keeps (gradients, accumulators) stays counted
  const long file_warm = status_kb("RssFile");
  bool reset = false;
  {
    std::ofstream clear("/proc/self/clear_refs");
    clear << "5";
    clear.flush();
    reset = static_cast<bool>(clear);
  }
  for (int i = 1; i < o.mem_steps; ++i) stepper->step();
  const long hwm = status_kb("VmHWM");
  const long file_after = status_kb("RssFile");
  const long shmem = status_kb("RssShmem");
  report("growth_kb", static_cast<double>(hwm - file_after - shmem - base_anon));
  report("tensor_peak_kb", static_cast<double>(tensors->peak()) / 1024.0);
  report("base_anon_kb", static_cast<double>(base_anon));
  report("hwm_kb", static_cast<double>(hwm));
  report("code_pages_kb", static_cast<double>(file_warm - file_before));
  report("file_drift_kb", static_cast<double>(file_after - file_warm));
  report("hwm_reset", reset ? 1 : 0);
  return 0;
}

// ------------------------------------------------------------------------------------ parent

std::string self_exe() {
  char buf[4096];
  const ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) throw std::runtime_error("cannot resolve /proc/self/exe");
  return std::string(buf, static_cast<size_t>(n));
}

// Runs this program in child mode; returns its "@key value" lines (its stderr passes through).
std::map<std::string, double> run_child(const Options& o, const std::string& mode,
                                        const std::string& row, const std::string& variant) {
  std::ostringstream cmd;
  cmd << "'" << self_exe() << "' --child " << mode << " --row " << row << " --threads " << o.threads
      << " --budget " << o.budget_s << " --mem-steps " << o.mem_steps << " --profile-steps "
      << o.profile_steps << (o.quick ? " --quick" : "");
  if (!variant.empty()) cmd << " --variant " << variant;
  if (!o.norm_method.empty()) cmd << " --norm-method " << o.norm_method;
  if (o.malloc_no_mmap) cmd << " --malloc-no-mmap";
  FILE* pipe = popen(cmd.str().c_str(), "r");
  if (pipe == nullptr) throw std::runtime_error("cannot start " + cmd.str());
  std::map<std::string, double> out;
  char line[1024];
  while (std::fgets(line, sizeof(line), pipe) != nullptr) {
    std::istringstream in(line);
    std::string key;
    double value = NAN;
    if (line[0] == '@' && (in >> key >> value)) out[key.substr(1)] = value;
  }
  const int status = pclose(pipe);
  if (status != 0)
    throw std::runtime_error("child failed (" + std::to_string(status) + "): " + cmd.str());
  return out;
}

int available_cores() {
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return CPU_COUNT(&set);
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// The BLAS libraries mapped into this process (after torch has loaded them).
std::string loaded_blas() {
  std::ifstream maps("/proc/self/maps");
  std::set<std::string> libs;
  std::string line;
  while (std::getline(maps, line)) {
    const auto slash = line.find('/');
    if (slash == std::string::npos) continue;
    const std::string path = line.substr(slash);
    const std::string base = path.substr(path.rfind('/') + 1);
    if (base.find("blas") != std::string::npos || base.find("lapack") != std::string::npos ||
        base.find("mkl") != std::string::npos) {
      libs.insert(path);
    }
  }
  std::string out;
  for (const auto& l : libs) out += (out.empty() ? "" : ", ") + l;
  using ConfigFn = char* (*)();
  if (auto fn = reinterpret_cast<ConfigFn>(dlsym(RTLD_DEFAULT, "openblas_get_config"))) {
    out += std::string(" [") + fn() + "]";
  }
  return out.empty() ? "(none found in /proc/self/maps)" : out;
}

std::string config_line(const std::string& config, const std::string& key) {
  const auto at = config.find(key);
  if (at == std::string::npos) return "?";
  const auto end = config.find_first_of(",\n", at);
  return config.substr(at + key.size(), end - at - key.size());
}

void print_environment(const Options& o) {
  // A tiny matmul makes torch load and initialise its BLAS before we look for it.
  (void)torch::mm(torch::ones({8, 8}), torch::ones({8, 8}));
  const std::string config = at::show_config();
  std::printf(
      "libtorch %s; BLAS_INFO=%s, LAPACK_INFO=%s, USE_MKLDNN=%s, USE_OPENMP=%s\n", TORCH_VERSION,
      config_line(config, "BLAS_INFO=").c_str(), config_line(config, "LAPACK_INFO=").c_str(),
      config_line(config, "USE_MKLDNN=").c_str(), config_line(config, "USE_OPENMP=").c_str());
  std::printf("BLAS loaded: %s\n", loaded_blas().c_str());
  std::printf("threads: %d (torch::set_num_threads; %d cores available to this process)\n",
              o.threads, available_cores());
  std::printf("DP step: %s; sigma=%.1f, C=%.1f, SGD lr=%.2f, loss cross-entropy (mean)\n",
              ("PerSampleGradientClipper(ConstantFlatClipper, norm method " +
               (o.norm_method.empty() ? std::string("auto") : o.norm_method) +
               ") + DPOptimizer(SGD, make_noise_source(seed), RDP accountant)")
                  .c_str(),
              kNoiseMultiplier, kMaxGradNorm, kLearningRate);
  std::printf(
      "timing: medians of per-step wall and CPU time, non-private and DP steps "
      "alternating in one process (budget %.1f s per row)\n",
      o.budget_s);
  std::printf("allocator: glibc malloc, %s\n",
              o.malloc_no_mmap ? "mmap disabled and no trimming (--malloc-no-mmap)"
                               : "default settings (large blocks mmapped and unmapped each time)");
  std::printf(
      "memory: peak anonymous RSS of steps 2..%d (VmHWM reset via /proc/self/clear_refs "
      "after a warm-up step, minus file-backed pages) minus the anonymous RSS before the "
      "first step; each variant alone in a fresh process\n",
      o.mem_steps);
  std::fflush(stdout);
}

int parent(const Options& o) {
  std::vector<Row> rows;
  if (o.rows.empty()) {
    rows = all_rows();
  } else {
    std::istringstream in(o.rows);
    std::string name;
    while (std::getline(in, name, ',')) rows.push_back(find_row(name));
  }
  print_environment(o);
  std::printf("\n");
  for (const auto& row : rows) {
    std::printf("%-9s %s, batch %lld\n", row.name.c_str(), row.what.c_str(),
                static_cast<long long>(row.batch));
  }
  std::printf("\n");
  std::fflush(stdout);
  struct Result {
    Row row;
    std::map<std::string, double> time, mem_np, mem_dp;
  };
  std::vector<Result> results;
  const auto t_start = Clock::now();
  for (const auto& row : rows) {
    std::fprintf(stderr, "[%5.1f s] %s ...\n", ms_since(t_start) / 1e3, row.name.c_str());
    Result r{row, run_child(o, "time", row.name, ""), run_child(o, "mem", row.name, "np"),
             run_child(o, "mem", row.name, "dp")};
    results.push_back(std::move(r));
  }
  bool reset_ok = true;
  std::printf(
      "| row | batch | steps | non-private ms | DP ms | time ratio | CPU-time ratio | "
      "page faults/step NP, DP | non-private peak MB | DP peak MB | memory ratio | "
      "tensor peak MB NP, DP | tensor ratio |\n");
  std::printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  for (const auto& r : results) {
    const double np = r.time.at("np_ms"), dp = r.time.at("dp_ms");
    const double mnp = r.mem_np.at("growth_kb") / 1024.0;
    const double mdp = r.mem_dp.at("growth_kb") / 1024.0;
    const double tnp = r.mem_np.at("tensor_peak_kb") / 1024.0;
    const double tdp = r.mem_dp.at("tensor_peak_kb") / 1024.0;
    reset_ok = reset_ok && r.mem_np.at("hwm_reset") > 0 && r.mem_dp.at("hwm_reset") > 0;
    std::printf(
        "| %s | %lld | %d | %.2f (%.2f-%.2f) | %.2f (%.2f-%.2f) | %.2f | %.2f | %.0f, %.0f "
        "| %.1f | %.1f | %.2f | %.1f, %.1f | %.2f |\n",
        r.row.name.c_str(), static_cast<long long>(r.row.batch),
        static_cast<int>(r.time.at("steps")), np, r.time.at("np_q25"), r.time.at("np_q75"), dp,
        r.time.at("dp_q25"), r.time.at("dp_q75"), dp / np,
        r.time.at("dp_cpu_ms") / r.time.at("np_cpu_ms"), r.time.at("np_faults"),
        r.time.at("dp_faults"), mnp, mdp, mdp / mnp, tnp, tdp, tdp / tnp);
  }
  std::printf(
      "\ntimes: median wall time per step (25th-75th percentile); time ratio = DP median "
      "/ non-private median; CPU-time ratio = the same with the process's CPU time (all "
      "threads), which time given to other processes does not inflate; page faults = median minor "
      "faults per "
      "step (fresh pages touched); peak MB = growth of the resident anonymous memory over a "
      "step after a warm-up step, in a fresh process per variant; tensor peak MB = the most "
      "bytes of CPU tensors alive at once during those steps, counting only tensors made from "
      "the warm-up step on (torch's allocator reports to a memory profiler)%s\n",
      reset_ok ? "" : "; WARNING: the peak-RSS reset failed, peaks include set-up");
  const auto dp_names = dp_stage_names();
  struct Measure {
    const char* suffix;  // of the child's keys
    const char* title;
    int decimals;
  };
  for (const Measure& m : {Measure{"", "wall-time ms", 2}, Measure{"_cpu", "CPU-time ms", 2},
                           Measure{"_faults", "page faults", 0}}) {
    std::printf(
        "\nStage breakdown, %s (median over 3 to %d staged steps per variant, within half "
        "the timing budget):\n\n",
        m.title, o.profile_steps);
    std::printf("| row | variant |");
    for (const auto& n : dp_names) std::printf(" %s |", n.c_str());
    std::printf(" total |\n|---|---|");
    for (size_t k = 0; k <= dp_names.size(); ++k) std::printf("---:|");
    std::printf("\n");
    for (const auto& r : results) {
      for (const bool dp : {false, true}) {
        const std::string prefix = dp ? "dp_stage_" : "np_stage_";
        std::printf("| %s | %s |", r.row.name.c_str(), dp ? "DP" : "non-private");
        double total = 0;
        for (const auto& n : dp_names) {
          const auto it = r.time.find(prefix + n + m.suffix);
          if (it == r.time.end()) {
            std::printf(" |");
          } else {
            std::printf(" %.*f |", m.decimals, it->second);
            total += it->second;
          }
        }
        std::printf(" %.*f |\n", m.decimals, total);
      }
    }
  }
  std::printf(
      "\nstages: forward = zero_grad + model forward + loss; rules = the tape's records "
      "turned into per-sample gradient rules (conv unfold, reshapes); norms = per-sample "
      "norms; clip+sum = clip factors and the clipped sums, added onto the noise that the "
      "accumulation starts from; noise = writing the N(0, sigma^2 C^2) tensors (timed apart, "
      "same shapes, and taken out of clip+sum); optimizer = the rest of the step (DP: the "
      "sums handed to .grad, SGD, accountant)\n");
  std::printf("\ntotal run time %.1f s\n", ms_since(t_start) / 1e3);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  CLI::App app{"Cost of a DP-SGD step next to a non-private step, model by model"};
  app.add_option("--threads", o.threads, "torch::set_num_threads (default: all available cores)")
      ->check(CLI::PositiveNumber);
  app.add_flag("--quick", o.quick, "fewer repetitions (~20-40 s in all)");
  app.add_option("--rows", o.rows,
                 "comma-separated rows: mlp-256, mlp-1024, cnn-256, cnn-1024, text-256, block-64, "
                 "lstm-128, encoder-32, resnet-64, cifar-cnn-256, textcnn-64");
  app.add_option("--norm-method", o.norm_method,
                 "auto|ghost|materialize: the clipper's norm method (GradSampleOptions; "
                 "default auto)")
      ->check(CLI::IsMember({"auto", "ghost", "materialize"}));
  app.add_flag("--malloc-no-mmap", o.malloc_no_mmap,
               "call dptorch::keep_freed_memory() first, as tools/dptrain does: glibc serves every "
               "allocation from its heap and never trims it, so large tensors reuse pages instead "
               "of faulting in fresh ones each step");
  app.add_option("--budget", o.budget_s, "timing seconds per row (default 12, quick 1)")
      ->check(CLI::PositiveNumber);
  app.add_option("--mem-steps", o.mem_steps,
                 "steps per memory measurement, the first a warm-up (default 3, quick 2)")
      ->check(CLI::Range(2, 1000));
  app.add_option("--profile-steps", o.profile_steps,
                 "staged steps per variant for the breakdown (default 7, quick 3)")
      ->check(CLI::PositiveNumber);
  app.add_option("--child", o.child, "internal: time|mem|loop")->group("");
  app.add_option("--steps", o.steps, "internal: steps of --child loop")->group("");
  app.add_option("--row", o.row, "internal: the row of a child")->group("");
  app.add_option("--variant", o.variant, "internal: np|dp")->group("");
  CLI11_PARSE(app, argc, argv);
  if (o.threads == 0) o.threads = available_cores();
  if (o.budget_s == 0) o.budget_s = o.quick ? 1.0 : 12;
  if (o.mem_steps == 0) o.mem_steps = o.quick ? 2 : 3;
  if (o.profile_steps == 0) o.profile_steps = o.quick ? 3 : 7;
  if (o.malloc_no_mmap) {
    dptorch::keep_freed_memory();
  }
  try {
    torch::set_num_threads(o.threads);
    if (o.child == "time") return child_time(o);
    if (o.child == "mem") return child_mem(o);
    if (o.child == "loop") return child_loop(o);
    if (!o.child.empty()) throw std::invalid_argument("--child must be time, mem or loop");
    return parent(o);
  } catch (const std::exception& e) {
    std::cerr << "dp_step_bench: error: " << e.what() << "\n";
    return 1;
  }
}
