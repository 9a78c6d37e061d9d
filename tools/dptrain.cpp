// dptrain: trains an image classifier on Fashion-MNIST with DP-SGD through dptorch's public API,
// and reports test accuracy with the (ε, δ) the run spent.
#include <dptorch/distributed/group.h>
#include <dptorch/dptorch.h>
#include <dptorch/io/atomic_file.h>
#include <dptorch/io/checked_file.h>

#include "dptrain_config.h"

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <optional>
#include <sstream>
#include <string_view>
#include <thread>

namespace {

namespace fs = std::filesystem;
namespace tnn = torch::nn;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

std::atomic<bool> g_interrupted{false};
// Test hook: behave as if Ctrl-C arrived after this many steps of this process (0: never).
int64_t g_stop_after_steps = 0;

// The training settings each model was tuned with (on a validation split of the training set,
// never the test set; README, "Measured"): what --epochs, --batch-size, --lr, --momentum,
// --max-grad-norm, --ema and --whitening default to for that --model.
struct ModelDefaults {
  double epochs, lr, momentum, max_grad_norm;
  int64_t batch_size;
  double ema, whitening;
};

ModelDefaults defaults_for(const std::string& model) {
  if (model == "scatter-linear") return {40, 16.0, 0.9, 0.1, 8192, 0.9, 1.0};
  // Tramèr & Boneh 2021's end-to-end CNN; also the scattering CNN, lstm and transformer.
  return {40, 4.0, 0.9, 0.1, 2048, 0.0, 0.0};
}

using dptrain::Config;
using dptrain::from_json;
using dptrain::to_json;

// Writes `parts`, one after the other, to `path` so that a crash leaves the old file or the new
// one, never a part (dptorch::io::write_file_atomically: fsync'ed, renamed, directory fsync'ed).
void write_file(const fs::path& path, std::initializer_list<std::string_view> parts) {
  dptorch::io::write_file_atomically(path.string(), parts);
}
void write_file(const fs::path& path, const std::string& text) { write_file(path, {text}); }

// The kinds of dptrain's checked files (dptorch::io::write_checked_file): a file is read back
// only if it is whole and of its kind. The feature cache's kind names the transform.
constexpr const char* kWhiteningKind = "whitening";
constexpr const char* kModelKind = "dptrain-model";
constexpr const char* kFeaturesKind = "scattering-J2-L8-28x28-float32";

// FNV-1a over a tensor's bytes: what identifies a data set in the feature cache.
uint64_t fingerprint(const torch::Tensor& t) {
  const auto c = t.contiguous();
  const auto* bytes = static_cast<const unsigned char*>(c.data_ptr());
  uint64_t h = 0xcbf29ce484222325ULL;
  for (size_t i = 0; i < c.nbytes(); ++i) h = (h ^ bytes[i]) * 0x100000001b3ULL;
  return h;
}

// Scattering features of `images` [N, 1, 28, 28], from `cache_dir` when it holds the features of
// exactly these images (the file's name holds the image count and a fingerprint of the images,
// its checked header the transform, and the size must match), else computed and, with a cache
// directory, written there as a checked file. A cached file that is damaged is computed again
// and replaced. An empty directory: computed in memory only.
torch::Tensor scattering_features(const torch::Tensor& images, const std::string& cache_dir) {
  dptorch::features::Scattering2D scattering(28, 28, /*J=*/2, /*L=*/8);
  const int64_t n = images.size(0);
  const std::vector<int64_t> sizes{n, scattering.channels(), scattering.out_height(),
                                   scattering.out_width()};
  std::ostringstream id;
  id << std::hex << fingerprint(images);
  const fs::path path =
      cache_dir.empty()
          ? fs::path()
          : fs::path(cache_dir) / ("scattering-" + std::to_string(n) + "-" + id.str() + ".bin");
  if (!path.empty() && fs::exists(path)) {
    try {
      auto bytes = std::make_unique<std::string>(
          dptorch::io::read_checked_file(path.string(), kFeaturesKind));
      const auto count = sizes[0] * sizes[1] * sizes[2] * sizes[3];
      if (bytes->size() == static_cast<size_t>(count) * sizeof(float)) {
        // The tensor keeps the bytes it was read into: no second copy of ~1 GB.
        void* data = bytes->data();
        return torch::from_blob(
            data, sizes, [owner = bytes.release()](void*) { delete owner; }, torch::kFloat);
      }
    } catch (const c10::Error&) {  // damaged or of an older format: computed again below
    }
  }
  auto features = scattering.forward(images.squeeze(1)).contiguous();
  if (!path.empty()) {
    fs::create_directories(path.parent_path());
    dptorch::io::write_checked_file(
        path.string(), kFeaturesKind,
        std::string_view(static_cast<const char*>(features.data_ptr()), features.nbytes()));
  }
  return features;
}

// An image's 28 rows as a sequence of 28 steps through an LSTM; its last state classifies.
struct RowLstmImpl : tnn::Module {
  RowLstmImpl() {
    lstm = register_module("lstm", dptorch::nn::LSTM(tnn::LSTMOptions(28, 128).batch_first(true)));
    head = register_module("head", dptorch::nn::Linear(128, 10));
  }
  torch::Tensor forward(const torch::Tensor& images) {  // [B, 1, 28, 28]
    auto [out, state] = lstm(images.flatten(1, 2));
    return head(std::get<0>(state)[0]);
  }
  dptorch::nn::LSTM lstm{nullptr};
  dptorch::nn::Linear head{nullptr};
};
TORCH_MODULE(RowLstm);

// A small encoder over the image's sixteen 7x7 patches as tokens (a learned position each);
// the mean token classifies.
struct PatchTransformerImpl : tnn::Module {
  static constexpr int64_t kPatch = 7, kTokens = 16, kWidth = 64;
  PatchTransformerImpl() {
    embed = register_module("embed", dptorch::nn::Linear(kPatch * kPatch, kWidth));
    position = register_module("position", dptorch::nn::Embedding(kTokens, kWidth));
    encoder = register_module(
        "encoder",
        dptorch::nn::TransformerEncoderLayer(
            tnn::TransformerEncoderLayerOptions(kWidth, 4).dim_feedforward(128).dropout(0.0)));
    head = register_module("head", dptorch::nn::Linear(kWidth, 10));
  }
  torch::Tensor forward(const torch::Tensor& images) {  // [B, 1, 28, 28]
    const int64_t B = images.size(0);
    auto patches = images.reshape({B, 4, kPatch, 4, kPatch})
                       .permute({0, 1, 3, 2, 4})
                       .reshape({B, kTokens, kPatch * kPatch});
    auto positions = torch::arange(kTokens, images.options().dtype(torch::kLong))
                         .unsqueeze(0)
                         .expand({B, kTokens});
    auto tokens = embed(patches) + position(positions);  // [B, 16, 64]
    auto encoded = encoder(tokens.transpose(0, 1));      // [16, B, 64]
    return head(encoded.mean(0));
  }
  dptorch::nn::Linear embed{nullptr}, head{nullptr};
  dptorch::nn::Embedding position{nullptr};
  dptorch::nn::TransformerEncoderLayer encoder{nullptr};
};
TORCH_MODULE(PatchTransformer);

// The scattering models' features: the 2-D scattering transform (J = 2, L = 8) of the raw
// [0, 1] images, 81 channels of 7x7, computed once per data set (Tramèr & Boneh 2021).
bool uses_scattering(const std::string& kind) { return kind.rfind("scatter-", 0) == 0; }
constexpr int64_t kScatterChannels = 81;

// The GroupNorm that starts the scattering models: 27 groups without parameters, so that each
// example's features are normalised on their own, which costs no privacy.
constexpr int64_t kScatterGroups = 27;

// The model of --model, built from dptorch layers. The scattering models start with the
// GroupNorm, unless their features come `whitened` (the GroupNorm and the whitening applied to
// them once, before training: run_whitening).
tnn::Sequential make_model(const std::string& kind, bool whitened) {
  if (kind == "lstm") return tnn::Sequential(RowLstm());
  if (kind == "transformer") return tnn::Sequential(PatchTransformer());
  if (kind == "cnn") {  // Tramèr & Boneh 2021, Table 9 (Fashion-MNIST end-to-end CNN).
    return tnn::Sequential(dptorch::nn::Conv2d(tnn::Conv2dOptions(1, 16, 8).stride(2).padding(2)),
                           tnn::Tanh(), tnn::MaxPool2d(tnn::MaxPool2dOptions(2).stride(1)),
                           dptorch::nn::Conv2d(tnn::Conv2dOptions(16, 32, 4).stride(2)),
                           tnn::Tanh(), tnn::MaxPool2d(tnn::MaxPool2dOptions(2).stride(1)),
                           tnn::Flatten(), dptorch::nn::Linear(32 * 4 * 4, 32), tnn::Tanh(),
                           dptorch::nn::Linear(32, 10));
  }
  tnn::Sequential model;
  if (!whitened) {
    model->push_back(dptorch::nn::GroupNorm(
        tnn::GroupNormOptions(kScatterGroups, kScatterChannels).affine(false)));
  }
  if (kind == "scatter-linear") {
    model->push_back(tnn::Flatten());
    model->push_back(dptorch::nn::Linear(kScatterChannels * 7 * 7, 10));
  } else {  // scatter-cnn: Tramèr & Boneh 2021's CNN on ScatterNet features, (F)MNIST
    model->push_back(
        dptorch::nn::Conv2d(tnn::Conv2dOptions(kScatterChannels, 16, 3).stride(2).padding(1)));
    model->push_back(tnn::Tanh());
    model->push_back(dptorch::nn::Conv2d(tnn::Conv2dOptions(16, 32, 3).padding(1)));
    model->push_back(tnn::Tanh());
    model->push_back(tnn::Flatten());
    model->push_back(dptorch::nn::Linear(32 * 4 * 4, 32));
    model->push_back(tnn::Tanh());
    model->push_back(dptorch::nn::Linear(32, 10));
  }
  return model;
}

// --whitening: the channel whitening of the GroupNorm-ed training features, from one private
// release of their sums (noise from the run's seed, or the OS's CSPRNG under --secure-rng),
// kept in the output directory as whitening.pt; a resumed run loads it from there. In a
// distributed job rank 0 fits (or loads) it and sends it to the others: the job releases the
// sums once.
dptorch::features::ChannelWhitening run_whitening(
    const torch::Tensor& train_x, const Config& config,
    const std::shared_ptr<dptorch::distributed::Group>& group, const fs::path& out, bool resume) {
  constexpr uint64_t kWhiteningSeedSalt = 0x5eed5ca77e2ULL;
  constexpr int64_t kFeatures = kScatterChannels * 7 * 7;
  const fs::path saved = out / "whitening.pt";
  const auto release = dptorch::features::channel_whitening_release(config.whitening_noise);
  dptorch::features::ChannelWhitening fitted{nullptr};
  // A run killed before it saved the whitening released nothing: a resumed one fits it anew.
  if ((!group || group->rank() == 0) && resume && fs::exists(saved)) {
    auto loaded = dptorch::features::ChannelWhitening(kScatterChannels, std::vector<int64_t>{7, 7});
    std::istringstream bytes(dptorch::io::read_checked_file(saved.string(), kWhiteningKind));
    torch::load(loaded, bytes);
    fitted = dptorch::features::ChannelWhitening(loaded->mean(), loaded->matrix(), release);
  } else if (!group || group->rank() == 0) {
    auto noise = dptorch::optim::make_noise_source(
        dptorch::optim::NoiseOptions()
            .secure_mode(config.secure_rng)
            .seed(config.secure_rng ? std::nullopt
                                    : std::optional<uint64_t>(config.seed ^ kWhiteningSeedSalt)));
    // After the GroupNorm, an example's features have norm at most √(its number of features).
    fitted = dptorch::features::fit_channel_whitening(
        torch::group_norm(train_x, kScatterGroups),
        dptorch::features::ChannelWhiteningOptions()
            .norm_bound(std::sqrt(static_cast<double>(kFeatures)))
            .noise_multiplier(config.whitening_noise)
            .regularization(config.whitening),
        *noise);
    std::ostringstream bytes;
    torch::save(fitted, bytes);
    dptorch::io::write_checked_file(saved.string(), kWhiteningKind, bytes.str());
  }
  if (!group) return fitted;
  // Rank 0's buffers, as raw float32 bytes.
  auto send = [&](const torch::Tensor& t) {
    return std::string(static_cast<const char*>(t.data_ptr()), t.numel() * sizeof(float));
  };
  const std::string mean_bytes = group->broadcast(fitted ? send(fitted->mean()) : std::string());
  const std::string matrix_bytes =
      group->broadcast(fitted ? send(fitted->matrix()) : std::string());
  if (fitted) return fitted;
  auto mean = torch::empty({kScatterChannels, 7, 7});
  auto matrix = torch::empty({kScatterChannels, kScatterChannels});
  TORCH_CHECK(mean_bytes.size() == mean.numel() * sizeof(float) &&
                  matrix_bytes.size() == matrix.numel() * sizeof(float),
              "rank 0 sent a whitening of the wrong size");
  std::memcpy(mean.data_ptr(), mean_bytes.data(), mean_bytes.size());
  std::memcpy(matrix.data_ptr(), matrix_bytes.data(), matrix_bytes.size());
  return dptorch::features::ChannelWhitening(mean, matrix, release);
}

// The scattering features after the models' GroupNorm and the whitening, computed once (a
// chunk at a time) so that training does not repeat the whitening's products every step.
torch::Tensor whiten(const torch::Tensor& features,
                     dptorch::features::ChannelWhitening& whitening) {
  torch::NoGradGuard no_grad;
  auto out = torch::empty_like(features);
  constexpr int64_t kChunk = 4096;
  for (int64_t begin = 0; begin < features.size(0); begin += kChunk) {
    const auto end = std::min(features.size(0), begin + kChunk);
    out.slice(0, begin, end)
        .copy_(
            whitening->forward(torch::group_norm(features.slice(0, begin, end), kScatterGroups)));
  }
  return out;
}

// Fashion-MNIST pixels standardised with the training set's mean and std.
constexpr double kMean = 0.2860, kStd = 0.3530;

torch::Tensor normalise(const torch::Tensor& images) { return (images - kMean) / kStd; }

// Test accuracy; in a distributed job each rank evaluates its share of the test set and the
// counts are summed, so every rank gets the job's accuracy.
// The exponential moving average of the parameters, θ̄ ← d·θ̄ + (1 − d)·θ after every step, kept
// as buffers of the model (so that checkpoints hold it): a post-processing of the private
// iterates, so it costs no privacy, and it averages away part of their noise (De et al. 2022).
class ParameterAverage {
 public:
  ParameterAverage(tnn::Sequential& model, double decay) : decay_(decay) {
    if (decay_ <= 0) return;
    torch::NoGradGuard no_grad;
    const auto params = model->parameters();
    for (size_t i = 0; i < params.size(); ++i) {
      params_.push_back(params[i]);
      averages_.push_back(
          model->register_buffer("average" + std::to_string(i), params[i].detach().clone()));
    }
  }
  void update() {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < params_.size(); ++i) {
      averages_[i].mul_(decay_).add_(params_[i].detach(), 1 - decay_);
    }
  }
  // Runs `f` with the averages in the parameters' place.
  template <typename F>
  auto evaluate_with(F&& f) {
    torch::NoGradGuard no_grad;
    for (size_t i = 0; i < params_.size(); ++i) swap(i);
    try {
      auto result = f();
      for (size_t i = 0; i < params_.size(); ++i) swap(i);
      return result;
    } catch (...) {
      for (size_t i = 0; i < params_.size(); ++i) swap(i);
      throw;
    }
  }

