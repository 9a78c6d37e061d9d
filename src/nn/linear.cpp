#include <dptorch/nn/linear.h>

#include <torch/torch.h>

#include "nn/layers_internal.h"

#include <algorithm>
#include <map>
#include <optional>
#include <tuple>

namespace dptorch::nn {

namespace F = torch::nn::functional;
using grad_sample::PerSampleGrads;

LinearImpl::LinearImpl(const torch::nn::LinearOptions& options_)
    : TwinLayer("dptorch::nn::Linear", options_) {
  reset();
}

void LinearImpl::adopt() {
  weight = adopt_parameter("weight", twin().weight);
  bias = adopt_parameter("bias", twin().bias);
}

namespace {

// Forms a call's per-sample gradients (the weight's [n, p, d] a chunk of samples at a time, each
// chunk's norms taken while it is in the cache; the bias's as [B, p]) and drops its input and
// output gradient.
void reduce_call(Call<LinearSaved>& call, bool train_weight, bool train_bias) {
  auto& saved = call.saved;
  const auto a = detail::to_brp(saved.input, saved.batch_dim, 1);
  const auto g = detail::to_brp(call.grad_outputs.at(0), saved.batch_dim, 1);
  const int64_t B = a.size(0), d = a.size(2), p = g.size(2);
  if (train_weight) {
    const int64_t sample_bytes = std::max<int64_t>(1, p * d * a.element_size());
    const int64_t step = std::clamp<int64_t>(grad_sample::ConvGrads::kChunkBytes / sample_bytes, 1,
                                             std::max<int64_t>(1, B));
    std::vector<torch::Tensor> norms;
    for (int64_t b = 0; b < B; b += step) {
      const int64_t n = std::min(step, B - b);
      torch::Tensor chunk_norms;
      saved.weight_samples.push_back(
          grad_sample::materialize(a.narrow(0, b, n), g.narrow(0, b, n), 1, &chunk_norms));
      norms.push_back(std::move(chunk_norms));
    }
    saved.weight_norms_sq = detail::cat_along(std::move(norms), 0);
  }
  if (train_bias) saved.bias_samples = g.sum(1);
  saved.reduced = true;
  saved.input = torch::Tensor();
  call.grad_outputs.clear();
}

}  // namespace

torch::Tensor LinearImpl::forward(const torch::Tensor& input) {
  if (!recording({&weight, &bias})) return twin().forward(input);
  TORCH_CHECK(input.dim() >= 2, "dptorch::nn::Linear needs a batch dimension to record ",
              "per-sample gradients, but got an input of shape ", input.sizes());
  LinearSaved saved;
  saved.input = input.detach();
  saved.batch_dim = batch_dim(input.dim() - 1);
  const int64_t B = input.size(saved.batch_dim);
  const auto w = weight.detach();
  // When backward files the call, the layer forms its per-sample gradients and keeps them
  // (freeing input and output gradient) where that is cheaper than the rule after backward and
  // the tape's budget allows; otherwise the call waits for the rule.
  FileHook<LinearSaved> on_file =
      [train_weight = detail::trainable(weight), train_bias = detail::trainable(bias),
       method = norm_method(),
       tape = std::weak_ptr<detail::Tape>(this->tape())](Call<LinearSaved>& call) {
        if (!train_weight || method == NormMethod::kGhost) return;
        const auto& g = call.grad_outputs.at(0);
        const auto& x = call.saved.input;
        if (!g.defined() || x.dim() < 2) return;
        const int64_t B = x.size(call.saved.batch_dim), d = x.size(-1), p = g.size(-1);
        const int64_t T = x.numel() / std::max<int64_t>(1, B * d);
        if (method == NormMethod::kAuto && !grad_sample::keep_is_cheaper(T, d, p)) return;
        // Where keeping pays, G_i outgrow the call's own activations (d·p > T·(d + p)): the call
        // takes at most half of what the tape's budget has left, so that the pass's peak memory
        // grows by a fraction of its activations at most.
        const auto t = tape.lock();
        if (!t || !t->try_keep(B * p * d * x.element_size(), /*share=*/2)) return;
        reduce_call(call, train_weight, train_bias);
      };
  return record(
      input, {weight, bias}, [&] { return F::linear(input, weight, bias); },
      [w](const torch::Tensor& g) { return g.matmul(w); }, std::move(saved), B, std::move(on_file));
}

std::unique_ptr<PerSampleGrads> LinearImpl::make_grads(std::vector<Call<LinearSaved>> calls) {
  const bool train_weight = detail::trainable(weight), train_bias = detail::trainable(bias);
  bool any_reduced = false;
  for (const auto& c : calls) any_reduced = any_reduced || c.saved.reduced;
  if (!any_reduced) {
    std::vector<torch::Tensor> a, g;
    for (const auto& c : calls) {
      a.push_back(detail::to_brp(c.saved.input, c.saved.batch_dim, 1));
      g.push_back(detail::to_brp(c.grad_outputs.at(0), c.saved.batch_dim, 1));
    }
    return std::make_unique<grad_sample::LinearLikeGrads>(
        detail::cat_along(std::move(a), 1), detail::cat_along(std::move(g), 1), 1,
        detail::shape_if_trainable(weight), train_bias, norm_method());
  }
  // Some call kept its per-sample gradients: form the others' too.
  return detail::kept_grads(calls, train_weight, train_bias, [&](Call<LinearSaved>& c) {
    reduce_call(c, train_weight, train_bias);
  });
}

// ----------------------------------------------------------------------------------- products

namespace {

// Where one slot's results go: a parameter, and the rows of it the slot covers.
struct Target {
  size_t param = 0;
  int64_t row = 0;
};

class ProductsGrads final : public PerSampleGrads {
 public:
  ProductsGrads(const std::vector<ProductSlot>& slots, std::vector<ProductRecord> records,
                int64_t batch_size, NormMethod method)
      : batch_size_(batch_size) {
    // Every trainable parameter is answered for, in slot order, used in this pass or not.
    for (const auto& slot : slots) {
      if (detail::trainable(slot.weight)) param_of(slot.weight_name, slot.weight);
      if (detail::trainable(slot.bias)) param_of(slot.bias_name, slot.bias);
    }
    std::map<size_t, std::pair<std::vector<torch::Tensor>, std::vector<torch::Tensor>>> by_slot;
    for (auto& r : records) {
      TORCH_CHECK(r.slot < slots.size(), "a product record names slot ", r.slot, " of ",
                  slots.size());
      by_slot[r.slot].first.push_back(std::move(r.input));
      by_slot[r.slot].second.push_back(std::move(r.grad_output));
    }
    for (auto& [index, parts] : by_slot) {
      const auto& slot = slots[index];
      const bool train_w = detail::trainable(slot.weight), train_b = detail::trainable(slot.bias);
      if (!train_w && !train_b) continue;
      auto g = detail::cat_along(std::move(parts.second), 1);
      const int64_t p = g.size(2);
      torch::Tensor a;
      std::vector<int64_t> weight_shape;
      if (train_w) {
        a = detail::cat_along(std::move(parts.first), 1);
        weight_shape = {p, a.size(2)};
      } else {
        a = torch::empty({g.size(0), g.size(1), 0}, g.options());
      }
      Entry e;
      e.a = a;
      e.g = g;
      e.rule = std::make_unique<grad_sample::LinearLikeGrads>(std::move(a), std::move(g), 1,
                                                              weight_shape, train_b, method);
      e.rows = p;
      if (train_w) e.weight = Target{param_of(slot.weight_name, slot.weight), slot.weight_row};
      if (train_b) e.bias = Target{param_of(slot.bias_name, slot.bias), slot.bias_row};
      entries_.push_back(std::move(e));
    }
    check_disjoint();
  }

