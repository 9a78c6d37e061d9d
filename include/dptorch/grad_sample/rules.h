#pragma once

/// The per-sample gradient rules of docs/design.md §2, one header per layer family beside the
/// interface they share: per_sample_grads.h (PerSampleGrads, MaterializedGrads), linear.h
/// (LinearLikeGrads), conv.h (ConvGrads), embedding.h (EmbeddingGrads). Stateless math is in
/// free functions; the classes hold one layer's tensors for one backward pass.

#include <dptorch/grad_sample/conv.h>
#include <dptorch/grad_sample/embedding.h>
#include <dptorch/grad_sample/linear.h>
#include <dptorch/grad_sample/per_sample_grads.h>
