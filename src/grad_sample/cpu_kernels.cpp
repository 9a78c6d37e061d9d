#include "cpu_kernels.h"
#include "../cpu_features.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace dptorch::grad_sample::cpu {
namespace {

// ⌈a / b⌉ for a >= 0, b > 0.
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// One output row of patches: row[ox] = src[ox·stride]. The stride as a template argument lets the
// compiler vectorise the common strides 1 and 2.
template <int64_t kStride, typename T>
void gather_row(const T* __restrict src, int64_t stride, int64_t size, T* __restrict row) {
  const int64_t s = kStride > 0 ? kStride : stride;
  for (int64_t ox = 0; ox < size; ++ox) row[ox] = src[ox * s];
}

// Patches of one sample from its zero-padded input [C, Hp, Wp]: every read is in bounds, so the
// inner loops are plain strided copies with no per-element test.
template <int64_t kStride, typename T>
void unfold_one(const T* padded, const PatchGeometry& g, int64_t padded_h, int64_t padded_w,
                T* out) {
  const int64_t out_h = g.out_h, out_w = g.out_w, positions = out_h * out_w;
  const int64_t row_step = g.stride_h * padded_w, stride_w = g.stride_w;
  for (int64_t c = 0; c < g.channels; ++c) {
    const T* plane = padded + c * padded_h * padded_w;
    for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
        T* dst = out + ((c * g.kernel_h + kh) * g.kernel_w + kw) * positions;
        const T* src = plane + kh * g.dilation_h * padded_w + kw * g.dilation_w;
        for (int64_t oy = 0; oy < out_h; ++oy) {
          gather_row<kStride>(src + oy * row_step, stride_w, out_w, dst + oy * out_w);
        }
      }
    }
  }
}

// Copies one sample's input [C, H, W] into the interior of `padded` [C, H + 2·pad_h, W + 2·pad_w],
// whose border stays zero, and returns it; without padding, the input itself. `padded` serves
// one geometry only.
template <typename T>
const T* pad_sample(const T* x, const PatchGeometry& g, std::vector<T>& padded) {
  if (g.pad_h == 0 && g.pad_w == 0) return x;
  const int64_t padded_h = g.height + 2 * g.pad_h, padded_w = g.width + 2 * g.pad_w;
  const auto size = static_cast<size_t>(g.channels * padded_h * padded_w);
  if (padded.size() != size) padded.assign(size, T(0));
  for (int64_t c = 0; c < g.channels; ++c) {
    for (int64_t y = 0; y < g.height; ++y) {
      std::copy(x + (c * g.height + y) * g.width, x + (c * g.height + y + 1) * g.width,
                padded.data() + (c * padded_h + y + g.pad_h) * padded_w + g.pad_w);
    }
  }
  return padded.data();
}

// Register tile of the fused conv norm: kTileRows output channels × two vectors of patch
// columns, in GCC vector types of kBytes bytes (16: SSE2 or NEON; 32: AVX2; 64: AVX-512).
template <typename T, int kBytes>
struct Vector {
  typedef T Type __attribute__((vector_size(kBytes)));
};
// Output channels per tile: 2·kRows accumulators and two patch vectors fit the register file
// (16 vector registers up to AVX2, 32 with AVX-512).
template <int kBytes>
constexpr int64_t kTileRows = kBytes == 64 ? 8 : 6;
// Patch columns per tile: the buffers' rows are padded to a multiple of the widest tile.
template <typename T>
constexpr int64_t kTileCols = static_cast<int64_t>(2 * 64 / sizeof(T));

