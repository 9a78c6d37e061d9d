#include <dptorch/nn/convert.h>

#include <dptorch/nn/modules.h>

#include <torch/torch.h>

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

// The twin of `any` as an AnyModule, parameters and buffers copied; nullopt if not a `Torch`.
template <typename Twin, typename Torch>
std::optional<torch::nn::AnyModule> convert_as(const torch::nn::AnyModule& any) {
  const auto* from = dynamic_cast<const typename Torch::ContainedType*>(any.ptr().get());
  if (from == nullptr) return std::nullopt;
  Twin to(rebuild_options(from->options));
  torch::NoGradGuard no_grad;
  auto params = to->named_parameters(/*recurse=*/false);
  for (const auto& p : from->named_parameters(/*recurse=*/false)) params[p.key()].copy_(p.value());
  auto buffers = to->named_buffers(/*recurse=*/false);
  for (const auto& b : from->named_buffers(/*recurse=*/false)) buffers[b.key()].copy_(b.value());
  to->train(from->is_training());
  return torch::nn::AnyModule(to);
}

torch::nn::AnyModule convert_module(const torch::nn::AnyModule& any, const std::string& path) {
  const auto& m = any.ptr();
  if (dynamic_cast<PerSampleLayer*>(m.get()) != nullptr) return any.clone();
  for (auto convert :
       {&convert_as<Linear, torch::nn::Linear>, &convert_as<Conv1d, torch::nn::Conv1d>,
        &convert_as<Conv2d, torch::nn::Conv2d>, &convert_as<Conv3d, torch::nn::Conv3d>,
        &convert_as<Embedding, torch::nn::Embedding>,
        &convert_as<EmbeddingBag, torch::nn::EmbeddingBag>,
        &convert_as<LayerNorm, torch::nn::LayerNorm>, &convert_as<GroupNorm, torch::nn::GroupNorm>,
        &convert_as<InstanceNorm1d, torch::nn::InstanceNorm1d>,
        &convert_as<InstanceNorm2d, torch::nn::InstanceNorm2d>,
        &convert_as<InstanceNorm3d, torch::nn::InstanceNorm3d>}) {
    if (auto converted = convert(any)) return *converted;
  }
  const bool is_batch_norm = m->as<torch::nn::BatchNorm1d>() || m->as<torch::nn::BatchNorm2d>() ||
                             m->as<torch::nn::BatchNorm3d>();
  TORCH_CHECK_VALUE(!is_batch_norm, path, " (", m->name(),
                    ") mixes samples across the batch and has no private twin; replace it with "
                    "dptorch::nn::GroupNorm");
  TORCH_CHECK_VALUE(m->parameters(/*recurse=*/true).empty(), path, " (", m->name(),
                    ") has parameters but no dptorch::nn twin; replace it with dptorch::nn layers "
                    "or derive it from dptorch::nn::PerSampleLayer");
  return any.clone();
}

}  // namespace

torch::nn::Sequential convert(const torch::nn::Sequential& model) {
  torch::nn::Sequential out;
  const auto names = model->named_children().keys();
  size_t k = 0;
  for (const auto& any : *model) {
    out->push_back(names[k], convert_module(any, names[k]));
    ++k;
  }
  return out;
}

}  // namespace dptorch::nn