 private:
  void swap(size_t i) {
    auto held = params_[i].detach().clone();
    params_[i].detach().copy_(averages_[i]);
    averages_[i].copy_(held);
  }
  double decay_;
  std::vector<torch::Tensor> params_, averages_;
};

double accuracy(tnn::Sequential& model, const torch::Tensor& images, const torch::Tensor& labels,
                const std::shared_ptr<dptorch::distributed::Group>& group) {
  torch::NoGradGuard no_grad;
  model->eval();
  const int64_t n = images.size(0);
  const int64_t world = group ? group->world_size() : 1;
  const int64_t rank = group ? group->rank() : 0;
  int64_t correct = 0;
  for (int64_t begin = rank * n / world; begin < (rank + 1) * n / world; begin += 2000) {
    const int64_t end = std::min<int64_t>(begin + 2000, (rank + 1) * n / world);
    auto pred = model->forward(images.slice(0, begin, end)).argmax(1);
    correct += pred.eq(labels.slice(0, begin, end)).sum().item<int64_t>();
  }
  model->train();
  if (group) {
    std::vector<torch::Tensor> total{torch::tensor({static_cast<double>(correct)}, torch::kDouble)};
    group->all_reduce_sum(total);
    correct = static_cast<int64_t>(total[0].item<double>());
  }
  return static_cast<double>(correct) / static_cast<double>(n);
}

