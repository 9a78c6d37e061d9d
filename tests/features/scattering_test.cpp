#include <gtest/gtest.h>
#include <torch/torch.h>

#include <dptorch/features/scattering.h>

#include <cmath>
#include <complex>
#include <vector>

namespace {

using dptorch::features::Scattering2D;

constexpr double kPi = 3.14159265358979323846;

// The reference image: x[i][j] = ((3i + 5j) mod 11) / 10, 28×28, in float.
torch::Tensor pattern_image() {
  auto x = torch::empty({28, 28}, torch::kFloat);
  auto a = x.accessor<float, 2>();
  for (int i = 0; i < 28; ++i)
    for (int j = 0; j < 28; ++j) a[i][j] = static_cast<float>((3 * i + 5 * j) % 11) / 10.0f;
  return x;
}

// Gaussian blob exp(−|u − c|²/(2·2²)) on a 28×28 grid, centred at (row, col).
torch::Tensor blob(double row, double col) {
  const auto i = torch::arange(28, torch::kDouble).unsqueeze(1);
  const auto j = torch::arange(28, torch::kDouble).unsqueeze(0);
  return torch::exp(-((i - row) * (i - row) + (j - col) * (j - col)) / 8.0);
}

double max_abs(const torch::Tensor& t) { return t.abs().max().item<double>(); }

// ---- A direct transcription of the definition (2-D filters, full-size products, subsampling by
// averaging spectral blocks), in double, for one image: the independent check of the optimised
// implementation on sizes and parameters the reference values do not cover.

torch::Tensor direct_gabor(int64_t M, int64_t N, double sigma, double theta, double xi,
                           double slant) {
  const double c = std::cos(theta), s = std::sin(theta);
  // curv = R·diag(1, slant²)·Rᵀ / (2σ²)
  const double a = (c * c + slant * slant * s * s) / (2 * sigma * sigma);
  const double b = (c * s - slant * slant * s * c) / (2 * sigma * sigma);
  const double d = (s * s + slant * slant * c * c) / (2 * sigma * sigma);
  auto out = torch::zeros({M, N}, torch::kComplexDouble);
  auto acc = out.accessor<c10::complex<double>, 2>();
  for (int64_t i = 0; i < M; ++i) {
    for (int64_t j = 0; j < N; ++j) {
      std::complex<double> sum = 0;
      for (int64_t ex = -2; ex <= 2; ++ex) {
        for (int64_t ey = -2; ey <= 2; ++ey) {
          const double u = static_cast<double>(i + ex * M), v = static_cast<double>(j + ey * N);
          sum += std::exp(
              std::complex<double>(-(a * u * u + 2 * b * u * v + d * v * v), xi * (u * c + v * s)));
        }
      }
      sum /= 2 * 3.1415 * sigma * sigma / slant;
      acc[i][j] = c10::complex<double>(sum.real(), sum.imag());
    }
  }
  return out;
}

torch::Tensor direct_periodize(const torch::Tensor& f, int64_t res) {
  const int64_t M = f.size(0), N = f.size(1), k = int64_t{1} << res;
  auto masked = f.clone();
  masked.narrow(0, M / (2 * k), M - M / k).zero_();
  masked.narrow(1, N / (2 * k), N - N / k).zero_();
  auto crop = torch::zeros({M / k, N / k}, torch::kDouble);
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j)
      crop += masked.narrow(0, i * (M / k), M / k).narrow(1, j * (N / k), N / k);
  return crop;
}

torch::Tensor direct_subsample(const torch::Tensor& z, int64_t k) {
  const int64_t m = z.size(0), n = z.size(1);
  return z.reshape({k, m / k, k, n / k}).mean(torch::IntArrayRef{0, 2});
}