// Σ G² over the tile of G = Σ_t g[o, t] a[t, j] at rows o0.. and columns j0.. (g and a point
// there), g [rows, g_stride] the output gradient, a [positions, d_stride] the patches; `columns`
// of a multiple of the vector width. With `store` (pointing at row o0, column j0 of a buffer
// [rows, d_stride]), the tile of G is written there too.
template <typename T, int kBytes>
__attribute__((always_inline)) inline double tile_sum_of_squares(const T* g, int64_t g_stride,
                                                                 const T* a, int64_t d_stride,
                                                                 int64_t positions, int64_t columns,
                                                                 T* store) {
  using Vec = typename Vector<T, kBytes>::Type;
  constexpr auto kLanes = static_cast<int64_t>(kBytes / sizeof(T));
  double s = 0.0;
  for (int64_t j = 0; j < columns; j += 2 * kLanes) {
    Vec acc[kTileRows<kBytes>][2] = {};
    for (int64_t t = 0; t < positions; ++t) {
      Vec a0, a1;
      std::memcpy(&a0, a + t * d_stride + j, sizeof(Vec));
      std::memcpy(&a1, a + t * d_stride + j + kLanes, sizeof(Vec));
      for (int64_t r = 0; r < kTileRows<kBytes>; ++r) {
        const T gv = g[r * g_stride + t];
        acc[r][0] += gv * a0;
        acc[r][1] += gv * a1;
      }
    }
    Vec squares = {};
    for (int64_t r = 0; r < kTileRows<kBytes>; ++r)
      squares += acc[r][0] * acc[r][0] + acc[r][1] * acc[r][1];
    if (store != nullptr) {
      for (int64_t r = 0; r < kTileRows<kBytes>; ++r) {
        std::memcpy(store + r * d_stride + j, &acc[r][0], sizeof(Vec));
        std::memcpy(store + r * d_stride + j + kLanes, &acc[r][1], sizeof(Vec));
      }
    }
    for (int64_t l = 0; l < kLanes; ++l) s += static_cast<double>(squares[l]);
  }
  return s;
}

// ‖G‖² of one sample, tile by tile; with `store` ([rows, d_stride]), G itself too.
template <typename T, int kBytes>
__attribute__((always_inline)) inline double sample_norm_sq_with(const T* g, int64_t g_stride,
                                                                 int64_t rows, const T* a,
                                                                 int64_t d_stride,
                                                                 int64_t positions, T* store) {
  double s = 0.0;
  for (int64_t o = 0; o < rows; o += kTileRows<kBytes>) {
    for (int64_t j = 0; j < d_stride; j += kTileCols<T>) {
      s += tile_sum_of_squares<T, kBytes>(g + o * g_stride, g_stride, a + j, d_stride, positions,
                                          kTileCols<T>,
                                          store == nullptr ? nullptr : store + o * d_stride + j);
    }
  }
  return s;
}

// Copies the kernel row of a patch: kKernel elements at `dilation` apart. The common kernel
// widths without dilation are compile-time counts, so that the copy is a vector move or two.
template <int64_t kKernel, typename T>
__attribute__((always_inline)) inline void copy_kernel_row(const T* src, int64_t kernel,
                                                           int64_t dilation, T* dst) {
  if constexpr (kKernel > 0) {
    for (int64_t i = 0; i < kKernel; ++i) dst[i] = src[i];
  } else {
    for (int64_t i = 0; i < kernel; ++i) dst[i] = src[i * dilation];
  }
}

// The patches of one record of one sample as rows [positions, d_stride] from its padded input
// (patch-major; columns past C·kh·kw are left as they are: zero).
template <int64_t kKernel, typename T>
void patch_rows(const T* x, const PatchGeometry& g, T* a, int64_t d_stride) {
  const int64_t padded_h = g.height + 2 * g.pad_h, padded_w = g.width + 2 * g.pad_w;
  for (int64_t oy = 0; oy < g.out_h; ++oy) {
    for (int64_t ox = 0; ox < g.out_w; ++ox) {
      T* row = a + (oy * g.out_w + ox) * d_stride;
      for (int64_t c = 0; c < g.channels; ++c) {
        for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
          const T* src =
              x + (c * padded_h + oy * g.stride_h + kh * g.dilation_h) * padded_w + ox * g.stride_w;
          copy_kernel_row<kKernel>(src, g.kernel_w, g.dilation_w,
                                   row + (c * g.kernel_h + kh) * g.kernel_w);
        }
      }
    }
  }
}

