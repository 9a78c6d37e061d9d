#pragma once

// CPU loops behind the grad_sample rules where a chain of torch operators would copy or scatter
// the same data several times. Raw pointers into contiguous tensors; the callers check shapes,
// dtypes and devices, and fall back to the device-generic operators for everything else.

#include <cstdint>
#include <vector>

namespace dptorch::grad_sample::cpu {

/// Geometry of a 2-D patch extraction (a 1-D convolution is the case H = kh = 1).
struct PatchGeometry {
  int64_t channels, height, width;  // input [C, H, W] of one sample
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t out_h, out_w;  // output positions
};

/// Writes the patches of `samples` inputs [C, H, W] (`input`, one after another) as
/// [C, kh, kw, out_h·out_w] per sample into `out`: the unfolded input with the output positions
/// innermost, zeros where a patch reaches into the padding. Parallel over samples.
template <typename T>
void unfold_patches_2d(const T* input, int64_t samples, const PatchGeometry& geometry, T* out);

/// One recorded call of a convolution: its input [B, C, H, W] and output gradient
/// [B, P, out_h, out_w], both contiguous, with the call's geometry.
template <typename T>
struct ConvRecord {
  const T* input;
  const T* grad_output;
  PatchGeometry geometry;
};

/// A convolution's per-sample weight gradients (groups = 1), G_i = Σ over the records and output
/// positions t of g_t a_tᵀ ([P, C·kh·kw]): ‖G_i‖² into norm_sq[i] (unless null) and G_i into
/// out[i] ([samples, P, C·kh·kw], unless null). G_i is formed one register tile at a time from
/// the sample's patches (unfolded into a per-thread buffer): time T·C·kh·kw·P per sample,
/// memory one sample's patches per thread beside `out`. Parallel over samples; the result does
/// not depend on the number of threads.
/// The vector width in bytes of conv_weight_samples_tiled's path on this processor (16, 32 or
/// 64: baseline, AVX2, AVX-512).
int tile_vector_bytes();

template <typename T>
void conv_weight_samples_tiled(const std::vector<ConvRecord<T>>& records, int64_t samples,
                               int64_t out_channels, T* norm_sq, T* out);

/// A linear-like layer's per-sample weight gradients, G_i = Σ_t g_t a_tᵀ ([p, d]) from
/// activations a [samples, positions, d] and output gradients g [samples, positions, p], both
/// contiguous: ‖G_i‖² into norm_sq[i] (unless null) and G_i into out[i] ([samples, p, d], unless
/// null), by the register tile of conv_weight_samples_tiled. Parallel over samples; the result does
/// not depend on the number of threads.
template <typename T>
void linear_weight_samples_tiled(const T* a, const T* g, int64_t samples, int64_t positions,
                                 int64_t d, int64_t p, T* norm_sq, T* out);

/// N rows of `dim` contiguous elements in groups of `per_group`: row n starts at
/// data + (n / per_group)·group_stride + (n % per_group)·row_stride. A [B, T, dim] tensor with
/// any strides over B and T (an output gradient expanded over positions has row_stride 0), or
/// [N, dim] with per_group 1.
template <typename T>
struct Rows {
  const T* data;
  int64_t count, dim, per_group, group_stride, row_stride;
  [[nodiscard]] const T* row(int64_t n) const {
    return data + (n / per_group) * group_stride + (n % per_group) * row_stride;
  }
};

/// ‖Σ_{n: sample[n]=i, index[n]=v} g_n‖² summed over v, into norm_sq[i] for i < batch_size.
/// Every index must lie in [0, num_embeddings), every sample in [0, batch_size) (checked).
/// Parallel over samples; each sample's repeated rows are found with bit sets over the table's
/// rows (2 bits per row and thread), so time is O(N·dim + num_embeddings / 64).
template <typename T>
void embedding_norm_sq(const int64_t* index, const int64_t* sample, const Rows<T>& g,
                       int64_t batch_size, int64_t num_embeddings, T* norm_sq);

/// out[index[n]] += w[sample[n]] · g_n for every n, out [num_embeddings, dim]. Parallel over
/// blocks of the table's rows, each scanning the lookups in order, so the result does not depend
/// on the number of threads. Indices and samples are checked as above.
template <typename T>
void embedding_add_weighted(const int64_t* index, const int64_t* sample, const Rows<T>& g,
                            const T* w, int64_t batch_size, int64_t num_embeddings, T* out);

/// Per-sample affine gradients of a group norm from its input: for every row r = b·C + c of
/// `rows` rows of `length` contiguous elements of `grad_output` and `input` ([B, C, S]),
/// weight[r] = rstd·Σ_s g_s·(x_s − mean) and bias[r] = Σ_s g_s, with mean and rstd those of row
/// r's (sample, group): index b·G + c / channels_per_group of `mean` and `rstd` ([B, G]).
/// Parallel over rows; the result does not depend on the number of threads.
template <typename T>
void group_norm_affine_samples(const T* grad_output, const T* input, const T* mean, const T* rstd,
                               int64_t rows, int64_t length, int64_t channels,
                               int64_t channels_per_group, T* weight, T* bias);

/// The input gradient of a group norm from the per-sample affine gradients `weight`, `bias`
/// ([B, C], as group_norm_affine_samples forms them) in one pass: for row r = b·C + c of group k,
/// with s = 1 / (channels_per_group·length), W = Σ_{c' in k} γ_c'·weight[b, c'] and
/// Bk = Σ_{c' in k} γ_c'·bias[b, c'], input_grad = rstd·(γ_c·g − Bk·s) − W·rstd²·s·(x − mean).
/// `gamma` [C] may be null (γ = 1). Parallel over (sample, group).
template <typename T>
void group_norm_input_grad(const T* grad_output, const T* input, const T* mean, const T* rstd,
                           const T* gamma, const T* weight, const T* bias, int64_t samples,
                           int64_t length, int64_t channels, int64_t channels_per_group,
                           T* input_grad);

}  // namespace dptorch::grad_sample::cpu
