#include <dptorch/clipping/per_sample_gradient_clipper.h>

#include <torch/torch.h>

#include <algorithm>

namespace dptorch {

PerSampleGradientClipper::PerSampleGradientClipper(std::shared_ptr<torch::nn::Module> module,
                                                   std::shared_ptr<NormClipper> norm_clipper,
                                                   bool batch_first,
                                                   const std::string& loss_reduction)
    : PerSampleGradientClipper(std::move(module), std::move(norm_clipper),
                               GradSampleOptions()
                                   .batch_first(batch_first)
                                   .loss_reduction(parse_loss_reduction(loss_reduction))) {}

PerSampleGradientClipper::PerSampleGradientClipper(std::shared_ptr<torch::nn::Module> module,
                                                   std::shared_ptr<NormClipper> norm_clipper,
                                                   const GradSampleOptions& options) {
  TORCH_CHECK_VALUE(norm_clipper != nullptr,
                    "PerSampleGradientClipper needs a norm clipper, e.g. "
                    "std::make_shared<dptorch::ConstantFlatClipper>(1.0)");
  TORCH_CHECK_VALUE(module != nullptr, "PerSampleGradientClipper needs a module, got a null one");
  // Check everything before attaching, so that nothing is left half-attached on error.
  validate(*module);
  std::vector<std::string> names;
  for (const auto& p : module->named_parameters()) {
    if (p.value().requires_grad()) names.push_back(p.key());
  }
  norm_clipper->check_parameters(names);
  gsm_ = std::make_unique<GradSampleModule>(std::move(module), options);
  norm_clipper_ = std::move(norm_clipper);
}

void PerSampleGradientClipper::set_on_batch_clip_func(std::function<void(const ClipEvent&)> func,
                                                      bool with_grad_sample) {
  set_on_batch_clip_func(std::move(func), ClipCallbackOptions().grad_sample(with_grad_sample));
}

void PerSampleGradientClipper::set_on_batch_clip_func(std::function<void(const ClipEvent&)> func,
                                                      const ClipCallbackOptions& options) {
  on_batch_clip_ = std::move(func);
  callback_options_ = options;
}

std::vector<double> PerSampleGradientClipper::parameter_thresholds(
    const std::vector<double>& t) const {
  if (norm_clipper_->is_per_layer() && t.size() == 1) {
    return std::vector<double>(gsm_->num_parameters(), t.front());
  }
  return t;
}

double PerSampleGradientClipper::noise_bound() const {
  if (accumulation_.iterations() > 0) return accumulation_.noise_bound();
  return l2_norm(parameter_thresholds(norm_clipper_->thresholds()));
}

std::vector<double> PerSampleGradientClipper::accumulated_thresholds() const {
  const auto& t = accumulation_.max_thresholds();
  if (t.empty()) return {};
  std::vector<double> out(gsm_->num_parameters());
  for (size_t k = 0; k < out.size(); ++k) out[k] = t[std::min(k, t.size() - 1)];
  return out;
}

void PerSampleGradientClipper::check_nothing_unrecorded() const {
  const auto layer = gsm_->unrecorded_layer();
  TORCH_CHECK(layer.empty(), "nothing was recorded for ", layer,
              ": it ran a forward pass in eval mode, and dp layers record per-sample gradients "
              "in training mode only; call model->train() before the training forward pass (and "
              "evaluate under torch::NoGradGuard)");
}

void PerSampleGradientClipper::clip_and_accumulate() {
  auto& gsm = *gsm_;
  if (!gsm.has_pass()) check_nothing_unrecorded();
  const auto names = gsm.parameter_names();
  const size_t n = names.size();
  // Norms -> clip factors -> one weighted sum per parameter.
  std::vector<torch::Tensor> norms;
  if (norm_clipper_->is_per_layer()) {
    for (const auto& item : gsm.norms()) norms.push_back(item.value());
  } else {
    norms.push_back(gsm.flat_norm());
  }
  const auto factors = norm_clipper_->clipping_factors(norms);
  const auto thresholds = parameter_thresholds(norm_clipper_->thresholds());
  auto pick = [](const auto& v, size_t k) { return v[std::min(k, v.size() - 1)]; };
  std::vector<torch::Tensor> w(n);
  for (size_t k = 0; k < n; ++k) w[k] = pick(factors, k);
  if (!accumulation_.active()) accumulation_.begin(gsm.parameters(), {});

  const bool callback = static_cast<bool>(on_batch_clip_);
  const auto& opts = callback_options_;
  const int64_t batch = gsm.batch_size();
  // The seed's scaling of a call's gradient: ÷ the call's batch size for a mean loss.
  const double call_scale =
      gsm.options().loss_reduction() == LossReduction::kMean && batch > 0 ? 1.0 / batch : 1.0;
  std::vector<torch::Tensor> after;
  if (callback && opts.grad_after_clip()) {
    // This call's sums are needed on their own: form them once and add them.
    for (const auto& item : gsm.clipped_sum(w)) after.push_back(item.value());
    accumulation_.add_sums(after, thresholds, batch);
  } else {
    accumulation_.add(gsm, w, thresholds);
  }

  if (callback) {
    torch::OrderedDict<std::string, torch::Tensor> samples, before;
    if (opts.grad_sample()) samples = gsm.grad_samples();
    if (opts.grad_before_clip()) {
      before = gsm.clipped_sum(torch::ones({batch}, gsm.parameters().front().options()));
    }
    for (size_t k = 0; k < n; ++k) {
      ClipEvent event;
      event.name = names[k];
      event.clip_factor = w[k];
      event.threshold = pick(thresholds, k);
      event.per_sample_norm = pick(norms, k);
      if (opts.grad_sample()) event.grad_sample = samples[names[k]];
      if (opts.grad_after_clip()) event.grad_after_clip = after[k] * call_scale;
      if (opts.grad_before_clip()) event.grad_before_clip = before[names[k]] * call_scale;
      on_batch_clip_(event);
    }
    on_batch_clip_(ClipEvent{});
  }
  gsm.clear();
}

ClipStats PerSampleGradientClipper::pre_step() {
  TORCH_CHECK(accumulation_.iterations() > 0,
              "pre_step() found no accumulated gradients; call clip_and_accumulate() after each "
              "backward before pre_step()");
  TORCH_CHECK(accumulation_.owner() == nullptr,
              "pre_step() found an accumulation begun by a DPOptimizer (noise and the 1/batch "
              "scale are already in the sums); finish it with that optimizer's step()");
  const int64_t batch_size = accumulation_.batch_size();
  if (gsm_->options().loss_reduction() == LossReduction::kMean && batch_size > 0) {
    for (const auto& sum : accumulation_.sums()) sum.div_(static_cast<double>(batch_size));
  }
  ClipStats stats;
  stats.thresholds = accumulated_thresholds();
  stats.max_norm.assign(stats.thresholds.size(), accumulation_.noise_bound());
  stats.batch_size = batch_size;
  accumulation_.finish(gsm_->parameters());
  return stats;
}

void PerSampleGradientClipper::zero_grad() {
  accumulation_.reset();
  gsm_->clear();
  for (auto& p : gsm_->parameters()) {
    if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
  }
}

void PerSampleGradientClipper::close() {
  accumulation_.release();
  gsm_->close();
}

std::ostream& operator<<(std::ostream& stream, const PerSampleGradientClipper& clipper) {
  auto& gsm = const_cast<PerSampleGradientClipper&>(clipper).grad_sample_module();
  stream << "PerSampleGradientClipper" << (gsm.closed() ? " (closed)" : "") << " on "
         << *gsm.module();
  return stream;
}

}  // namespace dptorch
