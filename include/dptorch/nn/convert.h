#pragma once

#include <torch/arg.h>
#include <torch/nn/modules/container/moduledict.h>
#include <torch/nn/modules/container/modulelist.h>
#include <torch/nn/modules/container/sequential.h>

#include <string>
#include <vector>

namespace dptorch::nn {

/// What nn::convert may change besides turning torch layers into their twins.
struct ConvertOptions {
  /// Replace BatchNorm1d/2d/3d, which mixes samples across the batch, by dptorch::nn::GroupNorm
  /// over the same channels (as Opacus' ModuleValidator.fix does): the group count is the
  /// largest divisor of the channel count that is at most 32; eps and the affine weight and
  /// bias are kept, the running statistics dropped. The model then computes something else:
  /// retrain or fine-tune it.
  TORCH_ARG(bool, fix_batch_norm) = false;
};

/// One module nn::convert replaced by something that is not its twin.
struct Replacement {
  /// Its path in the model (e.g. "features.2").
  std::string path;
  /// What it was and what it became, e.g. "torch::nn::BatchNorm2d(64)" and
  /// "dptorch::nn::GroupNorm(32 groups, 64 channels)".
  std::string from;
  std::string to;
};

/// Converts a Sequential of torch::nn layers into one of dptorch::nn twins, weights and buffers
/// copied (the result shares nothing with `model`). Linear, Conv1d/2d/3d, Embedding,
/// EmbeddingBag, LayerNorm, GroupNorm and InstanceNorm1d/2d/3d are converted; modules without
/// parameters (activations, pooling, dropout, ...) are cloned as they are. Containers LibTorch
/// can nest are converted recursively: a ModuleList or ModuleDict inside another, a Sequential
/// inside either, and a Sequential subclass whose forward runs its own elements (its
/// SequentialImpl part). Anything else with parameters is refused, naming its path; so is
/// BatchNorm, unless `options.fix_batch_norm()`. Each replacement that is not a twin is warned
/// about and, if `replaced` is given, appended to it.
///
/// Example:
///   auto model = dptorch::nn::convert(torch::nn::Sequential(torch::nn::Linear(4, 2)));
[[nodiscard]] torch::nn::Sequential convert(const torch::nn::Sequential& model,
                                            const ConvertOptions& options = {},
                                            std::vector<Replacement>* replaced = nullptr);
/// convert() for a ModuleList (its elements converted recursively).
[[nodiscard]] torch::nn::ModuleList convert(const torch::nn::ModuleList& model,
                                            const ConvertOptions& options = {},
                                            std::vector<Replacement>* replaced = nullptr);
/// convert() for a ModuleDict (its values converted recursively).
[[nodiscard]] torch::nn::ModuleDict convert(const torch::nn::ModuleDict& model,
                                            const ConvertOptions& options = {},
                                            std::vector<Replacement>* replaced = nullptr);

/// Converts in place: every Sequential (or subclass), ModuleList and ModuleDict in `module`'s
/// tree, `module` included, gets the twins of its torch layers, weights copied; the layers
/// themselves are replaced, not changed. This reaches a Sequential subclass held inside a
/// Sequential, which cannot be copied as its own type. Refusals as convert(); a refusal leaves
/// `module` as it was.
void convert_(torch::nn::Module& module, const ConvertOptions& options = {},
              std::vector<Replacement>* replaced = nullptr);

}  // namespace dptorch::nn
