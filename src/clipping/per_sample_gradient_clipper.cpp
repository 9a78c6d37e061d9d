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
  on_batch_clip_ = std::move(func);
  with_grad_sample_ = with_grad_sample;
}

void PerSampleGradientClipper::clip_and_accumulate() {
  auto& gsm = *gsm_;
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
  const auto thresholds = norm_clipper_->thresholds();
  auto pick = [](const auto& v, size_t k) { return v[std::min(k, v.size() - 1)]; };
  std::vector<torch::Tensor> w(n);
  for (size_t k = 0; k < n; ++k) w[k] = pick(factors, k);
  if (!accumulating_) start_accumulation({});
  if (scale_ == 1) {
    gsm.add_clipped_sum_to(w, summed_);
  } else {
    std::vector<torch::Tensor> scaled(n);
    for (size_t k = 0; k < n; ++k) scaled[k] = w[k] * scale_;
    gsm.add_clipped_sum_to(scaled, summed_);
  }
  for (size_t k = 0; k < n; ++k) max_norms_[k] = std::max(max_norms_[k], pick(thresholds, k));
  batch_size_ += gsm.batch_size();
  ++iterations_;

  if (on_batch_clip_) {
    torch::OrderedDict<std::string, torch::Tensor> samples;
    if (with_grad_sample_) samples = gsm.grad_samples();
    for (size_t k = 0; k < n; ++k) {
      ClipEvent event;
      event.name = names[k];
      event.clip_factor = w[k];
      event.threshold = pick(thresholds, k);
      event.per_sample_norm = pick(norms, k);
      if (with_grad_sample_) event.grad_sample = samples[names[k]];
      on_batch_clip_(event);
    }
    on_batch_clip_(ClipEvent{});
  }
  gsm.clear();
}

void PerSampleGradientClipper::start_accumulation(const AccumulationStart& start) {
  TORCH_CHECK(!accumulating_, "an accumulation is already under way");
  const auto params = gsm_->parameters();
  summed_.resize(params.size());
  for (size_t k = 0; k < params.size(); ++k) {
    const auto& p = params[k];
    auto& acc = summed_[k];
    const bool reusable = acc.defined() && acc.sizes() == p.sizes() &&
                          acc.scalar_type() == p.scalar_type() && acc.device() == p.device() &&
                          !(p.grad().defined() && p.grad().is_alias_of(acc));
    if (!reusable) acc = torch::empty(p.sizes(), p.options().requires_grad(false));
  }
  if (start.fill) {
    start.fill(summed_);
  } else {
    for (auto& acc : summed_) acc.zero_();
  }
  max_norms_.assign(params.size(), 0.0);
  filled_ = static_cast<bool>(start.fill);
  scale_ = start.scale;
  accumulating_ = true;
  ++accumulation_id_;
}

std::vector<torch::Tensor> PerSampleGradientClipper::accumulated() const {
  return iterations_ > 0 ? summed_ : std::vector<torch::Tensor>{};
}

ClipStats PerSampleGradientClipper::pre_step() {
  TORCH_CHECK(iterations_ > 0,
              "pre_step() found no accumulated gradients; call clip_and_accumulate() after each "
              "backward before pre_step()");
  TORCH_CHECK(!filled_ && scale_ == 1,
              "pre_step() found an accumulation begun by a DPOptimizer (noise and the 1/batch "
              "scale are already in the sums); finish it with that optimizer's step()");
  const auto params = gsm_->parameters();
  const bool mean = gsm_->options().loss_reduction() == LossReduction::kMean;
  for (size_t k = 0; k < params.size(); ++k) {
    auto& grad = summed_[k];
    if (mean && batch_size_ > 0) grad.div_(static_cast<double>(batch_size_));
    params[k].mutable_grad() = grad.detach();
  }
  ClipStats stats{max_norms_, batch_size_};
  reset_accumulation();
  return stats;
}

void PerSampleGradientClipper::reset_accumulation() {
  accumulating_ = false;
  filled_ = false;
  scale_ = 1;
  max_norms_.clear();
  batch_size_ = 0;
  iterations_ = 0;
}

void PerSampleGradientClipper::zero_grad() {
  reset_accumulation();
  gsm_->clear();
  for (auto& p : gsm_->parameters()) {
    if (p.grad().defined()) p.mutable_grad() = torch::Tensor();
  }
}

void PerSampleGradientClipper::close() {
  reset_accumulation();
  summed_.clear();
  gsm_->close();
}

}  // namespace dptorch
