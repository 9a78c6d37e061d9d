// The CPU loops behind the rules against the device-generic operators they stand in for.

#include <dptorch/dptorch.h>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <tuple>

#include "grad_sample/rules_internal.h"
#include "support/tensor_assert.h"

namespace dptorch {
namespace {

using ::testing::HasSubstr;
using testing::tensors_close;
using ::testing::ThrowsMessage;
namespace gs = grad_sample;

struct UnfoldCase {
  std::vector<int64_t> input, kernel, stride, padding, dilation;
};

class UnfoldPatches : public ::testing::TestWithParam<UnfoldCase> {};

TEST_P(UnfoldPatches, CpuLoopEqualsTheGenericOperators) {
  const auto& c = GetParam();
  torch::manual_seed(11);
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    SCOPED_TRACE(c10::toString(dtype));
    auto x = torch::randn(c.input, torch::TensorOptions().dtype(dtype));
    auto fast = gs::unfold_patches(x, c.kernel, c.stride, c.padding, c.dilation);
    auto generic = gs::detail::unfold_patches_generic(x, c.kernel, c.stride, c.padding, c.dilation);
    ASSERT_EQ(fast.sizes(), generic.sizes());
    EXPECT_TRUE(torch::equal(fast, generic));  // a gather: bit for bit
    // A non-contiguous input (channels last) gives the same patches.
    auto strided = x.transpose(1, -1).contiguous().transpose(1, -1);
    ASSERT_FALSE(strided.is_contiguous());
    EXPECT_TRUE(torch::equal(gs::unfold_patches(strided, c.kernel, c.stride, c.padding, c.dilation),
                             generic));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Geometries, UnfoldPatches,
    ::testing::Values(
        UnfoldCase{{4, 1, 28, 28}, {8, 8}, {2, 2}, {2, 2}, {1, 1}},   // the CNN's conv1
        UnfoldCase{{3, 16, 12, 12}, {4, 4}, {2, 2}, {0, 0}, {1, 1}},  // and conv2
        UnfoldCase{{2, 3, 9, 8}, {3, 2}, {2, 1}, {1, 0}, {1, 2}},     // dilation, mixed strides
        UnfoldCase{{2, 2, 5, 6}, {3, 3}, {1, 3}, {4, 3}, {2, 1}},     // padding wider than reach
        UnfoldCase{{3, 2, 7, 7}, {1, 1}, {3, 2}, {0, 1}, {1, 1}},     // 1×1 kernel
        UnfoldCase{{3, 4, 17}, {5}, {3}, {2}, {2}},                   // 1-D
        UnfoldCase{{2, 2, 10}, {3}, {1}, {0}, {1}}));

// Lookups of two records: rows of each sample interleaved, repeats within samples, one sample
// without lookups.
struct Lookups {
  torch::Tensor index, sample, g;
  int64_t batch = 6, vocab = 50, dim = 7;
};

Lookups make_lookups(torch::ScalarType dtype, int64_t vocab = 50, int64_t dim = 7) {
  torch::manual_seed(3);
  Lookups l;
  l.vocab = vocab;
  l.dim = dim;
  const int64_t n = 300;
  l.index = torch::randint(l.vocab, {n}, torch::kLong);
  l.sample = torch::randint(l.batch - 1, {n}, torch::kLong);  // sample 5 has no lookups
  l.index.slice(0, 0, 40).copy_(l.index.slice(0, 40, 80));    // many repeats
  l.g = torch::randn({n, l.dim}, torch::TensorOptions().dtype(dtype));
  return l;
}

// Small rows within one word of the loop's bit sets, and longer rows (two vectors of partial
// sums and a tail) over a table of several words.
TEST(EmbeddingNormSq, CpuLoopEqualsTheGenericOperators) {
  for (auto [dtype, vocab, dim] : {std::tuple{torch::kFloat, 50, 7},
                                   {torch::kDouble, 50, 7},
                                   {torch::kFloat, 1000, 37},
                                   {torch::kDouble, 1000, 37}}) {
    SCOPED_TRACE(std::string(c10::toString(dtype)) + ", vocab " + std::to_string(vocab));
    const auto l = make_lookups(dtype, vocab, dim);
    auto fast = gs::embedding_norm_sq(l.index, l.sample, l.g, l.batch, l.vocab);
    auto generic = gs::detail::embedding_norm_sq_generic(l.index, l.sample, l.g, l.batch, l.vocab);
    EXPECT_TRUE(tensors_close(fast, generic, dtype == torch::kDouble ? 1e-13 : 1e-6));
    EXPECT_EQ(fast[l.batch - 1].item<double>(), 0.0);
    // Every lookup its own sample: the norms are the rows' norms.
    auto own = torch::arange(l.g.size(0), torch::kLong);
    EXPECT_TRUE(tensors_close(gs::embedding_norm_sq(l.index, own, l.g, l.g.size(0), l.vocab),
                              l.g.square().sum(1), dtype == torch::kDouble ? 1e-14 : 1e-6));
  }
}

TEST(EmbeddingNormSq, RefusesRowsOutsideTheTable) {
  auto l = make_lookups(torch::kFloat);
  l.index[17] = l.vocab;
  EXPECT_THAT([&] { (void)gs::embedding_norm_sq(l.index, l.sample, l.g, l.batch, l.vocab); },
              ThrowsMessage<c10::Error>(HasSubstr("embedding row 50 is out of range")));
}

TEST(EmbeddingGrads, AddsTheWeightedSumLikeIndexAdd) {
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    SCOPED_TRACE(c10::toString(dtype));
    const auto l = make_lookups(dtype);
    const auto opts = torch::TensorOptions().dtype(dtype);
    auto w = torch::rand({l.batch}, opts);
    auto start = torch::randn({l.vocab, l.dim}, opts);
    auto expected =
        start.clone().index_add_(0, l.index, l.g * w.index_select(0, l.sample).unsqueeze(1));
    gs::EmbeddingGrads rule(l.index, l.sample, l.g, l.batch, l.vocab);
    const double tol = dtype == torch::kDouble ? 1e-14 : 1e-6;
    auto table = start.clone();  // contiguous: the CPU loop
    rule.add_weighted_sum_to({w}, {table});
    EXPECT_TRUE(tensors_close(table, expected, tol));
    auto strided = start.t().contiguous().t();  // not contiguous: the generic operators
    rule.add_weighted_sum_to({w}, {strided});
    EXPECT_TRUE(tensors_close(strided, expected, tol));
    EXPECT_TRUE(tensors_close(rule.weighted_sum({w}).at(0), expected - start, tol));
  }
}

// Rows given as a [B, T, dim] view expanded over T (the gradient of a mean over positions) give
// what the copied [B·T, dim] rows give, in the norms, the sums and the materialised gradients.
TEST(EmbeddingGrads, ExpandedRowsEqualCopiedRows) {
  for (auto dtype : {torch::kFloat, torch::kDouble}) {
    SCOPED_TRACE(c10::toString(dtype));
    torch::manual_seed(8);
    const int64_t B = 5, T = 9, V = 30, D = 6;
    auto index = torch::randint(V, {B * T}, torch::kLong);
    index.slice(0, 0, 4).fill_(3);  // repeats within sample 0
    auto sample = torch::arange(B, torch::kLong).repeat_interleave(T);
    auto per_sample = torch::randn({B, 1, D}, torch::TensorOptions().dtype(dtype));
    auto expanded = per_sample.expand({B, T, D});
    auto copied = expanded.reshape({B * T, D}).contiguous();
    gs::EmbeddingGrads a(index, sample, expanded, B, V), b(index, sample, copied, B, V);
    const double tol = dtype == torch::kDouble ? 1e-13 : 1e-6;
    EXPECT_TRUE(tensors_close(a.norm_sq().at(0), b.norm_sq().at(0), tol));
    auto w = torch::rand({B}, torch::TensorOptions().dtype(dtype));
    auto ta = torch::zeros({V, D}, w.options()), tb = torch::zeros({V, D}, w.options());
    a.add_weighted_sum_to({w}, {ta});
    b.add_weighted_sum_to({w}, {tb});
    EXPECT_TRUE(tensors_close(ta, tb, tol));
    EXPECT_TRUE(tensors_close(a.weighted_sum({w}).at(0), tb, tol));
    EXPECT_TRUE(tensors_close(a.materialize().at(0), b.materialize().at(0), tol));
    EXPECT_TRUE(tensors_close(gs::detail::embedding_norm_sq_generic(index, sample, copied, B, V),
                              a.norm_sq().at(0), tol));
  }
}

// The CPU loops split their work with at::parallel_for, whose OpenMP pragma is compiled where it
// is called: with the flags dptorch passes on (-fopenmp), a loop of two chunks runs on two
// threads. Without them every loop of dptorch would silently run on one.
TEST(ParallelLoops, RunOnTheThreadsTorchIsGiven) {
  const int threads = torch::get_num_threads();
  torch::set_num_threads(2);
  std::mutex mutex;
  std::set<std::thread::id> ids;
  at::parallel_for(0, 2, 1, [&](int64_t, int64_t) {
    std::lock_guard<std::mutex> lock(mutex);
    ids.insert(std::this_thread::get_id());
  });
  torch::set_num_threads(threads);
  EXPECT_EQ(ids.size(), 2u);
}

TEST(EmbeddingGrads, WeightedSumDoesNotDependOnTheThreadCount) {
  const auto l = make_lookups(torch::kFloat);
  auto w = torch::rand({l.batch});
  gs::EmbeddingGrads rule(l.index, l.sample, l.g, l.batch, l.vocab);
  const int threads = torch::get_num_threads();
  std::vector<torch::Tensor> tables;
  for (int t : {1, 2, 3}) {
    torch::set_num_threads(t);
    tables.push_back(torch::zeros({l.vocab, l.dim}));
    rule.add_weighted_sum_to({w}, {tables.back()});
  }
  torch::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(tables[0], tables[1]));
  EXPECT_TRUE(torch::equal(tables[0], tables[2]));
}

}  // namespace
}  // namespace dptorch

