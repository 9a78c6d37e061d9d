#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include <torch/arg.h>
#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/types.h>

#include <dptorch/accounting/accountant.h>

namespace dptorch::optim {
class NoiseSource;
}

namespace dptorch::features {

/// What fit_channel_whitening releases, and how.
///
/// Example: `ChannelWhiteningOptions().norm_bound(63).noise_multiplier(20).regularization(1)`
struct ChannelWhiteningOptions {
  /// B: the largest L2 norm of one example's features; an example above it is scaled down to it
  /// before it is counted, so that one example moves the released sums by at most B and B².
  /// Required. After a GroupNorm without affine over D values per example, B = √D bounds them.
  TORCH_ARG(std::optional<double>, norm_bound) = std::nullopt;
  /// σ: the noise std of each released sum over its sensitivity (B for the sum of the features,
  /// B² for the sum of their channel outer products). Larger σ costs less ε and gives a noisier
  /// estimate.
  TORCH_ARG(double, noise_multiplier) = 20.0;
  /// λ: added to every eigenvalue of the estimated channel covariance before its inverse square
  /// root, so that directions of small (or noise-dominated) variance are not blown up.
  TORCH_ARG(double, regularization) = 1.0;
};

/// A private whitening of features across their channels, fitted on the training set: y = W·(x −
/// μ) at every spatial position, with μ the features' mean (per channel and position) and W =
/// (Σ + λI)^(-1/2) for Σ the C×C covariance of the channels, pooled over positions. Both come
/// from one release of noisy sums (fit_channel_whitening), which costs privacy: release() is
/// that cost as an accountant history block, to compose with the training steps'
/// (PrivacyOptions::prior_releases). Applying the fitted transform costs nothing more.
///
/// Centring and whitening the inputs of a linear model that DP-SGD trains evens out the
/// directions its per-sample gradients take, so that clipping keeps more of the signal and the
/// same noise hides less of it. Inputs are [N, C, *spatial] (spatial as fitted); the transform
/// has no trainable parameters, and μ and W are buffers ("mean", "matrix"), so checkpoints of a
/// model that contains it keep them.
class ChannelWhiteningImpl : public torch::nn::Module {
 public:
  /// An identity transform for `channels` channels of features of shape `spatial` (a module to
  /// load fitted buffers into, e.g. from a checkpoint).
  ChannelWhiteningImpl(int64_t channels, std::vector<int64_t> spatial);
  /// The transform of the given mean μ ([C, *spatial]) and matrix W ([C, C], symmetric), and the
  /// release that produced them (a block with q = 1, or none for public statistics).
  ChannelWhiteningImpl(torch::Tensor mean, torch::Tensor matrix,
                       std::optional<accounting::HistoryEntry> release);

  /// W·(x − μ) over dimension 1 of x [N, C, *spatial]; x's dtype and device.
  torch::Tensor forward(const torch::Tensor& x);

  const torch::Tensor& mean() const noexcept { return mean_; }
  const torch::Tensor& matrix() const noexcept { return matrix_; }
  /// The privacy cost of the fit: one Gaussian mechanism on the whole data set (sample rate 1),
  /// as an accountant history block; none if the statistics were not released from private data.
  const std::optional<accounting::HistoryEntry>& release() const noexcept { return release_; }

 private:
  torch::Tensor mean_;
  torch::Tensor matrix_;
  std::optional<accounting::HistoryEntry> release_;
};
TORCH_MODULE(ChannelWhitening);

/// Fits a ChannelWhitening to `features` [N, C, *spatial] (the training set, N >= 1, finite
/// values) with differential privacy: every example is scaled down to norm B if above it; the
/// sum of the examples and the sum of their channel outer products Σ_p x_p x_pᵀ are each
/// released once with Gaussian noise of std σ·B and σ·B² (the covariance's upper triangle drawn,
/// then mirrored) from `noise`; μ = sum / N and Σ = outer sum / (N·P) − mean over positions of
/// μ_p μ_pᵀ (P positions), with negative eigenvalues (noise) set to 0, and W = (Σ + λI)^(-1/2).
/// N is treated as public, as the sample rate of DP-SGD is. The two releases compose to one
/// Gaussian mechanism with noise multiplier σ/√2 on the whole data set: release() = {σ/√2, 1, 1}.
/// μ and W are float32 on the features' device (computed in double).
[[nodiscard]] ChannelWhitening fit_channel_whitening(const torch::Tensor& features,
                                                     const ChannelWhiteningOptions& options,
                                                     optim::NoiseSource& noise);

/// The release fit_channel_whitening makes with noise multiplier σ (its release()), as an
/// accountant history block: {σ/√2, q = 1, 1 step}. For a whitening kept and loaded again, whose
/// release must still be counted.
[[nodiscard]] accounting::HistoryEntry channel_whitening_release(double noise_multiplier);

}  // namespace dptorch::features
