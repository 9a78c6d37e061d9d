#pragma once

#include <dptorch/common.h>
#include <dptorch/grad_sample/rules.h>

#include <torch/nn/cloneable.h>
#include <torch/nn/module.h>
#include <torch/types.h>

#include <atomic>
#include <functional>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <ostream>
#include <string>
#include <utility>
#include <vector>

/// The extension point of docs/design.md §2: what a layer whose per-sample gradients dptorch
/// computes is made of. Three levels, each for whoever needs it:
///  - PerSampleLayer: the interface GradSampleModule talks to (attach, take the rule, detach);
///  - RecordingLayer<Payload>: a layer that records calls with a payload of its own type and turns
///    them into a rule (what a user's layer derives from);
///  - TwinLayer<Derived, Twin, Payload>: a RecordingLayer that is a drop-in twin of a torch::nn
///    layer: options, reset, printing, training mode and the detached forward come from the twin.
namespace dptorch::nn {

namespace detail {

/// What a GradSampleModule shares with the dp layers attached to it.
struct Tape {
  /// Whether the batch is dimension 0 (true) or 1 of inputs with two or more leading dimensions.
  bool batch_first = true;
  /// Ghost norms, materialisation, or the cheaper of the two, for linear-like layers.
  NormMethod norm_method = NormMethod::kAuto;
  /// Calls filed by backward since the tape was last cleared.
  std::atomic<int64_t> filed{0};
  /// Bytes of the inputs and outputs of the calls recorded by forward (the activations the pass
  /// holds), and bytes of per-sample gradients that
  /// layers have formed while backward filed their calls (kept for the clipped sum), since the
  /// tape was last cleared: a layer keeps per-sample gradients only while kept_bytes stays
  /// within recorded_bytes, so that what it holds never outgrows what the pass recorded.
  std::atomic<int64_t> recorded_bytes{0}, kept_bytes{0};
  /// Whether `bytes` more could be kept, asking for `share`·bytes of what the budget has left (a
  /// layer whose per-sample gradients outgrow its own activations asks for more than it keeps,
  /// which bounds the pass's peak memory).
  [[nodiscard]] bool may_keep(int64_t bytes, int64_t share = 1) const {
    return kept_bytes.load() + share * bytes <= recorded_bytes.load();
  }
  /// may_keep(bytes, share), and if so counts `bytes` as kept.
  bool try_keep(int64_t bytes, int64_t share = 1) {
    int64_t kept = kept_bytes.load();
    while (kept + share * bytes <= recorded_bytes.load()) {
      if (kept_bytes.compare_exchange_weak(kept, kept + bytes)) return true;
    }
    return false;
  }
  /// Forgets filed calls and both byte counts.
  void reset() {
    filed = 0;
    recorded_bytes = 0;
    kept_bytes = 0;
  }
};

}  // namespace detail

/// The gradients of a recorded call's outputs, in backward, and which inputs need a gradient.
using TensorList = std::vector<torch::Tensor>;
/// Gives the gradients of a recorded call's inputs (one per input; undefined where not needed or
/// not differentiable) from the gradients of its outputs and the inputs' `needed` flags.
using InputGradients =
    std::function<TensorList(const TensorList& grad_outputs, const std::vector<bool>& needed)>;

/// The interface of every layer whose per-sample gradients dptorch computes. GradSampleModule
/// attaches it to a tape, lets backward run, then takes the rule of what was recorded.
/// Derive from RecordingLayer (or TwinLayer) rather than from this class directly.
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
  /// Whether the tape reads inputs with two or more leading dimensions batch first (true when
  /// detached). A layer that calls dp layers of its own hands them inputs in this layout.
  [[nodiscard]] bool batch_first() const { return tape_ == nullptr || tape_->batch_first; }

  /// Turns the calls filed since the last call into per-sample gradients and forgets them;
  /// nullptr if nothing was filed. `batch_size` receives the samples per call; calls of one
  /// pass that disagree on it are refused.
  [[nodiscard]] std::unique_ptr<grad_sample::PerSampleGrads> take_grads(int64_t* batch_size);
  /// Drops filed calls without using them (and forgets unrecorded calls).
  void clear_records();
  /// Forward calls since the last clear_records() that would have been recorded but for eval
  /// mode (attached, grad mode on, a parameter trainable): dp layers record in training mode
  /// only, as the seed's hooks did.
  [[nodiscard]] int64_t unrecorded_calls() const { return unrecorded_calls_; }

  /// The module this layer is (for its parameters and its type name).
  [[nodiscard]] virtual torch::nn::Module& as_module() = 0;

