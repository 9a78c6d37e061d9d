#include <dptorch/grad_sample/grad_sample_module.h>

#include <torch/torch.h>

#include <unordered_map>

namespace dptorch {

struct GradSampleModule::Pass {
  int64_t batch_size = 0;
  double scale = 1.0;  // recorded gradients -> per-sample gradients
  std::vector<std::unique_ptr<grad_sample::PerSampleGrads>> grads;  // per layer; null if unused
  std::vector<std::vector<std::string>> names;                      // per layer
  std::vector<torch::Tensor> norm_sq;                               // per slot, once asked
};

namespace {

std::string module_path(const std::string& key) { return key.empty() ? "(root module)" : key; }

std::string join(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

int64_t index_of(const std::vector<std::string>& names, const std::string& name) {
  for (size_t k = 0; k < names.size(); ++k) {
    if (names[k] == name) return static_cast<int64_t>(k);
  }
  return -1;
}

}  // namespace

void validate(torch::nn::Module& module) {
  for (const auto& item : module.named_modules("", /*include_self=*/true)) {
    auto& m = *item.value();
    const std::string path = module_path(item.key());
    TORCH_CHECK_VALUE(!m.as<torch::nn::BatchNorm1d>() && !m.as<torch::nn::BatchNorm2d>() &&
                          !m.as<torch::nn::BatchNorm3d>(),
                      path, " (", m.name(),
                      ") mixes samples across the batch, so per-sample gradients do not exist; "
                      "replace it with dptorch::nn::GroupNorm");
    if (dynamic_cast<nn::PerSampleLayer*>(&m) != nullptr) continue;
    for (const auto& p : m.named_parameters(/*recurse=*/false)) {
      TORCH_CHECK_VALUE(!p.value().requires_grad(), "parameter ", join(item.key(), p.key()), " of ",
                        path, " (", m.name(),
                        ") is trainable but no per-sample gradient rule covers it; use the "
                        "layer's dptorch::nn twin (dptorch::nn::convert converts a Sequential), "
                        "derive the layer from dptorch::nn::RecordingLayer, or freeze the "
                        "parameter (requires_grad false)");
    }
  }
}

GradSampleModule::GradSampleModule(std::shared_ptr<torch::nn::Module> module,
                                   GradSampleOptions options)
    : module_(std::move(module)), options_(std::move(options)) {
  TORCH_CHECK_VALUE(module_ != nullptr, "GradSampleModule needs a module, but got a null one");
  validate(*module_);
  std::unordered_map<const void*, std::pair<size_t, std::string>> owner;
  for (const auto& item : module_->named_modules("", /*include_self=*/true)) {
    auto* layer = dynamic_cast<nn::PerSampleLayer*>(item.value().get());
    if (layer == nullptr) continue;
    TORCH_CHECK(!layer->attached(), module_path(item.key()),
                " is already attached to another GradSampleModule (or PerSampleGradientClipper); "
                "close() that one first");
    for (const auto& p : item.value()->named_parameters(/*recurse=*/false)) {
      const auto [it, fresh] =
          owner.emplace(p.value().unsafeGetTensorImpl(), std::make_pair(layers_.size(), p.key()));
      TORCH_CHECK_VALUE(fresh || !p.value().requires_grad(), "parameter ",
                        join(module_path(item.key()), p.key()), " is also ",
                        join(layers_[it->second.first].first, it->second.second),
                        ": a trainable parameter shared by two dp layers (tied weights) has "
                        "per-sample gradients from both, which no single rule sums; untie them, "
                        "or freeze the shared parameter");
    }
    layers_.emplace_back(module_path(item.key()), layer);
  }
  for (const auto& p : module_->named_parameters(/*recurse=*/true)) {
    if (!p.value().requires_grad()) continue;
    const auto& [layer, local] = owner.at(p.value().unsafeGetTensorImpl());
    slots_.push_back({p.key(), p.value(), layer, local});
  }
  tape_ = std::make_shared<nn::detail::Tape>();
  tape_->batch_first = options_.batch_first();
  tape_->norm_method = options_.norm_method();
  for (auto& [path, layer] : layers_) layer->attach(tape_);
}

GradSampleModule::~GradSampleModule() { close(); }

void GradSampleModule::close() {
  if (closed_) return;
  closed_ = true;
  pass_.reset();
  for (auto& [path, layer] : layers_) layer->detach();
}

std::vector<std::string> GradSampleModule::parameter_names() const {
  std::vector<std::string> names;
  for (const auto& s : slots_) names.push_back(s.name);
  return names;
}

std::vector<torch::Tensor> GradSampleModule::parameters() const {
  std::vector<torch::Tensor> params;
  for (const auto& s : slots_) params.push_back(s.param);
  return params;
}

bool GradSampleModule::has_pass() const { return pass_ != nullptr || tape_->filed.load() > 0; }

std::string GradSampleModule::unrecorded_layer() const {
  for (const auto& [path, layer] : layers_) {
    if (layer->unrecorded_calls() > 0) {
      return path + " (" + layer->as_module().name() + ")";
    }
  }
  return {};
}

void GradSampleModule::clear() {
  pass_.reset();
  for (auto& [path, layer] : layers_) layer->clear_records();
  tape_->reset();
}

GradSampleModule::Pass& GradSampleModule::pass() {
  TORCH_CHECK(!closed_,
              "GradSampleModule is closed; attach a new one to compute per-sample "
              "gradients");
  if (pass_) return *pass_;
  auto p = std::make_unique<Pass>();
  p->grads.resize(layers_.size());
  p->names.resize(layers_.size());
  int64_t B = -1;
  std::string first;
  for (size_t l = 0; l < layers_.size(); ++l) {
    int64_t b = 0;
    auto grads = layers_[l].second->take_grads(&b);
    if (!grads) continue;
    if (B < 0) {
      B = b;
      first = layers_[l].first;
    }
    TORCH_CHECK(b == B, "inconsistent batch sizes in one backward pass: ", first, " saw ", B,
                " samples but ", layers_[l].first, " saw ", b,
                "; every layer must see the same batch (is batch_first set right?)");
    p->names[l] = grads->names();
    p->grads[l] = std::move(grads);
  }
  TORCH_CHECK(B >= 0,
              "no per-sample gradients were recorded: run the attached module forward "
              "(grad mode on) and loss.backward() first");
  p->batch_size = B;
  p->scale = options_.loss_reduction() == LossReduction::kMean ? static_cast<double>(B) : 1.0;
  pass_ = std::move(p);
  return *pass_;
}

int64_t GradSampleModule::batch_size() { return pass().batch_size; }

std::vector<torch::Tensor> GradSampleModule::per_slot(
    const std::function<std::vector<torch::Tensor>(grad_sample::PerSampleGrads&, size_t)>& query) {
  auto& p = pass();
  std::vector<std::vector<torch::Tensor>> by_layer(layers_.size());
  for (size_t l = 0; l < layers_.size(); ++l) {
    if (p.grads[l]) by_layer[l] = query(*p.grads[l], l);
  }
  std::vector<torch::Tensor> out;
  for (const auto& s : slots_) {
    const int64_t k = index_of(p.names[s.layer], s.local);
    out.push_back(k >= 0 ? by_layer[s.layer][k] : torch::Tensor());  // undefined: unused
  }
  return out;
}

torch::OrderedDict<std::string, torch::Tensor> GradSampleModule::norm_sq() {
  auto& p = pass();
  if (p.norm_sq.empty()) {
    auto sq = per_slot([](grad_sample::PerSampleGrads& g, size_t) { return g.norm_sq(); });
    for (size_t k = 0; k < slots_.size(); ++k) {
      sq[k] = sq[k].defined()
                  ? sq[k] * (p.scale * p.scale)
                  : torch::zeros({p.batch_size}, slots_[k].param.options().requires_grad(false));
    }
    p.norm_sq = std::move(sq);
  }
  torch::OrderedDict<std::string, torch::Tensor> out;
  for (size_t k = 0; k < slots_.size(); ++k) out.insert(slots_[k].name, p.norm_sq[k]);
  return out;
}

torch::OrderedDict<std::string, torch::Tensor> GradSampleModule::norms() {
  auto sq = norm_sq();
  torch::OrderedDict<std::string, torch::Tensor> out;
  for (const auto& item : sq) out.insert(item.key(), item.value().sqrt());
  return out;
}

torch::Tensor GradSampleModule::flat_norm() {
  auto sq = norm_sq();
  torch::Tensor total;
  for (const auto& item : sq) total = total.defined() ? total + item.value() : item.value();
  return total.defined() ? total.sqrt() : torch::zeros({pass().batch_size});
}

torch::OrderedDict<std::string, torch::Tensor> GradSampleModule::clipped_sum(
    const torch::Tensor& w) {
  return clipped_sum(std::vector<torch::Tensor>(slots_.size(), w));
}

torch::OrderedDict<std::string, torch::Tensor> GradSampleModule::clipped_sum(
    const std::vector<torch::Tensor>& w) {
  std::vector<torch::Tensor> sums;
  for (const auto& s : slots_) {
    sums.push_back(
        torch::zeros_like(s.param, torch::MemoryFormat::Contiguous).requires_grad_(false));
  }
  add_clipped_sum_to(w, sums);
  torch::OrderedDict<std::string, torch::Tensor> out;
  for (size_t k = 0; k < slots_.size(); ++k) out.insert(slots_[k].name, sums[k]);
  return out;
}

void GradSampleModule::add_clipped_sum_to(const std::vector<torch::Tensor>& w,
                                          const std::vector<torch::Tensor>& out) {
  auto& p = pass();
  TORCH_CHECK_VALUE(w.size() == slots_.size(), "clipped_sum needs one weight vector per trainable ",
                    "parameter (", slots_.size(), "), but got ", w.size());
  for (const auto& wk : w) {
    TORCH_CHECK_VALUE(wk.dim() == 1 && wk.size(0) == p.batch_size,
                      "clipped_sum weights must have shape [", p.batch_size, "], but got ",
                      wk.sizes());
  }
  TORCH_CHECK_VALUE(out.size() == slots_.size(), "add_clipped_sum_to needs one output tensor per ",
                    "trainable parameter (", slots_.size(), "), but got ", out.size());
  for (size_t k = 0; k < slots_.size(); ++k) {
    TORCH_CHECK_VALUE(out[k].sizes() == slots_[k].param.sizes(),
                      "add_clipped_sum_to: the output for ", slots_[k].name,
                      " must have the parameter's shape ", slots_[k].param.sizes(), ", but has ",
                      out[k].sizes());
  }
  for (size_t l = 0; l < layers_.size(); ++l) {
    if (!p.grads[l]) continue;
    std::vector<torch::Tensor> wl, ol;
    for (const auto& name : p.names[l]) {
      for (size_t k = 0; k < slots_.size(); ++k) {
        if (slots_[k].layer == l && slots_[k].local == name) {
          wl.push_back(w[k] * p.scale);
          ol.push_back(out[k]);
        }
      }
    }
    p.grads[l]->add_weighted_sum_to(wl, ol);
  }
}

torch::OrderedDict<std::string, torch::Tensor> GradSampleModule::grad_samples() {
  auto& p = pass();
  auto samples = per_slot([](grad_sample::PerSampleGrads& g, size_t) { return g.materialize(); });
  torch::OrderedDict<std::string, torch::Tensor> out;
  for (size_t k = 0; k < slots_.size(); ++k) {
    const auto& param = slots_[k].param;
    if (samples[k].defined()) {
      out.insert(slots_[k].name, samples[k] * p.scale);
    } else {
      std::vector<int64_t> shape{p.batch_size};
      for (auto d : param.sizes()) shape.push_back(d);
      out.insert(slots_[k].name, torch::zeros(shape, param.options().requires_grad(false)));
    }
  }
  return out;
}

}  // namespace dptorch