// One record of one sample: its patches into rows [first, first + positions) of `a`
// [positions_total, d_stride], its output gradient into columns [first, ...) of `grad_rows`
// (rows `grad_stride` apart; rows past the output channels stay zero).
template <typename T>
void sample_rows(const ConvRecord<T>& record, int64_t sample, int64_t out_channels,
                 std::vector<T>& padded, int64_t first, T* a, int64_t d_stride, T* grad_rows,
                 int64_t grad_stride) {
  const auto& g = record.geometry;
  const int64_t in_size = g.channels * g.height * g.width, positions = g.out_h * g.out_w;
  const T* x = pad_sample(record.input + sample * in_size, g, padded);
  T* rows = a + first * d_stride;
  switch (g.dilation_w == 1 ? g.kernel_w : 0) {
    case 1: patch_rows<1>(x, g, rows, d_stride); break;
    case 3: patch_rows<3>(x, g, rows, d_stride); break;
    case 4: patch_rows<4>(x, g, rows, d_stride); break;
    case 5: patch_rows<5>(x, g, rows, d_stride); break;
    case 8: patch_rows<8>(x, g, rows, d_stride); break;
    default: patch_rows<0>(x, g, rows, d_stride); break;
  }
  const T* grad = record.grad_output + sample * out_channels * positions;
  for (int64_t o = 0; o < out_channels; ++o) {
    std::copy(grad + o * positions, grad + (o + 1) * positions,
              grad_rows + o * grad_stride + first);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// The same loops compiled for AVX2 + FMA (x86-64-v3) and for AVX-512 (x86-64-v4), taken where
// the processor has them.
template <typename T>
__attribute__((target("arch=x86-64-v3"))) double sample_norm_sq_v3(const T* g, int64_t g_stride,
                                                                   int64_t rows, const T* a,
                                                                   int64_t d_stride,
                                                                   int64_t positions, T* store) {
  return sample_norm_sq_with<T, 32>(g, g_stride, rows, a, d_stride, positions, store);
}
template <typename T>
__attribute__((target("arch=x86-64-v4"))) double sample_norm_sq_v4(const T* g, int64_t g_stride,
                                                                   int64_t rows, const T* a,
                                                                   int64_t d_stride,
                                                                   int64_t positions, T* store) {
  return sample_norm_sq_with<T, 64>(g, g_stride, rows, a, d_stride, positions, store);
}

using dptorch::detail::has_x86_64_v3;
using dptorch::detail::has_x86_64_v4;
#endif

// Output channels per tile of that path: the gradient rows' buffer is padded to a multiple.
int64_t norm_tile_rows() { return tile_vector_bytes() == 64 ? kTileRows<64> : kTileRows<16>; }

// ‖G‖² of one sample on the processor's widest path, `rows` a multiple of norm_tile_rows(); with
// `store` ([rows, d_stride]), G itself too.
template <typename T>
double sample_norm_sq(const T* g, int64_t g_stride, int64_t rows, const T* a, int64_t d_stride,
                      int64_t positions, T* store) {
#if defined(__x86_64__) && defined(__GNUC__)
  switch (tile_vector_bytes()) {
    case 64: return sample_norm_sq_v4(g, g_stride, rows, a, d_stride, positions, store);
    case 32: return sample_norm_sq_v3(g, g_stride, rows, a, d_stride, positions, store);
    default: break;
  }
#endif
  return sample_norm_sq_with<T, 16>(g, g_stride, rows, a, d_stride, positions, store);
}

int64_t round_up(int64_t n, int64_t m) { return ceil_div(n, m) * m; }

// The row stride of the tile kernels' output-gradient rows over `positions`: an odd number of
// cache lines, so that the tile's rows fall into different cache sets (a power-of-two stride, as
// for 512 or 1024 positions, made them evict each other: 4-5x slower).
template <typename T>
int64_t grad_row_stride(int64_t positions) {
  constexpr auto kLine = static_cast<int64_t>(64 / sizeof(T));
  const int64_t lines = ceil_div(positions, kLine);
  return (lines % 2 == 0 ? lines + 1 : lines) * kLine;
}

// Sample i of the tile kernels: ‖G_i‖² of grad_rows [p_stride, g_stride] times the patch rows
// a [positions, d_stride] into norm_sq[i] (unless null), and G_i ([p, d]) into out[i] (unless
// null): straight where its rows need no padding, otherwise through `tile_out`
// ([p_stride, d_stride], empty in the first case).
template <typename T>
void tile_sample(const T* grad_rows, int64_t g_stride, int64_t p_stride, const T* a,
                 int64_t d_stride, int64_t positions, int64_t p, int64_t d, int64_t i, T* norm_sq,
                 T* out, std::vector<T>& tile_out) {
  T* sample_out = out == nullptr ? nullptr : out + i * p * d;
  T* store = tile_out.empty() ? sample_out : tile_out.data();
  const double s = sample_norm_sq(grad_rows, g_stride, p_stride, a, d_stride, positions, store);
  if (norm_sq != nullptr) norm_sq[i] = static_cast<T>(s);
  if (out != nullptr && !tile_out.empty()) {
    for (int64_t o = 0; o < p; ++o) {
      std::copy(store + o * d_stride, store + o * d_stride + d, sample_out + o * d);
    }
  }
}

void check_lookups(const int64_t* index, const int64_t* sample, int64_t n, int64_t batch_size,
                   int64_t num_embeddings) {
  for (int64_t r = 0; r < n; ++r) {
    TORCH_CHECK_INDEX(index[r] >= 0 && index[r] < num_embeddings, "embedding row ", index[r],
                      " is out of range for a table of ", num_embeddings, " rows");
    TORCH_CHECK_INDEX(sample[r] >= 0 && sample[r] < batch_size, "lookup of sample ", sample[r],
                      " is out of range for a batch of ", batch_size);
  }
}

// The offset of each lookup's gradient row in g.data, stepping through the groups in order
// (Rows::row() divides, once per call).
template <typename T>
std::vector<int64_t> row_offsets(const Rows<T>& g) {
  std::vector<int64_t> offset(static_cast<size_t>(g.count));
  int64_t r = 0;
  for (int64_t group = 0; r < g.count; ++group) {
    for (int64_t j = 0; j < g.per_group && r < g.count; ++j, ++r) {
      offset[static_cast<size_t>(r)] = group * g.group_stride + j * g.row_stride;
    }
  }
  return offset;
}

// Σ x_d²: kLanes independent partial sums of type Acc, which the compiler keeps in vector
// registers without reordering any one of them (a single running sum would be one long
// dependency chain), added up in double. Float partial sums of non-negative terms over a row of
// tens of elements lose only a few ulp; double ones serve the sums of repeated rows.
template <typename Acc, int64_t kLanes, typename T>
double sum_of_squares(const T* x, int64_t size) {
  Acc lanes[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= size; d += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) {
      const auto v = static_cast<Acc>(x[d + j]);
      lanes[j] += v * v;
    }
  }
  double s = 0.0;
  for (; d < size; ++d) s += static_cast<double>(x[d]) * static_cast<double>(x[d]);
  for (const Acc lane : lanes) s += static_cast<double>(lane);
  return s;
}

}  // namespace

