#pragma once

#include <array>
#include <cstdint>

/// The counter-based Gaussian generator behind PhiloxNoise (noise.h): Philox4x32-10 (Salmon,
/// Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy as 1, 2, 3") turned into standard
/// Gaussians by Box–Muller (1958). Entry j of the stream (key, stream) depends on (key, stream,
/// j) alone, so any range of it can be drawn anywhere, in any order, by any number of threads.
namespace dptorch::optim::detail {

/// Philox4x32-10 of `counter` under `key`: ten rounds of two 32×32→64-bit multiplications with
/// the published constants and Weyl key schedule.
[[nodiscard]] std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter,
                                                    std::array<uint32_t, 2> key);

/// out[i] = scale·z_{first + i} for i < count (or out[i] += that with `add`), where z is the
/// standard Gaussian stream of (key, stream): Philox block b (counter = b, stream) gives entries
/// 4b..4b+3 in float by Box–Muller on two pairs of 32-bit words (a radius from 32 random bits,
/// so |z| reaches about 6.66; an angle from 24). Vectorised, with an AVX2 + FMA path where the
/// processor has one, and an AVX-512 one (see FillPath).
void normal_fill(float* out, int64_t count, uint64_t first, uint64_t key, uint64_t stream,
                 float scale, bool add);

/// The code paths of the float normal_fill: portable vectors (SSE2 or NEON), AVX2 + FMA, and
/// AVX-512 (x86-64-v4). They give the same values to within the rounding of fused multiply-adds.
enum class FillPath { kBaseline, kAvx2, kAvx512 };

/// Whether this processor (and build) can run `path`.
[[nodiscard]] bool has_fill_path(FillPath path);

/// The fastest path this processor can run: the one normal_fill(float*, ...) takes.
[[nodiscard]] FillPath best_fill_path();

/// normal_fill on the given path (for tests and benchmarks); std::invalid_argument if
/// !has_fill_path(path).
void normal_fill(FillPath path, float* out, int64_t count, uint64_t first, uint64_t key,
                 uint64_t stream, float scale, bool add);

/// As above in double: block b gives entries 2b, 2b+1 from two 53-bit uniforms (Box–Muller with
/// the C library's log, sin and cos).
void normal_fill(double* out, int64_t count, uint64_t first, uint64_t key, uint64_t stream,
                 double scale, bool add);

/// The float logarithm of the float path (for tests): a Cephes-style polynomial on the mantissa,
/// exact range reduction, for finite x > 0.
[[nodiscard]] float log_poly(float x);

/// sin and cos of 2π·u (u in turns, in [0, 1)) of the float path (for tests): exact reduction to
/// a quarter turn, then polynomials on [-π/4, π/4].
void sincos_turns(float u, float* sin_out, float* cos_out);

}  // namespace dptorch::optim::detail