// One line of progress: a bar on a terminal, plain lines otherwise (CI logs).
class Progress {
 public:
  Progress(bool tty, std::string evaluated_on)
      : tty_(tty), evaluated_on_(std::move(evaluated_on)) {}
  void update(int epoch, int epochs, int64_t step, int64_t steps, double examples_per_s,
              double loss, double eps) {
    if (!tty_) return;
    constexpr int kWidth = 30;
    const int filled = static_cast<int>(kWidth * step / std::max<int64_t>(steps, 1));
    std::ostringstream line;
    line << "\repoch " << epoch << "/" << epochs << " [" << std::string(filled, '#')
         << std::string(kWidth - filled, '.') << "] " << step << "/" << steps << "  " << std::fixed
         << std::setprecision(0) << examples_per_s << " ex/s  loss " << std::setprecision(4)
         << loss;
    if (eps >= 0) line << "  eps " << std::setprecision(3) << eps;
    std::cout << line.str() << std::flush;
  }
  void end_epoch(int epoch, int epochs, double examples_per_s, double loss, double acc,
                 double eps) {
    std::ostringstream line;
    line << "epoch " << epoch << "/" << epochs << "  " << std::fixed << std::setprecision(0)
         << examples_per_s << " ex/s  loss " << std::setprecision(4) << loss << "  "
         << evaluated_on_ << " acc " << std::setprecision(2) << 100 * acc << "%";
    if (eps >= 0) line << "  eps " << std::setprecision(3) << eps;
    std::cout << (tty_ ? "\r\033[K" : "") << line.str() << "\n" << std::flush;
  }

 private:
  bool tty_;
  std::string evaluated_on_;
};

std::string svg_plot(const std::vector<json>& epochs, double target_eps) {
  const double W = 640, H = 360, L = 60, R = 60, T = 30, B = 50;
  const double n = std::max<double>(1, static_cast<double>(epochs.size()));
  double eps_max = target_eps > 0 ? target_eps : 0;
  for (const auto& e : epochs) eps_max = std::max(eps_max, e.value("epsilon", 0.0));
  if (eps_max <= 0) eps_max = 1;
  auto x = [&](double i) { return L + (W - L - R) * i / n; };
  auto y_acc = [&](double a) { return H - B - (H - T - B) * a; };
  auto y_eps = [&](double e) { return H - B - (H - T - B) * e / eps_max; };
  std::ostringstream s;
  s << std::fixed << std::setprecision(1);
  s << "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" << W << "\" height=\"" << H
    << "\" font-family=\"sans-serif\" font-size=\"12\">\n"
    << "<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    << "<text x=\"" << W / 2
    << "\" y=\"18\" text-anchor=\"middle\">dptrain: test accuracy and "
       "epsilon per epoch</text>\n"
    << "<line x1=\"" << L << "\" y1=\"" << H - B << "\" x2=\"" << W - R << "\" y2=\"" << H - B
    << "\" stroke=\"black\"/>\n"
    << "<line x1=\"" << L << "\" y1=\"" << T << "\" x2=\"" << L << "\" y2=\"" << H - B
    << "\" stroke=\"black\"/>\n"
    << "<line x1=\"" << W - R << "\" y1=\"" << T << "\" x2=\"" << W - R << "\" y2=\"" << H - B
    << "\" stroke=\"black\"/>\n";
  for (int k = 0; k <= 4; ++k) {
    const double f = k / 4.0;
    s << "<text x=\"" << L - 6 << "\" y=\"" << y_acc(f) + 4
      << "\" text-anchor=\"end\" fill=\"#1f77b4\">" << 100 * f << "%</text>\n"
      << "<text x=\"" << W - R + 6 << "\" y=\"" << y_eps(f * eps_max) + 4 << "\" fill=\"#d62728\">"
      << std::setprecision(2) << f * eps_max << std::setprecision(1) << "</text>\n";
  }
  s << "<text x=\"" << W / 2 << "\" y=\"" << H - 12 << "\" text-anchor=\"middle\">epoch</text>\n";
  std::ostringstream acc, eps;
  acc << std::fixed << std::setprecision(1);
  eps << std::fixed << std::setprecision(1);
  for (size_t i = 0; i < epochs.size(); ++i) {
    acc << x(static_cast<double>(i + 1)) << ","
        << y_acc(epochs[i].value("test_accuracy", epochs[i].value("validation_accuracy", 0.0)))
        << " ";
    if (epochs[i].contains("epsilon")) {
      eps << x(static_cast<double>(i + 1)) << "," << y_eps(epochs[i]["epsilon"].get<double>())
          << " ";
    }
  }
  s << "<polyline fill=\"none\" stroke=\"#1f77b4\" stroke-width=\"2\" points=\"" << acc.str()
    << "\"/>\n<polyline fill=\"none\" stroke=\"#d62728\" stroke-width=\"2\" points=\"" << eps.str()
    << "\"/>\n<text x=\"" << L + 8 << "\" y=\"" << T + 14
    << "\" fill=\"#1f77b4\">test accuracy</text>\n"
    << "<text x=\"" << L + 8 << "\" y=\"" << T + 30
    << "\" fill=\"#d62728\">epsilon (right axis)</text>\n"
    << "</svg>\n";
  return s.str();
}

// The share of a run's steps spent in the gradients' all-reduce, and what it sent.
struct AllReduceLog {
  double seconds = 0;
  int64_t bytes = 0;
  int64_t steps = 0;
};

