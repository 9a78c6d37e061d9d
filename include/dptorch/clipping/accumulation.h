#pragma once

#include <torch/types.h>

#include <cstdint>
#include <functional>
#include <vector>

namespace dptorch {

class GradSampleModule;

/// How an Accumulation begins.
struct AccumulationStart {
  /// Writes the first values of the sums into the (uninitialised) accumulators; empty: zeros.
  std::function<void(const std::vector<torch::Tensor>&)> fill;
  /// The norm bound C that noise in the first values was drawn for (its std is σ·C·scale);
  /// 0 if they hold no noise.
  double noise_bound = 0;
  /// Multiplies every clipped sum added (a DPOptimizer folds 1/E[B] of a mean loss in here).
  double scale = 1;
  /// Who began the accumulation (a DPOptimizer passes itself; nullptr: the clipper).
  const void* owner = nullptr;
  /// Scalars appended to the first bucket after the sums, zeroed at begin(): values that must
  /// travel with the gradients (a distributed DPOptimizer puts the unclipped count there).
  int64_t extra = 0;
};

/// The clipped sums of one logical batch while they are gathered (docs/design.md §3: one owner of
/// an accumulation): per trainable parameter the running Σ_i w_i G_i (times `scale`), the largest
/// clipping thresholds seen, the samples and the calls so far, and what the sums began with.
/// PerSampleGradientClipper adds to it after each backward; pre_step() or a DPOptimizer finish
/// it. The accumulator tensors are kept from one accumulation to the next, so a step allocates
/// no parameter-sized tensors. The accumulators of all parameters of one dtype and device are
/// views of one flat bucket, so the whole sum can be sent in one collective (docs/design.md §6).
class Accumulation {
 public:
  /// Whether an accumulation is under way (begun and not finished or reset).
  [[nodiscard]] bool active() const { return active_; }
  /// Begins an accumulation for `params` (none may be under way). Accumulators are reused where
  /// their shape, dtype and device fit and no `.grad` holds them.
  void begin(const std::vector<torch::Tensor>& params, AccumulationStart start);
  /// Adds Σ_i w_i G_i · scale() from the last backward on `gsm` (one weight vector [B] per
  /// parameter), and takes the element-wise maximum with `thresholds` (one per parameter for
  /// per-layer clipping, one for flat clipping).
  void add(GradSampleModule& gsm, const std::vector<torch::Tensor>& weights,
           const std::vector<double>& thresholds);
  /// Adds `sums` (already Σ_i w_i G_i, one per parameter) · scale(), with `thresholds` and
  /// `batch_size` as add() takes them from the tape.
  void add_sums(const std::vector<torch::Tensor>& sums, const std::vector<double>& thresholds,
                int64_t batch_size);

  /// The accumulators, one per parameter (valid while active()).
  [[nodiscard]] const std::vector<torch::Tensor>& sums() const { return sums_; }
  /// The flat buckets the accumulators are views of, one per (dtype, device) in the order the
  /// parameters first use them; the first ends with the extra() scalars.
  [[nodiscard]] const std::vector<torch::Tensor>& buckets() const { return buckets_; }
  /// The AccumulationStart::extra scalars at the end of the first bucket (empty if none).
  [[nodiscard]] torch::Tensor extra() const;
  /// The element-wise largest thresholds over the calls (empty before the first).
  [[nodiscard]] const std::vector<double>& max_thresholds() const { return max_thresholds_; }
  /// ‖max_thresholds()‖₂: the norm bound the noise of this logical batch must be scaled with.
  [[nodiscard]] double noise_bound() const;
  /// Samples added so far.
  [[nodiscard]] int64_t batch_size() const { return batch_size_; }
  /// add() / add_sums() calls so far.
  [[nodiscard]] int64_t iterations() const { return iterations_; }
  /// The factor every added sum was multiplied by.
  [[nodiscard]] double scale() const { return start_.scale; }
  /// The norm bound the noise already in the sums was drawn for (0: none).
  [[nodiscard]] double initial_noise_bound() const { return start_.noise_bound; }
  /// Who began it (see AccumulationStart::owner).
  [[nodiscard]] const void* owner() const { return start_.owner; }

  /// Hands each sum to its parameter's `.grad` without a copy and ends the accumulation.
  void finish(const std::vector<torch::Tensor>& params);
  /// Ends the accumulation without using it (the accumulators are kept for reuse).
  void reset();
  /// Ends the accumulation and frees the accumulators.
  void release();

 private:
  void merge_thresholds(const std::vector<double>& thresholds);

  // Whether the buckets fit `params` with `extra` trailing scalars and no .grad holds one.
  [[nodiscard]] bool reusable(const std::vector<torch::Tensor>& params, int64_t extra) const;

  std::vector<torch::Tensor> sums_;
  std::vector<torch::Tensor> buckets_;
  std::vector<size_t> bucket_of_;  // per parameter: the index of its bucket
  int64_t extra_ = 0;
  std::vector<double> max_thresholds_;
  AccumulationStart start_;
  int64_t batch_size_ = 0;
  int64_t iterations_ = 0;
  bool active_ = false;
};

/// ‖v‖₂ of a vector of thresholds.
[[nodiscard]] double l2_norm(const std::vector<double>& v);

}  // namespace dptorch
