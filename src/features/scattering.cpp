#include <dptorch/features/scattering.h>

#include <torch/torch.h>

#include <algorithm>
#include <cmath>

namespace dptorch::features {
namespace {

constexpr double kPi = 3.14159265358979323846;

// Gabor filter g(u)·exp(i·ξ·(u0·cos θ + u1·sin θ)) on the M×N grid, u = (row, column), where g
// is the Gaussian exp(−uᵀCu) with C = R_θ·diag(1, slant²)·R_θᵀ / (2σ²), summed over the 5×5
// translates of the grid by multiples of (M, N) from −2 to 2, and divided by 2·3.1415·σ²/slant
// (the definition's normalisation, with its truncated π).
torch::Tensor gabor(int64_t M, int64_t N, double sigma, double theta, double xi, double slant) {
  const double c = std::cos(theta), s = std::sin(theta), s2 = slant * slant;
  const double scale = 2.0 * sigma * sigma;
  const double c00 = (c * c + s2 * s * s) / scale;
  const double c01 = 2.0 * (1.0 - s2) * c * s / scale;  // C[0][1] + C[1][0]
  const double c11 = (s * s + s2 * c * c) / scale;

  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  const auto rows = torch::arange(M, opts).unsqueeze(1);
  const auto cols = torch::arange(N, opts).unsqueeze(0);
  auto sum = torch::zeros({M, N}, opts.dtype(torch::kComplexDouble));
  for (int64_t ex = -2; ex <= 2; ++ex) {
    for (int64_t ey = -2; ey <= 2; ++ey) {
      const auto u0 = rows + static_cast<double>(ex * M);
      const auto u1 = cols + static_cast<double>(ey * N);
      const auto quadratic = c00 * u0 * u0 + c01 * u0 * u1 + c11 * u1 * u1;
      sum += torch::polar(torch::exp(-quadratic), xi * (c * u0 + s * u1));
    }
  }
  return sum / (2.0 * 3.1415 * sigma * sigma / slant);
}

// Morlet wavelet: the Gabor filter minus K times its envelope, K chosen so the sum is zero.
torch::Tensor morlet(int64_t M, int64_t N, double sigma, double theta, double xi, double slant) {
  const auto wave = gabor(M, N, sigma, theta, xi, slant);
  const auto envelope = gabor(M, N, sigma, theta, 0.0, slant);
  return wave - (wave.sum() / envelope.sum()) * envelope;
}

// Real part of the DFT of a spatial filter (its imaginary part is only periodisation residue).
torch::Tensor fourier(const torch::Tensor& filter) { return torch::real(torch::fft::fft2(filter)); }

// Folds the Fourier filter f along dimension `dim` (size M) to the grid subsampled by k = 2^res:
// the frequencies [M/(2k), M/(2k) + M − M/k) are zeroed, then the k blocks of M/k are summed.
// What is left is the band a signal on the coarser grid can carry, with the Nyquist frequency
// taken from the negative side.
torch::Tensor fold_axis(const torch::Tensor& f, int64_t dim, int64_t res) {
  if (res == 0) return f;
  const int64_t M = f.size(dim), k = int64_t{1} << res;
  auto masked = f.clone();
  masked.narrow(dim, M / (2 * k), M - M / k).zero_();
  const int64_t d = dim < 0 ? dim + f.dim() : dim;
  auto shape = f.sizes().vec();
  shape[d] = M / k;
  shape.insert(shape.begin() + d, k);  // [..., k, M/k, ...]
  return masked.reshape(shape).sum(d);
}

// Folds the last two (frequency) dimensions of f to the grid subsampled by 2^res.
torch::Tensor fold(const torch::Tensor& f, int64_t res) {
  return fold_axis(fold_axis(f, -2, res), -1, res);
}

// Gather indices mapping padded position p to input position p − before, reflected at both ends
// without repeating the edge (period 2(n − 1); valid for any padding up to n).
torch::Tensor reflect_index(int64_t n, int64_t padded, int64_t before) {
  const int64_t period = std::max<int64_t>(2 * (n - 1), 1);
  std::vector<int64_t> index(static_cast<size_t>(padded));
  for (int64_t p = 0; p < padded; ++p) {
    const int64_t q = ((p - before) % period + period) % period;
    index[static_cast<size_t>(p)] = q < n ? q : period - q;
  }
  return torch::tensor(index, torch::kLong);
}

// The low-pass step along one axis, as a matrix: a signal of length m (on the grid subsampled by
// 2^res) is filtered by the folded 1-D low-pass spectrum `spectrum` (length M), subsampled to the
// grid 2^J by averaging the spectrum's 2^(J−res) blocks, and cropped by one sample at each end.
// Returns the [m, m/2^(J−res) − 2] matrix that maps the signal to the result.
torch::Tensor low_pass_matrix(const torch::Tensor& spectrum, int64_t res, int64_t J) {
  const auto folded = fold_axis(spectrum, 0, res);  // length m
  const int64_t m = folded.size(0), k = int64_t{1} << (J - res);
  const auto basis = torch::eye(m, torch::kDouble);
  const auto filtered = torch::fft::fft(basis, c10::nullopt, 1) * folded;
  const auto averaged = filtered.reshape({m, k, m / k}).mean(1);
  return torch::real(torch::fft::ifft(averaged, c10::nullopt, 1)).narrow(1, 1, m / k - 2);
}

// The full 2-D DFT of a real signal, from the half spectrum of rfft2 completed by Hermitian
// symmetry (F[k, l] = conj F[−k, −l]); several times faster than fft2 on real input.
torch::Tensor real_fft2(const torch::Tensor& u) {
  const int64_t m = u.size(-2), n = u.size(-1);
  const auto half = torch::fft::rfft2(u);  // columns 0..n/2
  const auto opts = torch::TensorOptions().dtype(torch::kLong).device(u.device());
  const auto neg_rows = torch::remainder(-torch::arange(m, opts), m);
  const auto neg_cols = torch::arange(n - (n / 2 + 1), 0, -1, opts);  // n − l for l > n/2
  return torch::cat({half, half.index_select(-2, neg_rows).index_select(-1, neg_cols).conj()}, -1);
}

// subsample_k(z ⊙ f), f broadcasting against z, without forming z ⊙ f: the sum over the k×k
// spectral blocks of z ⊙ f (f is stored divided by k², which turns the sum into the average
// that subsampling by k in space amounts to).
torch::Tensor filter_subsample(const torch::Tensor& z, const torch::Tensor& f, int64_t k) {
  const int64_t m = z.size(-2) / k, n = z.size(-1) / k;
  torch::Tensor sum;
  for (int64_t a = 0; a < k; ++a) {
    for (int64_t b = 0; b < k; ++b) {
      auto term =
          z.narrow(-2, a * m, m).narrow(-1, b * n, n) * f.narrow(-2, a * m, m).narrow(-1, b * n, n);
      sum = sum.defined() ? sum.add_(term) : term;
    }
  }
  return sum;
}

}  // namespace

Scattering2D::Scattering2D(int64_t height, int64_t width, int64_t J, int64_t L)
    : height_(height), width_(width), J_(J), L_(L) {
  TORCH_CHECK_VALUE(height >= 1 && width >= 1,
                    "Scattering2D: the image size must be positive, got ", height, "x", width);
  TORCH_CHECK_VALUE(J >= 1, "Scattering2D: J (the number of scales) must be at least 1, got ", J);
  TORCH_CHECK_VALUE(L >= 1, "Scattering2D: L (the number of orientations) must be at least 1, got ",
                    L);
  TORCH_CHECK_VALUE(J < 31 && (int64_t{1} << J) <= std::min(height, width),
                    "Scattering2D: both image sides must be at least 2^J, but the image is ",
                    height, "x", width, " and J = ", J,
                    "; use J <= floor(log2(min(height, width))) or a larger image");

  const int64_t step = int64_t{1} << J;
  const int64_t M = (height / step + 2) * step, N = (width / step + 2) * step;
  pad_rows_ = reflect_index(height, M, (M - height) / 2);
  pad_cols_ = reflect_index(width, N, (N - width) / 2);

  const double slant = 4.0 / static_cast<double>(L);
  const double t = std::trunc(static_cast<double>(L) / 2.0 - 1.0);
  for (int64_t j = 0; j < J; ++j) {
    const double sigma = 0.8 * std::ldexp(1.0, static_cast<int>(j));
    const double xi = 0.75 * kPi / std::ldexp(1.0, static_cast<int>(j));
    std::vector<torch::Tensor> wavelets;
    for (int64_t theta = 0; theta < L; ++theta) {
      const double angle = (t - static_cast<double>(theta)) * kPi / static_cast<double>(L);
      wavelets.push_back(fourier(morlet(M, N, sigma, angle, xi, slant)));
    }
    const auto bank = torch::stack(wavelets);  // [L, M, N]
    // Level r filters a signal on the grid subsampled by 2^r (the input for r = 0, a first-order
    // modulus of scale r otherwise) whose result is subsampled by 2^(j−r).
    std::vector<torch::Tensor> levels;
    for (int64_t r = 0; r < std::max<int64_t>(j, 1); ++r) {
      const auto level = fold(bank, r) / std::ldexp(1.0, static_cast<int>(2 * (j - r)));
      // Stored as complex: complex·complex products are vectorised, complex·real ones are not.
      levels.push_back(torch::complex(level, torch::zeros_like(level)));
    }
    psi_.push_back(std::move(levels));
  }

  // The low-pass φ (θ = 0, ξ = 0, slant = 1) is a product a(row)·b(col) of periodised 1-D
  // Gaussians, and so is its folded Fourier transform: Re(â ⊗ b̂) = Re â ⊗ Re b̂ because Im â,
  // which only comes from the periodisation's asymmetry, is below e^(−100) relative. Re â is even,
  // so each axis's filter-subsample-crop is a real matrix and the low-pass step of the definition,
  // Re ifft2(subsample(fft2(U)·φ̂)) cropped, equals P·U·Qᵀ.
  const double sigma = 0.8 * std::ldexp(1.0, static_cast<int>(J - 1));
  const auto gaussian = [&](int64_t n) {
    const auto u = torch::arange(n, torch::kDouble);
    auto sum = torch::zeros({n}, torch::kDouble);
    for (int64_t e = -2; e <= 2; ++e) {
      const auto v = u + static_cast<double>(e * n);
      sum += torch::exp(-v * v / (2.0 * sigma * sigma));
    }
    return torch::real(torch::fft::fft(sum));
  };
  const auto row_spectrum = gaussian(M) / (2.0 * 3.1415 * sigma * sigma);
  const auto col_spectrum = gaussian(N);
  for (int64_t r = 0; r < J; ++r) {
    low_rows_.push_back(low_pass_matrix(row_spectrum, r, J).t().contiguous());
    low_cols_.push_back(low_pass_matrix(col_spectrum, r, J));
  }
}

torch::Tensor Scattering2D::forward(const torch::Tensor& x) const {
  TORCH_CHECK_VALUE(x.defined(), "Scattering2D::forward: the input tensor is undefined");
  TORCH_CHECK_VALUE(x.dim() >= 2 && x.size(-2) == height_ && x.size(-1) == width_,
                    "Scattering2D::forward: expected an input of shape [..., ", height_, ", ",
                    width_, "], got ", x.sizes(),
                    "; reshape the images or build a Scattering2D for this size");
  TORCH_CHECK_VALUE(x.scalar_type() == torch::kFloat || x.scalar_type() == torch::kDouble,
                    "Scattering2D::forward: expected a float or double input, got ",
                    x.scalar_type(), "; convert it with x.to(torch::kFloat)");

  auto out_shape = x.sizes().slice(0, x.dim() - 2).vec();
  out_shape.insert(out_shape.end(), {channels(), out_height(), out_width()});
  const int64_t batch = x.numel() / (height_ * width_);
  if (batch == 0) return torch::empty(out_shape, x.options());

  const auto on_input = [&](const torch::Tensor& t) {
    return t.to(x.device(), t.is_complex() ? c10::toComplexType(x.scalar_type()) : x.scalar_type());
  };
  std::vector<torch::Tensor> rows, cols;
  std::vector<std::vector<torch::Tensor>> psi;
  for (int64_t r = 0; r < J_; ++r) {
    rows.push_back(on_input(low_rows_[r]));
    cols.push_back(on_input(low_cols_[r]));
    psi.emplace_back();
    for (const auto& level : psi_[r]) psi.back().push_back(on_input(level));
  }
  // Low-pass at resolution r: (U ⋆ φ) subsampled to the grid 2^J and cropped, as P_r·U·Q_rᵀ.
  const auto low_pass = [&](const torch::Tensor& u, int64_t r) {
    return torch::matmul(rows[r], torch::matmul(u, cols[r]));
  };

  const auto images = x.reshape({batch, height_, width_});
  const auto rows_index = pad_rows_.to(x.device()), cols_index = pad_cols_.to(x.device());
  // Images go through in chunks whose largest intermediate (the spectra filtered by all L
  // wavelets, or L² of them at a quarter of the size) has about `budget` complex values. On the
  // CPU small chunks are fastest: large fresh allocations are returned to the system when freed
  // and page-faulted back in on the next use, which costs more than the arithmetic on them.
  const int64_t M = rows_index.size(0), N = cols_index.size(0);
  const int64_t per_image = L_ * M * N * (J_ > 1 ? std::max<int64_t>(1, L_ / 4) : 1);
  const int64_t budget = x.is_cpu() ? int64_t{1} << 17 : int64_t{1} << 22;
  const int64_t chunk = std::max<int64_t>(1, budget / per_image);
  std::vector<torch::Tensor> results;
  for (int64_t start = 0; start < batch; start += chunk) {
    const auto U0 = images.narrow(0, start, std::min(chunk, batch - start))
                        .index_select(1, rows_index)
                        .index_select(2, cols_index);  // [b, M, N], reflect-padded
    std::vector<torch::Tensor> first{low_pass(U0, 0).unsqueeze(1)}, second;
    const auto F0 = real_fft2(U0).unsqueeze(1);
    for (int64_t j1 = 0; j1 < J_; ++j1) {
      // U1 = |x ⋆ ψ_{j1,θ1}| kept every 2^j1 pixels: [b, L, M/2^j1, N/2^j1].
      const auto U1 =
          torch::abs(torch::fft::ifft2(filter_subsample(F0, psi[j1][0], int64_t{1} << j1)));
      first.push_back(low_pass(U1, j1));
      if (j1 + 1 == J_) break;
      const auto F1 = real_fft2(U1).unsqueeze(2);
      std::vector<torch::Tensor> by_j2;  // each [b, L(θ1), L(θ2), h, w]
      for (int64_t j2 = j1 + 1; j2 < J_; ++j2) {
        // U2 = |U1 ⋆ ψ_{j2,θ2}| kept every 2^j2 pixels.
        const auto U2 = torch::abs(
            torch::fft::ifft2(filter_subsample(F1, psi[j2][j1], int64_t{1} << (j2 - j1))));
        by_j2.push_back(low_pass(U2, j2));
      }
      second.push_back(torch::cat(by_j2, 2).flatten(1, 2));  // θ1 slowest, then j2, then θ2
    }
    first.insert(first.end(), second.begin(), second.end());
    results.push_back(torch::cat(first, 1));
  }
  return torch::cat(results, 0).reshape(out_shape);
}

}  // namespace dptorch::features