int tile_vector_bytes() {
#if defined(__x86_64__) && defined(__GNUC__)
  if (dptorch::detail::has_x86_64_v4()) return 64;
  if (dptorch::detail::has_x86_64_v3()) return 32;
#endif
  return 16;
}

template <typename T>
void unfold_patches_2d(const T* input, int64_t samples, const PatchGeometry& geometry, T* out) {
  const auto& g = geometry;
  const int64_t in_size = g.channels * g.height * g.width;
  const int64_t out_size = g.channels * g.kernel_h * g.kernel_w * g.out_h * g.out_w;
  const int64_t padded_h = g.height + 2 * g.pad_h, padded_w = g.width + 2 * g.pad_w;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, out_size));
  at::parallel_for(0, samples, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> padded;
    for (int64_t b = begin; b < end; ++b) {
      const T* x = pad_sample(input + b * in_size, g, padded);
      T* patches = out + b * out_size;
      switch (g.stride_w) {
        case 1: unfold_one<1>(x, g, padded_h, padded_w, patches); break;
        case 2: unfold_one<2>(x, g, padded_h, padded_w, patches); break;
        default: unfold_one<0>(x, g, padded_h, padded_w, patches); break;
      }
    }
  });
}

template <typename T>
void conv_weight_samples_tiled(const std::vector<ConvRecord<T>>& records, int64_t samples,
                               int64_t out_channels, T* norm_sq, T* out) {
  const auto& g0 = records.front().geometry;
  const int64_t d = g0.channels * g0.kernel_h * g0.kernel_w;
  const int64_t d_stride = round_up(d, kTileCols<T>);
  const int64_t p_stride = round_up(out_channels, norm_tile_rows());
  int64_t positions = 0;
  for (const auto& r : records) positions += r.geometry.out_h * r.geometry.out_w;
  const int64_t g_stride = grad_row_stride<T>(positions);
  at::parallel_for(0, samples, 1, [&](int64_t begin, int64_t end) {
    // Padding columns and rows of the buffers stay zero and add nothing to the norms.
    std::vector<T> a(static_cast<size_t>(positions * d_stride), T(0));
    std::vector<T> grad_rows(static_cast<size_t>(p_stride * g_stride), T(0));
    std::vector<T> tile_out(out == nullptr || (d_stride == d && p_stride == out_channels)
                                ? 0
                                : static_cast<size_t>(p_stride * d_stride));
    std::vector<std::vector<T>> padded(records.size());
    for (int64_t i = begin; i < end; ++i) {
      int64_t first = 0;
      for (size_t k = 0; k < records.size(); ++k) {
        const auto& r = records[k];
        sample_rows(r, i, out_channels, padded[k], first, a.data(), d_stride, grad_rows.data(),
                    g_stride);
        first += r.geometry.out_h * r.geometry.out_w;
      }
      tile_sample(grad_rows.data(), g_stride, p_stride, a.data(), d_stride, positions, out_channels,
                  d, i, norm_sq, out, tile_out);
    }
  });
}

