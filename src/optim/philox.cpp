// The Gaussian stream of PhiloxNoise. Compiled without torch headers and with -fno-math-errno
// (CMakeLists.txt), so that the float square roots vectorise.

#include "optim/philox.h"
#include "../cpu_features.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#if defined(__x86_64__) && defined(__clang__)
#include <immintrin.h>
#elif defined(__x86_64__) && defined(__GNUC__)
// GCC 12's AVX-512 headers start some intrinsics from _mm512_undefined_*(), which its
// -Wmaybe-uninitialized then reports wherever they are inlined (GCC bug 105593).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#endif

namespace dptorch::optim::detail {
namespace {

// Philox4x32 multipliers and Weyl key increments (Salmon et al. 2011, Random123).
constexpr uint32_t kM0 = 0xD2511F53, kM1 = 0xCD9E8D57;
constexpr uint32_t kW0 = 0x9E3779B9, kW1 = 0xBB67AE85;
constexpr int kRounds = 10;

// Philox blocks per group of the float path: 32 blocks = 128 entries, four AVX2 vectors whose
// rounds run interleaved (one vector's rounds are a chain of dependent multiplies). Groups only
// batch the work: entry j is the same whatever the grouping.
constexpr int64_t kGroupBlocks = 32;
constexpr int64_t kGroupEntries = 4 * kGroupBlocks;

#define DPTORCH_INLINE __attribute__((always_inline)) inline

// GCC vector types of kBytes bytes (16: SSE2 or NEON; 32: AVX2): arithmetic, comparisons and
// selects on them are element-wise, so the math below is written once for every width.
template <int kBytes>
struct Lanes {
  typedef float F __attribute__((vector_size(kBytes)));
  typedef int32_t I __attribute__((vector_size(kBytes)));
  typedef uint32_t U __attribute__((vector_size(kBytes)));
  static constexpr int64_t kCount = kBytes / 4;
};

template <typename V, typename T>
DPTORCH_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V, typename T>
DPTORCH_INLINE void store(T* p, V v) {
  std::memcpy(p, &v, sizeof v);
}

// ln x for normal floats x > 0: x = m·2^e with m in [√½, √2), then the Cephes logf polynomial
// in m − 1 (coefficients from S. L. Moshier's Cephes library) and ln 2 in two parts, so that
// e·ln 2 is exact. Branch-free. Vectors go in and out by reference: an AVX-512 caller passing
// them by value to this untargeted template would change the call's ABI, which clang refuses.
template <int kBytes>
DPTORCH_INLINE void log_lanes(const typename Lanes<kBytes>::F& x, typename Lanes<kBytes>::F& out) {
  using L = Lanes<kBytes>;
  using F = typename L::F;
  using I = typename L::I;
  using U = typename L::U;
  // Casts between vector types of one size reinterpret the bits.
  const U bits = (U)x;
  const I exponent = (I)bits >> 23;                     // x > 0: the sign bit is 0
  const F m = (F)((bits & 0x007FFFFFU) | 0x3F000000U);  // m in [0.5, 1)
  const I low = m < 0.70710678118654752440f;            // -1 where m < √½
  const F e = __builtin_convertvector(exponent - 126 + low, F);
  const F f = low ? m + m - 1.0f : m - 1.0f;
  const F z = f * f;
  F y = F{} + 7.0376836292E-2f;
  y = y * f - 1.1514610310E-1f;
  y = y * f + 1.1676998740E-1f;
  y = y * f - 1.2420140846E-1f;
  y = y * f + 1.4249322787E-1f;
  y = y * f - 1.6668057665E-1f;
  y = y * f + 2.0000714765E-1f;
  y = y * f - 2.4999993993E-1f;
  y = y * f + 3.3333331174E-1f;
  y = y * f * z;
  y += -2.12194440E-4f * e;
  y += -0.5f * z;
  out = (f + y) + 0.693359375f * e;
}

// sin and cos of 2π·u for u in [0, 1): 4u (exact) in quarter turns, the nearest whole quarter q
// split off exactly, the rest in [-π/4, π/4] through the Cephes sinf/cosf polynomials, and the
// pair rotated by q: (s, c), (c, -s), (-s, -c), (-c, s) for q mod 4 = 0, 1, 2, 3.
template <int kBytes>
DPTORCH_INLINE void sincos_lanes(const typename Lanes<kBytes>::F& u, typename Lanes<kBytes>::F& s,
                                 typename Lanes<kBytes>::F& c) {
  using F = typename Lanes<kBytes>::F;
  using I = typename Lanes<kBytes>::I;
  const F t = 4.0f * u;
  const I q = __builtin_convertvector(t + 0.5f, I);
  const F x = (t - __builtin_convertvector(q, F)) * 1.57079632679489661923f;
  const F x2 = x * x;
  const F sp = ((-1.9515295891E-4f * x2 + 8.3321608736E-3f) * x2 - 1.6666654611E-1f) * x2 * x + x;
  const F cp = ((2.443315711809948E-5f * x2 - 1.388731625493765E-3f) * x2 + 4.166664568298827E-2f) *
                   x2 * x2 -
               0.5f * x2 + 1.0f;
  const I odd = (q & 1) != 0;
  const F sv = odd ? cp : sp;
  const F cv = odd ? sp : cp;
  s = (q & 2) != 0 ? -sv : sv;
  c = ((q + 1) & 2) != 0 ? -cv : cv;
}

// Philox4x32-10 of the counters (c0..c3)[l] under (k0, k1), in place, for kGroupBlocks lanes.
DPTORCH_INLINE void philox_group(uint32_t* c0, uint32_t* c1, uint32_t* c2, uint32_t* c3,
                                 uint32_t k0, uint32_t k1) {
  for (int round = 0; round < kRounds; ++round) {
    for (int64_t l = 0; l < kGroupBlocks; ++l) {
      const uint64_t p0 = static_cast<uint64_t>(kM0) * c0[l];
      const uint64_t p1 = static_cast<uint64_t>(kM1) * c2[l];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[l] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[l] ^ k1;
      c1[l] = static_cast<uint32_t>(p1);
      c3[l] = static_cast<uint32_t>(p0);
      c0[l] = n0;
      c2[l] = n2;
    }
    k0 += kW0;
    k1 += kW1;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// philox_group with AVX2 intrinsics, 8 lanes per register: the compiler's own vectorisation of
// the 32×32→64-bit products spends most of its time shuffling.
__attribute__((target("arch=x86-64-v3"))) void philox_group_avx2(uint32_t* c0, uint32_t* c1,
                                                                 uint32_t* c2, uint32_t* c3,
                                                                 uint32_t k0, uint32_t k1) {
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kM1));
  // All lanes' rounds interleaved: one vector's rounds form a chain of dependent multiplies,
  // and several independent chains keep the multipliers busy.
  constexpr int64_t kVectors = kGroupBlocks / 8;
  __m256i x0[kVectors], x1[kVectors], x2[kVectors], x3[kVectors];
  for (int64_t v = 0; v < kVectors; ++v) {
    x0[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c0 + 8 * v));
    x1[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c1 + 8 * v));
    x2[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c2 + 8 * v));
    x3[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c3 + 8 * v));
  }
  for (int round = 0; round < kRounds; ++round) {
    const __m256i key0 =
        _mm256_set1_epi32(static_cast<int>(k0 + static_cast<uint32_t>(round) * kW0));
    const __m256i key1 =
        _mm256_set1_epi32(static_cast<int>(k1 + static_cast<uint32_t>(round) * kW1));
    for (int64_t v = 0; v < kVectors; ++v) {
      // 64-bit products of the even and of the odd 32-bit elements; hi and lo words regathered.
      const __m256i e0 = _mm256_mul_epu32(x0[v], m0);
      const __m256i o0 = _mm256_mul_epu32(_mm256_srli_epi64(x0[v], 32), m0);
      const __m256i e2 = _mm256_mul_epu32(x2[v], m1);
      const __m256i o2 = _mm256_mul_epu32(_mm256_srli_epi64(x2[v], 32), m1);
      const __m256i hi0 = _mm256_blend_epi32(_mm256_srli_epi64(e0, 32), o0, 0xAA);
      const __m256i lo0 = _mm256_blend_epi32(e0, _mm256_slli_epi64(o0, 32), 0xAA);
      const __m256i hi1 = _mm256_blend_epi32(_mm256_srli_epi64(e2, 32), o2, 0xAA);
      const __m256i lo1 = _mm256_blend_epi32(e2, _mm256_slli_epi64(o2, 32), 0xAA);
      x0[v] = _mm256_xor_si256(_mm256_xor_si256(hi1, x1[v]), key0);
      x2[v] = _mm256_xor_si256(_mm256_xor_si256(hi0, x3[v]), key1);
      x1[v] = lo1;
      x3[v] = lo0;
    }
  }
  for (int64_t v = 0; v < kVectors; ++v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c0 + 8 * v), x0[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c1 + 8 * v), x1[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c2 + 8 * v), x2[v]);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c3 + 8 * v), x3[v]);
  }
}
#endif

