#pragma once

#include <dptorch/accounting/accountant.h>
#include <dptorch/clipping/per_sample_gradient_clipper.h>
#include <dptorch/data/poisson_data_loader.h>
#include <dptorch/data/samplers.h>
#include <dptorch/optim/dp_optimizer.h>
#include <dptorch/optim/noise.h>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/optim/optimizer.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace dptorch::distributed {
class Group;
}  // namespace dptorch::distributed

namespace dptorch {

/// How per-sample gradients are clipped.
enum class ClippingMode {
  /// One threshold C for the whole gradient of a sample.
  kFlat,
  /// One threshold per trainable parameter: PrivacyOptions::max_grad_norms, or C/√L each (their
  /// norm is C) when those are not given.
  kPerLayer,
  /// A threshold that follows a private quantile estimate (Andrew et al. 2021).
  kAdaptive,
  /// Every gradient normalised: factor_i = C / (‖G_i‖ + γ) (Bu et al. 2022, AUTO-S).
  kAutomatic,
};

/// What a user asks of make_private (the builder of docs/design.md §6). Exactly one of
/// noise_multiplier and target_epsilon must be set; resolve() settles it into PrivacySettings.
///
/// Example: `PrivacyOptions().target_epsilon(3).delta(1e-5).epochs(20).expected_batch_size(512)`
struct PrivacyOptions {
  /// σ: the noise std over the clipping norm. Conflicts with target_epsilon.
  TORCH_ARG(std::optional<double>, noise_multiplier) = std::nullopt;
  /// ε to spend over `epochs`: σ is calibrated so ε does not exceed it.
  TORCH_ARG(std::optional<double>, target_epsilon) = std::nullopt;
  /// C: the per-sample gradient norm bound (initial value for adaptive clipping).
  TORCH_ARG(double, max_grad_norm) = 1.0;
  /// Per-layer clipping: one threshold C_l per trainable parameter, in the order of
  /// named_parameters(); the noise is scaled with ‖(C_l)‖₂, and max_grad_norm is not used.
  /// Empty (the default): C/√L each.
  TORCH_ARG(std::vector<double>, max_grad_norms) = {};
  /// δ of the (ε, δ) guarantee.
  TORCH_ARG(double, delta) = 1e-5;
  /// Epochs of training: epochs × round(1/q) optimiser steps.
  TORCH_ARG(double, epochs) = 1;
  /// E[B]: expected logical batch size; the sample rate is q = E[B] / dataset size.
  TORCH_ARG(double, expected_batch_size) = 256;
  /// A registered accountant name (accounting::accountant_names()): "prv" (default), "pld",
  /// "rdp", "gdp", or a user's own.
  TORCH_ARG(std::string, accountant) = "prv";
  /// The most ε at δ the run may spend, by its accountant: the optimiser refuses a step that
  /// would pass it, before drawing anything (optim::DPOptimizerOptions::budget), also after
  /// load_checkpoint restored what an earlier run spent. Unset: no limit.
  TORCH_ARG(std::optional<accounting::PrivacyBudget>, budget) = std::nullopt;
  /// Gradient canaries that audit the run (audit::GradientCanaries; optim::DPOptimizerOptions::
  /// audit): after training, audit->result(δ) gives an ε lower bound to set beside the
  /// accountant's ε. Null: no audit.
  TORCH_ARG(std::shared_ptr<audit::GradientCanaries>, audit) = nullptr;
  /// Releases of the training set made before training, as accountant history blocks (e.g. a
  /// private feature statistic: features::ChannelWhitening::release()). The accountant starts
  /// with them, so ε and the budget count them, and a target_epsilon calibrates σ for them and
  /// the training steps together. Empty by default.
  TORCH_ARG(std::vector<accounting::HistoryEntry>, prior_releases) = {};
  /// Flat, per-layer or adaptive clipping.
  TORCH_ARG(ClippingMode, clipping) = ClippingMode::kFlat;
  /// Adaptive clipping: the target quantile γ of unclipped samples.
  TORCH_ARG(double, target_unclipped_quantile) = 0.5;
  /// Adaptive clipping: σ_b of the unclipped count (default E[B]/20, Andrew et al. 2021).
  TORCH_ARG(std::optional<double>, unclipped_num_std) = std::nullopt;
  /// Automatic clipping: the stability constant γ of factor_i = C / (‖G_i‖ + γ).
  TORCH_ARG(double, automatic_stability) = 0.01;
  /// Noise from the OS's CSPRNG, hardened against floating-point attacks; refuses a seed.
  TORCH_ARG(bool, secure_mode) = false;
  /// Seed of the sampler and the noise (reproducible runs); drawn from the OS if unset.
  TORCH_ARG(std::optional<uint64_t>, seed) = std::nullopt;
  /// "mean" or "sum": how the model's loss reduces over the batch.
  TORCH_ARG(std::string, loss_reduction) = "mean";
  /// Whether the batch is the first dimension of layer inputs.
  TORCH_ARG(bool, batch_first) = true;
  /// Ghost norms, materialisation, or the cheaper per layer.
  TORCH_ARG(NormMethod, norm_method) = NormMethod::kAuto;
  /// The ranks of a distributed job (distributed::Group::connect), or null for one process.
  /// Every rank calls make_private with the same options and the whole dataset: the model
  /// starts from rank 0's parameters, the seed is rank 0's, each rank samples its own shard
  /// (data::DistributedPoissonSampler) and the optimiser sums the ranks' clipped gradients
  /// (optim::DPOptimizerOptions::group); checkpoints hold the whole job.
  TORCH_ARG(std::shared_ptr<distributed::Group>, group) = nullptr;
};

/// What make_private settled on: every value a run (and its report) needs.
struct PrivacySettings {
  double noise_multiplier = 0;
  double sample_rate = 0;
  double expected_batch_size = 0;
  double max_grad_norm = 0;            // the noise's norm bound: C, or ‖(C_l)‖₂ for given C_l
  std::vector<double> max_grad_norms;  // per-layer thresholds, when given
  double delta = 0;
  int64_t steps = 0;  // planned optimiser steps
  int64_t steps_per_epoch = 0;
  int64_t dataset_size = 0;
  uint64_t sampler_seed = 0;
  std::string accountant;
  std::optional<accounting::PrivacyBudget> budget;       // the run's limit, when given
  std::vector<accounting::HistoryEntry> prior_releases;  // spent before training
  ClippingMode clipping = ClippingMode::kFlat;
  int64_t rank = 0;        // this process's rank in a distributed job
  int64_t world_size = 1;  // the job's processes
};

/// Checks `options` and settles them for a dataset of `dataset_size` examples: the sample rate,
/// the planned steps, and σ (calibrated when a target ε is given). Conflicting or out-of-range
/// settings are refused here, with what to change.
[[nodiscard]] PrivacySettings resolve(const PrivacyOptions& options, int64_t dataset_size);

/// A private training set-up: the DP optimiser and the Poisson data loader that feeds it.
template <typename Dataset>
struct PrivateTraining {
  std::shared_ptr<optim::DPOptimizer> optimizer;
  data::PoissonDataLoader<Dataset> loader;
  PrivacySettings settings;
};

/// What a checkpoint holds besides the model and optimiser state.
struct CheckpointInfo {
  int64_t loader_position = 0;
  int64_t optimizer_steps = 0;
  uint64_t sampler_seed = 0;
};

/// Entry point of private training (docs/design.md §6): validates the model, attaches the
/// per-sample machinery, wraps the optimiser, builds the Poisson loader, owns the accountant, and
/// saves and loads checkpoints.
///
/// Example:
///   dptorch::PrivacyEngine engine;
///   auto run = engine.make_private(model, std::make_shared<torch::optim::SGD>(
///       model->parameters(), torch::optim::SGDOptions(0.5)), dataset,
///       dptorch::PrivacyOptions().target_epsilon(3).epochs(10).expected_batch_size(512));
///   for (int64_t s = 0; s < run.settings.steps; ++s) {
///     auto batch = run.loader.next();
///     torch::nll_loss(model->forward(batch.data), batch.target).backward();
///     run.optimizer->step();
///   }
///   double eps = engine.epsilon(1e-5);
class PrivacyEngine {
 public:
  PrivacyEngine() = default;

