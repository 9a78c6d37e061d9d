#include <dptorch/nn/convert.h>

#include <dptorch/nn/modules.h>

#include <torch/torch.h>

#include "nn/layers_internal.h"

#include <functional>
#include <optional>

namespace dptorch::nn {
namespace {

// The options a layer is rebuilt from: most twins take their torch layer's options as they are.
template <typename Options>
const Options& rebuild_options(const Options& options) {
  return options;
}

// torch's Conv modules keep ConvNdOptions; their constructors take ConvOptions.
template <size_t D>
torch::nn::ConvOptions<D> rebuild_options(const torch::nn::detail::ConvNdOptions<D>& o) {
  return torch::nn::ConvOptions<D>(o.in_channels(), o.out_channels(), o.kernel_size())
      .stride(o.stride())
      .padding(o.padding())
      .dilation(o.dilation())
      .groups(o.groups())
      .bias(o.bias())
      .padding_mode(o.padding_mode());
}

// Copies the state (see detail::copy_state) and the training mode.
void copy_state_and_mode(const torch::nn::Module& from, torch::nn::Module& to) {
  detail::copy_state(from, to);
  to.train(from.is_training());
}

// The twin of `module` as an AnyModule, state copied; nullopt if it is not a `Torch`.
template <typename Twin, typename Torch>
std::optional<torch::nn::AnyModule> twin_of(const torch::nn::Module& module) {
  const auto* from = dynamic_cast<const typename Torch::ContainedType*>(&module);
  if (from == nullptr) return std::nullopt;
  Twin to(rebuild_options(from->options));
  copy_state_and_mode(*from, *to);
  return torch::nn::AnyModule(to);
}

// The largest divisor of `channels` that is at most 32: GroupNorm's groups must divide them.
int64_t group_count(int64_t channels) {
  for (int64_t g = std::min<int64_t>(32, channels); g > 1; --g) {
    if (channels % g == 0) return g;
  }
  return 1;
}

template <typename BatchNorm>
std::optional<torch::nn::AnyModule> group_norm_for(const torch::nn::Module& module,
                                                   const std::string& path,
                                                   std::vector<Replacement>& replaced) {
  const auto* bn = dynamic_cast<const typename BatchNorm::ContainedType*>(&module);
  if (bn == nullptr) return std::nullopt;
  const auto& o = bn->options;
  const int64_t channels = o.num_features();
  const int64_t groups = group_count(channels);
  GroupNorm to(torch::nn::GroupNormOptions(groups, channels).eps(o.eps()).affine(o.affine()));
  copy_state_and_mode(*bn, *to);  // weight and bias; GroupNorm has no running statistics
  std::ostringstream from_name, to_name;
  bn->pretty_print(from_name);
  to_name << "dptorch::nn::GroupNorm(" << groups << " groups, " << channels << " channels)";
  replaced.push_back({path, from_name.str(), to_name.str()});
  return torch::nn::AnyModule(to);
}

bool is_container(const torch::nn::Module& m) {
  return dynamic_cast<const torch::nn::SequentialImpl*>(&m) != nullptr ||
         dynamic_cast<const torch::nn::ModuleListImpl*>(&m) != nullptr ||
         dynamic_cast<const torch::nn::ModuleDictImpl*>(&m) != nullptr;
}

std::string join(const std::string& prefix, const std::string& name) {
  return prefix.empty() ? name : prefix + "." + name;
}

// The replacement of a torch layer: its twin, or a GroupNorm for a BatchNorm when asked;
// nullopt for anything else. A BatchNorm without the fix is refused.
std::optional<torch::nn::AnyModule> replacement_of(const torch::nn::Module& m,
                                                   const std::string& path,
                                                   const ConvertOptions& options,
                                                   std::vector<Replacement>& replaced) {
  for (auto convert : {&twin_of<Linear, torch::nn::Linear>,
                       &twin_of<Conv1d, torch::nn::Conv1d>,
                       &twin_of<Conv2d, torch::nn::Conv2d>,
                       &twin_of<Conv3d, torch::nn::Conv3d>,
                       &twin_of<Embedding, torch::nn::Embedding>,
                       &twin_of<EmbeddingBag, torch::nn::EmbeddingBag>,
                       &twin_of<LayerNorm, torch::nn::LayerNorm>,
                       &twin_of<GroupNorm, torch::nn::GroupNorm>,
                       &twin_of<InstanceNorm1d, torch::nn::InstanceNorm1d>,
                       &twin_of<InstanceNorm2d, torch::nn::InstanceNorm2d>,
                       &twin_of<InstanceNorm3d, torch::nn::InstanceNorm3d>,
                       &twin_of<RNN, torch::nn::RNN>,
                       &twin_of<LSTM, torch::nn::LSTM>,
                       &twin_of<GRU, torch::nn::GRU>,
                       &twin_of<RNNCell, torch::nn::RNNCell>,
                       &twin_of<LSTMCell, torch::nn::LSTMCell>,
                       &twin_of<GRUCell, torch::nn::GRUCell>,
                       &twin_of<MultiheadAttention, torch::nn::MultiheadAttention>,
                       &twin_of<TransformerEncoderLayer, torch::nn::TransformerEncoderLayer>,
                       &twin_of<TransformerEncoder, torch::nn::TransformerEncoder>}) {
    if (auto converted = convert(m)) return converted;
  }
  const bool is_batch_norm = dynamic_cast<const torch::nn::BatchNorm1dImpl*>(&m) ||
                             dynamic_cast<const torch::nn::BatchNorm2dImpl*>(&m) ||
                             dynamic_cast<const torch::nn::BatchNorm3dImpl*>(&m);
  if (!is_batch_norm) return std::nullopt;
  TORCH_CHECK_VALUE(
      options.fix_batch_norm(), path, " (", m.name(),
      ") mixes samples across the batch and has no private twin; replace it with "
      "dptorch::nn::GroupNorm, or convert with ConvertOptions().fix_batch_norm(true)");
  for (auto fix : {&group_norm_for<torch::nn::BatchNorm1d>, &group_norm_for<torch::nn::BatchNorm2d>,
                   &group_norm_for<torch::nn::BatchNorm3d>}) {
    if (auto converted = fix(m, path, replaced)) return converted;
  }
  return std::nullopt;
}

// A change to apply once every module of the tree has been checked.
using Edit = std::function<void()>;

void plan(torch::nn::Module& m, const std::string& path, const ConvertOptions& options,
          std::vector<Replacement>& replaced, std::vector<Edit>& edits);

// Plans what becomes of one element of a container: nothing (a dp layer), a recursive
// conversion (a container or a module of the user's own), or a replacement made by `replace`.
void plan_element(torch::nn::Module& element, const std::string& path,
                  const ConvertOptions& options, std::vector<Replacement>& replaced,
                  std::vector<Edit>& edits,
                  const std::function<Edit(torch::nn::AnyModule)>& replace) {
  if (dynamic_cast<PerSampleLayer*>(&element) != nullptr) return;
  if (!is_container(element)) {
    if (auto twin = replacement_of(element, path, options, replaced)) {
      edits.push_back(replace(std::move(*twin)));
      return;
    }
  }
  plan(element, path, options, replaced, edits);
}

// Plans the in-place conversion of `m`'s tree into `edits`, refusing what cannot be converted.
void plan(torch::nn::Module& m, const std::string& path, const ConvertOptions& options,
          std::vector<Replacement>& replaced, std::vector<Edit>& edits) {
  const std::string where = path.empty() ? "(root module)" : path;
  if (auto* seq = dynamic_cast<torch::nn::SequentialImpl*>(&m)) {
    const auto names = seq->named_children().keys();
    for (size_t k = 0; k < seq->size(); ++k) {
      const auto at = static_cast<std::ptrdiff_t>(k);
      plan_element(*(seq->begin() + at)->ptr(), join(path, names[k]), options, replaced, edits,
                   [seq, at, name = names[k]](torch::nn::AnyModule twin) -> Edit {
                     return [seq, at, name, twin]() {
                       seq->replace_module(name, twin.ptr());
                       *(seq->begin() + at) = twin;
                     };
                   });
    }
  } else if (auto* list = dynamic_cast<torch::nn::ModuleListImpl*>(&m)) {
    for (size_t k = 0; k < list->size(); ++k) {
      const auto at = static_cast<std::ptrdiff_t>(k);
      const auto name = std::to_string(k);
      plan_element(**(list->begin() + at), join(path, name), options, replaced, edits,
                   [list, at, name](torch::nn::AnyModule twin) -> Edit {
                     return [list, at, name, ptr = twin.ptr()] {
                       list->replace_module(name, ptr);
                       *(list->begin() + at) = ptr;
                     };
                   });
    }
  } else if (auto* dict = dynamic_cast<torch::nn::ModuleDictImpl*>(&m)) {
    for (const auto& key : dict->keys()) {
      plan_element(*(*dict)[key], join(path, key), options, replaced, edits,
                   [dict, key](torch::nn::AnyModule twin) -> Edit {
                     return [dict, key, ptr = twin.ptr()] { dict->update({{key, ptr}}); };
                   });
    }
  } else {
    // A module of the user's own: its containers are converted, but a torch layer held as a
    // member cannot be swapped from outside (the member would still point at the old one).
    if (dynamic_cast<PerSampleLayer*>(&m) != nullptr) return;
    TORCH_CHECK_VALUE(m.parameters(/*recurse=*/false).empty(), where, " (", m.name(),
                      ") has parameters but no dptorch::nn twin; replace it with dptorch::nn "
                      "layers or derive it from dptorch::nn::RecordingLayer");
    for (const auto& child : m.named_children()) {
      auto& c = *child.value();
      const auto child_path = join(path, child.key());
      if (dynamic_cast<PerSampleLayer*>(&c) == nullptr && !is_container(c)) {
        std::vector<Replacement> ignored;
        TORCH_CHECK_VALUE(!replacement_of(c, child_path, options, ignored), child_path, " (",
                          c.name(), ") is a member of ", where, " (", m.name(),
                          "), which convert cannot swap from outside; declare it as its "
                          "dptorch::nn twin, or hold it in a Sequential, ModuleList or ModuleDict");
      }
      plan(c, child_path, options, replaced, edits);
    }
  }
}

void report(const std::vector<Replacement>& found, std::vector<Replacement>* replaced) {
  for (const auto& r : found) {
    TORCH_WARN("dptorch::nn::convert replaced ", r.path, " ", r.from, " by ", r.to,
               "; the model computes something else now, so train it anew");
  }
  if (replaced != nullptr) replaced->insert(replaced->end(), found.begin(), found.end());
}

template <typename Holder>
Holder convert_copy(const Holder& model, const ConvertOptions& options,
                    std::vector<Replacement>* replaced) {
  auto copy = std::dynamic_pointer_cast<typename Holder::ContainedType>(model->clone());
  TORCH_CHECK(copy != nullptr, "could not copy ", model->name(), " to convert it");
  // Module::clone makes every parameter trainable again; frozen ones stay frozen here.
  auto copied = copy->named_parameters();
  for (const auto& p : model->named_parameters()) {
    if (copied.contains(p.key())) copied[p.key()].set_requires_grad(p.value().requires_grad());
  }
  convert_(*copy, options, replaced);
  return Holder(copy);
}

}  // namespace

void convert_(torch::nn::Module& module, const ConvertOptions& options,
              std::vector<Replacement>* replaced) {
  // Everything is checked before anything changes: a refusal leaves the module as it was.
  std::vector<Replacement> found;
  std::vector<Edit> edits;
  plan(module, "", options, found, edits);
  for (auto& edit : edits) edit();
  report(found, replaced);
}

torch::nn::Sequential convert(const torch::nn::Sequential& model, const ConvertOptions& options,
                              std::vector<Replacement>* replaced) {
  return convert_copy(model, options, replaced);
}

torch::nn::ModuleList convert(const torch::nn::ModuleList& model, const ConvertOptions& options,
                              std::vector<Replacement>* replaced) {
  return convert_copy(model, options, replaced);
}

torch::nn::ModuleDict convert(const torch::nn::ModuleDict& model, const ConvertOptions& options,
                              std::vector<Replacement>* replaced) {
  return convert_copy(model, options, replaced);
}

}  // namespace dptorch::nn