// Box–Muller on kGroupBlocks pairs of words: the radius √(-2 ln u1) with u1 in (0, 1] from 31
// bits (+ half a step, so -2 ln u1 <= 2·32·ln 2), and sin and cos of the angle 2π·u2 from 24.
template <int kBytes>
DPTORCH_INLINE void box_muller_lanes(const uint32_t* radius_words, const uint32_t* angle_words,
                                     float* radius, float* sin_out, float* cos_out) {
  using L = Lanes<kBytes>;
  using F = typename L::F;
  using I = typename L::I;
  using U = typename L::U;
  for (int64_t l = 0; l < kGroupBlocks; l += L::kCount) {
    const U w1 = load<U>(radius_words + l), w2 = load<U>(angle_words + l);
    const F u1 = __builtin_convertvector((I)(w1 >> 1), F) * 0x1p-31f + 0x1p-32f;
    const F u2 = __builtin_convertvector((I)(w2 >> 8), F) * 0x1p-24f;
    F r;
    log_lanes<kBytes>(u1, r);
    r *= -2.0f;
    for (int64_t i = 0; i < L::kCount; ++i) r[i] = std::sqrt(r[i]);
    F sn, cs;
    sincos_lanes<kBytes>(u2, sn, cs);
    store(radius + l, r);
    store(sin_out + l, sn);
    store(cos_out + l, cs);
  }
}

