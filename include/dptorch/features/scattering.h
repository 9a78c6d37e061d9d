#pragma once

#include <cstdint>
#include <vector>

#include <torch/types.h>

namespace dptorch::features {

/// The two-dimensional scattering transform of order two (Bruna & Mallat 2013; Oyallon &
/// Mallat 2015), with the filters, padding, subsampling and channel order as Kymatio's
/// Scattering2D defines it, so that its outputs match Kymatio's to within float rounding (a few
/// 1e-7 relative). It is a fixed (untrained) feature map, stable to small translations and
/// deformations, often used as the input of small differentially private classifiers.
///
/// Definition, for an H×W image x and parameters J (number of dyadic scales) and L (number
/// of orientations):
///  - x is reflect-padded (mirrored without repeating the edge pixel) to Hp×Wp, where
///    Hp = (⌊H/2^J⌋ + 2)·2^J, with ⌊(Hp − H)/2⌋ rows on top and the rest at the bottom (columns
///    likewise). All convolutions below are circular on this padded grid, computed by FFT.
///  - The wavelets ψ_{j,θ}, j = 0..J−1, θ = 0..L−1, are Morlet filters: a Gaussian envelope
///    with standard deviation σ = 0.8·2^j, stretched by 1/slant (slant = 4/L) across the
///    direction of oscillation, times exp(i·ξ·⟨u, e_α⟩), where u = (row, column), ξ = (3π/4)/2^j,
///    e_α = (cos α, sin α) and α = (t − θ)·π/L with t = L/2 − 1 truncated toward zero; a multiple
///    of the envelope is subtracted so that each wavelet sums to zero. The low-pass φ is a Gaussian
///    with σ = 0.8·2^(J−1). Every filter is sampled on the padded grid, periodised over the 5×5
///    neighbouring copies of the grid, divided by 2·3.1415·σ²/slant (slant = 1 for φ; this
///    truncated π makes φ's gain 1.0000295 rather than 1) and used through the real part of
///    its discrete Fourier transform.
///  - S0 = (x ⋆ φ) sampled every 2^J pixels;
///    S1[j1,θ1] = (U1 ⋆ φ) sampled every 2^J pixels, with U1 = |x ⋆ ψ_{j1,θ1}|;
///    S2[j1,θ1,j2,θ2] = (|U1 ⋆ ψ_{j2,θ2}| ⋆ φ) sampled every 2^J pixels, for j1 < j2.
///    Each modulus is kept only every 2^j pixels (j the scale of its wavelet) and the next
///    convolution runs on that coarser grid, with the Fourier transform of the filter folded
///    (periodised) to the coarser grid; subsampling is done in the Fourier domain by folding
///    the spectrum.
///  - The (Hp/2^J)×(Wp/2^J) results lose one row and column at each edge, leaving
///    ⌊H/2^J⌋×⌊W/2^J⌋ values per channel; output position (p, q) is centred on input pixel
///    (2^J·p + 2^J − top padding, 2^J·q + 2^J − left padding), which is (2^J·p, 2^J·q) when
///    the padding is 2^J on each side.
///
/// Channels, K = 1 + J·L + L²·J·(J−1)/2 of them, in this order: S0; then S1 for j1 = 0..J−1,
/// θ1 = 0..L−1 (θ fastest); then S2 for j1 = 0..J−1, θ1 = 0..L−1, j2 = j1+1..J−1,
/// θ2 = 0..L−1 (θ2 fastest). For 28×28 images with J = 2, L = 8 this is 81 channels of 7×7.
///
/// The filter bank is built once, in double precision, by the constructor; forward() does only
/// the transform (FFTs, products with the filters, and small matrix products for the low-pass
/// step, which is separable), on the input's device and in its precision (float or double).
/// The object is immutable after construction, so forward() may be called concurrently.
///
/// Example:
/// ```
///   dptorch::features::Scattering2D scattering(28, 28, /*J=*/2);   // L = 8
///   torch::Tensor features = scattering.forward(images);  // [B, 28, 28] -> [B, 81, 7, 7]
/// ```
class Scattering2D {
 public:
  /// Builds the filter bank for height×width images with J scales and L orientations.
  /// Throws c10::ValueError unless height, width >= 1, J >= 1, L >= 1 and both height and
  /// width are at least 2^J.
  Scattering2D(int64_t height, int64_t width, int64_t J, int64_t L = 8);

  /// Scattering coefficients of x, shaped [..., H, W] (any number of leading batch
  /// dimensions, float or double, any device); returns [..., channels(), out_height(),
  /// out_width()] with x's dtype and device. Throws c10::ValueError if x has fewer than two
  /// dimensions, trailing sizes other than (height, width), or a dtype other than float or
  /// double. The images are transformed a few at a time, so memory beyond the input and the
  /// output does not grow with the batch size.
  torch::Tensor forward(const torch::Tensor& x) const;

  /// Number of output channels, K = 1 + J·L + L²·J·(J−1)/2.
  int64_t channels() const noexcept { return 1 + J_ * L_ + L_ * L_ * J_ * (J_ - 1) / 2; }
  /// Output height, ⌊height / 2^J⌋.
  int64_t out_height() const noexcept { return height_ >> J_; }
  /// Output width, ⌊width / 2^J⌋.
  int64_t out_width() const noexcept { return width_ >> J_; }

 private:
  int64_t height_, width_, J_, L_;
  torch::Tensor pad_rows_, pad_cols_;  // gather indices implementing the reflection padding
  // psi_[j][r]: the L wavelets of scale j in Fourier (complex), [L, Hp/2^r, Wp/2^r], folded to
  // the grid subsampled by 2^r and divided by 4^(j−r), for r = 0..max(j−1, 0).
  std::vector<std::vector<torch::Tensor>> psi_;
  // The low-pass step at resolution r as P_r·U·Q_rᵀ: low_rows_[r] = P_r, low_cols_[r] = Q_rᵀ.
  std::vector<torch::Tensor> low_rows_, low_cols_;
};

}  // namespace dptorch::features