  /// Makes `model` and `optimizer` private over `dataset` (a torch::data dataset, or
  /// data::TensorPairDataset). The model must consist of dptorch layers (see validate()).
  template <typename Dataset>
  PrivateTraining<Dataset> make_private(std::shared_ptr<torch::nn::Module> model,
                                        std::shared_ptr<torch::optim::Optimizer> optimizer,
                                        Dataset dataset, const PrivacyOptions& options) {
    const auto size = dataset.size();
    TORCH_CHECK_VALUE(size.has_value() && *size > 0,
                      "make_private needs a non-empty dataset of "
                      "known size");
    auto settings = resolve(options, static_cast<int64_t>(*size));
    auto dp = make_optimizer(std::move(model), std::move(optimizer), options, settings);
    auto sampler = make_sampler(settings);
    return {std::move(dp), data::PoissonDataLoader<Dataset>(std::move(dataset), sampler), settings};
  }
  template <typename M, typename Dataset>
  PrivateTraining<Dataset> make_private(const torch::nn::ModuleHolder<M>& model,
                                        std::shared_ptr<torch::optim::Optimizer> optimizer,
                                        Dataset dataset, const PrivacyOptions& options) {
    return make_private(model.ptr(), std::move(optimizer), std::move(dataset), options);
  }

