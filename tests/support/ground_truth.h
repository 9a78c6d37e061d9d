#pragma once

// The ground-truth harness of the layer tests: variants (dtype, loss reduction, norm method) and
// expect_ground_truth, which checks a scenario's per-sample gradients, norms and clipped sums
// against plain autograd on batches of one.

#include <dptorch/dptorch.h>

#include <gtest/gtest.h>

#include "support/per_sample_reference.h"
#include "support/tensor_assert.h"

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace dptorch::testing {

using torch::Tensor;
namespace tnn = torch::nn;

// The dtype of a model's parameters (double unless the test converted it).
inline torch::Dtype dtype_of(tnn::Module& m) {
  for (const auto& p : m.parameters()) return p.scalar_type();
  return torch::kDouble;
}

// A floating tensor captured by a scenario (built in double), in the model's current dtype.
inline Tensor as_model(const Tensor& t, tnn::Module& m) {
  if (!t.defined() || !t.is_floating_point()) return t;
  return t.to(dtype_of(m));
}

// Copies parameters of the same names (every name of `from` must exist in `to`).
inline void copy_parameters(tnn::Module& from, tnn::Module& to) {
  torch::NoGradGuard no_grad;
  auto dst = to.named_parameters();
  for (const auto& p : from.named_parameters()) {
    ASSERT_TRUE(dst.contains(p.key())) << p.key();
    dst[p.key()].copy_(p.value());
  }
}

// Adds noise to every parameter: torch zero-initialises some biases, sets LayerNorm to the
// identity, and an encoder's layers start as copies of one another; none of that may hide
// a mix-up of parameters.
inline void perturb(tnn::Module& m) {
  torch::NoGradGuard no_grad;
  for (auto& p : m.parameters()) p.add_(0.3 * torch::randn_like(p));
}

struct Variant {
  torch::Dtype dtype;
  LossReduction reduction;
  NormMethod method;
};

const Variant kDoubleSumAuto{torch::kDouble, LossReduction::kSum, NormMethod::kAuto};
const Variant kFloatMeanGhost{torch::kFloat, LossReduction::kMean, NormMethod::kGhost};

inline std::vector<Variant> all_variants() {
  std::vector<Variant> v;
  for (auto dtype : {torch::kDouble, torch::kFloat}) {
    for (auto reduction : {LossReduction::kMean, LossReduction::kSum}) {
      for (auto method : {NormMethod::kAuto, NormMethod::kGhost, NormMethod::kMaterialize}) {
        v.push_back({dtype, reduction, method});
      }
    }
  }
  return v;
}

inline std::string variant_name(const Variant& v) {
  std::string s = v.dtype == torch::kDouble ? "double" : "float";
  s += v.reduction == LossReduction::kMean ? "_mean" : "_sum";
  s += v.method == NormMethod::kGhost         ? "_ghost"
       : v.method == NormMethod::kMaterialize ? "_materialize"
                                              : "_auto";
  return s;
}

// The GroundTruth check of grad_sample_module_test.cpp: the scenario (built in double) is
// converted to `v.dtype`; reference per-sample gradients come from autograd on batches of one
// through the detached model; then the model is attached (tape batch_first = `tape_batch_first`,
// by default the scenario's batch_dim == 0) and grad_samples, norm_sq, clipped_sum and flat_norm
// are compared, as is the attached forward's output with the detached one. `r` (the loss's
// per-sample weights) is drawn if undefined. Returns the per-sample gradients by name.
inline torch::OrderedDict<std::string, Tensor> expect_ground_truth(
    Scenario s, const Variant& v, std::optional<bool> tape_batch_first = {}, Tensor r = {}) {
  s.model->to(v.dtype);
  if (s.input.is_floating_point()) s.input = s.input.to(v.dtype);
  const double tol = v.dtype == torch::kDouble ? 1e-10 : 1e-5;
  const int64_t B = s.samples();

  Tensor detached_out;
  {
    torch::NoGradGuard no_grad;
    detached_out = s.forward(s.input);
  }
  if (!r.defined()) r = torch::randn_like(detached_out);
  r = r.to(detached_out.scalar_type());
  const auto reference = reference_grad_samples(s, r);

  GradSampleModule gsm(s.model, GradSampleOptions()
                                    .batch_first(tape_batch_first.value_or(s.batch_dim == 0))
                                    .loss_reduction(v.reduction)
                                    .norm_method(v.method));
  const auto out = s.forward(s.input);
  EXPECT_TRUE(tensors_close(out, detached_out, tol)) << "attached forward != detached forward";
  auto loss = per_sample_loss(out, r);
  if (v.reduction == LossReduction::kMean) loss = loss / static_cast<double>(B);
  loss.backward();

  const auto names = gsm.parameter_names();
  const auto expected_names = testing::trainable(*s.model);
  EXPECT_EQ(names.size(), reference.size());
  if (names.size() != reference.size()) return torch::OrderedDict<std::string, Tensor>();
  for (size_t k = 0; k < names.size(); ++k) EXPECT_EQ(names[k], expected_names[k].first);
  EXPECT_EQ(gsm.batch_size(), B);
  auto norm_sq = gsm.norm_sq();
  auto w = torch::rand({B}, torch::TensorOptions().dtype(v.dtype));
  auto sums = gsm.clipped_sum(w);
  auto samples = gsm.grad_samples();
  Tensor flat_sq = torch::zeros({B}, torch::kDouble);
  for (size_t k = 0; k < names.size(); ++k) {
    SCOPED_TRACE(names[k]);
    const auto& ref = reference[k];
    const auto ref_norm_sq = ref.flatten(1).square().sum(1);
    flat_sq += ref_norm_sq.to(torch::kDouble);
    EXPECT_TRUE(tensors_close(samples[names[k]], ref, tol));
    EXPECT_TRUE(tensors_close(norm_sq[names[k]], ref_norm_sq, tol));
    EXPECT_TRUE(tensors_close(sums[names[k]], torch::tensordot(w, ref, {0}, {0}), tol));
  }
  EXPECT_TRUE(tensors_close(gsm.flat_norm(), flat_sq.sqrt(), tol));
  // Autograd formed no parameter gradient: the tape did the work.
  for (const auto& p : s.model->parameters()) EXPECT_FALSE(p.grad().defined());
  return samples;
}

/// The (case, variant) pairs of a parameterised ground-truth suite: every variant for a case with
/// `all_variants` set, double/sum/auto and float/mean/ghost for the rest.
template <typename Case>
std::vector<std::tuple<Case, Variant>> variant_params(const std::vector<Case>& cases) {
  std::vector<std::tuple<Case, Variant>> out;
  for (const auto& c : cases) {
    if (c.all_variants) {
      for (const auto& v : all_variants()) out.emplace_back(c, v);
    } else {
      out.emplace_back(c, kDoubleSumAuto);
      out.emplace_back(c, kFloatMeanGhost);
    }
  }
  return out;
}

}  // namespace dptorch::testing
