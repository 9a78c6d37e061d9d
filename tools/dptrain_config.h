#pragma once

// dptrain's run settings and their config.json form (a header of its own so that the fuzz target
// of config.json parses it exactly as dptrain does).

#include <dptorch/data/fashion_mnist.h>

#include <c10/util/Exception.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

namespace dptrain {

using json = nlohmann::json;

// Everything that defines a run; saved as config.json so that --resume rebuilds the same run.
struct Config {
  double epsilon = 3.0;
  std::optional<double> noise_multiplier;
  std::optional<double> budget;  // ε at delta that training stops before passing
  double delta = 1e-5;
  double epochs = 40;
  int64_t batch_size = 2048;
  double lr = 4.0;
  double momentum = 0.9;
  double max_grad_norm = 0.1;
  std::string accountant = "prv";
  std::string clipping = "flat";
  std::string model = "scatter-linear";
  uint64_t seed = 0;
  bool no_privacy = false;
  bool secure_rng = false;
  int64_t train_subset = 0;  // 0: the whole training set
  int64_t max_physical_batch_size = 0;
  int64_t audit = 0;          // gradient canaries of the one-run audit (0: no audit)
  int64_t validation = 0;     // hold out the last N training examples and evaluate on them
  std::string feature_cache;  // where scattering features are kept between runs ("": nowhere)
  double ema = 0;             // decay of the parameters' moving average that is evaluated (0: none)
  double whitening = 0;       // λ of the scattering features' private whitening (0: none)
  double whitening_noise = 20;  // σ of the whitening's released sums
  std::string data_dir = dptorch::data::FashionMnist::kDefaultRoot;
};

inline json to_json(const Config& c) {
  json j = {{"epsilon", c.epsilon},
            {"delta", c.delta},
            {"epochs", c.epochs},
            {"batch_size", c.batch_size},
            {"lr", c.lr},
            {"momentum", c.momentum},
            {"max_grad_norm", c.max_grad_norm},
            {"accountant", c.accountant},
            {"clipping", c.clipping},
            {"model", c.model},
            {"seed", c.seed},
            {"no_privacy", c.no_privacy},
            {"secure_rng", c.secure_rng},
            {"train_subset", c.train_subset},
            {"max_physical_batch_size", c.max_physical_batch_size},
            {"audit", c.audit},
            {"validation", c.validation},
            {"feature_cache", c.feature_cache},
            {"ema", c.ema},
            {"whitening", c.whitening},
            {"whitening_noise", c.whitening_noise},
            {"data_dir", c.data_dir}};
  j["noise_multiplier"] = c.noise_multiplier ? json(*c.noise_multiplier) : json(nullptr);
  j["budget"] = c.budget ? json(*c.budget) : json(nullptr);
  return j;
}

// Refuses settings dptrain's options would have refused (a hand-edited or corrupt config.json),
// naming the field and what it must be.
inline void check(const Config& c) {
  const auto positive = [](const char* name, double v) {
    TORCH_CHECK_VALUE(std::isfinite(v) && v > 0, "\"", name, "\" must be a number > 0, but is ", v);
  };
  const auto non_negative = [](const char* name, double v) {
    TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0, "\"", name, "\" must be a number >= 0, but is ",
                      v);
  };
  positive("epsilon", c.epsilon);
  if (c.noise_multiplier) non_negative("noise_multiplier", *c.noise_multiplier);
  if (c.budget) positive("budget", *c.budget);
  TORCH_CHECK_VALUE(c.delta > 0 && c.delta < 1, "\"delta\" must be in (0, 1), but is ", c.delta);
  positive("epochs", c.epochs);
  TORCH_CHECK_VALUE(c.batch_size >= 1, "\"batch_size\" must be >= 1, but is ", c.batch_size);
  positive("lr", c.lr);
  non_negative("momentum", c.momentum);
  positive("max_grad_norm", c.max_grad_norm);
  TORCH_CHECK_VALUE(c.clipping == "flat" || c.clipping == "per-layer" || c.clipping == "adaptive" ||
                        c.clipping == "automatic",
                    "\"clipping\" must be flat, per-layer, adaptive or automatic");
  TORCH_CHECK_VALUE(c.model == "cnn" || c.model == "scatter-linear" || c.model == "scatter-cnn" ||
                        c.model == "lstm" || c.model == "transformer",
                    "\"model\" must be cnn, scatter-linear, scatter-cnn, lstm or transformer");
  TORCH_CHECK_VALUE(
      c.train_subset >= 0 && c.max_physical_batch_size >= 0 && c.audit >= 0 && c.validation >= 0,
      "\"train_subset\", \"max_physical_batch_size\", \"audit\" and \"validation\" "
      "must be >= 0");
  TORCH_CHECK_VALUE(std::isfinite(c.ema) && c.ema >= 0 && c.ema < 1,
                    "\"ema\" must be in [0, 1), but is ", c.ema);
  non_negative("whitening", c.whitening);
  positive("whitening_noise", c.whitening_noise);
}

inline Config from_json(const json& j) {
  Config c;
  c.epsilon = j.at("epsilon");
  if (!j.at("noise_multiplier").is_null())
    c.noise_multiplier = j.at("noise_multiplier").get<double>();
  if (j.contains("budget") && !j.at("budget").is_null()) c.budget = j.at("budget").get<double>();
  c.delta = j.at("delta");
  c.epochs = j.at("epochs");
  c.batch_size = j.at("batch_size");
  c.lr = j.at("lr");
  c.momentum = j.at("momentum");
  c.max_grad_norm = j.at("max_grad_norm");
  c.accountant = j.at("accountant");
  c.clipping = j.at("clipping");
  c.model = j.value("model", std::string("cnn"));
  c.seed = j.at("seed");
  c.no_privacy = j.at("no_privacy");
  c.secure_rng = j.at("secure_rng");
  c.train_subset = j.at("train_subset");
  c.max_physical_batch_size = j.at("max_physical_batch_size");
  c.audit = j.value("audit", int64_t{0});
  c.validation = j.value("validation", int64_t{0});
  c.feature_cache = j.value("feature_cache", std::string());
  c.ema = j.value("ema", 0.0);
  c.whitening = j.value("whitening", 0.0);
  c.whitening_noise = j.value("whitening_noise", 20.0);
  c.data_dir = j.at("data_dir");
  check(c);
  return c;
}

}  // namespace dptrain
