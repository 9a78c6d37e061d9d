#include "accounting/fft.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <utility>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace dptorch::accounting::detail {

namespace {

constexpr double kTwoPi = 6.28318530717958647692;
// Transforms up to this many points run as one radix-2 pass structure (they fit in L2).
constexpr size_t kDirectMax = size_t{1} << 14;
constexpr size_t kHugePage = size_t{1} << 21;

int log2_exact(size_t n) {
  int bits = 0;
  while ((size_t{1} << bits) < n) {
    ++bits;
  }
  return bits;
}

// cos and sin of 2πk/n for k in [0, n/2): each evaluated directly at an angle <= π/4 and
// mapped by symmetry, so accurate to an ulp (a recurrence would drift), with 8x fewer calls.
struct Twiddles {
  std::vector<double> cos;
  std::vector<double> sin;
};

Twiddles make_twiddles(size_t n) {
  const size_t half = n / 2;
  Twiddles tw{std::vector<double>(half), std::vector<double>(half)};
  auto direct = [&](size_t k) {
    const double angle = kTwoPi * static_cast<double>(k) / static_cast<double>(n);
    tw.cos[k] = std::cos(angle);
    tw.sin[k] = std::sin(angle);
  };
  if (n < 8) {
    for (size_t k = 0; k < half; ++k) {
      direct(k);
    }
    return tw;
  }
  const size_t eighth = n / 8;
  const size_t quarter = n / 4;
  for (size_t k = 0; k <= eighth; ++k) {
    direct(k);
  }
  for (size_t k = eighth + 1; k <= quarter; ++k) {
    tw.cos[k] = tw.sin[quarter - k];
    tw.sin[k] = tw.cos[quarter - k];
  }
  for (size_t k = quarter + 1; k < half; ++k) {
    tw.cos[k] = -tw.cos[half - k];
    tw.sin[k] = tw.sin[half - k];
  }
  return tw;
}

// exp(2πi m/n) for any m < n as the product of two directly evaluated table entries,
// exp(2πi (m_hi 2^s)/n) exp(2πi m_lo/n): two small tables instead of one of n entries.
class TwoLevelTwiddles {
 public:
  explicit TwoLevelTwiddles(size_t n)
      : shift_(log2_exact(n) / 2), mask_((size_t{1} << shift_) - 1) {
    const size_t lo_size = size_t{1} << shift_;
    const size_t hi_size = (n >> shift_) + 1;
    lo_.resize(2 * lo_size);
    hi_.resize(2 * hi_size);
    for (size_t k = 0; k < lo_size; ++k) {
      const double angle = kTwoPi * static_cast<double>(k) / static_cast<double>(n);
      lo_[2 * k] = std::cos(angle);
      lo_[2 * k + 1] = std::sin(angle);
    }
    for (size_t k = 0; k < hi_size; ++k) {
      const double angle = kTwoPi * static_cast<double>(k << shift_) / static_cast<double>(n);
      hi_[2 * k] = std::cos(angle);
      hi_[2 * k + 1] = std::sin(angle);
    }
  }

  void get(size_t m, double* c, double* s) const {
    const double* lo = &lo_[2 * (m & mask_)];
    const double* hi = &hi_[2 * (m >> shift_)];
    *c = hi[0] * lo[0] - hi[1] * lo[1];
    *s = hi[0] * lo[1] + hi[1] * lo[0];
  }