template <typename T>
void linear_weight_samples_tiled(const T* a, const T* g, int64_t samples, int64_t positions,
                                 int64_t d, int64_t p, T* norm_sq, T* out) {
  const int64_t d_stride = round_up(d, kTileCols<T>), p_stride = round_up(p, norm_tile_rows());
  const int64_t g_stride = grad_row_stride<T>(positions);
  at::parallel_for(0, samples, 1, [&](int64_t begin, int64_t end) {
    // The activations' rows are the tile's patch rows as they are, unless they need padding.
    std::vector<T> padded(d_stride == d ? 0 : static_cast<size_t>(positions * d_stride), T(0));
    std::vector<T> grad_rows(static_cast<size_t>(p_stride * g_stride), T(0));
    std::vector<T> tile_out(out == nullptr || (d_stride == d && p_stride == p)
                                ? 0
                                : static_cast<size_t>(p_stride * d_stride));
    for (int64_t i = begin; i < end; ++i) {
      const T* ai = a + i * positions * d;
      if (d_stride != d) {
        for (int64_t t = 0; t < positions; ++t) {
          std::copy(ai + t * d, ai + (t + 1) * d, padded.data() + t * d_stride);
        }
        ai = padded.data();
      }
      // The output gradient transposed: one row of positions per output feature.
      const T* gi = g + i * positions * p;
      for (int64_t t = 0; t < positions; ++t) {
        for (int64_t o = 0; o < p; ++o) grad_rows[o * g_stride + t] = gi[t * p + o];
      }
      tile_sample(grad_rows.data(), g_stride, p_stride, ai, d_stride, positions, p, d, i, norm_sq,
                  out, tile_out);
    }
  });
}

template <typename T>
void embedding_norm_sq(const int64_t* index, const int64_t* sample, const Rows<T>& g,
                       int64_t batch_size, int64_t num_embeddings, T* norm_sq) {
  const int64_t n = g.count, dim = g.dim;
  check_lookups(index, sample, n, batch_size, num_embeddings);
  // Counting sort of the lookups by sample (stable: each sample's rows keep their order).
  std::vector<int64_t> start(static_cast<size_t>(batch_size) + 1, 0), order(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) ++start[static_cast<size_t>(sample[r]) + 1];
  for (int64_t i = 0; i < batch_size; ++i) start[i + 1] += start[i];
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t r = 0; r < n; ++r) order[static_cast<size_t>(next[sample[r]]++)] = r;
  }
  const std::vector<int64_t> offset = row_offsets(g);
  const auto words = static_cast<size_t>(ceil_div(num_embeddings, 64));
  at::parallel_for(0, batch_size, 16, [&](int64_t begin, int64_t end) {
    // Bit sets over the table's rows: rows a sample looks up, and rows it looks up more than
    // once. Each sample clears the bits it set, so they are zero again for the next one.
    std::vector<uint64_t> seen(words, 0), repeated(words, 0);
    auto test = [](const std::vector<uint64_t>& bits, int64_t v) {
      return ((bits[static_cast<size_t>(v >> 6)] >> (v & 63)) & 1) != 0;
    };
    auto set = [](std::vector<uint64_t>& bits, int64_t v) {
      bits[static_cast<size_t>(v >> 6)] |= uint64_t{1} << (v & 63);
    };
    // The summed gradients of a sample's repeated rows (rare), in double: (row, offset in sums).
    std::vector<std::pair<int64_t, size_t>> groups;
    std::vector<double> sums;
    for (int64_t i = begin; i < end; ++i) {
      bool repeats = false;
      for (int64_t k = start[i]; k < start[i + 1]; ++k) {
        const int64_t v = index[order[k]];
        if (test(seen, v)) {
          set(repeated, v);
          repeats = true;
        } else {
          set(seen, v);
        }
      }
      // Rows looked up once contribute their own squared norm; a mean's or a sum's expanded
      // gradient has one row for all of a sample's lookups, whose norm is computed once.
      double total = 0.0;
      const T* last_row = nullptr;
      double last_sq = 0.0;
      groups.clear();
      sums.clear();
      for (int64_t k = start[i]; k < start[i + 1]; ++k) {
        const int64_t r = order[k], v = index[r];
        const T* row = g.data + offset[r];
        if (repeats && test(repeated, v)) {
          auto group = std::find_if(groups.begin(), groups.end(),
                                    [v](const auto& entry) { return entry.first == v; });
          if (group == groups.end()) {
            groups.emplace_back(v, sums.size());
            sums.resize(sums.size() + static_cast<size_t>(dim), 0.0);
            group = groups.end() - 1;
          }
          double* acc = sums.data() + group->second;
          for (int64_t d = 0; d < dim; ++d) acc[d] += static_cast<double>(row[d]);
          continue;
        }
        if (row != last_row) {
          last_row = row;
          last_sq = sum_of_squares<T, 16>(row, dim);
        }
        total += last_sq;
      }
      for (const auto& group : groups)
        total += sum_of_squares<double, 8>(sums.data() + group.second, dim);
      norm_sq[i] = static_cast<T>(total);
      for (int64_t k = start[i]; k < start[i + 1]; ++k) {
        const int64_t v = index[order[k]];
        seen[static_cast<size_t>(v >> 6)] = 0;
        repeated[static_cast<size_t>(v >> 6)] = 0;
      }
    }
  });
}