  std::vector<std::string> names() const override { return names_; }

  std::vector<torch::Tensor> norm_sq() override {
    std::vector<torch::Tensor> out(params_.size());
    // Slots over the same tensor (a recurrent layer's two products share the gates' gradient)
    // form its Gram matrix once.
    std::vector<torch::Tensor> seen, shared;
    for (const auto& e : entries_) {
      for (const auto& t : {e.a, e.g}) {
        auto same = [&](const torch::Tensor& s) { return s.is_same(t); };
        if (std::any_of(seen.begin(), seen.end(), same)) {
          if (std::none_of(shared.begin(), shared.end(), same)) shared.push_back(t);
        } else {
          seen.push_back(t);
        }
      }
    }
    grad_sample::GramCache grams(std::move(shared));
    for (auto& e : entries_) {
      auto n = e.rule->norm_sq(&grams);
      size_t k = 0;
      for (const auto& t : {e.weight, e.bias}) {
        if (!t) continue;
        auto& o = out[t->param];
        o = o.defined() ? o + n[k] : n[k];
        ++k;
      }
    }
    for (size_t i = 0; i < out.size(); ++i) {
      if (!out[i].defined()) out[i] = torch::zeros({batch_size_}, params_[i].options());
    }
    return out;
  }

  std::vector<torch::Tensor> weighted_sum(const std::vector<torch::Tensor>& w) override {
    std::vector<torch::Tensor> out;
    for (const auto& p : params_) out.push_back(torch::zeros_like(p));
    add_weighted_sum_to(w, out);
    return out;
  }

