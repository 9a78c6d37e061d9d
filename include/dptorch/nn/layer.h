#pragma once

#include <dptorch/common.h>
#include <dptorch/grad_sample/rules.h>

#include <torch/nn/module.h>
#include <torch/types.h>

#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

namespace dptorch::nn {

/// One call of a dp layer while attached to a tape: what the layer saw in forward and, once
/// backward has run, the gradient of its output. The pair defines every per-sample gradient of
/// the layer's parameters (docs/design.md §2).
struct Record {
  /// The layer's input as it saw it (detached; for norm layers the normalised input).
  torch::Tensor input;
  /// The gradient of the layer's output; set in backward.
  torch::Tensor grad_output;
  /// Layer-specific tensors saved in forward (e.g. the bag of each EmbeddingBag lookup).
  std::vector<torch::Tensor> extra;
  /// The dimension of `input` and `grad_output` that indexes samples.
  int64_t batch_dim = 0;
  /// The number of samples of this call.
  int64_t batch_size = 0;
};

namespace detail {

/// What a GradSampleModule shares with the dp layers attached to it.
struct Tape {
  /// Whether the batch is dimension 0 (true) or 1 of inputs with two or more leading dimensions.
  bool batch_first = true;
  /// Ghost norms, materialisation, or the cheaper of the two, for linear-like layers.
  NormMethod norm_method = NormMethod::kAuto;
  /// Records filed by backward since the tape was last cleared.
  std::atomic<int64_t> filed{0};
};

/// The records a layer's backward calls have filed (backward may run on other threads).
struct RecordSink {
  std::mutex mutex;
  std::vector<Record> records;
};

}  // namespace detail

/// The interface of every layer whose per-sample gradients dptorch can compute: the dp layers of
/// this namespace, and the extension point for a user's own layer (derive from it, record calls
/// through `taped`, and turn records into a grad_sample::PerSampleGrads in `make_grads`).
class PerSampleLayer {
 public:
  PerSampleLayer() = default;
  /// A copy (Cloneable::clone) starts detached, with no records of its own.
  PerSampleLayer(const PerSampleLayer&) {}  // NOLINT: nothing of the original is copied
  PerSampleLayer& operator=(const PerSampleLayer&) { return *this; }
  virtual ~PerSampleLayer() = default;

  /// Starts recording calls on `tape` (done by GradSampleModule).
  void attach(std::shared_ptr<detail::Tape> tape);
  /// Stops recording and drops what was recorded: the layer is its torch twin again.
  void detach();
  /// Whether the layer is attached to a tape.
  [[nodiscard]] bool attached() const { return tape_ != nullptr; }

  /// Turns the records filed since the last call into per-sample gradients and forgets them;
  /// nullptr if nothing was filed. `batch_size` receives the samples per record; records of one
  /// pass that disagree on it are refused.
  [[nodiscard]] std::unique_ptr<grad_sample::PerSampleGrads> take_grads(int64_t* batch_size);
  /// Drops filed records without using them (and forgets unrecorded calls).
  void clear_records();
  /// Forward calls since the last clear_records() that would have been recorded but for eval
  /// mode (attached, grad mode on, a parameter trainable): dp layers record in training mode
  /// only, as the seed's hooks did.
  [[nodiscard]] int64_t unrecorded_calls() const { return unrecorded_calls_; }

  /// The module this layer is (for its parameters and its type name).
  [[nodiscard]] virtual torch::nn::Module& as_module() = 0;

 protected:
  /// Builds the rule of this layer from the records of one pass (at least one, all of the same
  /// batch size, each with its grad_output set).
  [[nodiscard]] virtual std::unique_ptr<grad_sample::PerSampleGrads> make_grads(
      std::vector<Record> records) = 0;

  /// Whether a forward call now should be recorded: attached, in training mode, grad mode on,
  /// and a parameter of the layer trainable. (A call refused only for eval mode is counted.)
  [[nodiscard]] bool recording(std::initializer_list<const torch::Tensor*> params) const;
  /// The batch dimension of an input with `leading_dims` dimensions before the features.
  [[nodiscard]] int64_t batch_dim(int64_t leading_dims) const;
  /// The norm method the tape asks for.
  [[nodiscard]] NormMethod norm_method() const;

  /// Runs `compute()` as a recorded call: autograd sees `input`, `weight` and `bias` as inputs
  /// (either may be undefined), but forms no parameter gradient; in backward, `input_grad(g)`
  /// gives the input gradient (only called when it is needed) and `record` with its
  /// grad_output set is filed for this layer.
  torch::Tensor taped(const torch::Tensor& input, const torch::Tensor& weight,
                      const torch::Tensor& bias, const std::function<torch::Tensor()>& compute,
                      std::function<torch::Tensor(const torch::Tensor&)> input_grad, Record record);

 private:
  std::shared_ptr<detail::Tape> tape_;
  std::shared_ptr<detail::RecordSink> sink_ = std::make_shared<detail::RecordSink>();
  mutable std::atomic<int64_t> unrecorded_calls_{0};
};

}  // namespace dptorch::nn
