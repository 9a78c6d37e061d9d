#include <dptorch/engine/privacy_engine.h>

#include <dptorch/io/checked_file.h>

#include <dptorch/accounting/calibration.h>
#include <dptorch/distributed/group.h>

#include <torch/torch.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <iterator>
#include <optional>
#include <sstream>

namespace dptorch {
namespace {

constexpr const char* kCheckpointFormat = "dptorch-checkpoint-1";
// A distributed job's checkpoint: one more entry, the job's size and every rank's state.
constexpr const char* kWorldSizeKey = "world_size";
constexpr const char* kRankStatesKey = "rank_states";
// The noise generator's seed is derived from the user's seed, apart from the sampler's.
constexpr uint64_t kNoiseSeedSalt = 0x9e3779b97f4a7c15ULL;

// Names and shapes of every parameter and buffer: two models with the same fingerprint can
// exchange state.
std::string fingerprint(const torch::nn::Module& module) {
  std::ostringstream out;
  for (const auto& p : module.named_parameters()) out << p.key() << p.value().sizes() << ";";
  for (const auto& b : module.named_buffers()) out << b.key() << b.value().sizes() << ";";
  return out.str();
}

}  // namespace

PrivacySettings resolve(const PrivacyOptions& options, int64_t dataset_size) {
  TORCH_CHECK_VALUE(dataset_size > 0, "the dataset is empty; private training needs examples");
  detail::check_in_range("delta", options.delta(), 0, 1, detail::Bounds::kOpen);
  detail::check_positive("max_grad_norm", options.max_grad_norm());
  detail::check_positive("epochs", options.epochs());
  detail::check_positive("expected_batch_size", options.expected_batch_size());
  TORCH_CHECK_VALUE(options.expected_batch_size() <= static_cast<double>(dataset_size),
                    "expected_batch_size must be at most the dataset size (", dataset_size,
                    "), but is ", options.expected_batch_size());
  (void)parse_loss_reduction(options.loss_reduction());
  (void)accounting::make_accountant(options.accountant());
  TORCH_CHECK_VALUE(options.noise_multiplier().has_value() != options.target_epsilon().has_value(),
                    options.noise_multiplier()
                        ? "noise_multiplier and target_epsilon conflict"
                        : "neither noise_multiplier nor target_epsilon is set",
                    "; set exactly one of them");
  TORCH_CHECK_VALUE(!(options.secure_mode() && options.seed()),
                    "secure_mode refuses a seed (its randomness must be unpredictable); unset "
                    "seed or turn secure_mode off");
  if (options.clipping() == ClippingMode::kAdaptive) {
    detail::check_in_range("target_unclipped_quantile", options.target_unclipped_quantile(), 0, 1,
                           detail::Bounds::kOpen);
  }
  if (options.clipping() == ClippingMode::kAutomatic) {
    detail::check_positive("automatic_stability", options.automatic_stability());
  }
  TORCH_CHECK_VALUE(
      options.max_grad_norms().empty() || options.clipping() == ClippingMode::kPerLayer,
      "max_grad_norms gives per-layer thresholds, but clipping is not per-layer; "
      "set clipping(ClippingMode::kPerLayer) or give max_grad_norm alone");
  for (double c : options.max_grad_norms()) detail::check_positive("max_grad_norms[i]", c);

  PrivacySettings s;
  s.dataset_size = dataset_size;
  s.expected_batch_size = options.expected_batch_size();
  s.sample_rate = options.expected_batch_size() / static_cast<double>(dataset_size);
  s.max_grad_norm = options.max_grad_norm();
  s.max_grad_norms = options.max_grad_norms();
  if (!s.max_grad_norms.empty()) s.max_grad_norm = l2_norm(s.max_grad_norms);
  s.delta = options.delta();
  s.accountant = options.accountant();
  if (options.budget()) accounting::check_budget(*options.budget());
  s.budget = options.budget();
  s.clipping = options.clipping();
  s.prior_releases = options.prior_releases();
  s.steps_per_epoch = std::max<int64_t>(1, std::llround(1.0 / s.sample_rate));
  s.steps = std::max<int64_t>(1, std::llround(options.epochs() * s.steps_per_epoch));
  if (options.noise_multiplier()) {
    detail::check_non_negative("noise_multiplier", *options.noise_multiplier());
    s.noise_multiplier = *options.noise_multiplier();
  } else {
    detail::check_positive("target_epsilon", *options.target_epsilon());
    s.noise_multiplier =
        accounting::noise_multiplier_for_epsilon(accounting::CalibrationOptions()
                                                     .target_epsilon(*options.target_epsilon())
                                                     .delta(s.delta)
                                                     .sample_rate(s.sample_rate)
                                                     .steps(s.steps)
                                                     .accountant(s.accountant)
                                                     .prior(s.prior_releases));
  }
  if (const auto& group = options.group()) {
    s.rank = group->rank();
    s.world_size = group->world_size();
  }
  if (options.seed()) {
    s.sampler_seed = *options.seed();
  } else if (options.group()) {
    // Every rank must sample with one seed: rank 0's, from its CSPRNG.
    const uint64_t mine = s.rank == 0 ? optim::secure_seed() : 0;
    const std::string sent =
        options.group()->broadcast(std::string(reinterpret_cast<const char*>(&mine), sizeof mine));
    std::memcpy(&s.sampler_seed, sent.data(), sizeof s.sampler_seed);
  } else {
    s.sampler_seed = optim::secure_seed();
  }
  return s;
}

std::shared_ptr<const data::BatchSampler> PrivacyEngine::make_sampler(
    const PrivacySettings& settings) {
  if (settings.world_size > 1) {
    return std::make_shared<data::DistributedPoissonSampler>(
        settings.dataset_size, settings.sample_rate, settings.sampler_seed, settings.rank,
        settings.world_size);
  }
  return std::make_shared<data::PoissonSampler>(settings.dataset_size, settings.sample_rate,
                                                settings.sampler_seed);
}

std::shared_ptr<optim::DPOptimizer> PrivacyEngine::make_optimizer(
    std::shared_ptr<torch::nn::Module> model, std::shared_ptr<torch::optim::Optimizer> optimizer,
    const PrivacyOptions& options, const PrivacySettings& settings) {
  TORCH_CHECK_VALUE(model != nullptr && optimizer != nullptr,
                    "make_private needs a model and an optimizer");
  validate(*model);
  if (const auto& group = options.group()) {
    // The ranks must run one job: the same data set size, sampling, noise, clipping, accountant,
    // seed and model architecture (different data set sizes would put an example in two ranks'
    // shards, different seeds would make the shards' draws overlap).
    std::ostringstream job;
    job.precision(17);
    job << settings.dataset_size << ' ' << settings.sample_rate << ' ' << settings.steps << ' '
        << settings.noise_multiplier << ' ' << settings.max_grad_norm << ' '
        << settings.sampler_seed << ' ' << settings.accountant << ' '
        << static_cast<int>(settings.clipping) << ' ' << options.loss_reduction() << ' '
        << options.secure_mode() << ' ' << fingerprint(*model);
    for (double c : settings.max_grad_norms) job << ' ' << c;
    if (settings.budget)
      job << " budget " << settings.budget->epsilon << ' ' << settings.budget->delta;
    const auto digest = static_cast<int64_t>(std::hash<std::string>{}(job.str()) >> 2);
    auto both = torch::tensor({digest, -digest}, torch::kLong);
    group->all_reduce_max(both);
    TORCH_CHECK_VALUE(
        both[0].item<int64_t>() == digest && -both[1].item<int64_t>() == digest,
        "the ranks of the job were given different settings (data set size, "
        "sampling, noise, clipping, accountant, budget, seed or model); start every rank "
        "with the same options, data set and model");
    // Every rank starts from rank 0's model, so that the same steps keep them identical.
    std::ostringstream out;
    if (group->rank() == 0) {
      torch::serialize::OutputArchive archive;
      model->save(archive);
      archive.save_to(out);
    }
    std::istringstream in(group->broadcast(out.str()));
    if (group->rank() != 0) {
      torch::serialize::InputArchive archive;
      archive.load_from(in);
      model->load(archive);
    }
  }
  std::shared_ptr<NormClipper> norm_clipper;
  switch (settings.clipping) {
    case ClippingMode::kFlat:
      norm_clipper = std::make_shared<ConstantFlatClipper>(settings.max_grad_norm);
      break;
    case ClippingMode::kPerLayer: {
      size_t n = 0;
      for (const auto& p : model->parameters()) n += p.requires_grad() ? 1 : 0;
      TORCH_CHECK_VALUE(n > 0, "the model has no trainable parameters");
      TORCH_CHECK_VALUE(settings.max_grad_norms.empty() || settings.max_grad_norms.size() == n,
                        "max_grad_norms has ", settings.max_grad_norms.size(),
                        " thresholds but the model has ", n,
                        " trainable parameters; give one per parameter, in the order of "
                        "named_parameters()");
      norm_clipper = std::make_shared<ConstantPerLayerClipper>(
          settings.max_grad_norms.empty()
              ? std::vector<double>(n, settings.max_grad_norm / std::sqrt(static_cast<double>(n)))
              : settings.max_grad_norms);
      break;
    }
    case ClippingMode::kAdaptive:
      norm_clipper = std::make_shared<AdaptiveClipper>(
          AdaptiveClipperOptions(settings.max_grad_norm)
              .target_unclipped_quantile(options.target_unclipped_quantile())
              .unclipped_num_std(
                  options.unclipped_num_std().value_or(settings.expected_batch_size / 20.0)));
      break;
    case ClippingMode::kAutomatic:
      norm_clipper =
          std::make_shared<AutomaticClipper>(settings.max_grad_norm, options.automatic_stability());
      break;
  }
  auto clipper = std::make_shared<PerSampleGradientClipper>(
      std::move(model), std::move(norm_clipper),
      GradSampleOptions()
          .batch_first(options.batch_first())
          .loss_reduction(parse_loss_reduction(options.loss_reduction()))
          .norm_method(options.norm_method()));
  std::shared_ptr<optim::NoiseSource> noise = optim::make_noise_source(
      optim::NoiseOptions()
          .secure_mode(options.secure_mode())
          .seed(options.seed() ? std::optional<uint64_t>(*options.seed() ^ kNoiseSeedSalt)
                               : std::nullopt));
  accountant_ = accounting::make_accountant(settings.accountant);
  accountant_->set_history(settings.prior_releases);
  return std::make_shared<optim::DPOptimizer>(
      std::move(optimizer), std::move(clipper),
      optim::DPOptimizerOptions(settings.noise_multiplier, settings.expected_batch_size)
          .sample_rate(settings.sample_rate)
          .group(options.group())
          .budget(settings.budget)
          .audit(options.audit())
          .sampling(data::Sampling::kPoisson),  // make_sampler's
      std::move(noise), accountant_);
}

double PrivacyEngine::epsilon(double delta) const {
  return accountant_ ? accountant_->epsilon(delta) : 0.0;
}

namespace {

// One rank's part of a job's checkpoint: its loader position and its noise state.
std::string rank_state(const CheckpointInfo& info, optim::NoiseSource& noise) {
  torch::serialize::OutputArchive archive;
  archive.write("position", c10::IValue(info.loader_position));
  if (noise.resumable()) archive.write("noise", c10::IValue(noise.state()));
  std::ostringstream out;
  archive.save_to(out);
  return out.str();
}

// What a checkpoint file holds after its checked header (io::write_checked_file).
constexpr const char* kCheckpointKind = "checkpoint";

// Writes `archive` to `path` as a checked file, so that a crash leaves the old checkpoint or the
// new one, and a file damaged later is refused before torch's reader sees it.
void write_atomically(torch::serialize::OutputArchive& archive, const std::string& path) {
  std::ostringstream bytes;
  archive.save_to(bytes);
  try {
    io::write_checked_file(path, kCheckpointKind, bytes.str());
  } catch (const c10::Error& e) {
    // "could not write <path>: <reason>", said of the checkpoint.
    std::string reason = detail::first_line(e.what_without_backtrace());
    const std::string prefix = "could not write " + path + ": ";
    if (reason.rfind(prefix, 0) == 0) reason = reason.substr(prefix.size());
    TORCH_CHECK(false, "could not write checkpoint ", path, ": ", reason);
  }
}

}  // namespace

void PrivacyEngine::save_checkpoint(const std::string& path, optim::DPOptimizer& optimizer,
                                    const CheckpointInfo& info) const {
  TORCH_CHECK_VALUE(accountant_ != nullptr, "save_checkpoint before make_private: nothing to save");
  const auto& group = optimizer.options().group();
  // Every rank's state reaches rank 0 (through a barrier: all ranks are at this step).
  std::vector<std::string> states;
  if (group) states = group->gather(rank_state(info, optimizer.noise()));
  std::string error;
  if (!group || group->rank() == 0) {
    try {
      auto& module = *optimizer.clipper().grad_sample_module().module();
      torch::serialize::OutputArchive archive;
      archive.write("format", c10::IValue(std::string(kCheckpointFormat)));
      archive.write("fingerprint", c10::IValue(fingerprint(module)));
      archive.write("accountant", c10::IValue(accountant_->serialize()));
      // Secure mode keeps its sampler seed out of the file: the batches stay secret from a
      // reader of the checkpoint, and a resumed secure run draws a fresh seed (load_checkpoint).
      const uint64_t sampler_seed = optimizer.noise().is_secure() ? 0 : info.sampler_seed;
      archive.write("info", torch::tensor({info.loader_position, info.optimizer_steps,
                                           static_cast<int64_t>(sampler_seed)},
                                          torch::kLong));
      if (optimizer.noise().resumable()) {
        archive.write("noise", c10::IValue(optimizer.noise().state()));
      }
      if (auto adaptive =
              std::dynamic_pointer_cast<AdaptiveClipper>(optimizer.clipper().norm_clipper())) {
        archive.write("max_norm", c10::IValue(adaptive->max_norm()));
      }
      archive.write(kWorldSizeKey, c10::IValue(group ? group->world_size() : int64_t{1}));
      if (group) {
        c10::List<std::string> list;
        for (auto& state : states) list.push_back(std::move(state));
        archive.write(kRankStatesKey, c10::IValue(list));
      }
      torch::serialize::OutputArchive model_archive, optimizer_archive;
      module.save(model_archive);
      optimizer.inner().save(optimizer_archive);
      archive.write("model", model_archive);
      archive.write("optimizer", optimizer_archive);
      write_atomically(archive, path);
    } catch (const std::exception& e) {
      if (!group) throw;
      error = detail::first_line(e.what());
    }
  }
  // No rank returns before the checkpoint is in place, and all learn if it is not.
  if (group && group->any(!error.empty())) {
    TORCH_CHECK(false,
                group->rank() == 0 ? error : "rank 0 could not write the job's checkpoint " + path);
  }
}

namespace {

// Checks that `archive` holds a tensor of the same shape and dtype, contiguous, for every
// parameter and buffer of `module` and its children, as Module::load will read them: a
// checkpoint whose model part is damaged is refused before any weight changes.
void check_module_state(const torch::nn::Module& module, torch::serialize::InputArchive& archive,
                        const std::string& path, const std::string& prefix) {
  auto check = [&](const std::string& key, const torch::Tensor& expected) {
    torch::Tensor saved;
    TORCH_CHECK_VALUE(archive.try_read(key, saved) && saved.defined(), "checkpoint ", path,
                      " has no state for ", prefix, key, "; it is damaged");
    TORCH_CHECK_VALUE(saved.sizes() == expected.sizes() && saved.dtype() == expected.dtype() &&
                          saved.is_contiguous(),
                      "checkpoint ", path, " holds ", prefix, key, " as ", saved.dtype(), " ",
                      saved.sizes(), ", but the model's is ", expected.dtype(), " ",
                      expected.sizes(), "; it is damaged");
  };
  for (const auto& p : module.named_parameters(/*recurse=*/false)) check(p.key(), p.value());
  for (const auto& b : module.named_buffers(/*recurse=*/false)) check(b.key(), b.value());
  for (const auto& child : module.named_children()) {
    if (!child.value()->is_serializable()) continue;
    torch::serialize::InputArchive child_archive;
    TORCH_CHECK_VALUE(archive.try_read(child.key(), child_archive), "checkpoint ", path,
                      " has no state for ", prefix, child.key(), "; it is damaged");
    check_module_state(*child.value(), child_archive, path, prefix + child.key() + ".");
  }
}

// An archive's bytes, to restore from if what follows fails.
std::string bytes_of(const std::function<void(torch::serialize::OutputArchive&)>& save) {
  torch::serialize::OutputArchive archive;
  save(archive);
  std::ostringstream out;
  archive.save_to(out);
  return out.str();
}

void load_bytes(const std::string& bytes,
                const std::function<void(torch::serialize::InputArchive&)>& load) {
  torch::serialize::InputArchive archive;
  std::istringstream in(bytes);
  archive.load_from(in);
  load(archive);
}

}  // namespace

CheckpointInfo PrivacyEngine::load_checkpoint(const std::string& path,
                                              optim::DPOptimizer& optimizer) {
  TORCH_CHECK_VALUE(accountant_ != nullptr, "load_checkpoint needs make_private first");
  const auto& group = optimizer.options().group();
  // The file's payload, read and checked (kind, size, CRC-32) here or by rank 0 and sent to every
  // rank after a '+'; or rank 0's reason for refusing it after a '-'.
  std::string bytes;
  if (!group || group->rank() == 0) {
    try {
      bytes = "+" + io::read_checked_file(path, kCheckpointKind);
    } catch (const c10::Error& e) {
      if (!group) throw;
      bytes = "-" + detail::first_line(e.what_without_backtrace());
    }
  }
  if (group) bytes = group->broadcast(bytes);
  TORCH_CHECK_VALUE(!bytes.empty() && bytes[0] == '+', bytes.substr(1),
                    group && group->rank() != 0 ? " (read on rank 0)" : "");
  bytes.erase(0, 1);
  auto& module = *optimizer.clipper().grad_sample_module().module();
  auto adaptive = std::dynamic_pointer_cast<AdaptiveClipper>(optimizer.clipper().norm_clipper());
  torch::serialize::InputArchive archive, model_archive, optimizer_archive;
  c10::IValue value;
  std::optional<std::string> noise_state;
  std::optional<int64_t> position;
  std::optional<double> max_norm;
  std::string accountant_state;
  torch::Tensor info_tensor;
  // Everything is read and checked before anything changes.
  auto check = [&] {
    auto read_string = [&](const char* key) {
      c10::IValue value;
      TORCH_CHECK(archive.try_read(key, value) && value.isString(), "checkpoint ", path,
                  " is not a dptorch checkpoint (no ", key, ")");
      return value.toStringRef();
    };
    try {
      std::istringstream in(bytes);
      archive.load_from(in);
    } catch (const c10::Error& e) {
      TORCH_CHECK(false, "checkpoint ", path,
                  " is corrupt or not a dptorch checkpoint: ", detail::first_line(e.what()));
    }
    TORCH_CHECK(read_string("format") == kCheckpointFormat, "checkpoint ", path,
                " has an unknown format");
    const int64_t world = group ? group->world_size() : 1;
    const int64_t saved_world =
        archive.try_read(kWorldSizeKey, value) && value.isInt() ? value.toInt() : 1;
    TORCH_CHECK_VALUE(saved_world == world, "checkpoint ", path, " was written by a job of ",
                      saved_world, saved_world == 1 ? " process" : " processes",
                      ", but this job has ", world, "; resume it with ", saved_world,
                      saved_world == 1 ? " process" : " processes", " (dptrain: --nproc ",
                      saved_world, ")");
    if (group) {
      TORCH_CHECK(archive.try_read(kRankStatesKey, value) && value.isList() &&
                      static_cast<int64_t>(value.toListRef().size()) == world,
                  "checkpoint ", path, " has no state for each of its ", world, " ranks");
      const auto& mine = value.toListRef()[static_cast<size_t>(group->rank())];
      TORCH_CHECK(mine.isString(), "checkpoint ", path, " has a damaged rank state");
      torch::serialize::InputArchive rank_archive;
      try {
        std::istringstream in(mine.toStringRef());
        rank_archive.load_from(in);
      } catch (const c10::Error&) {
        TORCH_CHECK(false, "checkpoint ", path, " has a damaged rank state");
      }
      c10::IValue v;
      TORCH_CHECK(rank_archive.try_read("position", v) && v.isInt() && v.toInt() >= 0,
                  "checkpoint ", path, " has a damaged rank state");
      position = v.toInt();
      if (rank_archive.try_read("noise", v) && v.isString()) noise_state = v.toStringRef();
    } else if (archive.try_read("noise", value)) {
      TORCH_CHECK_VALUE(value.isString(), "checkpoint ", path, " has a damaged noise state");
      noise_state = value.toStringRef();
    }
    const auto saved_fingerprint = read_string("fingerprint");
    TORCH_CHECK_VALUE(saved_fingerprint == fingerprint(module), "checkpoint ", path,
                      " is from a different model (parameters and shapes differ); build the same "
                      "model to resume it");
    accountant_state = read_string("accountant");
    std::unique_ptr<accounting::Accountant> saved;
    try {
      saved = accounting::load_accountant(accountant_state);
    } catch (const c10::Error& e) {
      TORCH_CHECK_VALUE(false, "checkpoint ", path, " has a damaged accountant state (",
                        detail::first_line(e.what()), ")");
    }
    TORCH_CHECK_VALUE(saved->mechanism() == accountant_->mechanism(), "checkpoint ", path,
                      " was written with the ", saved->mechanism(),
                      " accountant, but this run uses ", accountant_->mechanism(),
                      "; resume with the same accountant");
    TORCH_CHECK(archive.try_read("info", info_tensor) && info_tensor.defined() &&
                    info_tensor.dim() == 1 && info_tensor.numel() == 3 &&
                    info_tensor.scalar_type() == torch::kLong,
                "checkpoint ", path, " is not a dptorch checkpoint (no info)");
    TORCH_CHECK(info_tensor[0].item<int64_t>() >= 0 && info_tensor[1].item<int64_t>() >= 0,
                "checkpoint ", path, " has a damaged position (", info_tensor[0].item<int64_t>(),
                ", ", info_tensor[1].item<int64_t>(), " steps)");
    TORCH_CHECK(archive.try_read("model", model_archive) &&
                    archive.try_read("optimizer", optimizer_archive),
                "checkpoint ", path, " is not a dptorch checkpoint (no model or optimizer state)");
    check_module_state(module, model_archive, path, "");
    if (adaptive && archive.try_read("max_norm", value)) {
      TORCH_CHECK(value.isDouble() && std::isfinite(value.toDouble()) && value.toDouble() > 0,
                  "checkpoint ", path, " has a damaged clipping threshold");
      max_norm = value.toDouble();
    }
  };
  if (!group) {
    check();
  } else {
    // Every rank checks the same bytes, but its own state too: all accept or all refuse.
    std::string error;
    try {
      check();
    } catch (const std::exception& e) {
      error = detail::first_line(e.what());
    }
    TORCH_CHECK_VALUE(!group->any(!error.empty()),
                      error.empty() ? "another rank of the job refused checkpoint " + path : error);
  }

  // Everything is checked: restore. The noise source refuses a state of another kind before it
  // changes anything; the optimiser's state is checked only by loading it, so the noise state
  // and the optimiser's are put back if that fails, and nothing has changed.
  auto& noise = optimizer.noise();
  const std::optional<std::string> noise_before =
      noise.resumable() && noise_state ? std::optional<std::string>(noise.state()) : std::nullopt;
  if (noise_before) {
    try {
      noise.set_state(*noise_state);
    } catch (const c10::Error& e) {
      TORCH_CHECK_VALUE(false, "checkpoint ", path, ": ", detail::first_line(e.what()));
    }
  }
  const std::string optimizer_before =
      bytes_of([&](torch::serialize::OutputArchive& a) { optimizer.inner().save(a); });
  try {
    optimizer.inner().load(optimizer_archive);
  } catch (const std::exception& e) {
    if (noise_before) noise.set_state(*noise_before);
    load_bytes(optimizer_before,
               [&](torch::serialize::InputArchive& a) { optimizer.inner().load(a); });
    TORCH_CHECK_VALUE(false, "checkpoint ", path, " has a damaged optimizer state (",
                      detail::printable(detail::first_line(e.what()), 200),
                      "); nothing was restored");
  }
  // The model's tensors are checked (check_module_state), the accountant's state was parsed:
  // these cannot fail.
  module.load(model_archive);
  accountant_->deserialize(accountant_state);
  if (adaptive && max_norm) adaptive->set_max_norm(*max_norm);
  optimizer.zero_grad();
  CheckpointInfo info;
  info.loader_position = position ? *position : info_tensor[0].item<int64_t>();
  info.optimizer_steps = info_tensor[1].item<int64_t>();
  info.sampler_seed = static_cast<uint64_t>(info_tensor[2].item<int64_t>());
  optimizer.set_steps(info.optimizer_steps);
  return info;
}

}  // namespace dptorch
