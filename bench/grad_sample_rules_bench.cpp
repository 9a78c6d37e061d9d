// grad_sample_rules_bench: the per-sample gradient rules of dptorch::grad_sample, one layer at a
// time, next to the non-private kernel that computes the same layer's weight gradient, and (for
// convolutions) with the patch extraction alone, the CPU loop against the generic operators.
//
//   grad_sample_rules_bench                   # all cases, one thread, ~1 minute
//   grad_sample_rules_bench --malloc-no-mmap  # the same without fresh-page faults
//   grad_sample_rules_bench --cases conv,embedding --reps 21
//
// Times are medians of the process CPU time over --reps calls after one warm-up call, with the
// median number of minor page faults per call.

#include <dptorch/dptorch.h>

#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include "grad_sample/rules_internal.h"
#include "measure.h"
#include "optim/philox.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <ctime>
#include <functional>
#include <iostream>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace {

namespace gs = dptorch::grad_sample;

int g_reps = 11;

using dptorch::bench::cpu_ms;
using dptorch::bench::median;
using dptorch::bench::page_faults;

// Prints "name  cpu <median> ms  faults <median>/call" for `f`, after one warm-up call.
void measure(const std::string& name, const std::function<void()>& f) {
  f();
  std::vector<double> cpu, faults;
  for (int i = 0; i < g_reps; ++i) {
    const double c0 = cpu_ms(), f0 = page_faults();
    f();
    cpu.push_back(cpu_ms() - c0);
    faults.push_back(page_faults() - f0);
  }
  std::printf("  %-62s cpu %8.2f ms   faults %6.0f/call\n", name.c_str(), median(cpu),
              median(faults));
  std::fflush(stdout);
}

// ------------------------------------------------------------------------------------ conv

struct ConvCase {
  const char* name;
  int64_t batch, channels, size, out_channels, kernel, stride, padding;
};

void conv_cases() {
  const std::vector<ConvCase> cases{{"conv1 of the CNN", 256, 1, 28, 16, 8, 2, 2},
                                    {"conv2 of the CNN", 256, 16, 12, 32, 4, 2, 0},
                                    {"conv1 of the CNN", 1024, 1, 28, 16, 8, 2, 2},
                                    {"conv2 of the CNN", 1024, 16, 12, 32, 4, 2, 0}};
  for (const auto& c : cases) {
    torch::manual_seed(0);
    auto x = torch::randn({c.batch, c.channels, c.size, c.size});
    auto weight = torch::randn({c.out_channels, c.channels, c.kernel, c.kernel});
    const std::vector<int64_t> k{c.kernel, c.kernel}, st{c.stride, c.stride},
        pad{c.padding, c.padding}, dil{1, 1};
    auto g = torch::randn_like(at::convolution(x, weight, {}, st, pad, dil, false, {0, 0}, 1));
    auto w = torch::rand({c.batch});
    const int64_t T = g.size(2) * g.size(3), d = c.channels * c.kernel * c.kernel;
    gs::ConvShape shape{
        c.batch, T, d, c.out_channels, 1, c.channels, c.channels * c.size * c.size, c.kernel, true};
    std::printf("%s, B=%lld: T=%lld d=%lld p=%lld, kAuto takes %s\n", c.name,
                static_cast<long long>(c.batch), static_cast<long long>(T),
                static_cast<long long>(d), static_cast<long long>(c.out_channels),
                gs::to_string(gs::plan_conv(shape, dptorch::NormMethod::kAuto, false).path));
    gs::ConvGeometry geo{k, st, pad, dil, 1};
    auto library = [&] {
      gs::ConvGrads rule({x}, {g}, weight, true, false, geo, dptorch::NormMethod::kAuto);
      return std::make_pair(rule.norm_sq().at(0), rule.weighted_sum({w}).at(0));
    };
    auto norms = [&] {
      gs::ConvGrads rule({x}, {g}, weight, true, false, geo, dptorch::NormMethod::kAuto);
      return rule.norm_sq().at(0);
    };
    std::printf("  (CPU loop vs generic unfold: %s)\n",
                torch::equal(gs::unfold_patches(x, k, st, pad, dil),
                             gs::detail::unfold_patches_generic(x, k, st, pad, dil))
                    ? "equal"
                    : "DIFFERENT");
    measure("library: ConvGrads norm_sq + weighted_sum", [&] { (void)library(); });
    measure("library: ConvGrads norm_sq", [&] { (void)norms(); });
    measure("  unfold_patches of the whole batch (CPU loop)",
            [&] { (void)gs::unfold_patches(x, k, st, pad, dil); });
    measure("  detail::unfold_patches_generic of the whole batch",
            [&] { (void)gs::detail::unfold_patches_generic(x, k, st, pad, dil); });
    measure("  non-private weight gradient (convolution_backward)", [&] {
      (void)at::convolution_backward(g, x, weight, c10::nullopt, st, pad, dil, false, {0, 0}, 1,
                                     {false, true, false});
    });
  }
}