 protected:
  /// Moves the filed calls into a rule (nullptr when none), checking one batch size.
  [[nodiscard]] virtual std::unique_ptr<grad_sample::PerSampleGrads> take_filed(
      int64_t* batch_size) = 0;
  /// Forgets the filed calls.
  virtual void drop_filed() = 0;

  /// Whether a forward call now should be recorded: attached, in training mode, grad mode on,
  /// and one of `params` trainable. (A call refused only for eval mode is counted.)
  [[nodiscard]] bool recording(std::initializer_list<const torch::Tensor*> params) const;
  /// The same for a layer with many parameters: one of the module's own parameters trainable.
  [[nodiscard]] bool recording() const;
  /// The batch dimension of an input with `leading_dims` dimensions before the features.
  [[nodiscard]] int64_t batch_dim(int64_t leading_dims) const;
  /// The norm method the tape asks for.
  [[nodiscard]] NormMethod norm_method() const;
  /// The tape the layer is attached to (null when detached): what a call's file hook may
  /// capture to ask whether it can keep per-sample gradients (Tape::try_keep).
  [[nodiscard]] const std::shared_ptr<detail::Tape>& tape() const { return tape_; }

  /// Runs `compute()` once, now, as one custom autograd function whose inputs are `inputs` (data
  /// and parameters alike; undefined ones allowed). Autograd forms no gradient for a parameter:
  /// in backward, `input_gradients` gives the inputs' gradients (null when no input is
  /// differentiable) and `file` receives the detached gradients of the outputs.
  TensorList taped(const TensorList& inputs, const std::function<TensorList()>& compute,
                   InputGradients input_gradients, std::function<void(TensorList)> file);

 private:
  [[nodiscard]] bool recording_if(bool trainable) const;

  std::shared_ptr<detail::Tape> tape_;
  mutable std::atomic<int64_t> unrecorded_calls_{0};
};

/// One recorded call of a layer: what its forward saved (`saved`, of the layer's own type), the
/// gradients of its outputs once backward has run, and its number of samples.
template <class Payload>
struct Call {
  Payload saved;
  TensorList grad_outputs;
  int64_t batch_size = 0;
};

/// Runs when backward files a call, before the call is stored: it may reduce the call at once
/// (form the call's per-sample gradients into its payload and drop the inputs and output
/// gradients it no longer needs), so that memory is freed as backward proceeds.
template <class Payload>
using FileHook = std::function<void(Call<Payload>&)>;

/// A layer that records its calls with a payload of type `Payload` and turns the calls of one
/// backward pass into a rule. A user's own layer derives from it (with torch::nn::Cloneable):
/// its forward calls `record(...)` when `recording()` says so, and `make_grads` is its rule
/// (docs/extending.md walks through one).
template <class Payload>
class RecordingLayer : public PerSampleLayer {
 public:
  RecordingLayer() = default;
  /// A copy starts with no filed calls of its own.
  RecordingLayer(const RecordingLayer& other) : PerSampleLayer(other) {}
  RecordingLayer& operator=(const RecordingLayer&) { return *this; }

 protected:
  /// The rule of one backward pass: every call filed since the last pass (at least one, all of
  /// the same batch size, each with its grad_outputs set), in the order backward filed them.
  [[nodiscard]] virtual std::unique_ptr<grad_sample::PerSampleGrads> make_grads(
      std::vector<Call<Payload>> calls) = 0;

  /// Records a call with any number of inputs and outputs (see PerSampleLayer::taped); `saved`
  /// is filed with the gradients of the outputs when backward reaches it, after `on_file` (if
  /// any) has run on the call.
  TensorList record(const TensorList& inputs, const std::function<TensorList()>& compute,
                    InputGradients input_gradients, Payload saved, int64_t batch_size,
                    FileHook<Payload> on_file = nullptr) {
    auto call = std::make_shared<Call<Payload>>();
    call->saved = std::move(saved);
    call->batch_size = batch_size;
    std::weak_ptr<Sink> sink = sink_;
    return taped(inputs, compute, std::move(input_gradients),
                 [sink, call, on_file = std::move(on_file)](TensorList grad_outputs) {
                   call->grad_outputs = std::move(grad_outputs);
                   if (on_file && !sink.expired()) on_file(*call);
                   if (auto s = sink.lock()) {
                     std::lock_guard<std::mutex> lock(s->mutex);
                     s->calls.push_back(std::move(*call));
                   }
                 });
  }