template <typename T>
void embedding_add_weighted(const int64_t* index, const int64_t* sample, const Rows<T>& g,
                            const T* w, int64_t batch_size, int64_t num_embeddings, T* out) {
  const int64_t n = g.count, dim = g.dim;
  check_lookups(index, sample, n, batch_size, num_embeddings);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(1, ceil_div(num_embeddings, threads));
  const std::vector<int64_t> offset = row_offsets(g);
  at::parallel_for(0, num_embeddings, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < n; ++r) {
      const int64_t v = index[r];
      if (v < begin || v >= end) continue;
      const T factor = w[sample[r]];
      const T* row = g.data + offset[r];
      T* dst = out + v * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] += factor * row[d];
    }
  });
}

namespace {

// Σ g·(x − m) and Σ g over one row; omp simd keeps partial sums in vector lanes.
template <typename T>
inline __attribute__((always_inline)) void row_moments(const T* g, const T* x, T m, int64_t n,
                                                       T* dot, T* sum) {
  T d = 0, s = 0;
#pragma omp simd reduction(+ : d, s)
  for (int64_t i = 0; i < n; ++i) {
    d += g[i] * (x[i] - m);
    s += g[i];
  }
  *dot = d;
  *sum = s;
}

template <typename T>
inline __attribute__((always_inline)) void rows_moments(const T* g, const T* x, const T* mean,
                                                        const T* rstd, int64_t begin, int64_t end,
                                                        int64_t n, int64_t channels,
                                                        int64_t per_group, T* w, T* b) {
  for (int64_t r = begin; r < end; ++r) {
    const int64_t stat = (r / channels) * (channels / per_group) + (r % channels) / per_group;
    T dot, sum;
    row_moments(g + r * n, x + r * n, mean[stat], n, &dot, &sum);
    w[r] = dot * rstd[stat];
    b[r] = sum;
  }
}

// Input gradient rows of the (sample, group) pairs [begin, end): see group_norm_input_grad.
template <typename T>
inline __attribute__((always_inline)) void groups_input_grad(
    const T* g, const T* x, const T* mean, const T* rstd, const T* gamma, const T* w, const T* b,
    int64_t begin, int64_t end, int64_t n, int64_t channels, int64_t per_group, T* dx) {
  const int64_t groups = channels / per_group;
  const T s = T(1) / static_cast<T>(per_group * n);
  for (int64_t k = begin; k < end; ++k) {
    const int64_t sample = k / groups, first = sample * channels + (k % groups) * per_group;
    T wk = 0, bk = 0;
    for (int64_t c = 0; c < per_group; ++c) {
      const T gc = gamma == nullptr ? T(1) : gamma[(first + c) % channels];
      wk += gc * w[first + c];
      bk += gc * b[first + c];
    }
    const T r = rstd[k], m = mean[k];
    const T slope = wk * r * r * s, offset = bk * r * s;
    for (int64_t c = 0; c < per_group; ++c) {
      const int64_t row = first + c;
      const T scale = r * (gamma == nullptr ? T(1) : gamma[row % channels]);
      const T* gr = g + row * n;
      const T* xr = x + row * n;
      T* out = dx + row * n;
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) out[i] = scale * gr[i] - offset - slope * (xr[i] - m);
    }
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
template <typename T>
__attribute__((target("arch=x86-64-v3"))) void groups_input_grad_v3(
    const T* g, const T* x, const T* mean, const T* rstd, const T* gamma, const T* w, const T* b,
    int64_t begin, int64_t end, int64_t n, int64_t channels, int64_t per_group, T* dx) {
  groups_input_grad(g, x, mean, rstd, gamma, w, b, begin, end, n, channels, per_group, dx);
}

template <typename T>
__attribute__((target("arch=x86-64-v3"))) void rows_moments_v3(const T* g, const T* x,
                                                               const T* mean, const T* rstd,
                                                               int64_t begin, int64_t end,
                                                               int64_t n, int64_t channels,
                                                               int64_t per_group, T* w, T* b) {
  rows_moments(g, x, mean, rstd, begin, end, n, channels, per_group, w, b);
}
#endif

}  // namespace

template <typename T>
void group_norm_affine_samples(const T* grad_output, const T* input, const T* mean, const T* rstd,
                               int64_t rows, int64_t length, int64_t channels,
                               int64_t channels_per_group, T* weight, T* bias) {
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, length));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (dptorch::detail::has_x86_64_v3()) {
      rows_moments_v3(grad_output, input, mean, rstd, begin, end, length, channels,
                      channels_per_group, weight, bias);
      return;
    }