 private:
  int shift_;
  size_t mask_;
  std::vector<double> lo_;
  std::vector<double> hi_;
};

// Twiddles of every radix-2 stage of a length-n transform, laid out so that stage `len` reads
// its len/2 factors exp(∓2πi j/len) contiguously at entries [len/2, len) (interleaved re, im),
// with the sign of the direction baked in.
std::vector<double> stage_twiddles(size_t n, bool inverse) {
  const Twiddles tw = make_twiddles(n);
  const double sign = inverse ? 1.0 : -1.0;
  std::vector<double> out(2 * n);
  for (size_t len = 2; len <= n; len <<= 1) {
    const size_t half = len / 2;
    const size_t step = n / len;
    for (size_t j = 0; j < half; ++j) {
      out[2 * (half + j)] = tw.cos[j * step];
      out[2 * (half + j) + 1] = sign * tw.sin[j * step];
    }
  }
  return out;
}

// Iterative radix-2 decimation-in-time FFT of n interleaved complex values (bit reversal,
// then log2(n) butterfly stages); tw must be stage_twiddles(n, inverse).
void fft_radix2(double* a, size_t n, const double* tw, bool inverse) {
  for (size_t i = 1, j = 0; i < n; ++i) {
    size_t bit = n >> 1;
    for (; j & bit; bit >>= 1) {
      j ^= bit;
    }
    j ^= bit;
    if (i < j) {
      std::swap(a[2 * i], a[2 * j]);
      std::swap(a[2 * i + 1], a[2 * j + 1]);
    }
  }
  // Stage 2: no twiddle. Stage 4: twiddles 1 and ∓i, i.e. a swap of parts.
  for (size_t i = 0; i < 2 * n; i += 4) {
    const double ur = a[i];
    const double ui = a[i + 1];
    const double vr = a[i + 2];
    const double vi = a[i + 3];
    a[i] = ur + vr;
    a[i + 1] = ui + vi;
    a[i + 2] = ur - vr;
    a[i + 3] = ui - vi;
  }
  if (n >= 4) {
    const double sign = inverse ? 1.0 : -1.0;
    for (size_t i = 0; i < 2 * n; i += 8) {
      double* p = a + i;
      // (p0, p2) with twiddle 1, (p1, p3) with twiddle ∓i.
      const double r0 = p[0], i0 = p[1], r1 = p[2], i1 = p[3];
      const double r2 = p[4], i2 = p[5], r3 = p[6], i3 = p[7];
      const double tr = -sign * i3;  // (r3 + i i3)(sign i) = -sign i3 + i sign r3
      const double ti = sign * r3;
      p[0] = r0 + r2;
      p[1] = i0 + i2;
      p[4] = r0 - r2;
      p[5] = i0 - i2;
      p[2] = r1 + tr;
      p[3] = i1 + ti;
      p[6] = r1 - tr;
      p[7] = i1 - ti;
    }
  }
  for (size_t len = 8; len <= n; len <<= 1) {
    const size_t half = len / 2;
    const double* w = tw + 2 * half;
    for (size_t start = 0; start < n; start += len) {
      double* lo = a + 2 * start;
      double* hi = a + 2 * (start + half);
      for (size_t j = 0; j < half; ++j) {
        const double wr = w[2 * j];
        const double wi = w[2 * j + 1];
        const double hr = hi[2 * j];
        const double him = hi[2 * j + 1];
        const double vr = hr * wr - him * wi;
        const double vi = hr * wi + him * wr;
        const double ur = lo[2 * j];
        const double ui = lo[2 * j + 1];
        lo[2 * j] = ur + vr;
        lo[2 * j + 1] = ui + vi;
        hi[2 * j] = ur - vr;
        hi[2 * j + 1] = ui - vi;
      }
    }
  }
}

// dst (cols x rows) = transpose of src (rows x cols), complex elements, in cache-sized tiles.
void transpose(const double* src, double* dst, size_t rows, size_t cols) {
  constexpr size_t kTile = 16;  // 32 thrashes L1: rows are power-of-two strides apart
  for (size_t r0 = 0; r0 < rows; r0 += kTile) {
    const size_t r1 = std::min(rows, r0 + kTile);
    for (size_t c0 = 0; c0 < cols; c0 += kTile) {
      const size_t c1 = std::min(cols, c0 + kTile);
      for (size_t r = r0; r < r1; ++r) {
        for (size_t c = c0; c < c1; ++c) {
          dst[2 * (c * rows + r)] = src[2 * (r * cols + c)];
          dst[2 * (c * rows + r) + 1] = src[2 * (r * cols + c) + 1];
        }
      }
    }
  }
}

// Four-step FFT (Bailey 1990): with n = n1 n2, index j = n2 j1 + j2 and k = k1 + n1 k2,
// X_k = Σ_j2 [W_n^(j2 k1) Σ_j1 x_(n2 j1 + j2) W_n1^(j1 k1)] W_n2^(j2 k2): n2 transforms of
// length n1, a twiddle, n1 transforms of length n2, with transposes so that each transform
// runs on contiguous memory.
void fft_four_step(double* a, size_t n, double* scratch, bool inverse) {
  const int bits = log2_exact(n);
  const size_t n1 = size_t{1} << (bits / 2);
  const size_t n2 = n / n1;
  const double sign = inverse ? 1.0 : -1.0;

  transpose(a, scratch, n1, n2);  // row j2 of scratch: x_(n2 j1 + j2) over j1
  const std::vector<double> tw1 = stage_twiddles(n1, inverse);
  const TwoLevelTwiddles twiddle(n);
  for (size_t j2 = 0; j2 < n2; ++j2) {
    double* row = scratch + 2 * j2 * n1;
    fft_radix2(row, n1, tw1.data(), inverse);
    for (size_t k1 = 1; k1 < n1; ++k1) {
      double c = 0.0;
      double s = 0.0;
      twiddle.get(j2 * k1, &c, &s);
      s *= sign;
      const double re = row[2 * k1];
      const double im = row[2 * k1 + 1];
      row[2 * k1] = re * c - im * s;
      row[2 * k1 + 1] = re * s + im * c;
    }
  }
  transpose(scratch, a, n2, n1);  // row k1 of a: the twiddled values over j2
  const std::vector<double> tw2 = stage_twiddles(n2, inverse);
  for (size_t k1 = 0; k1 < n1; ++k1) {
    fft_radix2(a + 2 * k1 * n2, n2, tw2.data(), inverse);
  }
  transpose(a, scratch, n1, n2);  // scratch[k2][k1] = X_(k1 + n1 k2): natural order
  std::memcpy(a, scratch, 2 * n * sizeof(double));
}

}  // namespace

