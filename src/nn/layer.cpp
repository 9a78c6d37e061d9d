#include <dptorch/nn/layer.h>

#include <torch/torch.h>

namespace dptorch::nn {
namespace detail {
namespace {

// One recorded call in flight: kept alive by the autograd graph until backward files it.
struct TapedCall : torch::CustomClassHolder {
  std::function<torch::Tensor(const torch::Tensor&)> input_grad;
  Record record;
  std::shared_ptr<RecordSink> sink;
  std::shared_ptr<Tape> tape;
  bool filed = false;
};

class TapedFunction : public torch::autograd::Function<TapedFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& input,
                               const torch::Tensor& weight, const torch::Tensor& bias,
                               const std::function<torch::Tensor()>& compute,
                               const c10::intrusive_ptr<TapedCall>& call) {
    (void)input;
    (void)weight;
    (void)bias;
    ctx->saved_data["call"] = c10::IValue::make_capsule(call);
    return compute();
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto call = c10::static_intrusive_pointer_cast<TapedCall>(ctx->saved_data["call"].toCapsule());
    TORCH_CHECK(!call->filed,
                "backward ran twice through the same forward pass of an attached dptorch layer; "
                "per-sample gradients of one forward pass can be taken once: call "
                "clip_and_accumulate() after each backward and run a new forward pass");
    call->filed = true;
    const auto& g = grad_outputs[0];
    torch::Tensor grad_input;
    if (ctx->needs_input_grad(0) && call->input_grad) grad_input = call->input_grad(g);
    call->record.grad_output = g.detach();
    {
      std::lock_guard<std::mutex> lock(call->sink->mutex);
      call->sink->records.push_back(std::move(call->record));
    }
    ++call->tape->filed;
    call->input_grad = nullptr;
    return {grad_input, torch::Tensor(), torch::Tensor(), torch::Tensor(), torch::Tensor()};
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
  std::lock_guard<std::mutex> lock(sink_->mutex);
  sink_->records.clear();
  unrecorded_calls_ = 0;
}

std::unique_ptr<grad_sample::PerSampleGrads> PerSampleLayer::take_grads(int64_t* batch_size) {
  std::vector<Record> records;
  {
    std::lock_guard<std::mutex> lock(sink_->mutex);
    records.swap(sink_->records);
  }
  if (records.empty()) return nullptr;
  const int64_t B = records.front().batch_size;
  for (const auto& r : records) {
    TORCH_CHECK(r.batch_size == B, "calls of one ", as_module().name(),
                " in a single forward pass saw different batch sizes (", B, " and ", r.batch_size,
                "); every call of a layer must see the same samples");
  }
  *batch_size = B;
  return make_grads(std::move(records));
}

bool PerSampleLayer::recording(std::initializer_list<const torch::Tensor*> params) const {
  if (!tape_ || !torch::GradMode::is_enabled()) return false;
  bool trainable = false;
  for (const auto* p : params) trainable = trainable || (p->defined() && p->requires_grad());
  if (!trainable) return false;
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

torch::Tensor PerSampleLayer::taped(const torch::Tensor& input, const torch::Tensor& weight,
                                    const torch::Tensor& bias,
                                    const std::function<torch::Tensor()>& compute,
                                    std::function<torch::Tensor(const torch::Tensor&)> input_grad,
                                    Record record) {
  TORCH_CHECK(tape_->filed.load() == 0,
              "a forward pass started while the tape still holds the per-sample gradients of an "
              "earlier backward pass; call clip_and_accumulate() (or zero_grad()) after each "
              "backward before the next forward pass, or two batches would mix");
  auto call = c10::make_intrusive<detail::TapedCall>();
  call->input_grad = std::move(input_grad);
  call->record = std::move(record);
  call->sink = sink_;
  call->tape = tape_;
  // Autograd needs defined inputs; an absent parameter becomes an empty constant.
  auto or_empty = [&](const torch::Tensor& t) {
    return t.defined() ? t : torch::empty({0}, input.options().requires_grad(false));
  };
  return detail::TapedFunction::apply(input, or_empty(weight), or_empty(bias), compute, call);
}

}  // namespace dptorch::nn