torch::Tensor direct_scattering(const torch::Tensor& image, int64_t J, int64_t L) {
  namespace F = torch::nn::functional;
  const int64_t H = image.size(0), W = image.size(1), step = int64_t{1} << J;
  const int64_t M = ((H + step) / step + 1) * step, N = ((W + step) / step + 1) * step;
  const int64_t top = (M - H) / 2, bottom = (M - H + 1) / 2;
  const int64_t left = (N - W) / 2, right = (N - W + 1) / 2;
  // Reflection padding; a padding equal to the image side is reflect(side − 1) plus one more
  // mirrored row (column) at each end.
  const bool full_rows = top == H, full_cols = left == W;
  auto x = F::pad(image.to(torch::kDouble).view({1, 1, H, W}),
                  F::PadFuncOptions(
                      {left - full_cols, right - full_cols, top - full_rows, bottom - full_rows})
                      .mode(torch::kReflect))
               .view({M - 2 * full_rows, N - 2 * full_cols});
  if (full_rows) x = torch::cat({x.narrow(0, 1, 1), x, x.narrow(0, x.size(0) - 2, 1)}, 0);
  if (full_cols) x = torch::cat({x.narrow(1, 1, 1), x, x.narrow(1, x.size(1) - 2, 1)}, 1);

  std::vector<std::vector<torch::Tensor>> psi(J);  // [j][θ], full size
  for (int64_t j = 0; j < J; ++j) {
    for (int64_t t = 0; t < L; ++t) {
      const double sigma = 0.8 * std::pow(2.0, j), slant = 4.0 / L;
      const double theta = (static_cast<int>(L - L / 2.0 - 1) - t) * kPi / L;
      const auto wave = direct_gabor(M, N, sigma, theta, 3.0 / 4.0 * kPi / std::pow(2.0, j), slant);
      const auto env = direct_gabor(M, N, sigma, theta, 0.0, slant);
      psi[j].push_back(torch::real(torch::fft::fft2(wave - wave.sum() / env.sum() * env)));
    }
  }
  const auto phi =
      torch::real(torch::fft::fft2(direct_gabor(M, N, 0.8 * std::pow(2.0, J - 1), 0, 0, 1)));

  const auto crop = [](const torch::Tensor& t) {
    return t.narrow(0, 1, t.size(0) - 2).narrow(1, 1, t.size(1) - 2);
  };
  const auto low = [&](const torch::Tensor& z, int64_t r) {
    return crop(torch::real(
        torch::fft::ifft2(direct_subsample(z * direct_periodize(phi, r), int64_t{1} << (J - r)))));
  };
  const auto modulus_fft = [](const torch::Tensor& z) {
    return torch::fft::fft2(torch::abs(torch::fft::ifft2(z)));
  };
  const auto U0 = torch::fft::fft2(x);
  std::vector<torch::Tensor> s0{low(U0, 0)}, s1, s2;
  for (int64_t j1 = 0; j1 < J; ++j1) {
    for (int64_t t1 = 0; t1 < L; ++t1) {
      const auto U1 = modulus_fft(direct_subsample(U0 * psi[j1][t1], int64_t{1} << j1));
      s1.push_back(low(U1, j1));
      for (int64_t j2 = j1 + 1; j2 < J; ++j2) {
        for (int64_t t2 = 0; t2 < L; ++t2) {
          const auto U2 = modulus_fft(
              direct_subsample(U1 * direct_periodize(psi[j2][t2], j1), int64_t{1} << (j2 - j1)));
          s2.push_back(low(U2, j2));
        }
      }
    }
  }
  s0.insert(s0.end(), s1.begin(), s1.end());
  s0.insert(s0.end(), s2.begin(), s2.end());
  return torch::stack(s0);
}

TEST(Scattering2D, SizesAndChannelCount) {
  const Scattering2D a(28, 28, 2);
  EXPECT_EQ(a.channels(), 81);
  EXPECT_EQ(a.out_height(), 7);
  EXPECT_EQ(a.out_width(), 7);
  const Scattering2D b(32, 45, 3, 6);
  EXPECT_EQ(b.channels(), 1 + 3 * 6 + 36 * 3);
  EXPECT_EQ(b.out_height(), 4);
  EXPECT_EQ(b.out_width(), 5);
  EXPECT_EQ(b.forward(torch::rand({2, 32, 45})).sizes(), torch::IntArrayRef({2, 127, 4, 5}));
}

