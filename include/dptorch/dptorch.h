#pragma once

/// dptorch: differentially private deep learning for LibTorch. This umbrella header brings in
/// every public part; each area also has its own headers (see DESIGN.md for the data flow).
#include <dptorch/common.h>
#include <dptorch/nn/convert.h>
#include <dptorch/nn/layer.h>
#include <dptorch/nn/modules.h>
#include <dptorch/grad_sample/grad_sample_module.h>
#include <dptorch/grad_sample/rules.h>
#include <dptorch/clipping/norm_clipper.h>
#include <dptorch/clipping/per_sample_gradient_clipper.h>