#endif
    rows_moments(grad_output, input, mean, rstd, begin, end, length, channels, channels_per_group,
                 weight, bias);
  });
}

template <typename T>
void group_norm_input_grad(const T* grad_output, const T* input, const T* mean, const T* rstd,
                           const T* gamma, const T* weight, const T* bias, int64_t samples,
                           int64_t length, int64_t channels, int64_t channels_per_group,
                           T* input_grad) {
  const int64_t pairs = samples * (channels / channels_per_group);
  const int64_t grain =
      std::max<int64_t>(1, 32768 / std::max<int64_t>(1, length * channels_per_group));
  at::parallel_for(0, pairs, grain, [&](int64_t begin, int64_t end) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (dptorch::detail::has_x86_64_v3()) {
      groups_input_grad_v3(grad_output, input, mean, rstd, gamma, weight, bias, begin, end, length,
                           channels, channels_per_group, input_grad);
      return;
    }
#endif
    groups_input_grad(grad_output, input, mean, rstd, gamma, weight, bias, begin, end, length,
                      channels, channels_per_group, input_grad);
  });
}

#define DPTORCH_INSTANTIATE(T)                                                                    \
  template void unfold_patches_2d<T>(const T*, int64_t, const PatchGeometry&, T*);                \
  template void conv_weight_samples_tiled<T>(const std::vector<ConvRecord<T>>&, int64_t, int64_t, \
                                             T*, T*);                                             \
  template void linear_weight_samples_tiled<T>(const T*, const T*, int64_t, int64_t, int64_t,     \
                                               int64_t, T*, T*);                                  \
  template void embedding_norm_sq<T>(const int64_t*, const int64_t*, const Rows<T>&, int64_t,     \
                                     int64_t, T*);                                                \
  template void embedding_add_weighted<T>(const int64_t*, const int64_t*, const Rows<T>&,         \
                                          const T*, int64_t, int64_t, T*);                        \
  template void group_norm_input_grad<T>(const T*, const T*, const T*, const T*, const T*,        \
                                         const T*, const T*, int64_t, int64_t, int64_t, int64_t,  \
                                         T*);                                                     \
  template void group_norm_affine_samples<T>(const T*, const T*, const T*, const T*, int64_t,     \
                                             int64_t, int64_t, int64_t, T*, T*);
DPTORCH_INSTANTIATE(float)
DPTORCH_INSTANTIATE(double)
#undef DPTORCH_INSTANTIATE

}  // namespace dptorch::grad_sample::cpu