int run(const Config& config, const fs::path& out, bool resume, int threads,
        const std::shared_ptr<dptorch::distributed::Group>& group) {
  torch::set_num_threads(threads);
  fs::create_directories(out);
  // Rank 0 (or the only process) prints, evaluates and writes the run's files; every rank
  // trains, and all write the checkpoint together.
  const bool lead = !group || group->rank() == 0;
  const int64_t world = group ? group->world_size() : 1;
  const auto start = Clock::now();

  dptorch::data::FashionMnist train_set(config.data_dir, dptorch::data::FashionMnist::Mode::kTrain);
  dptorch::data::FashionMnist test_set(config.data_dir, dptorch::data::FashionMnist::Mode::kTest);
  auto train_x = train_set.images();
  auto train_y = train_set.labels();
  auto test_x = test_set.images();
  auto test_y = test_set.labels();
  if (config.validation > 0) {
    // Tuning never sees the test set: the last N training examples stand in for it.
    const int64_t n = train_x.size(0);
    TORCH_CHECK_VALUE(config.validation < n, "--validation ", config.validation,
                      " holds out the whole training set of ", n,
                      " examples; hold out fewer (10000 is usual)");
    test_x = train_x.slice(0, n - config.validation);
    test_y = train_y.slice(0, n - config.validation);
    train_x = train_x.slice(0, 0, n - config.validation);
    train_y = train_y.slice(0, 0, n - config.validation);
  }
  if (config.train_subset > 0) {
    train_x = train_x.slice(0, 0, config.train_subset);
    train_y = train_y.slice(0, 0, config.train_subset);
  }
  const std::string evaluated_on = config.validation > 0 ? "validation" : "test";
  const std::string accuracy_key = evaluated_on + "_accuracy";
  if (uses_scattering(config.model)) {
    // Features of the raw images, once per data set (they do not depend on the model).
    const auto features_start = Clock::now();
    train_x = scattering_features(train_x, config.feature_cache);
    test_x = scattering_features(test_x, config.feature_cache);
    if (lead) {
      std::cout << "scattering features of " << train_x.size(0) + test_x.size(0) << " images in "
                << std::fixed << std::setprecision(1)
                << std::chrono::duration<double>(Clock::now() - features_start).count() << " s\n";
    }
  } else {
    train_x = normalise(train_x);
    test_x = normalise(test_x);
  }

  // The whitening's statistics are released once, before training; their ε joins the run's.
  dptorch::features::ChannelWhitening whitening{nullptr};
  if (config.whitening > 0) {
    whitening = run_whitening(train_x, config, group, out, resume);
    train_x = whiten(train_x, whitening);
    test_x = whiten(test_x, whitening);
  }

  torch::manual_seed(config.seed);
  auto model = make_model(config.model, static_cast<bool>(whitening));
  ParameterAverage average(model, config.ema);
  auto sgd = std::make_shared<torch::optim::SGD>(
      model->parameters(), torch::optim::SGDOptions(config.lr).momentum(config.momentum));

  dptorch::PrivacyOptions options;
  options.delta(config.delta)
      .epochs(config.epochs)
      .expected_batch_size(static_cast<double>(config.batch_size))
      .max_grad_norm(config.max_grad_norm)
      .accountant(config.accountant)
      .secure_mode(config.secure_rng);
  if (!config.secure_rng) options.seed(config.seed);
  options.group(group);
  if (config.clipping == "per-layer") options.clipping(dptorch::ClippingMode::kPerLayer);
  if (config.clipping == "adaptive") options.clipping(dptorch::ClippingMode::kAdaptive);
  if (config.clipping == "automatic") options.clipping(dptorch::ClippingMode::kAutomatic);
  if (config.noise_multiplier) {
    options.noise_multiplier(*config.noise_multiplier);
  } else {
    options.target_epsilon(config.epsilon);
  }
  if (config.budget && !config.no_privacy) {
    options.budget(dptorch::accounting::PrivacyBudget{*config.budget, config.delta});
  }
  if (whitening && !config.no_privacy) options.prior_releases({*whitening->release()});
  if (config.no_privacy) options.noise_multiplier(0.0).target_epsilon(std::nullopt);
  std::shared_ptr<dptorch::audit::GradientCanaries> canaries;
  if (config.audit > 0) {
    TORCH_CHECK_VALUE(!config.no_privacy, "--audit audits a private run; drop --no-privacy");
    TORCH_CHECK_VALUE(!resume,
                      "this run is audited, and the audit's canaries and scores are not saved in "
                      "checkpoints, so it cannot be resumed; start it again (or without --audit)");
    canaries = std::make_shared<dptorch::audit::GradientCanaries>(
        dptorch::audit::CanaryOptions(config.audit).seed(config.seed));
    options.audit(canaries);
  }

  dptorch::PrivacyEngine engine;
  auto training =
      engine.make_private(model, sgd, dptorch::data::TensorPairDataset(train_x, train_y), options);
  const auto& settings = training.settings;
  // Each rank's own randomness (none of these models draws any today) comes from the seed and
  // the rank; one process keeps torch's stream as it was.
  if (world > 1) torch::manual_seed(dptorch::distributed::rank_seed(config.seed, group->rank()));
  if (config.no_privacy) {
    // Same model and optimiser, no clipping and no noise: the dp layers run as plain torch.
    training.optimizer->clipper().close();
  }

  if (!config.no_privacy) {
    // The whole run must fit the budget before the first step is taken.
    auto planned = dptorch::accounting::make_accountant(settings.accountant);
    planned->set_history(settings.prior_releases);
    planned->step(settings.noise_multiplier, settings.sample_rate, settings.steps);
    const double planned_eps = planned->epsilon(config.delta);
    TORCH_CHECK_VALUE(planned_eps <= config.epsilon * (1 + 1e-9),
                      "the planned run would spend eps = ", planned_eps,
                      ", past the budget --epsilon ", config.epsilon,
                      "; raise --noise-multiplier, lower --epochs, or raise --epsilon");
  }

  std::vector<json> epochs_log;
  const fs::path checkpoint = out / "checkpoint.pt";
  // A run killed before its first checkpoint resumes from the start.
  if (resume && fs::exists(config.no_privacy ? out / "model.pt" : checkpoint)) {
    if (!config.no_privacy) {
      (void)engine.load_checkpoint(checkpoint.string(), training);
    } else {
      // One archive: the model, the optimiser and the loader's position, written together.
      const std::string saved = (out / "model.pt").string();
      torch::serialize::InputArchive archive;
      std::istringstream bytes(dptorch::io::read_checked_file(saved, kModelKind));
      try {
        archive.load_from(bytes);
        torch::serialize::InputArchive part;
        archive.read("model", part);
        model->load(part);
        archive.read("optimizer", part);
        sgd->load(part);
        c10::IValue position;
        archive.read("position", position);
        training.loader.set_position(position.toInt());
      } catch (const c10::Error& e) {
        TORCH_CHECK_VALUE(false, "cannot resume from ", saved, ": ",
                          dptorch::detail::first_line(e.what_without_backtrace()),
                          "; start the run again");
      }
    }
    // The epochs the checkpoint holds (a crash between checkpoint and metrics leaves none past).
    std::ifstream metrics(out / "metrics.jsonl");
    int64_t line_number = 0;
    for (std::string line; lead && std::getline(metrics, line);) {
      ++line_number;
      if (line.empty()) continue;
      const json entry = json::parse(line, nullptr, /*allow_exceptions=*/false);
      TORCH_CHECK_VALUE(
          entry.is_object() && entry.contains("steps") && entry["steps"].is_number_integer(),
          "cannot resume: line ", line_number, " of ", (out / "metrics.jsonl").string(),
          " is not an epoch's metrics; restore the file or start the run again");
      if (entry["steps"].get<int64_t>() <= training.loader.position()) epochs_log.push_back(entry);
    }
  } else if (lead) {
    write_file(out / "metrics.jsonl", std::string());
  }

  const int64_t per_epoch = settings.steps_per_epoch;
  const int64_t total_steps = settings.steps;
  const int epochs_total = static_cast<int>((total_steps + per_epoch - 1) / per_epoch);
  std::ostringstream header;
  header << "dptrain: Fashion-MNIST, " << train_x.size(0) << " training examples, "
         << (config.no_privacy ? "no privacy" : "DP-SGD") << ", " << total_steps
         << " steps of expected batch " << settings.expected_batch_size
         << " (q = " << settings.sample_rate << ")";
  if (!config.no_privacy) {
    header << ", sigma = " << settings.noise_multiplier << ", C = " << settings.max_grad_norm
           << ", " << settings.accountant << " accountant";
  }
  header << ", " << threads << " threads";
  if (world > 1) header << " in each of " << world << " processes";
  if (lead) std::cout << header.str() << "\n" << std::flush;

  auto save = [&] {
    if (config.no_privacy) {
      torch::serialize::OutputArchive archive, model_part, optimizer_part;
      model->save(model_part);
      sgd->save(optimizer_part);
      archive.write("model", model_part);
      archive.write("optimizer", optimizer_part);
      archive.write("position", c10::IValue(training.loader.position()));
      std::ostringstream bytes;
      archive.save_to(bytes);
      dptorch::io::write_checked_file((out / "model.pt").string(), kModelKind, bytes.str());
    } else {
      engine.save_checkpoint(checkpoint.string(), training);
    }
  };
  auto loss_fn = [](const torch::Tensor& logits, const torch::Tensor& y) {
    return torch::nn::functional::cross_entropy(logits, y);
  };

  Progress progress(lead && isatty(STDOUT_FILENO) != 0, evaluated_on);
  AllReduceLog allreduce;
  int64_t examples_seen = 0;
  int64_t steps_this_process = 0;
  double train_seconds = 0;
  // The budget ends the run before the step that would pass it (the optimiser would refuse that
  // step anyway); every rank sees the same history and stops at the same step.
  bool at_budget = false;
  auto budget_reached = [&] {
    at_budget = at_budget || (config.budget && !config.no_privacy &&
                              training.optimizer->steps_within_budget() == 0);
    return at_budget;
  };
  while (training.loader.position() < total_steps && !budget_reached()) {
    const int epoch = static_cast<int>(training.loader.position() / per_epoch) + 1;
    const int64_t epoch_end = std::min<int64_t>(epoch * per_epoch, total_steps);
    const double eps_before = config.no_privacy ? -1 : engine.epsilon(config.delta);
    const auto epoch_start = Clock::now();
    int64_t epoch_examples = 0;
    double loss_sum = 0;
    int64_t loss_count = 0;
    while (training.loader.position() < epoch_end && !budget_reached()) {
      if (g_stop_after_steps > 0 && steps_this_process == g_stop_after_steps) g_interrupted = true;
      // The ranks agree on stopping (every 10 steps: a small all-reduce), so that all save the
      // same step.
      bool stop = g_interrupted;
      if (group) {
        const bool ask = g_stop_after_steps > 0 || steps_this_process % 10 == 0;
        stop = ask && group->any(stop);
      }
      if (stop) {
        save();
        if (lead) {
          std::cout << "\ndptrain: interrupted; checkpoint saved. Resume with: dptrain --resume "
                    << out.string() << (world > 1 ? " --nproc " + std::to_string(world) : "")
                    << "\n";
        }
        return 130;
      }
      const auto batch = training.loader.next();
      const int64_t B = batch.data.size(0);
      const int64_t cap = config.max_physical_batch_size > 0 ? config.max_physical_batch_size
                                                             : std::max<int64_t>(B, 1);
      for (const auto& chunk : dptorch::data::physical_batches(batch, cap)) {
        if (chunk.data.size(0) == 0) continue;  // an empty batch: the step adds noise only
        auto loss = loss_fn(model->forward(chunk.data), chunk.target);
        loss.backward();
        loss_sum += loss.item<double>() * static_cast<double>(chunk.data.size(0));
        loss_count += chunk.data.size(0);
        if (config.no_privacy) continue;
        training.optimizer->accumulate();
      }
      if (config.no_privacy) {
        sgd->step();
        sgd->zero_grad();
      } else if (group) {
        const auto before = group->stats();
        training.optimizer->step();
        allreduce.seconds += group->stats().seconds_in_collectives - before.seconds_in_collectives;
        allreduce.bytes += group->stats().bytes_reduced - before.bytes_reduced;
        ++allreduce.steps;
      } else {
        training.optimizer->step();
      }
      average.update();
      epoch_examples += B;
      ++steps_this_process;
      const double secs = std::chrono::duration<double>(Clock::now() - epoch_start).count();
      progress.update(epoch, epochs_total, training.loader.position() - (epoch - 1) * per_epoch,
                      epoch_end - (epoch - 1) * per_epoch,
                      static_cast<double>(epoch_examples * world) / std::max(secs, 1e-9),
                      loss_sum / std::max<int64_t>(loss_count, 1), eps_before);
    }
    const double secs = std::chrono::duration<double>(Clock::now() - epoch_start).count();
    if (group) {
      // The job's examples and loss, not this rank's part alone (one small all-reduce an epoch).
      std::vector<torch::Tensor> totals{torch::tensor(
          {static_cast<double>(epoch_examples), loss_sum, static_cast<double>(loss_count)},
          torch::kDouble)};
      group->all_reduce_sum(totals);
      epoch_examples = static_cast<int64_t>(totals[0][0].item<double>());
      loss_sum = totals[0][1].item<double>();
      loss_count = static_cast<int64_t>(totals[0][2].item<double>());
    }
    train_seconds += secs;
    examples_seen += epoch_examples;
    const double acc =
        average.evaluate_with([&] { return accuracy(model, test_x, test_y, group); });
    if (!lead) {
      save();
      continue;
    }
    const double eps = config.no_privacy ? -1 : engine.epsilon(config.delta);
    json entry = {{"epoch", epoch},
                  {"steps", training.loader.position()},
                  {"train_loss", loss_sum / std::max<int64_t>(loss_count, 1)},
                  {accuracy_key, acc},
                  {"examples_per_second", epoch_examples / std::max(secs, 1e-9)},
                  {"seconds", secs}};
    if (!config.no_privacy) entry["epsilon"] = eps;
    epochs_log.push_back(entry);
    // The checkpoint first, then the whole metrics file again (a crash leaves the old lines or
    // the new ones; one that falls between the two loses this epoch's line, never repeats it).
    save();
    std::string lines;
    for (const auto& e : epochs_log) lines += e.dump() + "\n";
    write_file(out / "metrics.jsonl", lines);
    progress.end_epoch(epoch, epochs_total, entry["examples_per_second"], entry["train_loss"], acc,
                       eps);
  }

  // Each rank's time in the gradients' all-reduce (waiting for slower ranks included).
  std::vector<double> allreduce_per_rank;
  if (group) {
    std::vector<torch::Tensor> mine{torch::zeros({world}, torch::kDouble)};
    mine[0][group->rank()] = allreduce.seconds;
    group->all_reduce_sum(mine);
    for (int64_t r = 0; r < world; ++r) allreduce_per_rank.push_back(mine[0][r].item<double>());
  }
  const double acc = average.evaluate_with([&] { return accuracy(model, test_x, test_y, group); });
  if (!lead) return 0;
  const double wall = std::chrono::duration<double>(Clock::now() - start).count();
  json report = {{accuracy_key, acc},
                 {"private", !config.no_privacy},
                 {"delta", config.delta},
                 {"noise_multiplier", settings.noise_multiplier},
                 {"sample_rate", settings.sample_rate},
                 {"steps", training.loader.position()},
                 {"epochs", config.epochs},
                 {"expected_batch_size", settings.expected_batch_size},
                 {"max_grad_norm", settings.max_grad_norm},
                 {"accountant", settings.accountant},
                 {"wall_seconds", wall},
                 {"train_seconds", train_seconds},
                 {"examples_per_second", examples_seen / std::max(train_seconds, 1e-9)},
                 {"threads", threads},
                 {"config", to_json(config)}};
  if (!config.no_privacy) {
    const double eps = engine.epsilon(config.delta);
    report["epsilon"] = eps;
    // The ledger (every segment of the run) and ε under every accountant, for a reader to check.
    const auto& history = engine.accountant()->history();
    json ledger = json::array();
    const auto releases =
        static_cast<std::ptrdiff_t>(std::min(settings.prior_releases.size(), history.size()));
    for (const auto& s : dptorch::accounting::ledger_of({history.begin() + releases, history.end()},
                                                        settings.max_grad_norm, config.clipping)) {
      ledger.push_back({{"sampler", s.sampler},
                        {"noise_multiplier", s.noise_multiplier},
                        {"sample_rate", s.sample_rate},
                        {"steps", s.steps},
                        {"max_grad_norm", s.max_grad_norm},
                        {"clipping", s.clipping}});
    }
    report["privacy_ledger"] = ledger;
    if (whitening) {
      // The features' statistics, released once before training (fit_channel_whitening).
      report["feature_release"] = {
          {"what", "mean and channel covariance of the scattering features (--whitening)"},
          {"mechanism", "gaussian"},
          {"noise_multiplier", whitening->release()->noise_multiplier},
          {"regularization", config.whitening}};
    }
    json by_accountant = json::object();
    for (const auto& [name, e] :
         dptorch::accounting::epsilon_by_accountant(history, config.delta)) {
      by_accountant[name] = std::isfinite(e) ? json(e) : json(nullptr);
    }
    report["epsilon_by_accountant"] = by_accountant;
    // Adaptive clipping moves the bound during training: no single C to state.
    std::string statement = dptorch::accounting::privacy_statement(
        eps, config.delta, settings.accountant, "poisson",
        config.clipping == "adaptive" ? 0.0 : settings.max_grad_norm);
    if (whitening) {
      std::ostringstream release;
      release << " Epsilon also counts one release, before training, of the training features' "
                 "mean and channel covariance (the Gaussian mechanism with noise multiplier "
              << whitening->release()->noise_multiplier << ").";
      statement += release.str();
    }
    report["privacy_statement"] = statement;
    std::cout << statement << "\n";
  }
  if (canaries) {
    const auto found = canaries->result(config.delta);
    report["audit"] = {{"canaries", found.canaries},
                       {"steps", found.steps},
                       {"guesses", found.guesses},
                       {"correct", found.correct},
                       {"confidence", found.confidence},
                       {"delta", found.delta},
                       {"epsilon_lower_bound", found.epsilon_lower_bound}};
    std::cout << "audit: epsilon >= " << found.epsilon_lower_bound << " at delta " << found.delta
              << " with " << 100 * found.confidence << "% confidence (" << found.correct << " of "
              << found.guesses << " guesses right about " << found.canaries
              << " gradient canaries over " << found.steps
              << " steps); the accountant's epsilon is " << engine.epsilon(config.delta) << "\n";
  }
  if (config.budget && !config.no_privacy) {
    report["budget"] = {{"epsilon", *config.budget}, {"delta", config.delta}};
    report["stopped_at_budget"] = at_budget;
    if (at_budget) {
      std::cout << "dptrain: stopped at the privacy budget after " << training.loader.position()
                << " steps: epsilon " << engine.epsilon(config.delta) << " at delta "
                << config.delta << " (budget " << *config.budget
                << "); one more step would have passed it\n";
    }
  }
  if (world > 1) {
    const int64_t n = std::max<int64_t>(allreduce.steps, 1);
    report["processes"] = world;
    report["allreduce_seconds"] = allreduce.seconds;
    report["allreduce_share"] = allreduce.seconds / std::max(train_seconds, 1e-9);
    report["allreduce_seconds_per_rank"] = allreduce_per_rank;
    report["allreduce_bytes_per_step"] = allreduce.bytes / n;
  }
  write_file(out / "report.json", report.dump(2) + "\n");
  write_file(out / "plot.svg", svg_plot(epochs_log, config.no_privacy ? 0 : config.epsilon));

  std::cout << std::fixed << "\n== dptrain report ==\n"
            << evaluated_on << " accuracy" << std::string(evaluated_on == "test" ? 3 : 1, ' ')
            << std::setprecision(2) << 100 * acc << "%\n";
  if (!config.no_privacy) {
    std::cout << "privacy         eps = " << std::setprecision(3) << engine.epsilon(config.delta)
              << ", delta = " << std::scientific << std::setprecision(0) << config.delta
              << std::fixed << " (" << settings.accountant << ")\n"
              << "noise           sigma = " << std::setprecision(4) << settings.noise_multiplier
              << ", C = " << settings.max_grad_norm << "\n";
  } else {
    std::cout << "privacy         none (--no-privacy)\n";
  }
  std::cout << "sampling        q = " << std::setprecision(6) << settings.sample_rate << ", "
            << training.loader.position() << " steps\n"
            << "time            " << std::setprecision(1) << wall << " s wall, "
            << std::setprecision(0) << examples_seen / std::max(train_seconds, 1e-9)
            << " examples/s\n";
  if (world > 1) {
    std::cout << "processes       " << world << ", all-reduce " << std::setprecision(1)
              << 100 * allreduce.seconds / std::max(train_seconds, 1e-9)
              << "% of rank 0's training time (waiting for slower ranks included), "
              << std::setprecision(0) << allreduce.bytes / std::max<int64_t>(allreduce.steps, 1)
              << " bytes per step\n";
  }
  std::cout << "outputs         " << out.string() << "/{report.json, metrics.jsonl, plot.svg, "
            << (config.no_privacy ? "model.pt" : "checkpoint.pt")
            << (whitening ? ", whitening.pt" : "") << "}\n";
  return 0;
}