  /// make_private that insists on a target ε (and refuses an explicit noise multiplier).
  template <typename M, typename Dataset>
  PrivateTraining<Dataset> make_private_with_epsilon(
      M&& model, std::shared_ptr<torch::optim::Optimizer> optimizer, Dataset dataset,
      const PrivacyOptions& options) {
    TORCH_CHECK_VALUE(options.target_epsilon().has_value() && !options.noise_multiplier(),
                      "make_private_with_epsilon needs target_epsilon and no noise_multiplier");
    return make_private(std::forward<M>(model), std::move(optimizer), std::move(dataset), options);
  }

  /// ε spent so far at δ, by the engine's accountant.
  [[nodiscard]] double epsilon(double delta) const;
  /// The accountant (created by make_private; null before).
  [[nodiscard]] const std::shared_ptr<accounting::Accountant>& accountant() const {
    return accountant_;
  }

  /// Writes model, optimiser (inner state, step count, noise state, adaptive threshold),
  /// accountant history and loader position to `path`, atomically (temporary file, then rename).
  /// In a distributed job every rank calls it at the same step: after a barrier, rank 0 writes
  /// one checkpoint of the whole job (with every rank's loader position and noise state), and
  /// no rank returns before it is in place.
  template <typename Dataset>
  void save_checkpoint(const std::string& path, const PrivateTraining<Dataset>& run) const {
    save_checkpoint(
        path, *run.optimizer,
        CheckpointInfo{run.loader.position(), run.optimizer->steps(), run.settings.sampler_seed});
  }
  /// Restores what save_checkpoint wrote into `run` (same model architecture and accountant);
  /// the run continues exactly where the saved one was. Nothing changes if the checkpoint is
  /// refused. In a distributed job every rank calls it: rank 0 reads the file and sends it to
  /// the others; a checkpoint of a job with another number of processes is refused. In secure
  /// mode no seed comes from the file (none is written there): the run samples on with its own.
  template <typename Dataset>
  CheckpointInfo load_checkpoint(const std::string& path, PrivateTraining<Dataset>& run) {
    auto info = load_checkpoint(path, *run.optimizer);
    // A secure run never takes a seed from a file: it goes on sampling with its own, fresh one
    // (each Poisson step is independent of the others, so the accounting is unchanged).
    if (run.optimizer->noise().is_secure()) info.sampler_seed = run.settings.sampler_seed;
    if (info.sampler_seed != run.settings.sampler_seed) {
      run.settings.sampler_seed = info.sampler_seed;
      run.loader =
          data::PoissonDataLoader<Dataset>(run.loader.dataset(), make_sampler(run.settings));
    }
    run.loader.set_position(info.loader_position);
    return info;
  }

  /// Non-template parts of save_checkpoint / load_checkpoint.
  void save_checkpoint(const std::string& path, optim::DPOptimizer& optimizer,
                       const CheckpointInfo& info) const;
  CheckpointInfo load_checkpoint(const std::string& path, optim::DPOptimizer& optimizer);

  /// The sampler `settings` describe: a PoissonSampler, or in a distributed job this rank's
  /// DistributedPoissonSampler.
  [[nodiscard]] static std::shared_ptr<const data::BatchSampler> make_sampler(
      const PrivacySettings& settings);

 private:
  std::shared_ptr<optim::DPOptimizer> make_optimizer(
      std::shared_ptr<torch::nn::Module> model, std::shared_ptr<torch::optim::Optimizer> optimizer,
      const PrivacyOptions& options, const PrivacySettings& settings);

  std::shared_ptr<accounting::Accountant> accountant_;
};

}  // namespace dptorch