// Values computed by Kymatio's Scattering2D (torch frontend, float) for pattern_image().
TEST(Scattering2D, MatchesReferenceValues) {
  const Scattering2D scattering(28, 28, 2, 8);
  for (auto dtype : {torch::kDouble, torch::kFloat}) {
    SCOPED_TRACE(dtype == torch::kDouble ? "double" : "float");
    const auto S = scattering.forward(pattern_image().to(dtype)).to(torch::kDouble);
    ASSERT_EQ(S.sizes(), torch::IntArrayRef({81, 7, 7}));
    const auto near = [](double got, double want) {
      EXPECT_NEAR(got, want, 1e-5 * std::abs(want));
    };
    near(S[0][0][0].item<double>(), 0.4732531);
    near(S[0][3][3].item<double>(), 0.4926243);
    near(S[1][3][3].item<double>(), 0.0974638);
    near(S.narrow(0, 0, 1).sum().item<double>(), 24.485670);
    near(S.narrow(0, 1, 16).sum().item<double>(), 28.924843);
    near(S.narrow(0, 17, 64).sum().item<double>(), 10.644175);
  }
}

// Sizes with odd and unequal paddings, padding equal to the image side (8×8, J = 3), J = 1 and
// J = 3, odd L and L = 1.
TEST(Scattering2D, MatchesDirectTranscriptionOfTheDefinition) {
  struct Case {
    int64_t H, W, J, L;
  };
  for (const Case c : {Case{28, 28, 2, 8}, Case{17, 23, 2, 5}, Case{8, 8, 3, 4}, Case{24, 19, 3, 3},
                       Case{9, 12, 1, 6}, Case{16, 16, 2, 1}}) {
    SCOPED_TRACE(testing::Message() << c.H << "x" << c.W << " J=" << c.J << " L=" << c.L);
    torch::manual_seed(c.H * 100 + c.W);
    const auto image = torch::rand({c.H, c.W}, torch::kDouble);
    const auto got = Scattering2D(c.H, c.W, c.J, c.L).forward(image);
    const auto want = direct_scattering(image, c.J, c.L);
    ASSERT_EQ(got.sizes(), want.sizes());
    EXPECT_LT(max_abs(got - want), 1e-10 * max_abs(want));
  }
}

TEST(Scattering2D, ConstantImageHasOnlyTheLowPassGain) {
  const Scattering2D scattering(28, 28, 2);
  const auto S = scattering.forward(torch::full({28, 28}, 0.7, torch::kDouble));
  // The low-pass gain is Σφ = π/3.1415 (the definition normalises by a truncated π).
  const double gain = kPi / 3.1415;  // 1.0000295; Kymatio's float32 filters give 1.0000293
  EXPECT_LT(max_abs(S[0] - 0.7 * gain), 1e-12);
  EXPECT_LT(max_abs(S.narrow(0, 1, 80)), 1e-12);
  const auto Sf = scattering.forward(torch::full({28, 28}, 0.7, torch::kFloat));
  EXPECT_LT(max_abs(Sf[0] - 0.7 * gain), 1e-6);
  EXPECT_LT(max_abs(Sf.narrow(0, 1, 80)), 1e-5);
}

// A shift by 2^J = 4 pixels of a blob in the middle shifts every channel by one output position:
// all steps are circular convolutions and subsamplings by divisors of 4, so only the far tails
// of the filters, reaching the padding, break the equivariance (by ~1e-5 at the edge rows,
// ~1e-7 inside).
TEST(Scattering2D, ShiftByTwoToTheJMovesOutputsByOne) {
  const Scattering2D scattering(28, 28, 2);
  const auto a = scattering.forward(blob(12, 12));
  const auto b = scattering.forward(blob(16, 12));
  EXPECT_LT(max_abs(b.narrow(1, 1, 6) - a.narrow(1, 0, 6)), 1e-4 * max_abs(a));
  EXPECT_LT(max_abs(b.narrow(1, 2, 4) - a.narrow(1, 1, 4)), 2e-6 * max_abs(a));
  const auto argmax = [](const torch::Tensor& map) {
    const int64_t i = map.argmax().item<int64_t>();
    return std::make_pair(i / map.size(1), i % map.size(1));
  };
  EXPECT_EQ(argmax(a[0]), std::make_pair(int64_t{3}, int64_t{3}));
  EXPECT_EQ(argmax(b[0]), std::make_pair(int64_t{4}, int64_t{3}));
  EXPECT_EQ(argmax(a.narrow(0, 1, 16).sum(0)), std::make_pair(int64_t{3}, int64_t{3}));
  EXPECT_EQ(argmax(b.narrow(0, 1, 16).sum(0)), std::make_pair(int64_t{4}, int64_t{3}));
}