std::atomic<bool> g_launcher_terminated{false};

// dptrain --nproc N: starts N copies of this program as the ranks of one job on 127.0.0.1
// (torchrun's variables in their environment, `args` without --nproc), and waits for them. When
// a rank fails, the others stop on their own (at once, or within the collectives' timeout if one
// hangs); any still running `grace` after a rank failed are killed. SIGTERM to the launcher is
// passed on to the ranks. Exits as the rank that caused the failure did (0 if none failed).
int launch(int nproc, const std::vector<std::string>& args, int port,
           std::chrono::milliseconds grace) {
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  std::vector<std::string> env_base;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string kv = *e;
    const std::string key = kv.substr(0, kv.find('='));
    if (key != "RANK" && key != "WORLD_SIZE" && key != "LOCAL_RANK" && key != "MASTER_ADDR" &&
        key != "MASTER_PORT") {
      env_base.push_back(kv);
    }
  }
  // c10d logs through glog: keep its warnings off the ranks' stderr (the ranks' own errors say
  // what failed) unless the user asked for them.
  if (std::getenv("GLOG_minloglevel") == nullptr) env_base.push_back("GLOG_minloglevel=3");
  std::signal(SIGINT, SIG_IGN);  // Ctrl-C reaches the ranks, which save and stop together
  struct sigaction term {};
  term.sa_handler = [](int) { g_launcher_terminated = true; };  // no SA_RESTART: wakes waitpid
  ::sigaction(SIGTERM, &term, nullptr);
  const pid_t launcher = ::getpid();
  std::vector<pid_t> pids;
  auto signal_all = [&](int sig) {
    for (pid_t pid : pids) {
      if (pid > 0) ::kill(pid, sig);
    }
  };
  for (int rank = 0; rank < nproc; ++rank) {
    auto env = env_base;
    for (const auto& kv :
         {"RANK=" + std::to_string(rank), "LOCAL_RANK=" + std::to_string(rank),
          "WORLD_SIZE=" + std::to_string(nproc), std::string("MASTER_ADDR=127.0.0.1"),
          "MASTER_PORT=" + std::to_string(port)}) {
      env.push_back(kv);
    }
    std::vector<std::string> argv_s{self};
    argv_s.insert(argv_s.end(), args.begin(), args.end());
    std::vector<char*> argv, envp;
    for (auto& a : argv_s) argv.push_back(a.data());
    argv.push_back(nullptr);
    for (auto& kv : env) envp.push_back(kv.data());
    envp.push_back(nullptr);
    const pid_t pid = ::fork();
    if (pid < 0) {
      signal_all(SIGKILL);
      throw std::runtime_error("cannot start rank " + std::to_string(rank) + " of " +
                               std::to_string(nproc) + ": " + std::strerror(errno));
    }
    if (pid == 0) {
      std::signal(SIGINT, SIG_DFL);
      std::signal(SIGTERM, SIG_DFL);
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);       // a rank never outlives its launcher,
      if (::getppid() != launcher) ::_exit(1);  // even one that died before the line above
      ::execve(argv[0], argv.data(), envp.data());
      ::_exit(127);
    }
    pids.push_back(pid);
  }
  std::vector<int> status(pids.size(), 0);
  std::vector<bool> killed(pids.size(), false);
  size_t running = pids.size();
  bool failing = false;  // a rank failed: the others have until `deadline`
  auto deadline = Clock::now();
  bool forwarded = false;
  while (running > 0) {
    if (g_launcher_terminated && !forwarded) {
      signal_all(SIGTERM);
      forwarded = true;
    }
    int raw = 0;
    const pid_t pid = ::waitpid(-1, &raw, failing ? WNOHANG : 0);
    const auto it = std::find(pids.begin(), pids.end(), pid);
    if (pid > 0 && it != pids.end()) {
      --running;
      const auto rank = static_cast<size_t>(it - pids.begin());
      status[rank] = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
      *it = -1;
      if (status[rank] != 0 && status[rank] != 130 && !failing) {
        failing = true;
        deadline = Clock::now() + grace;
      }
      continue;
    }
    if (failing && Clock::now() > deadline) {
      for (size_t r = 0; r < pids.size(); ++r) {
        if (pids[r] <= 0) continue;
        std::cerr << "dptrain: rank " << r << " did not stop within "
                  << std::chrono::duration<double>(grace).count()
                  << " s of the job's failure; killing it\n";
        ::kill(pids[r], SIGKILL);
        killed[r] = true;
      }
      failing = false;
    } else if (failing) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  // The rank to report: one that failed on its own (status 1 is a rank stopping because another
  // failed), else one that had to be killed, else the first that failed.
  int culprit = -1;
  for (size_t r = 0; r < status.size() && culprit < 0; ++r) {
    if (status[r] != 0 && status[r] != 1 && status[r] != 130 && !killed[r])
      culprit = static_cast<int>(r);
  }
  for (size_t r = 0; r < status.size() && culprit < 0; ++r) {
    if (killed[r]) culprit = static_cast<int>(r);
  }
  for (size_t r = 0; r < status.size() && culprit < 0; ++r) {
    if (status[r] != 0) culprit = static_cast<int>(r);
  }
  if (culprit < 0) return 0;
  const int result = status[static_cast<size_t>(culprit)];
  if (result != 130) {
    std::cerr << "dptrain: the job failed: rank " << culprit << " of " << nproc
              << (killed[static_cast<size_t>(culprit)]
                      ? " hung and was killed"
                      : " exited with status " + std::to_string(result))
              << "\n";
  }
  return result == 130 ? 130 : (result == 0 ? 1 : result);
}

}  // namespace

