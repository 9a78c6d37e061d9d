#include <dptorch/nn/layer.h>

#include <torch/torch.h>

#include <sstream>

namespace dptorch::nn {
namespace detail {

void print_as_twin(std::ostream& stream, const torch::nn::Module& twin) {
  std::ostringstream text;
  twin.pretty_print(text);
  std::string s = text.str();
  if (s.rfind("torch::nn::", 0) == 0) s = "dptorch::nn::" + s.substr(11);
  stream << s;
}

namespace {

// One recorded call in flight: kept alive by the autograd graph until backward files it.
struct TapedCall : torch::CustomClassHolder {
  InputGradients input_gradients;
  std::function<void(TensorList)> file;
  std::shared_ptr<Tape> tape;
  size_t num_inputs = 0;
  bool filed = false;
  // Aliases of the inputs (sharing their version counters) and the versions forward saw: what
  // the call saved for backward must not have been changed in place since, as torch's own
  // saved tensors may not.
  TensorList watched;
  std::vector<uint32_t> versions;
  std::string layer;
};

class TapedFunction : public torch::autograd::Function<TapedFunction> {
 public:
  static TensorList forward(torch::autograd::AutogradContext* ctx, at::TensorList inputs,
                            const std::function<TensorList()>& compute,
                            const c10::intrusive_ptr<TapedCall>& call) {
    (void)inputs;
    ctx->saved_data["call"] = c10::IValue::make_capsule(call);
    return compute();
  }

  static TensorList backward(torch::autograd::AutogradContext* ctx, TensorList grad_outputs) {
    auto call = c10::static_intrusive_pointer_cast<TapedCall>(ctx->saved_data["call"].toCapsule());
    TORCH_CHECK(!call->filed,
                "backward ran twice through the same forward pass of an attached dptorch layer; "
                "per-sample gradients of one forward pass can be taken once: call "
                "clip_and_accumulate() after each backward and run a new forward pass");
    call->filed = true;
    for (size_t i = 0; i < call->watched.size(); ++i) {
      TORCH_CHECK(call->watched[i]._version() == call->versions[i], "an input of a call of ",
                  call->layer,
                  " was modified by an in-place operation after the call; per-sample gradients "
                  "need the values the call saw: make the in-place operation out of place");
    }
    call->watched.clear();
    std::vector<bool> needed(call->num_inputs);
    bool any = false;
    for (size_t i = 0; i < needed.size(); ++i) any = any || (needed[i] = ctx->needs_input_grad(i));
    TensorList grads(call->num_inputs);
    if (any && call->input_gradients) {
      grads = call->input_gradients(grad_outputs, needed);
      TORCH_INTERNAL_ASSERT(grads.size() == call->num_inputs);
    }
    for (auto& g : grad_outputs) g = g.detach();
    call->file(std::move(grad_outputs));
    ++call->tape->filed;
    call->input_gradients = nullptr;
    call->file = nullptr;
    grads.emplace_back();  // compute
    grads.emplace_back();  // call
    return grads;
  }
};

}  // namespace
}  // namespace detail

void PerSampleLayer::attach(std::shared_ptr<detail::Tape> tape) {
  clear_records();
  tape_ = std::move(tape);
}

void PerSampleLayer::detach() {
  clear_records();
  tape_.reset();
}

void PerSampleLayer::clear_records() {
  drop_filed();
  unrecorded_calls_ = 0;
}

std::unique_ptr<grad_sample::PerSampleGrads> PerSampleLayer::take_grads(int64_t* batch_size) {
  return take_filed(batch_size);
}

bool PerSampleLayer::recording(std::initializer_list<const torch::Tensor*> params) const {
  bool trainable = false;
  for (const auto* p : params) trainable = trainable || (p->defined() && p->requires_grad());
  return recording_if(trainable);
}

bool PerSampleLayer::recording() const {
  bool trainable = false;
  for (const auto& p : const_cast<PerSampleLayer*>(this)->as_module().parameters(false)) {
    trainable = trainable || p.requires_grad();
  }
  return recording_if(trainable);
}

bool PerSampleLayer::recording_if(bool trainable) const {
  if (!tape_ || !torch::GradMode::is_enabled() || !trainable) return false;
  // As the seed's hooks: nothing is recorded outside training mode; the call is counted so that
  // a step after it can say why its batch is missing.
  if (!const_cast<PerSampleLayer*>(this)->as_module().is_training()) {
    ++unrecorded_calls_;
    return false;
  }
  return true;
}

int64_t PerSampleLayer::batch_dim(int64_t leading_dims) const {
  return (tape_ && !tape_->batch_first && leading_dims >= 2) ? 1 : 0;
}

NormMethod PerSampleLayer::norm_method() const {
  return tape_ ? tape_->norm_method : NormMethod::kAuto;
}

TensorList PerSampleLayer::taped(const TensorList& inputs,
                                 const std::function<TensorList()>& compute,
                                 InputGradients input_gradients,
                                 std::function<void(TensorList)> file) {
  TORCH_CHECK(tape_ != nullptr, as_module().name(),
              " recorded a call while detached; record only when recording() says so");
  TORCH_CHECK(tape_->filed.load() == 0,
              "a forward pass started while the tape still holds the per-sample gradients of an "
              "earlier backward pass; call clip_and_accumulate() (or zero_grad()) after each "
              "backward before the next forward pass, or two batches would mix");
  auto call = c10::make_intrusive<detail::TapedCall>();
  call->input_gradients = std::move(input_gradients);
  call->file = std::move(file);
  call->tape = tape_;
  call->num_inputs = inputs.size();
  call->layer = as_module().name();
  for (const auto& t : inputs) {
    if (!t.defined()) continue;
    if (!t.requires_grad() || !t.is_leaf()) tape_->recorded_bytes += t.numel() * t.element_size();
    call->watched.push_back(t.detach());
    call->versions.push_back(t._version());
  }
  // Autograd needs defined inputs; an absent one becomes an empty constant.
  TensorList defined;
  defined.reserve(inputs.size());
  for (const auto& t : inputs) defined.push_back(t.defined() ? t : torch::empty({0}));
  auto outputs = detail::TapedFunction::apply(at::TensorList(defined), compute, call);
  for (const auto& t : outputs) {
    if (t.defined()) tape_->recorded_bytes += t.numel() * t.element_size();
  }
  return outputs;
}

}  // namespace dptorch::nn