// --- Buffer -------------------------------------------------------------------------------

void Buffer::Free::operator()(double* p) const noexcept { std::free(p); }

Buffer::Buffer(size_t size, size_t capacity) : size_(size), capacity_(std::max(size, capacity)) {
  if (capacity_ == 0) {
    return;
  }
  size_t bytes = capacity_ * sizeof(double);
  void* p = nullptr;
  if (bytes >= kHugePage) {
    bytes = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    p = std::aligned_alloc(kHugePage, bytes);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (p != nullptr) {
      (void)madvise(p, bytes, MADV_HUGEPAGE);  // a hint; failure only costs speed
    }
#endif
  } else {
    p = std::malloc(bytes);
  }
  if (p == nullptr) {
    throw std::bad_alloc();
  }
  data_.reset(static_cast<double*>(p));
  std::memset(p, 0, capacity_ * sizeof(double));
}

void Buffer::resize(size_t size) {
  TORCH_CHECK(size <= capacity_, "Buffer::resize to ", size, " beyond its capacity ", capacity_);
  size_ = size;
}

// --- transforms ---------------------------------------------------------------------------

bool is_power_of_two(size_t n) { return n != 0 && (n & (n - 1)) == 0; }

size_t next_power_of_two(size_t n) {
  size_t p = 1;
  while (p < n) {
    p <<= 1;
  }
  return p;
}

void fft_interleaved(double* data, size_t n, double* scratch, bool inverse) {
  TORCH_CHECK_VALUE(is_power_of_two(n), "fft length must be a power of two, but is ", n);
  if (n == 1) {
    return;
  }
  if (n <= kDirectMax) {
    fft_radix2(data, n, stage_twiddles(n, inverse).data(), inverse);
    return;
  }
  fft_four_step(data, n, scratch, inverse);
}