// ------------------------------------------------------------------------------------ embedding

void embedding_cases() {
  const int64_t B = 256, T = 128, V = 20000, D = 64;
  std::printf("Embedding(%lld, %lld), B=%lld, T=%lld (the text row)\n", static_cast<long long>(V),
              static_cast<long long>(D), static_cast<long long>(B), static_cast<long long>(T));
  torch::manual_seed(0);
  auto index = torch::randint(V, {B * T}, torch::kLong);
  auto sample = torch::arange(B, torch::kLong).repeat_interleave(T);
  auto g = torch::randn({B * T, D});
  measure("library: embedding_norm_sq",
          [&] { (void)gs::embedding_norm_sq(index, sample, g, B, V); });
  auto w = torch::rand({B});
  gs::EmbeddingGrads rule(index, sample, g, B, V);
  auto table = torch::zeros({V, D});
  measure("library: EmbeddingGrads::add_weighted_sum_to a kept table", [&] {
    table.zero_();
    rule.add_weighted_sum_to({w}, {table});
  });
  // What DPOptimizer's accumulation does to the table: noise written first, the sum added on it.
  dptorch::optim::PhiloxNoise filler(3);
  measure("library: PhiloxNoise::fill_gaussian_ + add_weighted_sum_to", [&] {
    filler.fill_gaussian_(table, 1.0);
    rule.add_weighted_sum_to({w}, {table});
  });
  // Rows expanded over T, as the gradient of a sum over positions arrives (one row per sample).
  auto g_expanded = (torch::randn({B, 1, D}) / T).expand({B, T, D});
  gs::EmbeddingGrads expanded_rule(index, sample, g_expanded, B, V);
  measure("library: embedding norms of rows expanded over T",
          [&] { (void)expanded_rule.norm_sq(); });
  auto idx2 = index.view({B, T});
  measure("  non-private: embedding_dense_backward", [&] {
    (void)at::embedding_dense_backward(g.view({B, T, D}), idx2, V, -1, false);
  });
  dptorch::optim::PhiloxNoise philox(1);
  dptorch::optim::TorchNoise torch_noise(1);
  measure("noise: PhiloxNoise::gaussian for the [20000, 64] table", [&] {
    (void)philox.gaussian({V, D}, 1.0, g.options());
  });
  measure("noise: PhiloxNoise::add_gaussian_ into the table",
          [&] { philox.add_gaussian_(table, 1.0); });
  // The float generator's code paths side by side (PhiloxNoise takes the fastest).
  const std::pair<dptorch::optim::detail::FillPath, const char*> paths[] = {
      {dptorch::optim::detail::FillPath::kBaseline, "baseline (SSE2)"},
      {dptorch::optim::detail::FillPath::kAvx2, "AVX2"},
      {dptorch::optim::detail::FillPath::kAvx512, "AVX-512"}};
  for (const auto& [path, name] : paths) {
    if (!dptorch::optim::detail::has_fill_path(path)) continue;
    measure(std::string("noise: normal_fill into the table, ") + name + " path", [&] {
      dptorch::optim::detail::normal_fill(path, table.data_ptr<float>(), table.numel(), 0, 1, 0,
                                          1.0f, false);
    });
  }
  measure("noise: TorchNoise::gaussian for the table", [&] {
    (void)torch_noise.gaussian({V, D}, 1.0, g.options());
  });
  measure("noise: TorchNoise::add_gaussian_ into the table",
          [&] { torch_noise.add_gaussian_(table, 1.0); });
}

// ------------------------------------------------------------------------------------ memory

// What a fresh page costs here: a tensor allocated and filled each call, against one reused.
void page_fault_cases() {
  std::printf("fresh pages: allocate + fill a tensor each call, against refilling one\n");
  for (const int64_t mib : {4, 16, 64}) {
    const int64_t n = mib * 1048576 / 4;
    auto kept = torch::empty({n});
    std::printf(" %lld MiB\n", static_cast<long long>(mib));
    measure("allocate + fill", [&] { (void)torch::empty({n}).fill_(1); });
    measure("refill a kept tensor", [&] { kept.fill_(1); });
  }
}

// ------------------------------------------------------------------------------- conv paths

// One convolution layer of a bench row: B samples of [C, H, W] (H = 1: a 1-D convolution),
// p output channels, a k×k kernel (1×k in 1-D).
struct ConvLayer {
  const char* row;
  const char* layer;
  int64_t batch, channels, height, width, out_channels, kernel, stride, padding;
};