// scale × entries kGroupEntries·group ... of the float stream into out[0..kGroupEntries). The
// scale enters here, so that writing and adding the values later are plain stores and adds
// (no multiply that the compiler could fuse into the add differently in the two cases).
template <int kBytes>
DPTORCH_INLINE void float_group(uint64_t group, uint64_t key, uint64_t stream, float scale,
                                float* out) {
  uint32_t c0[kGroupBlocks], c1[kGroupBlocks], c2[kGroupBlocks], c3[kGroupBlocks];
  for (int64_t l = 0; l < kGroupBlocks; ++l) {
    const uint64_t block = group * kGroupBlocks + static_cast<uint64_t>(l);
    c0[l] = static_cast<uint32_t>(block);
    c1[l] = static_cast<uint32_t>(block >> 32);
    c2[l] = static_cast<uint32_t>(stream);
    c3[l] = static_cast<uint32_t>(stream >> 32);
  }
#if defined(__x86_64__) && defined(__GNUC__)
  if constexpr (kBytes == 32) {
    philox_group_avx2(c0, c1, c2, c3, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
  } else {
    philox_group(c0, c1, c2, c3, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
  }
#else
  philox_group(c0, c1, c2, c3, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
#endif
  float r0[kGroupBlocks], s0[kGroupBlocks], k0c[kGroupBlocks];
  float r1[kGroupBlocks], s1[kGroupBlocks], k1c[kGroupBlocks];
  box_muller_lanes<kBytes>(c0, c1, r0, s0, k0c);
  box_muller_lanes<kBytes>(c2, c3, r1, s1, k1c);
  for (int64_t l = 0; l < kGroupBlocks; ++l) {
    const float a = scale * r0[l], b = scale * r1[l];
    out[4 * l + 0] = a * k0c[l];
    out[4 * l + 1] = a * s0[l];
    out[4 * l + 2] = b * k1c[l];
    out[4 * l + 3] = b * s1[l];
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The AVX-512 path: 16 lanes per register and a group of kWideBlocks Philox blocks, four
// registers whose rounds run interleaved. Philox keeps the 64-bit products' halves apart with
// masked in-lane shuffles and folds its two XORs into one ternary-logic instruction; the four
// outputs of each block are put back in stream order with two rounds of in-register shuffles.
constexpr int64_t kWideBlocks = 64;
constexpr int64_t kWideEntries = 4 * kWideBlocks;

__attribute__((target("arch=x86-64-v4"))) DPTORCH_INLINE void philox_wide(__m512i* x0, __m512i* x1,
                                                                          __m512i* x2, __m512i* x3,
                                                                          uint32_t k0,
                                                                          uint32_t k1) {
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kM1));
  constexpr int64_t kVectors = kWideBlocks / 16;
  for (int round = 0; round < kRounds; ++round) {
    const __m512i key0 =
        _mm512_set1_epi32(static_cast<int>(k0 + static_cast<uint32_t>(round) * kW0));
    const __m512i key1 =
        _mm512_set1_epi32(static_cast<int>(k1 + static_cast<uint32_t>(round) * kW1));
    for (int64_t v = 0; v < kVectors; ++v) {
      // Products of the even and of the odd 32-bit elements; in each 64-bit lane the low word
      // sits in the even element and the high word in the odd one.
      const __m512i e0 = _mm512_mul_epu32(x0[v], m0);
      const __m512i o0 = _mm512_mul_epu32(_mm512_srli_epi64(x0[v], 32), m0);
      const __m512i e2 = _mm512_mul_epu32(x2[v], m1);
      const __m512i o2 = _mm512_mul_epu32(_mm512_srli_epi64(x2[v], 32), m1);
      // hi: even elements take e's odd neighbour, odd ones keep o; lo: the converse.
      const __m512i hi0 = _mm512_mask_shuffle_epi32(o0, 0x5555, e0, _MM_PERM_CDAB);
      const __m512i lo0 = _mm512_mask_shuffle_epi32(e0, 0xAAAA, o0, _MM_PERM_CDAB);
      const __m512i hi1 = _mm512_mask_shuffle_epi32(o2, 0x5555, e2, _MM_PERM_CDAB);
      const __m512i lo1 = _mm512_mask_shuffle_epi32(e2, 0xAAAA, o2, _MM_PERM_CDAB);
      x0[v] = _mm512_ternarylogic_epi32(hi1, x1[v], key0, 0x96);  // three-way XOR
      x2[v] = _mm512_ternarylogic_epi32(hi0, x3[v], key1, 0x96);
      x1[v] = lo1;
      x3[v] = lo0;
    }
  }
}

// Box–Muller on 16 pairs of words, as box_muller_lanes.
__attribute__((target("arch=x86-64-v4"))) DPTORCH_INLINE void box_muller_wide(
    __m512i radius_words, __m512i angle_words, __m512& radius, __m512& sin_out, __m512& cos_out) {
  using F = Lanes<64>::F;
  using I = Lanes<64>::I;
  using U = Lanes<64>::U;
  const U w1 = (U)radius_words, w2 = (U)angle_words;
  const F u1 = __builtin_convertvector((I)(w1 >> 1), F) * 0x1p-31f + 0x1p-32f;
  const F u2 = __builtin_convertvector((I)(w2 >> 8), F) * 0x1p-24f;
  F log_u1;
  log_lanes<64>(u1, log_u1);
  radius = _mm512_sqrt_ps((__m512)(-2.0f * log_u1));
  F sn, cs;
  sincos_lanes<64>(u2, sn, cs);
  sin_out = (__m512)sn;
  cos_out = (__m512)cs;
}

// scale × entries kWideEntries·group ... of the float stream: stored to out[0..kWideEntries),
// or added to it with `add`.
__attribute__((target("arch=x86-64-v4"))) DPTORCH_INLINE void float_group_wide(
    uint64_t group, uint64_t key, uint64_t stream, float scale, bool add, float* out) {
  constexpr int64_t kVectors = kWideBlocks / 16;
  const uint64_t first_block = group * kWideBlocks;
  // Groups are aligned to kWideBlocks, a divisor of 2^32: the high counter word is shared.
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512i x0[kVectors], x1[kVectors], x2[kVectors], x3[kVectors];
  for (int64_t v = 0; v < kVectors; ++v) {
    x0[v] = _mm512_add_epi32(
        _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_block + 16 * v))), iota);
    x1[v] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(first_block >> 32)));
    x2[v] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream)));
    x3[v] = _mm512_set1_epi32(static_cast<int>(static_cast<uint32_t>(stream >> 32)));
  }
  philox_wide(x0, x1, x2, x3, static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32));
  const __m512 s = _mm512_set1_ps(scale);
  for (int64_t v = 0; v < kVectors; ++v) {
    __m512 r0, s0, c0, r1, s1, c1;
    box_muller_wide(x0[v], x1[v], r0, s0, c0);
    box_muller_wide(x2[v], x3[v], r1, s1, c1);
    const __m512 a = _mm512_mul_ps(s, r0), b = _mm512_mul_ps(s, r1);
    // Entries 4l .. 4l+3 of block l: a·cos, a·sin, b·cos, b·sin. A 4×4 transpose of floats
    // within each 128-bit lane, then one of the 128-bit lanes across the registers.
    const __m512 p = _mm512_mul_ps(a, c0), q = _mm512_mul_ps(a, s0);
    const __m512 r = _mm512_mul_ps(b, c1), t = _mm512_mul_ps(b, s1);
    const __m512 pq_lo = _mm512_unpacklo_ps(p, q), pq_hi = _mm512_unpackhi_ps(p, q);
    const __m512 rt_lo = _mm512_unpacklo_ps(r, t), rt_hi = _mm512_unpackhi_ps(r, t);
    const __m512 u0 = _mm512_castpd_ps(
        _mm512_unpacklo_pd(_mm512_castps_pd(pq_lo), _mm512_castps_pd(rt_lo)));  // blocks 0,4,8,12
    const __m512 u1 = _mm512_castpd_ps(
        _mm512_unpackhi_pd(_mm512_castps_pd(pq_lo), _mm512_castps_pd(rt_lo)));  // 1,5,9,13
    const __m512 u2 = _mm512_castpd_ps(
        _mm512_unpacklo_pd(_mm512_castps_pd(pq_hi), _mm512_castps_pd(rt_hi)));  // 2,6,10,14
    const __m512 u3 = _mm512_castpd_ps(
        _mm512_unpackhi_pd(_mm512_castps_pd(pq_hi), _mm512_castps_pd(rt_hi)));  // 3,7,11,15
    const __m512 v01_lo = _mm512_shuffle_f32x4(u0, u1, 0x44);
    const __m512 v01_hi = _mm512_shuffle_f32x4(u0, u1, 0xEE);
    const __m512 v23_lo = _mm512_shuffle_f32x4(u2, u3, 0x44);
    const __m512 v23_hi = _mm512_shuffle_f32x4(u2, u3, 0xEE);
    const __m512 o[4] = {
        _mm512_shuffle_f32x4(v01_lo, v23_lo, 0x88), _mm512_shuffle_f32x4(v01_lo, v23_lo, 0xDD),
        _mm512_shuffle_f32x4(v01_hi, v23_hi, 0x88), _mm512_shuffle_f32x4(v01_hi, v23_hi, 0xDD)};
    float* dst = out + 64 * v;
    for (int i = 0; i < 4; ++i) {
      const __m512 value = add ? _mm512_add_ps(_mm512_loadu_ps(dst + 16 * i), o[i]) : o[i];
      _mm512_storeu_ps(dst + 16 * i, value);
    }
  }
}