  /// Records the common call: one output computed from one differentiable `input` and the
  /// layer's `params`; `input_grad(g)` gives the input's gradient (null if none is needed).
  torch::Tensor record(const torch::Tensor& input, std::initializer_list<torch::Tensor> params,
                       const std::function<torch::Tensor()>& compute,
                       std::function<torch::Tensor(const torch::Tensor&)> input_grad, Payload saved,
                       int64_t batch_size, FileHook<Payload> on_file = nullptr) {
    TensorList inputs{input};
    inputs.insert(inputs.end(), params.begin(), params.end());
    InputGradients grads;
    if (input_grad) {
      grads = [input_grad = std::move(input_grad), n = inputs.size()](
                  const TensorList& g, const std::vector<bool>& needed) {
        TensorList out(n);
        if (needed[0]) out[0] = input_grad(g[0]);
        return out;
      };
    }
    return record(
               inputs, [&] { return TensorList{compute()}; }, std::move(grads), std::move(saved),
               batch_size, std::move(on_file))
        .front();
  }

 private:
  struct Sink {
    std::mutex mutex;
    std::vector<Call<Payload>> calls;
  };

  std::unique_ptr<grad_sample::PerSampleGrads> take_filed(int64_t* batch_size) final {
    std::vector<Call<Payload>> calls;
    {
      std::lock_guard<std::mutex> lock(sink_->mutex);
      calls.swap(sink_->calls);
    }
    if (calls.empty()) return nullptr;
    const int64_t B = calls.front().batch_size;
    for (const auto& c : calls) check_batch_size(B, c.batch_size);
    *batch_size = B;
    return make_grads(std::move(calls));
  }

  void drop_filed() final {
    std::lock_guard<std::mutex> lock(sink_->mutex);
    sink_->calls.clear();
  }

  void check_batch_size(int64_t expected, int64_t got) {
    TORCH_CHECK(got == expected, "calls of one ", as_module().name(),
                " in a single forward pass saw different batch sizes (", expected, " and ", got,
                "); every call of a layer must see the same samples");
  }

  std::shared_ptr<Sink> sink_ = std::make_shared<Sink>();
};

namespace detail {
/// Prints `twin` with its namespace replaced: "torch::nn::Linear(...)" -> "dptorch::nn::...".
void print_as_twin(std::ostream& stream, const torch::nn::Module& twin);
}  // namespace detail

/// The base of a drop-in twin of a torch::nn layer (Derived is the twin's Impl, `Twin` the torch
/// ModuleHolder, e.g. torch::nn::Linear): it keeps the options, builds the torch layer on reset
/// and adopts its parameters under the same names (so state dicts interchange), prints as it,
/// passes training mode on, and offers it for the detached forward. Derived supplies
/// `void adopt()` (bind its members to twin()'s tensors with adopt_parameter/adopt_buffer), its
/// forward, and its rule. `Options` is what the twin's constructor takes (by default the type of
/// its `options` member).
template <class Derived, class Twin, class Payload,
          class TwinOptions =
              std::decay_t<decltype(std::declval<typename Twin::ContainedType&>().options)>>
class TwinLayer : public torch::nn::Cloneable<Derived>, public RecordingLayer<Payload> {
 public:
  using TwinImpl = typename Twin::ContainedType;
  using Options = TwinOptions;

  /// The options the layer was built with.
  Options options;

  void reset() override {
    twin_ = Twin(options);
    twin_->train(this->is_training());
    static_cast<Derived*>(this)->adopt();
  }
  void pretty_print(std::ostream& stream) const override { detail::print_as_twin(stream, *twin_); }
  void train(bool on = true) override {
    torch::nn::Module::train(on);
    twin_->train(on);
  }
  torch::nn::Module& as_module() override { return *this; }

 protected:
  TwinLayer(std::string name, Options options_)
      : torch::nn::Cloneable<Derived>(std::move(name)), options(std::move(options_)) {}

  /// The torch layer, sharing this layer's parameters and buffers: the detached forward.
  TwinImpl& twin() { return *twin_; }
  const TwinImpl& twin() const { return *twin_; }

  /// Registers the twin's tensor under `name`; an undefined one is registered undefined, as the
  /// twin does, so named_parameters() and state dicts match.
  torch::Tensor adopt_parameter(const std::string& name, const torch::Tensor& tensor) {
    return this->register_parameter(name, tensor, tensor.defined() && tensor.requires_grad());
  }
  torch::Tensor adopt_buffer(const std::string& name, const torch::Tensor& tensor) {
    return this->register_buffer(name, tensor);
  }

 private:
  Twin twin_{nullptr};
};

}  // namespace dptorch::nn