  void add_weighted_sum_to(const std::vector<torch::Tensor>& w,
                           const std::vector<torch::Tensor>& out) override {
    for (auto& e : entries_) {
      std::vector<torch::Tensor> ws, os;
      if (e.weight) {
        ws.push_back(w.at(e.weight->param));
        os.push_back(rows(out.at(e.weight->param), *e.weight, e.rows, 0, true));
      }
      if (e.bias) {
        ws.push_back(w.at(e.bias->param));
        os.push_back(rows(out.at(e.bias->param), *e.bias, e.rows, 0, false));
      }
      e.rule->add_weighted_sum_to(ws, os);
    }
  }

  std::vector<torch::Tensor> materialize() override {
    std::vector<torch::Tensor> out;
    for (const auto& p : params_) {
      std::vector<int64_t> shape{batch_size_};
      shape.insert(shape.end(), p.sizes().begin(), p.sizes().end());
      out.push_back(torch::zeros(shape, p.options()));
    }
    for (auto& e : entries_) {
      auto m = e.rule->materialize();
      size_t k = 0;
      for (const auto& [t, is_weight] :
           {std::make_pair(e.weight, true), std::make_pair(e.bias, false)}) {
        if (!t) continue;
        auto target = rows(out[t->param], *t, e.rows, 1, is_weight);
        target.add_(m[k++].reshape_as(target));
      }
    }
    return out;
  }

 private:
  struct Entry {
    torch::Tensor a, g;  // the rule's activations and output gradients (handles)
    std::unique_ptr<grad_sample::LinearLikeGrads> rule;
    int64_t rows = 0;
    std::optional<Target> weight, bias;
  };

  // Norms of different slots add up only over different rows: a sample's gradient on rows two
  // slots share is the sum of both, whose norm is not the sum of their norms.
  void check_disjoint() const {
    for (size_t i = 0; i < entries_.size(); ++i) {
      for (size_t j = i + 1; j < entries_.size(); ++j) {
        for (const auto& [a, b, what] :
             {std::make_tuple(entries_[i].weight, entries_[j].weight, "weight"),
              std::make_tuple(entries_[i].bias, entries_[j].bias, "bias")}) {
          if (!a || !b || a->param != b->param) continue;
          const bool overlap =
              a->row < b->row + entries_[j].rows && b->row < a->row + entries_[i].rows;
          TORCH_CHECK(!overlap, "two product slots of one layer cover overlapping rows of ",
                      names_[a->param], " (", what,
                      ") in one pass; a per-sample norm cannot add them: record such products "
                      "in one slot (or in slots of disjoint rows)");
        }
      }
    }
  }

  size_t param_of(const std::string& name, const torch::Tensor& tensor) {
    for (size_t i = 0; i < params_.size(); ++i) {
      if (params_[i].is_same(tensor)) return i;
    }
    names_.push_back(name);
    params_.push_back(tensor);
    return params_.size() - 1;
  }

  // The rows a slot covers of `t` (a parameter's shape after `lead` sample dimensions): a weight
  // viewed as [rows, d], a bias flattened.
  static torch::Tensor rows(const torch::Tensor& t, const Target& target, int64_t n, int64_t lead,
                            bool is_weight) {
    std::vector<int64_t> shape(t.sizes().begin(), t.sizes().begin() + lead);
    const auto param = t.sizes().slice(lead);
    if (is_weight) {
      shape.push_back(param[0]);
      shape.push_back(-1);
    } else {
      shape.push_back(-1);
    }
    return t.view(shape).narrow(lead, target.row, n);
  }

  int64_t batch_size_;
  std::vector<std::string> names_;
  std::vector<torch::Tensor> params_;
  std::vector<Entry> entries_;
};

}  // namespace

std::unique_ptr<PerSampleGrads> products_rule(const std::vector<ProductSlot>& slots,
                                              std::vector<ProductRecord> records,
                                              int64_t batch_size, NormMethod method) {
  return std::make_unique<ProductsGrads>(slots, std::move(records), batch_size, method);
}

}  // namespace dptorch::nn

namespace dptorch::nn {

std::vector<ProductRecord> product_records(std::vector<Call<ProductsSaved>> calls) {
  std::vector<ProductRecord> records;
  for (auto& c : calls) {
    TORCH_CHECK(c.saved.products.size() == c.grad_outputs.size(), "a call saved ",
                c.saved.products.size(), " products but has ", c.grad_outputs.size(),
                " outputs; save one product per output");
    for (size_t i = 0; i < c.grad_outputs.size(); ++i) {
      auto& [slot, input] = c.saved.products[i];
      records.push_back({slot, std::move(input), std::move(c.grad_outputs[i])});
    }
  }
  return records;
}

}  // namespace dptorch::nn
