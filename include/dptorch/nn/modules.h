#pragma once

/// Drop-in twins of torch::nn layers whose per-sample gradients dptorch computes, one header per
/// family. Each takes its twin's options type and has the same parameter and buffer names, so
/// state dicts interchange. Detached from a tape a layer runs its twin's own forward (same
/// results, same speed); attached (by GradSampleModule) it records what its rule needs instead
/// of forming parameter gradients.
///
/// Example:
///   auto model = torch::nn::Sequential(dptorch::nn::Linear(784, 128), torch::nn::ReLU(),
///                                      dptorch::nn::Linear(128, 10));

#include <dptorch/nn/attention.h>
#include <dptorch/nn/conv.h>
#include <dptorch/nn/embedding.h>
#include <dptorch/nn/linear.h>
#include <dptorch/nn/normalization.h>
#include <dptorch/nn/recurrent.h>
