#pragma once

/// dptorch: differentially private deep learning for LibTorch. This umbrella header brings in
/// every public part; each area also has its own headers (see docs/design.md for the data flow).
#include <torch/torch.h>

#include <dptorch/accounting/accountant.h>
#include <dptorch/accounting/calibration.h>
#include <dptorch/accounting/gdp.h>
#include <dptorch/accounting/pld.h>
#include <dptorch/accounting/prv.h>
#include <dptorch/accounting/rdp.h>
#include <dptorch/accounting/report.h>
#include <dptorch/audit/canaries.h>
#include <dptorch/clipping/norm_clipper.h>
#include <dptorch/clipping/per_sample_gradient_clipper.h>
#include <dptorch/common.h>
#include <dptorch/data/fashion_mnist.h>
#include <dptorch/data/idx.h>
#include <dptorch/data/physical_batches.h>
#include <dptorch/data/poisson_data_loader.h>
#include <dptorch/data/samplers.h>
#include <dptorch/distributed/group.h>
#include <dptorch/engine/privacy_engine.h>
#include <dptorch/features/scattering.h>
#include <dptorch/features/whitening.h>
#include <dptorch/grad_sample/grad_sample_module.h>
#include <dptorch/grad_sample/rules.h>
#include <dptorch/io/atomic_file.h>
#include <dptorch/io/checked_file.h>
#include <dptorch/memory.h>
#include <dptorch/nn/convert.h>
#include <dptorch/nn/layer.h>
#include <dptorch/nn/modules.h>
#include <dptorch/optim/dp_optimizer.h>
#include <dptorch/optim/noise.h>