// 15 images: more than one internal chunk.
TEST(Scattering2D, BatchesMatchSingleImages) {
  const Scattering2D scattering(28, 28, 2);
  const auto x = torch::rand({3, 5, 28, 28});
  const auto batched = scattering.forward(x);
  ASSERT_EQ(batched.sizes(), torch::IntArrayRef({3, 5, 81, 7, 7}));
  const auto flat = scattering.forward(x.reshape({15, 28, 28}));
  EXPECT_TRUE(torch::equal(flat.reshape({3, 5, 81, 7, 7}), batched));
  for (int64_t i = 0; i < 3; ++i) {
    for (int64_t c = 0; c < 5; ++c) {
      EXPECT_LT(max_abs(scattering.forward(x[i][c]) - batched[i][c]), 1e-6);
    }
  }
  const auto strided = x.transpose(-1, -2).contiguous().transpose(-1, -2);
  EXPECT_LT(max_abs(scattering.forward(strided) - batched), 1e-6);
  EXPECT_EQ(scattering.forward(torch::rand({0, 28, 28})).sizes(),
            torch::IntArrayRef({0, 81, 7, 7}));
}

TEST(Scattering2D, FloatMatchesDouble) {
  const Scattering2D scattering(28, 28, 2);
  const auto x = torch::rand({4, 28, 28}, torch::kDouble);
  const auto d = scattering.forward(x);
  const auto f = scattering.forward(x.to(torch::kFloat));
  EXPECT_EQ(f.scalar_type(), torch::kFloat);
  EXPECT_EQ(d.scalar_type(), torch::kDouble);
  EXPECT_LT(max_abs(f.to(torch::kDouble) - d), 1e-5 * max_abs(d));
}

// Gradients flow to the input (all steps are differentiable away from zeros of the moduli);
// checked against a central difference on one pixel.
TEST(Scattering2D, GradientMatchesFiniteDifference) {
  const Scattering2D scattering(16, 16, 2, 4);
  torch::manual_seed(3);
  const auto x = torch::rand({16, 16}, torch::kDouble);
  const auto weights = torch::rand({scattering.channels(), 4, 4}, torch::kDouble);
  const auto loss = [&](const torch::Tensor& input) {
    return (scattering.forward(input) * weights).sum();
  };
  const auto leaf = x.clone().requires_grad_(true);
  loss(leaf).backward();
  const double h = 1e-6;
  auto plus = x.clone(), minus = x.clone();
  plus[5][9] += h;
  minus[5][9] -= h;
  const double numeric = (loss(plus) - loss(minus)).item<double>() / (2 * h);
  EXPECT_NEAR(leaf.grad()[5][9].item<double>(), numeric, 1e-6 * std::abs(numeric) + 1e-9);
}

TEST(Scattering2D, RejectsBadArguments) {
  EXPECT_THROW(Scattering2D(28, 28, 0), c10::ValueError);
  EXPECT_THROW(Scattering2D(28, 28, 2, 0), c10::ValueError);
  EXPECT_THROW(Scattering2D(3, 28, 2), c10::ValueError);   // 3 < 2^2
  EXPECT_THROW(Scattering2D(28, 28, 5), c10::ValueError);  // 28 < 2^5
  EXPECT_THROW(Scattering2D(0, 28, 1), c10::ValueError);
  const Scattering2D scattering(28, 28, 2);
  EXPECT_THROW(scattering.forward(torch::rand({28, 27})), c10::ValueError);
  EXPECT_THROW(scattering.forward(torch::rand({4, 27, 28})), c10::ValueError);
  EXPECT_THROW(scattering.forward(torch::rand({28})), c10::ValueError);
  EXPECT_THROW(scattering.forward(torch::ones({28, 28}, torch::kLong)), c10::ValueError);
  EXPECT_THROW(scattering.forward(torch::ones({28, 28}, torch::kHalf)), c10::ValueError);
  EXPECT_THROW(scattering.forward(torch::Tensor()), c10::ValueError);
  try {
    scattering.forward(torch::rand({28, 27}));
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("[..., 28, 28]"), std::string::npos) << e.what();
  }
}

}  // namespace