namespace dptorch {
namespace {

struct FusedCase {
  std::vector<int64_t> input, weight;  // one input shape of the two records; weight [P, C, k...]
  std::vector<int64_t> stride, padding, dilation;
};

class FusedConvNorms : public ::testing::TestWithParam<FusedCase> {};

// The three paths give the same norms: the fused CPU loop (groups 1), the grouped-convolution
// materialisation, and ghost norms over unfolded chunks. Two records of different sizes, as a
// layer called on two inputs.
TEST_P(FusedConvNorms, EqualGhostNorms) {
  const auto& c = GetParam();
  torch::manual_seed(21);
  for (auto dtype : {torch::kDouble, torch::kFloat}) {
    SCOPED_TRACE(c10::toString(dtype));
    const auto opts = torch::TensorOptions().dtype(dtype);
    auto weight = torch::randn(c.weight, opts);
    gs::ConvGeometry geo;
    geo.kernel.assign(c.weight.begin() + 2, c.weight.end());
    geo.stride = c.stride;
    geo.padding = c.padding;
    geo.dilation = c.dilation;
    std::vector<torch::Tensor> inputs, grads;
    for (int64_t extra : {0, 3}) {
      auto shape = c.input;
      shape.back() += extra;
      inputs.push_back(torch::randn(shape, opts));
      auto out = at::convolution(inputs.back(), weight, {}, geo.stride, geo.padding, geo.dilation,
                                 false, std::vector<int64_t>(geo.kernel.size(), 0), 1);
      grads.push_back(torch::randn_like(out));
    }
    gs::ConvGrads fused(inputs, grads, weight, true, false, geo, gs::ConvPath::kFused);
    gs::ConvGrads ghost(inputs, grads, weight, true, false, geo, gs::ConvPath::kGhost);
    gs::ConvGrads mat(inputs, grads, weight, true, false, geo, gs::ConvPath::kMaterialize);
    ASSERT_EQ(fused.path(), gs::ConvPath::kFused);
    const auto n_fused = fused.norm_sq().at(0), n_ghost = ghost.norm_sq().at(0);
    EXPECT_TRUE(tensors_close(n_fused, n_ghost, dtype == torch::kDouble ? 1e-12 : 1e-5));
    EXPECT_TRUE(
        tensors_close(mat.norm_sq().at(0), n_ghost, dtype == torch::kDouble ? 1e-12 : 1e-5));
    // And the norms of the materialised per-sample gradients.
    EXPECT_TRUE(tensors_close(n_fused, fused.materialize().at(0).flatten(1).square().sum(1),
                              dtype == torch::kDouble ? 1e-12 : 1e-5));
    // The same for any number of threads.
    const int threads = torch::get_num_threads();
    torch::set_num_threads(1);
    const auto n_one = fused.norm_sq().at(0);
    torch::set_num_threads(threads);
    EXPECT_TRUE(torch::equal(n_one, n_fused));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Geometries, FusedConvNorms,
    ::testing::Values(
        // The CNN's two layers (kernel widths 8 and 4).
        FusedCase{{5, 1, 28, 28}, {16, 1, 8, 8}, {2, 2}, {2, 2}, {1, 1}},
        FusedCase{{5, 16, 12, 12}, {32, 16, 4, 4}, {2, 2}, {0, 0}, {1, 1}},
        // Widths 3 and 5; channels not a multiple of the tile (7 and 13 output channels).
        FusedCase{{3, 3, 9, 10}, {7, 3, 3, 3}, {1, 1}, {1, 1}, {1, 1}},
        FusedCase{{3, 2, 11, 9}, {13, 2, 5, 5}, {1, 2}, {2, 0}, {1, 1}},
        // Dilation, an odd width, rectangular kernel, padding past the reach.
        FusedCase{{2, 2, 9, 12}, {5, 2, 2, 3}, {2, 1}, {1, 3}, {2, 2}},
        FusedCase{{2, 3, 7, 8}, {4, 3, 3, 7}, {1, 1}, {4, 4}, {1, 1}},
        // 1-D.
        FusedCase{{4, 3, 20}, {6, 3, 5}, {2}, {1}, {1}},
        FusedCase{{4, 2, 15}, {9, 2, 3}, {1}, {0}, {3}}));

// conv_weight_samples by each kernel (one grouped convolution with the batch folded into the
// groups, or one kernel per sample under 8 channels per group; the register tile) against plain
// autograd on a batch of one, in double, chunked at every boundary.
struct SamplesCase {
  std::vector<int64_t> input, weight;  // weight [p, C/G, k...]
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};

class ConvWeightSamples : public ::testing::TestWithParam<SamplesCase> {};

TEST_P(ConvWeightSamples, EqualAutogradOnBatchesOfOneInEveryChunking) {
  const auto& c = GetParam();
  torch::manual_seed(31);
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto x = torch::randn(c.input, opts);
  auto weight = torch::randn(c.weight, opts);
  const std::vector<int64_t> out_pad(c.stride.size(), 0);
  auto g = torch::randn_like(
      at::convolution(x, weight, {}, c.stride, c.padding, c.dilation, false, out_pad, c.groups));
  const int64_t B = x.size(0);
  std::vector<torch::Tensor> expected;
  for (int64_t i = 0; i < B; ++i) {
    auto w = weight.clone().requires_grad_(true);
    auto y = at::convolution(x.narrow(0, i, 1), w, {}, c.stride, c.padding, c.dilation, false,
                             out_pad, c.groups);
    (y * g.narrow(0, i, 1)).sum().backward();
    expected.push_back(w.grad());
  }
  const auto truth = torch::stack(expected);
  gs::ConvGeometry geo{std::vector<int64_t>(c.weight.begin() + 2, c.weight.end()), c.stride,
                       c.padding, c.dilation, c.groups};
  EXPECT_TRUE(tensors_close(gs::conv_weight_samples(x, g, weight, geo), truth, 1e-10));
  EXPECT_TRUE(tensors_close(
      gs::conv_weight_samples(x, g, weight, geo, gs::ConvSampleKernel::kGrouped), truth, 1e-10));
  const bool tiled = c.groups == 1 && c.stride.size() <= 2;
  if (tiled) {
    EXPECT_TRUE(tensors_close(
        gs::conv_weight_samples(x, g, weight, geo, gs::ConvSampleKernel::kTiled), truth, 1e-10));
    // In float too (the vector path of either width), against the double result.
    EXPECT_TRUE(tensors_close(
        gs::conv_weight_samples(x.to(torch::kFloat), g.to(torch::kFloat), weight.to(torch::kFloat),
                                geo, gs::ConvSampleKernel::kTiled)
            .to(torch::kDouble),
        truth, 1e-4));
  } else {
    EXPECT_THROW((void)gs::conv_weight_samples(x, g, weight, geo, gs::ConvSampleKernel::kTiled),
                 c10::Error);
  }
  const int64_t sample_bytes = weight.numel() * weight.element_size();
  for (int64_t per_chunk : {int64_t{1}, int64_t{2}, B - 1, B + 5}) {
    SCOPED_TRACE(per_chunk);
    const auto kernel =
        tiled && per_chunk % 2 == 0 ? gs::ConvSampleKernel::kTiled : gs::ConvSampleKernel::kGrouped;
    torch::Tensor norms;
    const auto chunks =
        gs::conv_weight_sample_chunks(x, g, weight, geo, per_chunk * sample_bytes, kernel, &norms);
    EXPECT_TRUE(tensors_close(norms, truth.flatten(1).square().sum(1), 1e-10));
    const int64_t step = std::min(per_chunk, B);
    EXPECT_EQ(static_cast<int64_t>(chunks.size()), (B + step - 1) / step);
    EXPECT_TRUE(tensors_close(torch::cat(chunks), truth, 1e-10));
    // The rule over the chunks: norms, sums and the gradients themselves.
    auto w = torch::rand({B}, opts);
    gs::MaterializedGrads rule({"weight"}, std::vector<std::vector<torch::Tensor>>{chunks});
    EXPECT_TRUE(tensors_close(rule.norm_sq().at(0), truth.flatten(1).square().sum(1), 1e-10));
    EXPECT_TRUE(tensors_close(rule.weighted_sum({w}).at(0),
                              truth.flatten(1).t().mv(w).view(weight.sizes()), 1e-10));
    EXPECT_TRUE(tensors_close(rule.materialize().at(0), truth, 1e-10));
  }
}

INSTANTIATE_TEST_SUITE_P(
    Geometries, ConvWeightSamples,
    ::testing::Values(
        // 2-D: stride, padding, dilation, a rectangular kernel, groups (and depthwise), 1×1.
        SamplesCase{{5, 3, 9, 10}, {4, 3, 3, 3}, {1, 1}, {1, 1}, {1, 1}, 1},
        SamplesCase{{4, 2, 11, 9}, {5, 2, 5, 3}, {2, 1}, {2, 0}, {1, 2}, 1},
        SamplesCase{{3, 4, 9, 8}, {6, 2, 3, 3}, {1, 2}, {2, 1}, {2, 1}, 2},
        SamplesCase{{4, 3, 9, 9}, {3, 1, 3, 3}, {2, 2}, {0, 0}, {1, 1}, 3},
        SamplesCase{{6, 4, 8, 8}, {8, 4, 1, 1}, {2, 2}, {0, 0}, {1, 1}, 1},
        // 8 input channels per group or more: the grouped kernel (fewer: one kernel per sample).
        SamplesCase{{3, 8, 7, 6}, {5, 8, 3, 3}, {1, 1}, {1, 1}, {1, 1}, 1},
        SamplesCase{{4, 16, 9, 8}, {6, 8, 3, 2}, {2, 1}, {1, 0}, {1, 2}, 2},
        SamplesCase{{3, 9, 14}, {4, 9, 3}, {2}, {2}, {2}, 1},
        SamplesCase{{2, 8, 3, 4, 4}, {3, 8, 2, 2, 2}, {1, 1, 2}, {0, 1, 1}, {1, 1, 1}, 1},
        // 1-D and 3-D.
        SamplesCase{{5, 3, 20}, {6, 3, 5}, {2}, {1}, {1}, 1},
        SamplesCase{{4, 4, 15}, {6, 2, 3}, {1}, {3}, {3}, 2},
        SamplesCase{{3, 2, 4, 5, 4}, {3, 2, 2, 3, 2}, {1, 2, 1}, {1, 0, 1}, {1, 1, 1}, 1}));

// The cost model on the layers whose timings calibrated it (docs/performance.md, per-layer table).
// The clipped sum over kept per-sample gradients is split over the threads by column: the same
// result, bit for bit, with one thread and with two.
TEST(MaterializedGrads, WeightedSumDoesNotDependOnTheThreadCount) {
  torch::manual_seed(9);
  std::vector<torch::Tensor> chunks{torch::randn({5, 40000}), torch::randn({3, 40000})};
  gs::MaterializedGrads rule({"weight"}, std::vector<std::vector<torch::Tensor>>{chunks});
  const auto w = torch::rand({8});
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  const auto one = rule.weighted_sum({w}).at(0);
  at::set_num_threads(2);
  const auto two = rule.weighted_sum({w}).at(0);
  at::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(one, two));
  EXPECT_TRUE(tensors_close(one, torch::cat(chunks).t().mv(w), 1e-5));
}

// Rules over one shared output gradient (a recurrent layer's two products) take its Gram matrix
// from the cache once; the norms equal the uncached ghost norms and materialised ones.
TEST(GramCache, SharedTensorsFormedOnceAndNormsUnchanged) {
  torch::manual_seed(5);
  const auto opts = torch::TensorOptions().dtype(torch::kDouble);
  auto a1 = torch::randn({3, 7, 4}, opts), a2 = torch::randn({3, 7, 6}, opts);
  auto g = torch::randn({3, 7, 5}, opts);
  gs::GramCache cache({g});
  const auto first = cache.gram(g, 1);
  EXPECT_TRUE(cache.gram(g, 1).is_same(first));
  EXPECT_FALSE(cache.gram(a1, 1).is_same(cache.gram(a1, 1)));  // not shared: formed each time
  EXPECT_TRUE(tensors_close(first, torch::bmm(g, g.transpose(1, 2)), 1e-12));
  for (const auto& a : {a1, a2, a1}) {
    const auto cached = gs::ghost_norm_sq(a, g, 1, &cache);
    EXPECT_TRUE(tensors_close(cached, gs::ghost_norm_sq(a, g, 1), 1e-12));
    EXPECT_TRUE(tensors_close(cached, gs::materialize(a, g, 1).flatten(1).square().sum(1), 1e-10));
  }
}

// A linear-like layer's G_i with their norms, on the register tile where the processor has it
// (AVX-512) and by the batched matmul elsewhere, against one product per sample: rows of every
// length (padded to the tile or not), 512 positions (the row stride the tile pads), one position,
// strided inputs, float and double.
TEST(LinearWeightSamples, EqualOneProductPerSampleInEveryShape) {
  torch::manual_seed(21);
  struct Shape {
    int64_t B, T, d, p;
  };
  for (const auto dtype : {torch::kDouble, torch::kFloat}) {
    const double tol = dtype == torch::kDouble ? 1e-10 : 1e-4;
    const auto opts = torch::TensorOptions().dtype(dtype);
    for (const auto& s : {Shape{3, 5, 7, 3}, Shape{2, 1, 33, 9}, Shape{2, 512, 16, 8},
                          Shape{3, 17, 64, 24}, Shape{2, 4, 1, 1}, Shape{2, 9, 40, 70}}) {
      for (const bool strided : {false, true}) {
        auto a = strided ? torch::randn({s.B, s.d, s.T}, opts).transpose(1, 2)
                         : torch::randn({s.B, s.T, s.d}, opts);
        auto g = strided ? torch::randn({s.T, s.B, s.p}, opts).transpose(0, 1)
                         : torch::randn({s.B, s.T, s.p}, opts);
        std::vector<torch::Tensor> truth;
        for (int64_t i = 0; i < s.B; ++i) truth.push_back(g[i].t().mm(a[i]));
        const auto expected = torch::stack(truth);
        torch::Tensor norms;
        const auto samples = gs::materialize(a, g, 1, &norms);
        SCOPED_TRACE(::testing::PrintToString(std::vector<int64_t>{s.B, s.T, s.d, s.p}));
        EXPECT_TRUE(tensors_close(samples, expected, tol));
        EXPECT_TRUE(tensors_close(norms, expected.flatten(1).square().sum(1), tol));
        EXPECT_TRUE(tensors_close(gs::materialize(a, g, 1), expected, tol));
      }
    }
  }
}

TEST(ConvCostModel, PicksThePathsMeasuredFastest) {
  auto plan = [](int64_t B, int64_t C, int64_t T, int64_t k2, int64_t p, bool may_keep) {
    gs::ConvShape s;
    s.batch = B;
    s.in_channels = C;
    s.positions = T;
    s.patch = C * k2;
    s.out_channels = p;
    s.input_size = C * T;
    s.kernel_width = k2 == 64 ? 8 : 3;
    s.fused_available = true;
    return gs::plan_conv(s, NormMethod::kAuto, may_keep);
  };
  EXPECT_EQ(plan(256, 1, 144, 64, 16, false).path, gs::ConvPath::kFused);       // the CNN's conv1
  EXPECT_EQ(plan(64, 16, 1024, 9, 16, true).path, gs::ConvPath::kMaterialize);  // ResNet stage 1
  EXPECT_TRUE(plan(64, 16, 1024, 9, 16, true).keep);
  EXPECT_FALSE(plan(64, 16, 1024, 9, 16, false).keep);
  EXPECT_EQ(plan(8, 512, 1, 9, 512, false).path, gs::ConvPath::kGhost);  // 3×3 on 1×1, 512 wide
  // Forced paths are taken whatever they cost; only kMaterialize keeps.
  gs::ConvShape s;
  s.batch = 8;
  s.in_channels = 512;
  s.positions = 1;
  s.patch = 512 * 9;
  s.out_channels = 512;
  EXPECT_EQ(gs::plan_conv(s, NormMethod::kMaterialize, true).path, gs::ConvPath::kMaterialize);
  EXPECT_TRUE(gs::plan_conv(s, NormMethod::kMaterialize, true).keep);
  EXPECT_EQ(gs::plan_conv(s, NormMethod::kGhost, true).path, gs::ConvPath::kGhost);
  EXPECT_FALSE(gs::plan_conv(s, NormMethod::kGhost, true).keep);
}

}  // namespace
}  // namespace dptorch
