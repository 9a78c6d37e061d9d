#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <dptorch/features/whitening.h>
#include <dptorch/optim/noise.h>

#include <cmath>
#include <limits>
#include <sstream>
#include <utility>
#include <vector>

namespace {

using dptorch::features::channel_whitening_release;
using dptorch::features::ChannelWhitening;
using dptorch::features::ChannelWhiteningOptions;
using dptorch::features::fit_channel_whitening;
using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

// A noise source that draws nothing and records the std of every draw it is asked for.
class RecordingNoise final : public dptorch::optim::NoiseSource {
 public:
  torch::Tensor gaussian(at::IntArrayRef shape, double stddev,
                         const torch::TensorOptions& options) override {
    draws.emplace_back(shape.vec(), stddev);
    return torch::zeros(shape, options);
  }
  bool is_secure() const noexcept override { return false; }
  std::vector<std::pair<std::vector<int64_t>, double>> draws;
};

// Features [N, C, H, W] with correlated channels and a non-zero mean: channel c at every
// position is a mix of C independent factors, plus an offset that depends on c and position.
torch::Tensor correlated_features(int64_t n, int64_t c, int64_t h, int64_t w) {
  torch::manual_seed(5);
  const auto mixing = torch::randn({c, c}, torch::kDouble) + 2 * torch::eye(c, torch::kDouble);
  const auto factors = torch::randn({n, h, w, c}, torch::kDouble);
  const auto offset = torch::randn({c, h, w}, torch::kDouble);
  return factors.matmul(mixing.t()).permute({0, 3, 1, 2}) + offset;
}

// The definition, written out in double: μ per (channel, position); Σ the channel covariance
// of the centred features pooled over examples and positions; W = (Σ + λI)^(-1/2).
std::pair<torch::Tensor, torch::Tensor> exact_whitening(const torch::Tensor& x, double lambda) {
  const auto mean = x.mean(0);
  const auto centred = (x - mean).permute({0, 2, 3, 1}).reshape({-1, x.size(1)});
  const auto cov = centred.t().mm(centred) / static_cast<double>(centred.size(0));
  auto [values, vectors] = torch::linalg::eigh(cov, "L");
  return {mean, vectors.mm(torch::diag((values + lambda).rsqrt())).mm(vectors.t())};
}

ChannelWhiteningOptions quiet(double bound, double lambda) {
  return ChannelWhiteningOptions().norm_bound(bound).noise_multiplier(1e-300).regularization(
      lambda);
}

TEST(ChannelWhitening, WithoutNoiseIsTheExactWhitening) {
  const auto x = correlated_features(300, 5, 3, 4);
  RecordingNoise noise;
  for (const double lambda : {1e-9, 0.5}) {
    SCOPED_TRACE(lambda);
    auto fitted = fit_channel_whitening(x, quiet(1e9, lambda), noise);
    const auto [mean, matrix] = exact_whitening(x, lambda);
    EXPECT_TRUE(torch::allclose(fitted->mean().to(torch::kDouble), mean, 1e-5, 1e-5));
    EXPECT_TRUE(torch::allclose(fitted->matrix().to(torch::kDouble), matrix, 1e-5, 1e-5));
    EXPECT_EQ(fitted->mean().scalar_type(), torch::kFloat);
    EXPECT_EQ(fitted->mean().sizes(), (std::vector<int64_t>{5, 3, 4}));
  }
  // With λ → 0 the transformed training set has zero mean and identity channel covariance.
  auto fitted = fit_channel_whitening(x, quiet(1e9, 1e-9), noise);
  const auto y = fitted->forward(x.to(torch::kFloat)).to(torch::kDouble);
  EXPECT_LT(y.mean(0).abs().max().item<double>(), 1e-4);
  const auto v = y.permute({0, 2, 3, 1}).reshape({-1, 5});
  const auto cov = v.t().mm(v) / static_cast<double>(v.size(0));
  EXPECT_TRUE(torch::allclose(cov, torch::eye(5, torch::kDouble), 1e-4, 1e-4)) << cov;
}

TEST(ChannelWhitening, ForwardIsTheMatrixTimesTheCentredChannels) {
  const auto x = correlated_features(50, 4, 2, 2);
  RecordingNoise noise;
  auto fitted = fit_channel_whitening(x, quiet(1e9, 0.3), noise);
  const auto input = torch::randn({7, 4, 2, 2});
  const auto y = fitted->forward(input);
  for (int64_t i : {0, 6}) {
    for (int64_t p = 0; p < 2; ++p) {
      for (int64_t q = 0; q < 2; ++q) {
        const auto channels = input.index({i, torch::indexing::Slice(), p, q}) -
                              fitted->mean().index({torch::indexing::Slice(), p, q});
        const auto expected = fitted->matrix().mv(channels);
        EXPECT_TRUE(
            torch::allclose(y.index({i, torch::indexing::Slice(), p, q}), expected, 1e-5, 1e-5));
      }
    }
  }
  // Double inputs stay double, and gradients flow to the input.
  const auto xd = torch::randn({3, 4, 2, 2}, torch::kDouble).requires_grad_();
  const auto yd = fitted->forward(xd);
  EXPECT_EQ(yd.scalar_type(), torch::kDouble);
  yd.sum().backward();
  EXPECT_TRUE(xd.grad().defined());
  EXPECT_TRUE(fitted->parameters().empty());
}

// Each example is scaled down to norm B before it is counted; the sums get noise of std σ·B and
// σ·B², and the release is the Gaussian mechanism with multiplier σ/√2 on the whole data set.
TEST(ChannelWhitening, ClipsEachExampleAndNoisesAtItsSensitivity) {
  auto x = torch::zeros({2, 2, 1, 1}, torch::kDouble);
  x[0][0][0][0] = 3.0;   // norm 3: kept
  x[1][1][0][0] = 40.0;  // norm 40: scaled to 5
  RecordingNoise noise;
  auto fitted = fit_channel_whitening(
      x, ChannelWhiteningOptions().norm_bound(5).noise_multiplier(7).regularization(1), noise);
  EXPECT_NEAR(fitted->mean()[0][0][0].item<double>(), 1.5, 1e-6);
  EXPECT_NEAR(fitted->mean()[1][0][0].item<double>(), 2.5, 1e-6);
  ASSERT_EQ(noise.draws.size(), 2U);
  EXPECT_EQ(noise.draws[0].first, (std::vector<int64_t>{2, 1}));
  EXPECT_DOUBLE_EQ(noise.draws[0].second, 7.0 * 5.0);
  EXPECT_EQ(noise.draws[1].first, (std::vector<int64_t>{2, 2}));
  EXPECT_DOUBLE_EQ(noise.draws[1].second, 7.0 * 25.0);
  ASSERT_TRUE(fitted->release().has_value());
  EXPECT_DOUBLE_EQ(fitted->release()->noise_multiplier, 7.0 / std::sqrt(2.0));
  EXPECT_DOUBLE_EQ(fitted->release()->sample_rate, 1.0);
  EXPECT_EQ(fitted->release()->steps, 1);
  EXPECT_TRUE(*fitted->release() == channel_whitening_release(7.0));
  // The clipped examples (3, 0) and (0, 5) have covariance Σ = [[2.25, −3.75], [−3.75, 6.25]];
  // W = (Σ + I)^(-1/2), and W² (Σ + I) = I.
  const auto sigma = torch::tensor({{2.25, -3.75}, {-3.75, 6.25}}, torch::kDouble);
  const auto w = fitted->matrix().to(torch::kDouble);
  EXPECT_TRUE(torch::allclose(w.mm(w).mm(sigma + torch::eye(2, torch::kDouble)),
                              torch::eye(2, torch::kDouble), 1e-5, 1e-5))
      << w;
}

// Real noise: the noisy covariance may have negative eigenvalues; they count as 0, so W stays
// finite and symmetric, and its largest gain is at most λ^(-1/2).
TEST(ChannelWhitening, NoiseNeverMakesTheMatrixInvalid) {
  const auto x = correlated_features(20, 6, 2, 2);
  dptorch::optim::PhiloxNoise noise(3);
  auto fitted = fit_channel_whitening(
      x, ChannelWhiteningOptions().norm_bound(10).noise_multiplier(50).regularization(0.25), noise);
  const auto w = fitted->matrix().to(torch::kDouble);
  EXPECT_TRUE(torch::isfinite(w).all().item<bool>());
  EXPECT_TRUE(torch::allclose(w, w.t()));
  EXPECT_LE(torch::linalg::eigvalsh(w, "L").max().item<double>(), 2.0 + 1e-6);
  EXPECT_GT(torch::linalg::eigvalsh(w, "L").min().item<double>(), 0.0);
}

TEST(ChannelWhitening, CheckpointsKeepTheFittedBuffers) {
  const auto x = correlated_features(40, 3, 2, 2);
  RecordingNoise noise;
  auto fitted = fit_channel_whitening(x, quiet(1e9, 0.1), noise);
  std::stringstream buffer;
  torch::save(fitted, buffer);
  ChannelWhitening loaded(3, std::vector<int64_t>{2, 2});
  torch::load(loaded, buffer);
  EXPECT_TRUE(torch::equal(loaded->mean(), fitted->mean()));
  EXPECT_TRUE(torch::equal(loaded->matrix(), fitted->matrix()));
  const auto input = torch::randn({2, 3, 2, 2});
  EXPECT_TRUE(torch::allclose(loaded->forward(input), fitted->forward(input)));
}

TEST(ChannelWhitening, RejectsBadInput) {
  RecordingNoise noise;
  const auto x = torch::randn({4, 3, 2});
  EXPECT_THAT([&] { (void)fit_channel_whitening(x, ChannelWhiteningOptions(), noise); },
              ThrowsMessage<c10::Error>(HasSubstr("needs norm_bound")));
  EXPECT_THAT([&] { (void)fit_channel_whitening(x, quiet(-1, 1), noise); },
              ThrowsMessage<c10::Error>(HasSubstr("norm_bound")));
  EXPECT_THAT([&] { (void)fit_channel_whitening(x, quiet(1, 0), noise); },
              ThrowsMessage<c10::Error>(HasSubstr("regularization")));
  EXPECT_THAT([&] { (void)fit_channel_whitening(x, quiet(1, 1).noise_multiplier(0), noise); },
              ThrowsMessage<c10::Error>(HasSubstr("noise_multiplier")));
  EXPECT_THAT([&] { (void)fit_channel_whitening(torch::randn({4}), quiet(1, 1), noise); },
              ThrowsMessage<c10::Error>(HasSubstr("[N, C, *spatial]")));
  auto bad = x.clone();
  bad[1][2][0] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THAT([&] { (void)fit_channel_whitening(bad, quiet(1, 1), noise); },
              ThrowsMessage<c10::Error>(HasSubstr("NaN")));
  EXPECT_THAT([&] { (void)fit_channel_whitening(x.to(torch::kInt), quiet(1, 1), noise); },
              ThrowsMessage<c10::Error>(HasSubstr("floating-point")));
  auto fitted = fit_channel_whitening(x, quiet(1, 1), noise);
  EXPECT_THAT(
      [&] {
        (void)fitted->forward(torch::randn({4, 3, 5}));
      },
      ThrowsMessage<c10::Error>(HasSubstr("fitted to examples of shape")));
}

}  // namespace