__attribute__((target("arch=x86-64-v4"))) void float_fill_v4(float* out, int64_t count,
                                                             uint64_t first, uint64_t key,
                                                             uint64_t stream, float scale,
                                                             bool add) {
  uint64_t j = first;
  const uint64_t end = first + static_cast<uint64_t>(count);
  alignas(64) float z[kWideEntries];
  while (j < end) {
    const uint64_t group = j / kWideEntries;
    const auto offset = static_cast<int64_t>(j - group * kWideEntries);
    const auto n = static_cast<int64_t>(
        std::min<uint64_t>(static_cast<uint64_t>(kWideEntries - offset), end - j));
    float* dst = out + (j - first);
    if (n == kWideEntries) {
      float_group_wide(group, key, stream, scale, add, dst);
    } else {  // a group cut by the range: through a buffer
      float_group_wide(group, key, stream, scale, false, z);
      for (int64_t i = 0; i < n; ++i) dst[i] = add ? dst[i] + z[offset + i] : z[offset + i];
    }
    j += static_cast<uint64_t>(n);
  }
}
#endif

template <int kBytes>
DPTORCH_INLINE void float_fill(float* out, int64_t count, uint64_t first, uint64_t key,
                               uint64_t stream, float scale, bool add) {
  float z[kGroupEntries];
  uint64_t j = first;
  const uint64_t end = first + static_cast<uint64_t>(count);
  while (j < end) {
    const uint64_t group = j / kGroupEntries;
    float_group<kBytes>(group, key, stream, scale, z);
    const auto offset = static_cast<int64_t>(j - group * kGroupEntries);
    const auto n = static_cast<int64_t>(
        std::min<uint64_t>(static_cast<uint64_t>(kGroupEntries - offset), end - j));
    float* dst = out + (j - first);
    if (add) {
      for (int64_t i = 0; i < n; ++i) dst[i] += z[offset + i];
    } else {
      std::copy(z + offset, z + offset + n, dst);
    }
    j += static_cast<uint64_t>(n);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("arch=x86-64-v3"))) void float_fill_v3(float* out, int64_t count,
                                                             uint64_t first, uint64_t key,
                                                             uint64_t stream, float scale,
                                                             bool add) {
  float_fill<32>(out, count, first, key, stream, scale, add);
}