void fft(std::vector<std::complex<double>>& data, bool inverse) {
  const size_t n = data.size();
  TORCH_CHECK_VALUE(is_power_of_two(n), "fft length must be a power of two, but is ", n);
  std::vector<double> scratch(n > kDirectMax ? 2 * n : 0);
  // std::complex<double> is layout-compatible with double[2] ([complex.numbers.general]).
  fft_interleaved(reinterpret_cast<double*>(data.data()), n, scratch.data(), inverse);
}

void rfft_inplace(Buffer& data, Buffer& scratch) {
  const size_t n = data.size();
  TORCH_CHECK_VALUE(n >= 2 && is_power_of_two(n), "rfft length must be a power of two >= 2, ",
                    "but is ", n);
  TORCH_CHECK(data.capacity() >= n + 2 && scratch.size() >= n,
              "rfft_inplace needs capacity n + 2 and n doubles of scratch");
  const size_t h = n / 2;
  // Even samples as real parts, odd samples as imaginary parts: x is already that signal.
  double* z = data.data();
  fft_interleaved(z, h, scratch.data(), /*inverse=*/false);
  data.resize(n + 2);
  const double z0r = z[0];
  const double z0i = z[1];
  z[0] = z0r + z0i;
  z[1] = 0.0;
  z[2 * h] = z0r - z0i;
  z[2 * h + 1] = 0.0;
  const TwoLevelTwiddles twiddle(n);
  // X_k = E_k + w^k O_k with E_k = (Z_k + conj Z_(h-k)) / 2 and O_k = (Z_k - conj Z_(h-k)) / 2i
  // (the transforms of the even and odd samples), w = exp(-2πi/n); k and h - k together.
  auto unpack = [](double ar, double ai, double br, double bi, double wr, double wi, double* out) {
    // a = Z_k, b = conj(Z_(h-k)) given as (br, bi) already conjugated.
    const double er = 0.5 * (ar + br);
    const double ei = 0.5 * (ai + bi);
    const double or_ = 0.5 * (ai - bi);
    const double oi = -0.5 * (ar - br);
    out[0] = er + wr * or_ - wi * oi;
    out[1] = ei + wr * oi + wi * or_;
  };
  for (size_t k = 1; k <= h / 2; ++k) {
    const size_t m = h - k;
    double c = 0.0;
    double s = 0.0;
    twiddle.get(k, &c, &s);
    const double zkr = z[2 * k];
    const double zki = z[2 * k + 1];
    const double zmr = z[2 * m];
    const double zmi = z[2 * m + 1];
    double xk[2];
    double xm[2];
    unpack(zkr, zki, zmr, -zmi, c, -s, xk);
    // w^(h-k) = -conj(w^k).
    unpack(zmr, zmi, zkr, -zki, -c, -s, xm);
    z[2 * k] = xk[0];
    z[2 * k + 1] = xk[1];
    z[2 * m] = xm[0];
    z[2 * m + 1] = xm[1];
  }
}

