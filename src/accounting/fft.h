#pragma once

#include <complex>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

// Fast Fourier transforms and large work buffers for the PRV accountant's convolutions.
// Internals: sizes are powers of two (the PRV grid is sized to one).

namespace dptorch::accounting::detail {

/// A heap array of doubles for grids of millions of points: zero-initialised, aligned to
/// 2 MiB and, on Linux, backed by transparent huge pages where the system allows
/// (first-touching 4 KiB pages costs more than the FFT on some virtual machines). It has a
/// fixed capacity and a size within it, so an in-place rfft can grow n reals to n + 2.
class Buffer {
 public:
  Buffer() = default;
  /// `size` zeros with room for `capacity` >= size values.
  Buffer(size_t size, size_t capacity);
  /// `size` zeros.
  explicit Buffer(size_t size) : Buffer(size, size) {}

  /// Raw access, size and capacity, element access and iteration, as std::vector.
  double* data() noexcept { return data_.get(); }
  const double* data() const noexcept { return data_.get(); }
  size_t size() const noexcept { return size_; }
  size_t capacity() const noexcept { return capacity_; }
  /// Changes the size within the capacity (new values are whatever the memory holds).
  void resize(size_t size);

  double& operator[](size_t i) noexcept { return data_[i]; }
  const double& operator[](size_t i) const noexcept { return data_[i]; }
  double* begin() noexcept { return data(); }
  double* end() noexcept { return data() + size_; }
  const double* begin() const noexcept { return data(); }
  const double* end() const noexcept { return data() + size_; }

 private:
  struct Free {
    void operator()(double* p) const noexcept;
  };
  std::unique_ptr<double[], Free> data_;
  size_t size_ = 0;
  size_t capacity_ = 0;
};

/// True if n is a power of two (n >= 1).
bool is_power_of_two(size_t n);

/// The smallest power of two >= n (n >= 1).
size_t next_power_of_two(size_t n);

/// In-place FFT of n (a power of two) complex values stored as interleaved (re, im) doubles:
/// X_k = Σ_j x_j exp(∓2πi jk/n), minus sign forward; the inverse is unnormalised (n times
/// the inverse transform). Iterative radix-2 (Cooley, Tukey 1965) up to 2^13 points; larger
/// sizes use the four-step decomposition n = n1 n2 (Bailey 1990) over radix-2 transforms
/// that fit in cache. `scratch` holds at least 2n doubles (unused for small n).
void fft_interleaved(double* data, size_t n, double* scratch, bool inverse);

/// In-place FFT of a std::vector (convenience for tests; see fft_interleaved).
void fft(std::vector<std::complex<double>>& data, bool inverse);

/// In-place real FFT: the first n (a power of two >= 2) values of `data` become its n/2 + 1
/// DFT coefficients, interleaved; data's size grows to n + 2 (its capacity must allow it).
/// One complex FFT of length n/2. `scratch` holds at least n doubles.
void rfft_inplace(Buffer& data, Buffer& scratch);

/// Inverse of rfft_inplace: n/2 + 1 interleaved coefficients (size n + 2) become the n real
/// values (size n), normalised so that irfft(rfft(x)) == x up to rounding.
void irfft_inplace(Buffer& data, size_t n, Buffer& scratch);

/// The first n/2 + 1 DFT coefficients of a real sequence of power-of-two length n >= 2.
std::vector<std::complex<double>> rfft(const std::vector<double>& x);

/// z_k <- z_k^steps for `bins` interleaved complex values (the T-fold composition of a
/// distribution whose spectrum z is), as |z|^T e^(i T arg z) so that large T neither overflows
/// nor loses the phase; bins whose power underflows are set to 0 directly.
void raise_spectrum(double* z, size_t bins, int64_t steps);

/// The real sequence of length n whose rfft is `spectrum` (n/2 + 1 coefficients).
std::vector<double> irfft(const std::vector<std::complex<double>>& spectrum, size_t n);

}  // namespace dptorch::accounting::detail