using dptorch::detail::has_x86_64_v3;
using dptorch::detail::has_x86_64_v4;
#endif

void float_fill_baseline(float* out, int64_t count, uint64_t first, uint64_t key, uint64_t stream,
                         float scale, bool add) {
  float_fill<16>(out, count, first, key, stream, scale, add);
}

}  // namespace

std::array<uint32_t, 4> philox4x32_10(std::array<uint32_t, 4> counter,
                                      std::array<uint32_t, 2> key) {
  uint32_t c0[kGroupBlocks] = {counter[0]}, c1[kGroupBlocks] = {counter[1]},
           c2[kGroupBlocks] = {counter[2]}, c3[kGroupBlocks] = {counter[3]};
  philox_group(c0, c1, c2, c3, key[0], key[1]);
  return {c0[0], c1[0], c2[0], c3[0]};
}

bool has_fill_path(FillPath path) {
  switch (path) {
    case FillPath::kBaseline: return true;
#if defined(__x86_64__) && defined(__GNUC__)
    case FillPath::kAvx2: return has_x86_64_v3();
    case FillPath::kAvx512: return has_x86_64_v4();
#endif
    default: return false;
  }
}

FillPath best_fill_path() {
  if (has_fill_path(FillPath::kAvx512)) return FillPath::kAvx512;
  if (has_fill_path(FillPath::kAvx2)) return FillPath::kAvx2;
  return FillPath::kBaseline;
}