int main(int argc, char** argv) {
  // Every step allocates and frees tensors of tens of MB. glibc returns such blocks to the OS
  // at once (mmap/munmap), and on virtual machines the page faults of re-touching them cost more
  // than the arithmetic (measured here: 0.8 s per 88 MB). Keep freed memory in the heap instead.
  dptorch::keep_freed_memory();
  CLI::App app{"dptrain: differentially private training on Fashion-MNIST (DP-SGD)."};
  Config config;
  std::string out = "dptrain-out", resume_dir, clipping = config.clipping;
  double noise_multiplier = -1;
  int threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  app.add_option("--epsilon", config.epsilon, "target epsilon; sigma is calibrated to reach it")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--delta", config.delta, "target delta")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--epochs", config.epochs,
                 "training epochs (default: the value tuned for --model)")
      ->check(CLI::PositiveNumber);
  app.add_option("--batch-size", config.batch_size,
                 "expected (Poisson) batch size (default: the value tuned for --model)")
      ->check(CLI::PositiveNumber);
  app.add_option("--lr", config.lr, "SGD learning rate (default: the value tuned for --model)")
      ->check(CLI::PositiveNumber);
  app.add_option("--momentum", config.momentum,
                 "SGD momentum (default: the value tuned for --model)")
      ->check(CLI::Range(0.0, 1.0));
  app.add_option("--max-grad-norm", config.max_grad_norm,
                 "per-sample gradient norm bound C (default: the value tuned for --model)")
      ->check(CLI::PositiveNumber);
  app.add_option("--budget", config.budget,
                 "privacy budget: training stops before the step that would spend more than this "
                 "epsilon at --delta (also across --resume), and the report says so")
      ->check(CLI::PositiveNumber);
  auto* sigma_opt = app.add_option("--noise-multiplier", noise_multiplier,
                                   "noise multiplier sigma, instead of --epsilon")
                        ->check(CLI::NonNegativeNumber);
  app.add_option("--accountant", config.accountant, "privacy accountant")
      ->capture_default_str()
      ->check(CLI::IsMember(dptorch::accounting::accountant_names()));
  app.add_option("--clipping", clipping,
                 "per-sample clipping: flat (at C), per-layer (C/sqrt(L) per parameter), adaptive "
                 "(C follows a private quantile), automatic (every gradient normalised to C)")
      ->capture_default_str()
      ->check(CLI::IsMember({"flat", "per-layer", "adaptive", "automatic"}));
  app.add_option("--model", config.model,
                 "cnn (two convolutions), scatter-linear (a linear model on scattering features), "
                 "scatter-cnn (a small CNN on them), lstm (an image's rows as 28 steps), or "
                 "transformer (an encoder layer over 7x7 patches)")
      ->capture_default_str()
      ->check(CLI::IsMember({"cnn", "scatter-linear", "scatter-cnn", "lstm", "transformer"}));
  auto* seed_opt = app.add_option("--seed", config.seed, "seed of the model, sampler and noise")
                       ->capture_default_str();
  app.add_option("--threads", threads, "CPU threads")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--out", out, "output directory")->capture_default_str();
  auto* resume_opt =
      app.add_option("--resume", resume_dir, "continue the run saved in this directory");
  auto* no_privacy = app.add_flag("--no-privacy", config.no_privacy,
                                  "train the same model without privacy, for comparison");
  auto* secure = app.add_flag("--secure-rng", config.secure_rng,
                              "cryptographically secure noise and sampling (refuses --seed)");
  app.add_option("--train-subset", config.train_subset,
                 "train on the first N examples only (0: all); for quick checks")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--max-physical-batch-size", config.max_physical_batch_size,
                 "split logical batches into physical ones of at most this size (0: no split)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--audit", config.audit,
                 "audit the run in one training run: N gradient canaries (each in the run with "
                 "probability 1/2) give an epsilon lower bound at 95% confidence, reported next to "
                 "the accountant's epsilon (Steinke, Nasr & Jagielski 2023)")
      ->check(CLI::PositiveNumber);
  app.add_option("--validation", config.validation,
                 "hold out the last N training examples and report accuracy on them instead of "
                 "the test set (for choosing hyper-parameters; 0: evaluate on the test set)")
      ->capture_default_str()
      ->check(CLI::NonNegativeNumber);
  app.add_option("--feature-cache", config.feature_cache,
                 "directory that keeps the scattering models' features between runs; a cached file "
                 "is used only if it was made from the same images (default: none, computed each "
                 "run)");
  app.add_option("--ema", config.ema,
                 "evaluate (and report) the exponential moving average of the parameters with this "
                 "decay, e.g. 0.9 (post-processing: no privacy cost; default: the value tuned for "
                 "--model, 0 = the last parameters)")
      ->check(CLI::Range(0.0, 0.9999));
  app.add_option("--whitening", config.whitening,
                 "scattering models: centre the features and whiten them across channels, with "
                 "(Σ + λI)^(-1/2) of their covariance Σ, from statistics released privately once "
                 "before training (their ε is counted in the run's); this sets λ > 0 (default: the "
                 "value tuned for --model, 0 = none)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--whitening-noise", config.whitening_noise,
                 "noise multiplier of the whitening's released sums (larger: less ε, a noisier "
                 "estimate)")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--data-dir", config.data_dir, "Fashion-MNIST directory (gzip IDX files)")
      ->capture_default_str();
  int nproc = 1, master_port = 0;
  double timeout_s = 60;
  app.add_option("--nproc", nproc,
                 "train with N processes on this host (a distributed job over c10d on 127.0.0.1); "
                 "on several hosts, start dptrain with torchrun's environment instead")
      ->capture_default_str()
      ->check(CLI::Range(1, 256));
  app.add_option("--master-port", master_port,
                 "TCP port of the job's store with --nproc (default: a free one)")
      ->check(CLI::Range(1, 65535));
  app.add_option("--timeout", timeout_s,
                 "seconds a rank waits for the others before the job stops with an error")
      ->capture_default_str()
      ->check(CLI::PositiveNumber);
  app.add_option("--stop-after-steps", g_stop_after_steps,
                 "testing: stop as on Ctrl-C after this many steps")
      ->group("");  // hidden
  secure->excludes(seed_opt);
  sigma_opt->excludes(no_privacy);
  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::ParseError& e) {
    std::cerr << "dptrain: error: " << e.what() << " (see --help)\n";
    return 2;
  }
  if (*sigma_opt) config.noise_multiplier = noise_multiplier;
  const auto tuned = defaults_for(config.model);
  if (app.count("--epochs") == 0) config.epochs = tuned.epochs;
  if (app.count("--batch-size") == 0) config.batch_size = tuned.batch_size;
  if (app.count("--lr") == 0) config.lr = tuned.lr;
  if (app.count("--momentum") == 0) config.momentum = tuned.momentum;
  if (app.count("--max-grad-norm") == 0) config.max_grad_norm = tuned.max_grad_norm;
  if (app.count("--ema") == 0) config.ema = tuned.ema;
  if (app.count("--whitening") == 0) config.whitening = tuned.whitening;
  if (config.no_privacy && app.count("--lr") == 0) config.lr = 0.05;  // no clipping: a usual lr
  config.clipping = clipping;

  if (config.whitening > 0 && !uses_scattering(config.model)) {
    std::cerr << "dptrain: error: --whitening whitens the scattering features; use it with "
                 "--model scatter-linear or scatter-cnn, or drop it\n";
    return 2;
  }
  if (nproc > 1 && config.no_privacy) {
    std::cerr << "dptrain: error: --nproc trains privately; run --no-privacy in one process\n";
    return 2;
  }
  const auto timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  const bool is_rank = dptorch::distributed::environment_is_distributed();
  if (nproc > 1 && !is_rank) {
    // The launcher: the ranks get the same arguments without --nproc (and a share of the cores).
    std::vector<std::string> args;
    for (int i = 1; i < argc; ++i) {
      const std::string a = argv[i];
      if (a == "--nproc") {
        ++i;
        continue;
      }
      if (a.rfind("--nproc=", 0) == 0) continue;
      args.push_back(a);
    }
    if (app.count("--threads") == 0) {
      const unsigned cores = std::max(1u, std::thread::hardware_concurrency());
      args.push_back("--threads");
      args.push_back(std::to_string(std::max(1u, cores / static_cast<unsigned>(nproc))));
    }
    try {
      const int port =
          master_port > 0 ? master_port : static_cast<int>(dptorch::distributed::free_port());
      return launch(nproc, args, port, std::chrono::seconds(10));
    } catch (const std::exception& e) {
      std::cerr << "dptrain: error: " << e.what() << "\n";
      return 1;
    }
  }

  std::signal(SIGINT, [](int) { g_interrupted = true; });
  std::signal(SIGTERM, [](int) { g_interrupted = true; });
  std::shared_ptr<dptorch::distributed::Group> group;
  try {
    if (is_rank) {
      TORCH_CHECK_VALUE(!config.no_privacy,
                        "a distributed job trains privately; run --no-privacy in one process");
      auto group_options = dptorch::distributed::options_from_environment(timeout);
      TORCH_CHECK_VALUE(nproc == 1 || nproc == group_options.world_size(), "--nproc ", nproc,
                        " differs from WORLD_SIZE ", group_options.world_size());
      group = dptorch::distributed::Group::connect(group_options);
    }
    bool resume = false;
    if (*resume_opt) {
      bool others = false;
      for (const auto* opt : app.get_options()) {
        const std::string name = opt->get_name();
        others = others || (opt->count() > 0 && name != "--resume" && name != "--threads" &&
                            name != "--nproc" && name != "--master-port" && name != "--timeout" &&
                            name != "--stop-after-steps");
      }
      if (others) {
        std::cerr << "dptrain: error: --resume takes the run's saved settings; give only "
                     "--resume DIR (and --threads, --nproc, --master-port, --timeout)\n";
        return 2;
      }
      std::ifstream in(fs::path(resume_dir) / "config.json");
      if (!in) {
        std::cerr
            << "dptrain: error: " << resume_dir
            << " holds no dptrain run (no config.json); resume a directory that a run wrote\n";
        return 2;
      }
      const std::string config_path = (fs::path(resume_dir) / "config.json").string();
      try {
        config = from_json(json::parse(in));
      } catch (const std::exception& e) {  // the JSON parser's, or check()'s
        const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
        const std::string what = c10_error ? c10_error->what_without_backtrace() : e.what();
        std::cerr << "dptrain: error: " << config_path << " is not a dptrain run's settings ("
                  << dptorch::detail::printable(dptorch::detail::first_line(what))
                  << "); restore it or start the run again\n";
        return 2;
      }
      out = resume_dir;
      resume = true;
    } else if (!group || group->rank() == 0) {
      fs::create_directories(out);
      write_file(fs::path(out) / "config.json", to_json(config).dump(2) + "\n");
    }
    return run(config, out, resume, threads, group);
  } catch (const dptorch::distributed::RankFailure& e) {
    // Another rank failed: this one stops too, naming it, without waiting on the dead.
    std::cerr << "dptrain: error (rank " << group->rank() << "): " << e.what() << "\n";
    dptorch::distributed::exit_after_failure(group, 1, e.failed_rank());
  } catch (const c10::Error& e) {
    std::string what = e.what_without_backtrace();
    what = what.substr(0, what.find('\n'));
    if (!group) {
      std::cerr << "dptrain: error: " << what << "\n";
      return 2;
    }
    group->fail(what);
    std::cerr << "dptrain: error (rank " << group->rank() << "): " << what << "\n";
    dptorch::distributed::exit_after_failure(group, 2, group->rank());
  } catch (const std::exception& e) {
    if (!group) {
      std::cerr << "dptrain: error: " << e.what() << "\n";
      return 2;
    }
    group->fail(e.what());
    std::cerr << "dptrain: error (rank " << group->rank() << "): " << e.what() << "\n";
    dptorch::distributed::exit_after_failure(group, 2, group->rank());
  }
}