void irfft_inplace(Buffer& data, size_t n, Buffer& scratch) {
  TORCH_CHECK_VALUE(n >= 2 && is_power_of_two(n), "irfft length must be a power of two >= 2, ",
                    "but is ", n);
  TORCH_CHECK(data.size() == n + 2 && scratch.size() >= n,
              "irfft_inplace needs n/2 + 1 coefficients and n doubles of scratch");
  const size_t h = n / 2;
  double* z = data.data();
  const TwoLevelTwiddles twiddle(n);
  // Z_k = E_k + i O_k, E_k = (X_k + conj X_(h-k)) / 2, O_k = (X_k - conj X_(h-k)) conj(w^k) / 2.
  auto pack = [](double ar, double ai, double br, double bi, double wr, double wi, double* out) {
    // a = X_k, b = conj(X_(h-k)) given already conjugated, (wr, wi) = conj(w^k).
    const double er = 0.5 * (ar + br);
    const double ei = 0.5 * (ai + bi);
    const double dr = 0.5 * (ar - br);
    const double di = 0.5 * (ai - bi);
    const double or_ = dr * wr - di * wi;
    const double oi = dr * wi + di * wr;
    out[0] = er - oi;
    out[1] = ei + or_;
  };
  {
    double z0[2];
    pack(z[0], z[1], z[2 * h], -z[2 * h + 1], 1.0, 0.0, z0);
    z[0] = z0[0];
    z[1] = z0[1];
  }
  for (size_t k = 1; k <= h / 2; ++k) {
    const size_t m = h - k;
    double c = 0.0;
    double s = 0.0;
    twiddle.get(k, &c, &s);  // w^k = c - is, so conj(w^k) = c + is and conj(w^(h-k)) = -c + is
    const double xkr = z[2 * k];
    const double xki = z[2 * k + 1];
    const double xmr = z[2 * m];
    const double xmi = z[2 * m + 1];
    double zk[2];
    double zm[2];
    pack(xkr, xki, xmr, -xmi, c, s, zk);
    pack(xmr, xmi, xkr, -xki, -c, s, zm);
    z[2 * k] = zk[0];
    z[2 * k + 1] = zk[1];
    z[2 * m] = zm[0];
    z[2 * m + 1] = zm[1];
  }
  fft_interleaved(z, h, scratch.data(), /*inverse=*/true);
  const double scale = 1.0 / static_cast<double>(h);
  for (size_t i = 0; i < n; ++i) {
    z[i] *= scale;
  }
  data.resize(n);
}

std::vector<std::complex<double>> rfft(const std::vector<double>& x) {
  const size_t n = x.size();
  TORCH_CHECK_VALUE(n >= 2 && is_power_of_two(n), "rfft length must be a power of two >= 2, ",
                    "but is ", n);
  Buffer data(n, n + 2);
  Buffer scratch(n);
  std::copy(x.begin(), x.end(), data.begin());
  rfft_inplace(data, scratch);
  std::vector<std::complex<double>> out(n / 2 + 1);
  for (size_t k = 0; k < out.size(); ++k) {
    out[k] = {data[2 * k], data[2 * k + 1]};
  }
  return out;
}

std::vector<double> irfft(const std::vector<std::complex<double>>& spectrum, size_t n) {
  TORCH_CHECK_VALUE(n >= 2 && is_power_of_two(n), "irfft length must be a power of two >= 2, ",
                    "but is ", n);
  TORCH_CHECK_VALUE(spectrum.size() == n / 2 + 1, "irfft of length ", n, " needs ", n / 2 + 1,
                    " coefficients, but got ", spectrum.size());
  Buffer data(n + 2);
  Buffer scratch(n);
  for (size_t k = 0; k < spectrum.size(); ++k) {
    data[2 * k] = spectrum[k].real();
    data[2 * k + 1] = spectrum[k].imag();
  }
  irfft_inplace(data, n, scratch);
  return std::vector<double>(data.begin(), data.end());
}

void raise_spectrum(double* z, size_t bins, int64_t steps) {
  if (steps == 1) {
    return;
  }
  const double power = static_cast<double>(steps);
  constexpr double kLogSmallest = -745.2;  // log of the smallest subnormal double
  for (size_t k = 0; k < bins; ++k) {
    const double re = z[2 * k];
    const double im = z[2 * k + 1];
    const double log_magnitude = 0.5 * power * std::log(re * re + im * im);
    if (!(log_magnitude > kLogSmallest)) {
      z[2 * k] = 0.0;
      z[2 * k + 1] = 0.0;
      continue;
    }
    const double magnitude = std::exp(log_magnitude);
    const double phase = power * std::atan2(im, re);
    z[2 * k] = magnitude * std::cos(phase);
    z[2 * k + 1] = magnitude * std::sin(phase);
  }
}

}  // namespace dptorch::accounting::detail