void normal_fill(float* out, int64_t count, uint64_t first, uint64_t key, uint64_t stream,
                 float scale, bool add) {
  static const FillPath best = best_fill_path();
  normal_fill(best, out, count, first, key, stream, scale, add);
}

void normal_fill(FillPath path, float* out, int64_t count, uint64_t first, uint64_t key,
                 uint64_t stream, float scale, bool add) {
  if (!has_fill_path(path)) {
    throw std::invalid_argument("normal_fill: this processor cannot run the requested path");
  }
  switch (path) {
#if defined(__x86_64__) && defined(__GNUC__)
    case FillPath::kAvx512: return float_fill_v4(out, count, first, key, stream, scale, add);
    case FillPath::kAvx2: return float_fill_v3(out, count, first, key, stream, scale, add);
#endif
    default: return float_fill_baseline(out, count, first, key, stream, scale, add);
  }
}

void normal_fill(double* out, int64_t count, uint64_t first, uint64_t key, uint64_t stream,
                 double scale, bool add) {
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  for (int64_t i = 0; i < count;) {
    const uint64_t j = first + static_cast<uint64_t>(i);
    const uint64_t block = j / 2;
    const auto w =
        philox4x32_10({static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                       static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)},
                      {static_cast<uint32_t>(key), static_cast<uint32_t>(key >> 32)});
    const uint64_t a = ((static_cast<uint64_t>(w[0]) << 32) | w[1]) >> 11;
    const uint64_t b = ((static_cast<uint64_t>(w[2]) << 32) | w[3]) >> 11;
    const double u1 = static_cast<double>(a + 1) * 0x1.0p-53;  // (0, 1]
    const double u2 = static_cast<double>(b) * 0x1.0p-53;      // [0, 1)
    const double radius = std::sqrt(-2.0 * std::log(u1));
    const double z[2] = {radius * std::cos(kTwoPi * u2), radius * std::sin(kTwoPi * u2)};
    for (uint64_t e = j % 2; e < 2 && i < count; ++e, ++i) {
      out[i] = add ? out[i] + scale * z[e] : scale * z[e];
    }
  }
}

float log_poly(float x) {
  Lanes<16>::F v = {x, x, x, x};
  Lanes<16>::F log_v;
  log_lanes<16>(v, log_v);
  return log_v[0];
}

void sincos_turns(float u, float* sin_out, float* cos_out) {
  Lanes<16>::F v = {u, u, u, u}, s, c;
  sincos_lanes<16>(v, s, c);
  *sin_out = s[0];
  *cos_out = c[0];
}

}  // namespace dptorch::optim::detail
