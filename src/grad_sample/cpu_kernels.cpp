#include "cpu_kernels.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace dptorch::grad_sample::cpu {
namespace {

// ⌈a / b⌉ for b > 0 and any sign of a.
int64_t ceil_div(int64_t a, int64_t b) { return a >= 0 ? (a + b - 1) / b : -((-a) / b); }

template <typename T>
void unfold_one(const T* input, const PatchGeometry& g, T* out) {
  const int64_t positions = g.out_h * g.out_w;
  for (int64_t c = 0; c < g.channels; ++c) {
    const T* plane = input + c * g.height * g.width;
    for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
      for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
        T* dst = out + ((c * g.kernel_h + kh) * g.kernel_w + kw) * positions;
        // Output column ox reads input column ox·stride + x_offset; [begin, end) are inside.
        const int64_t x_offset = kw * g.dilation_w - g.pad_w;
        const int64_t begin = std::clamp<int64_t>(ceil_div(-x_offset, g.stride_w), 0, g.out_w);
        const int64_t end =
            std::clamp<int64_t>(ceil_div(g.width - x_offset, g.stride_w), begin, g.out_w);
        for (int64_t oy = 0; oy < g.out_h; ++oy) {
          T* row = dst + oy * g.out_w;
          const int64_t y = oy * g.stride_h + kh * g.dilation_h - g.pad_h;
          if (y < 0 || y >= g.height) {
            std::fill(row, row + g.out_w, T(0));
            continue;
          }
          std::fill(row, row + begin, T(0));
          const T* src = plane + y * g.width;
          if (g.stride_w == 1) {
            std::copy(src + begin + x_offset, src + end + x_offset, row + begin);
          } else {
            for (int64_t ox = begin; ox < end; ++ox) row[ox] = src[ox * g.stride_w + x_offset];
          }
          std::fill(row + end, row + g.out_w, T(0));
        }
      }
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

template <typename T>
double sum_of_squares(const T* x, int64_t size) {
  double s = 0.0;
  for (int64_t d = 0; d < size; ++d) s += static_cast<double>(x[d]) * static_cast<double>(x[d]);
  return s;
}

}  // namespace

template <typename T>
void unfold_patches_2d(const T* input, int64_t samples, const PatchGeometry& geometry, T* out) {
  const int64_t in_size = geometry.channels * geometry.height * geometry.width;
  const int64_t out_size = geometry.channels * geometry.kernel_h * geometry.kernel_w *
                           geometry.out_h * geometry.out_w;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, out_size));
  at::parallel_for(0, samples, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) unfold_one(input + b * in_size, geometry, out + b * out_size);
  });
}

template <typename T>
void embedding_norm_sq(const int64_t* index, const int64_t* sample, const T* g, int64_t n,
                       int64_t dim, int64_t batch_size, int64_t num_embeddings, T* norm_sq) {
  check_lookups(index, sample, n, batch_size, num_embeddings);
  // Counting sort of the lookups by sample (stable: each sample's rows keep their order).
  std::vector<int64_t> start(static_cast<size_t>(batch_size) + 1, 0), order(static_cast<size_t>(n));
  for (int64_t r = 0; r < n; ++r) ++start[static_cast<size_t>(sample[r]) + 1];
  for (int64_t i = 0; i < batch_size; ++i) start[i + 1] += start[i];
  {
    std::vector<int64_t> next(start.begin(), start.end() - 1);
    for (int64_t r = 0; r < n; ++r) order[static_cast<size_t>(next[sample[r]]++)] = r;
  }
  at::parallel_for(0, batch_size, 16, [&](int64_t begin, int64_t end) {
    // Open-addressing table from a sample's rows of the embedding to its first lookup of the row
    // and, once the row repeats, to the sum of its lookups' gradients in `sums`.
    std::vector<int64_t> keys, first, summed, used;
    std::vector<double> sums;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t rows = start[i + 1] - start[i];
      int bits = 4;
      while ((int64_t{1} << bits) < 2 * rows) ++bits;
      const int64_t mask = (int64_t{1} << bits) - 1;
      keys.assign(static_cast<size_t>(mask + 1), -1);
      first.resize(keys.size());
      summed.resize(keys.size());
      used.clear();
      sums.clear();
      for (int64_t k = start[i]; k < start[i + 1]; ++k) {
        const int64_t r = order[k], v = index[r];
        auto h = static_cast<int64_t>((static_cast<uint64_t>(v) * 0x9E3779B97F4A7C15ULL) >>
                                      (64 - bits));
        while (keys[h] != -1 && keys[h] != v) h = (h + 1) & mask;
        if (keys[h] == -1) {
          keys[h] = v;
          first[h] = r;
          summed[h] = -1;
          used.push_back(h);
          continue;
        }
        if (summed[h] == -1) {
          summed[h] = static_cast<int64_t>(sums.size());
          sums.insert(sums.end(), g + first[h] * dim, g + (first[h] + 1) * dim);
        }
        double* acc = sums.data() + summed[h];
        const T* row = g + r * dim;
        for (int64_t d = 0; d < dim; ++d) acc[d] += static_cast<double>(row[d]);
      }
      double total = 0.0;
      for (const int64_t h : used) {
        total += summed[h] == -1 ? sum_of_squares(g + first[h] * dim, dim)
                                 : sum_of_squares(sums.data() + summed[h], dim);
      }
      norm_sq[i] = static_cast<T>(total);
    }
  });
}

template <typename T>
void embedding_add_weighted(const int64_t* index, const int64_t* sample, const T* g,
                            const T* w, int64_t n, int64_t dim, int64_t batch_size,
                            int64_t num_embeddings, T* out) {
  check_lookups(index, sample, n, batch_size, num_embeddings);
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(1, ceil_div(num_embeddings, threads));
  at::parallel_for(0, num_embeddings, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = 0; r < n; ++r) {
      const int64_t v = index[r];
      if (v < begin || v >= end) continue;
      const T factor = w[sample[r]];
      const T* row = g + r * dim;
      T* dst = out + v * dim;
      for (int64_t d = 0; d < dim; ++d) dst[d] += factor * row[d];
    }
  });
}

#define DPTORCH_INSTANTIATE(T)                                                                  \
  template void unfold_patches_2d<T>(const T*, int64_t, const PatchGeometry&, T*);             \
  template void embedding_norm_sq<T>(const int64_t*, const int64_t*, const T*, int64_t,        \
                                     int64_t, int64_t, int64_t, T*);                            \
  template void embedding_add_weighted<T>(const int64_t*, const int64_t*, const T*, const T*,   \
                                          int64_t, int64_t, int64_t, int64_t, T*);
DPTORCH_INSTANTIATE(float)
DPTORCH_INSTANTIATE(double)
#undef DPTORCH_INSTANTIATE

}  // namespace dptorch::grad_sample::cpu