// Median wall time in ms of `f` over g_reps calls after one warm-up call.
double wall_ms(const std::function<void()>& f) {
  f();
  std::vector<double> t;
  for (int i = 0; i < g_reps; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    f();
    t.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  return median(t);
}

// Every convolution layer of the rows of bench/dp_step_bench, each path timed (norms and the
// clipped sum), next to the cost model's estimates and choice.
void conv_path_cases() {
  const std::vector<ConvLayer> layers{
      {"cnn-256", "conv1 1→16 8×8 s2 p2, 28×28", 256, 1, 28, 28, 16, 8, 2, 2},
      {"cnn-256", "conv2 16→32 4×4 s2, 12×12", 256, 16, 12, 12, 32, 4, 2, 0},
      {"resnet-64", "stem 3→16 3×3, 32×32", 64, 3, 32, 32, 16, 3, 1, 1},
      {"resnet-64", "stage 1 16→16 3×3, 32×32 (×4)", 64, 16, 32, 32, 16, 3, 1, 1},
      {"resnet-64", "stage 2 16→32 3×3 s2, 32×32", 64, 16, 32, 32, 32, 3, 2, 1},
      {"resnet-64", "shortcut 16→32 1×1 s2, 32×32", 64, 16, 32, 32, 32, 1, 2, 0},
      {"resnet-64", "stage 2 32→32 3×3, 16×16 (×3)", 64, 32, 16, 16, 32, 3, 1, 1},
      {"resnet-64", "stage 3 32→64 3×3 s2, 16×16", 64, 32, 16, 16, 64, 3, 2, 1},
      {"resnet-64", "shortcut 32→64 1×1 s2, 16×16", 64, 32, 16, 16, 64, 1, 2, 0},
      {"resnet-64", "stage 3 64→64 3×3, 8×8 (×3)", 64, 64, 8, 8, 64, 3, 1, 1},
      {"cifar-cnn-256", "conv1 3→32 3×3, 32×32", 256, 3, 32, 32, 32, 3, 1, 1},
      {"cifar-cnn-256", "conv2 32→64 3×3, 16×16", 256, 32, 16, 16, 64, 3, 1, 1},
      {"cifar-cnn-256", "conv3 64→128 3×3, 8×8", 256, 64, 8, 8, 128, 3, 1, 1},
      {"textcnn-64", "Conv1d 128→256 k3, 256", 64, 128, 1, 256, 256, 3, 1, 0},
  };
  std::printf(
      "| row | layer | T | d | p | non-private weight gradient | materialize (kept), grouped | "
      "materialize (kept), tiled | materialize (not kept) | fused | ghost | model: kept allowed | "
      "model: not allowed | fastest (kept allowed) | choice within 3%% |\n|---|---|---:|---:|---:|"
      "---:|---:|---:|---:|---:|---:|---|---|---|---|\n");
  for (const auto& c : layers) {
    torch::manual_seed(0);
    const bool one_d = c.height == 1;
    auto x = one_d ? torch::randn({c.batch, c.channels, c.width})
                   : torch::randn({c.batch, c.channels, c.height, c.width});
    const size_t dims = one_d ? 1 : 2;
    const std::vector<int64_t> k(dims, c.kernel), st(dims, c.stride), pad(dims, c.padding),
        dil(dims, 1);
    std::vector<int64_t> wshape{c.out_channels, c.channels};
    wshape.insert(wshape.end(), k.begin(), k.end());
    auto weight = torch::randn(wshape);
    const std::vector<int64_t> out_pad(k.size(), 0);
    auto g = torch::randn_like(at::convolution(x, weight, {}, st, pad, dil, false, out_pad, 1));
    auto w = torch::rand({c.batch});
    const gs::ConvGeometry geo{k, st, pad, dil, 1};
    auto acc = torch::zeros_like(weight);
    const double np = wall_ms([&] {
      (void)at::convolution_backward(g, x, weight, c10::nullopt, st, pad, dil, false, out_pad, 1,
                                     {false, true, false});
    });
    auto kept_ms = [&](gs::ConvSampleKernel kernel) {
      return wall_ms([&] {
        std::vector<std::vector<torch::Tensor>> samples{
            gs::conv_weight_sample_chunks(x, g, weight, geo, gs::ConvGrads::kChunkBytes, kernel)};
        gs::MaterializedGrads rule({"weight"}, std::move(samples));
        (void)rule.norm_sq();
        rule.add_weighted_sum_to({w}, {acc});
      });
    };
    const double kept_grouped = kept_ms(gs::ConvSampleKernel::kGrouped);
    const double kept_tiled = kept_ms(gs::ConvSampleKernel::kTiled);
    auto path_ms = [&](gs::ConvPath path) {
      return wall_ms([&] {
        gs::ConvGrads rule({x}, {g}, weight, true, false, geo, path);
        (void)rule.norm_sq();
        rule.add_weighted_sum_to({w}, {acc});
      });
    };
    const double mat = path_ms(gs::ConvPath::kMaterialize);
    const double fused = path_ms(gs::ConvPath::kFused);
    const double ghost = path_ms(gs::ConvPath::kGhost);
    gs::ConvGrads probe({x}, {g}, weight, true, false, geo, gs::ConvPath::kGhost);
    const auto shape = probe.shape();
    const auto with_keep = gs::plan_conv(shape, dptorch::NormMethod::kAuto, true);
    const auto without = gs::plan_conv(shape, dptorch::NormMethod::kAuto, false);
    auto measured = [&](const gs::ConvPlan& plan) {
      const double kept = plan.kernel == gs::ConvSampleKernel::kTiled ? kept_tiled : kept_grouped;
      switch (plan.path) {
        case gs::ConvPath::kMaterialize: return plan.keep ? kept : mat;
        case gs::ConvPath::kFused: return fused;
        case gs::ConvPath::kGhost: return ghost;
      }
      return std::nan("");
    };
    const double kept = std::min(kept_grouped, kept_tiled);
    const double best = std::min({kept, fused, ghost});
    const char* fastest = best == kept_grouped ? "materialize, grouped"
                          : best == kept_tiled ? "materialize, tiled"
                          : best == fused      ? "fused"
                                               : "ghost";
    auto choice = [](const gs::ConvPlan& plan) {
      std::string name = gs::to_string(plan.path);
      if (plan.path == gs::ConvPath::kMaterialize) {
        name += plan.kernel == gs::ConvSampleKernel::kTiled ? ", tiled" : ", grouped";
      }
      return name;
    };
    const double best_nokeep = std::min({mat, fused, ghost});
    std::printf(
        "| %s | %s | %lld | %lld | %lld | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %s (%.2f) | %s "
        "(%.2f) | %s | %s, %s |\n",
        c.row, c.layer, static_cast<long long>(shape.positions),
        static_cast<long long>(shape.patch), static_cast<long long>(shape.out_channels), np,
        kept_grouped, kept_tiled, mat, fused, ghost, choice(with_keep).c_str(), measured(with_keep),
        choice(without).c_str(), measured(without), fastest,
        measured(with_keep) <= 1.03 * best ? "yes" : "NO",
        measured(without) <= 1.03 * best_nokeep ? "yes" : "NO");
    std::fflush(stdout);
  }
  std::printf(
      "\nms per call (median wall time): norms and the clipped sum of one layer's weight; "
      "materialize (kept): G_i by the grouped convolution or by the register tile, norms and "
      "Σ w_i G_i from them; (not kept): norms from G_i a chunk at a time (the model's kernel), the "
      "sum by the non-private kernel; fused and "
      "ghost: their norms, the sum by the non-private kernel. The last column: whether the "
      "model's choice with keeping allowed, then without, is within 3%% of the fastest path.\n");
}

}  // namespace

