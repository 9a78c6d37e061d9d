#include <dptorch/features/whitening.h>

#include <torch/torch.h>

#include <dptorch/common.h>
#include <dptorch/optim/noise.h>

#include <algorithm>
#include <cmath>
#include <utility>

namespace dptorch::features {
ChannelWhiteningImpl::ChannelWhiteningImpl(int64_t channels, std::vector<int64_t> spatial) {
  TORCH_CHECK_VALUE(channels >= 1, "ChannelWhitening needs >= 1 channel, got ", channels);
  std::vector<int64_t> shape{channels};
  shape.insert(shape.end(), spatial.begin(), spatial.end());
  mean_ = register_buffer("mean", torch::zeros(shape));
  matrix_ = register_buffer("matrix", torch::eye(channels));
}

ChannelWhiteningImpl::ChannelWhiteningImpl(torch::Tensor mean, torch::Tensor matrix,
                                           std::optional<accounting::HistoryEntry> release)
    : release_(release) {
  TORCH_CHECK_VALUE(mean.dim() >= 1 && matrix.dim() == 2 && matrix.size(0) == mean.size(0) &&
                        matrix.size(1) == mean.size(0),
                    "ChannelWhitening needs a mean [C, *spatial] and a matrix [C, C]; got ",
                    mean.sizes(), " and ", matrix.sizes());
  mean_ = register_buffer("mean", std::move(mean));
  matrix_ = register_buffer("matrix", std::move(matrix));
}

torch::Tensor ChannelWhiteningImpl::forward(const torch::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == mean_.dim() + 1 && x.sizes().slice(1) == mean_.sizes(),
                    "ChannelWhitening was fitted to examples of shape ", mean_.sizes(),
                    " but got input ", x.sizes(), "; pass [N, ", mean_.sizes(), "]");
  const auto centred = x - mean_.to(x.dtype());
  // W is symmetric, so W·x_p for every position p is x's channel vectors times W.
  return centred.movedim(1, -1).matmul(matrix_.to(x.dtype())).movedim(-1, 1);
}

ChannelWhitening fit_channel_whitening(const torch::Tensor& features,
                                       const ChannelWhiteningOptions& options,
                                       optim::NoiseSource& noise) {
  TORCH_CHECK_VALUE(options.norm_bound().has_value(),
                    "fit_channel_whitening needs norm_bound: the largest L2 norm of one example's "
                    "features (sqrt(D) after a GroupNorm without affine over D values)");
  const double bound = *options.norm_bound();
  detail::check_positive("norm_bound", bound);
  detail::check_positive("noise_multiplier", options.noise_multiplier());
  detail::check_positive("regularization", options.regularization());
  TORCH_CHECK_VALUE(features.dim() >= 2 && features.size(0) >= 1 && features.size(1) >= 1,
                    "fit_channel_whitening needs features [N, C, *spatial] with N, C >= 1; got ",
                    features.sizes());
  TORCH_CHECK_VALUE(features.is_floating_point(),
                    "fit_channel_whitening needs floating-point features, got ",
                    features.scalar_type());
  TORCH_CHECK_VALUE(torch::isfinite(features).all().item<bool>(),
                    "fit_channel_whitening got features with NaN or infinite values");
  torch::NoGradGuard no_grad;
  const int64_t n = features.size(0);
  const int64_t channels = features.size(1);
  const auto dd = features.options().dtype(torch::kDouble);

  // The sums over examples scaled to norm at most B, x_i·min(1, B/‖x_i‖), in double, a chunk
  // of examples at a time: Σ_i x_i and Σ_i Σ_p x_{i,p} x_{i,p}ᵀ.
  const auto flat = features.detach().reshape({n, channels, -1});
  const int64_t positions = flat.size(2);
  auto sum = torch::zeros({channels, positions}, dd);
  auto outer = torch::zeros({channels, channels}, dd);
  constexpr int64_t kChunk = 2048;
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    auto x = flat.slice(0, begin, std::min(n, begin + kChunk)).to(torch::kDouble);
    const auto norms = x.flatten(1).norm(2, 1);
    x = x * (bound / norms.clamp_min(bound)).view({-1, 1, 1});
    sum += x.sum(0);
    const auto vectors = x.transpose(1, 2).reshape({-1, channels});
    outer += vectors.t().mm(vectors);
  }

  // One release of each: noise of std σ·B on the sum (its sensitivity is B) and σ·B² on the
  // outer sum (its Frobenius norm is at most Σ_p ‖x_{i,p}‖² = ‖x_i‖² <= B²), drawn on the upper
  // triangle and mirrored.
  const double sigma = options.noise_multiplier();
  noise.add_gaussian_(sum, sigma * bound);
  const auto outer_noise = noise.gaussian({channels, channels}, sigma * bound * bound, dd).triu();
  outer += outer_noise + outer_noise.triu(1).t();

  const auto mean = sum / static_cast<double>(n);  // [C, P]
  const auto covariance = outer / static_cast<double>(n * positions) -
                          mean.mm(mean.t()) / static_cast<double>(positions);
  auto [eigenvalues, eigenvectors] = torch::linalg::eigh(covariance, "L");
  const auto scale = (eigenvalues.clamp_min(0) + options.regularization()).rsqrt();
  const auto matrix = eigenvectors.mm(torch::diag(scale)).mm(eigenvectors.t());

  auto shape = features.sizes().slice(2).vec();
  shape.insert(shape.begin(), channels);
  const auto fopts = features.options().dtype(torch::kFloat);
  return ChannelWhitening(mean.reshape(shape).to(fopts), ((matrix + matrix.t()) / 2).to(fopts),
                          channel_whitening_release(sigma));
}

accounting::HistoryEntry channel_whitening_release(double noise_multiplier) {
  // Two Gaussian mechanisms of multiplier σ on one data set compose to one of σ/√2.
  return {noise_multiplier / std::sqrt(2.0), 1.0, 1};
}

}  // namespace dptorch::features