int main(int argc, char** argv) {
  int threads = 1;
  bool no_mmap = false;
  std::string cases = "conv,embedding,pages";  // conv-paths on request
  CLI::App app{"The per-sample gradient rules next to the non-private kernels of the same layers"};
  app.add_option("--threads", threads, "torch::set_num_threads (default 1)")
      ->check(CLI::PositiveNumber);
  app.add_option("--reps", g_reps, "timed calls per measurement (default 11)")
      ->check(CLI::PositiveNumber);
  app.add_option("--cases", cases, "comma-separated: conv, conv-paths, embedding, pages");
  app.add_flag("--malloc-no-mmap", no_mmap,
               "call dptorch::keep_freed_memory() first (glibc: no mmap, no trimming)");
  CLI11_PARSE(app, argc, argv);
  if (no_mmap) {
    dptorch::keep_freed_memory();
  }
  std::set<std::string> chosen;
  std::istringstream in(cases);
  for (std::string c; std::getline(in, c, ',');) {
    if (c != "conv" && c != "conv-paths" && c != "embedding" && c != "pages") {
      std::cerr << "grad_sample_rules_bench: error: unknown case '" << c
                << "'; choose from conv, conv-paths, embedding, pages\n";
      return 2;
    }
    chosen.insert(c);
  }
  torch::set_num_threads(threads);
  std::printf("threads %d, allocator: glibc malloc%s, %d timed calls each\n\n", threads,
              no_mmap ? " without mmap or trimming" : " (default settings)", g_reps);
  if (chosen.count("conv")) conv_cases();
  if (chosen.count("conv-paths")) conv_path_cases();
  if (chosen.count("embedding")) embedding_cases();
  if (chosen.count("pages")) page_fault_cases();
  return 0;
}
