// grad_sample_rules_bench: the per-sample gradient rules of dptorch::grad_sample, one layer at a
// time, next to the alternatives that docs/performance.md proposes, so that each proposal's gain
// can be re-measured. Every alternative is checked against the library's result first.
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

#include <sys/resource.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <ctime>
#include <functional>
#include <iostream>
#include <set>
#include <sstream>
#include <string>
#include <vector>

namespace {

namespace gs = dptorch::grad_sample;

int g_reps = 11;

double cpu_ms() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) * 1e-6;
}

double minor_faults() {
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_minflt);
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Prints "name  cpu <median> ms  faults <median>/call" for `f`, after one warm-up call.
void measure(const std::string& name, const std::function<void()>& f) {
  f();
  std::vector<double> cpu, faults;
  for (int i = 0; i < g_reps; ++i) {
    const double c0 = cpu_ms(), f0 = minor_faults();
    f();
    cpu.push_back(cpu_ms() - c0);
    faults.push_back(minor_faults() - f0);
  }
  std::printf("  %-62s cpu %8.2f ms   faults %6.0f/call\n", name.c_str(), median(cpu),
              median(faults));
  std::fflush(stdout);
}

// Largest |a - b| relative to the largest |a|.
double rel_diff(const torch::Tensor& a, const torch::Tensor& b) {
  return ((a - b.view_as(a)).abs().max() / a.abs().max().clamp_min(1e-30)).item<double>();
}

// ------------------------------------------------------------------------------------ conv

struct ConvCase {
  const char* name;
  int64_t batch, channels, size, out_channels, kernel, stride, padding;
};

// Proposal for ConvImpl::make_grads + LinearLikeGrads: per-sample norms from the unfolded
// patches of a few samples at a time (so that no [B, T, C·k²] tensor is ever whole), and the
// clipped sum as the weight gradient of the convolution for grad_output scaled per sample.
std::pair<torch::Tensor, torch::Tensor> conv_proposal(const torch::Tensor& x,
                                                      const torch::Tensor& weight,
                                                      const torch::Tensor& g,
                                                      const torch::Tensor& w, const ConvCase& c,
                                                      bool materialize) {
  const int64_t B = x.size(0), T = g.size(2) * g.size(3);
  const int64_t d = c.channels * c.kernel * c.kernel, p = c.out_channels;
  // Samples per chunk: the chunk's largest temporary stays under 4 MiB.
  const int64_t per_sample = std::max(d * T, materialize ? p * d : T * T);
  const int64_t chunk = std::max<int64_t>(1, (int64_t{4} << 20) / (4 * per_sample));
  std::vector<torch::Tensor> parts;
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t b1 = std::min(B, b0 + chunk);
    auto a = gs::unfold_patches(x.slice(0, b0, b1), {c.kernel, c.kernel}, {c.stride, c.stride},
                                {c.padding, c.padding}, {1, 1});  // [b, T, d]
    auto gc = g.slice(0, b0, b1).flatten(2);                      // [b, p, T]
    if (materialize) {
      parts.push_back(at::linalg_vector_norm(torch::bmm(gc, a).flatten(1), 2, {1}).square());
    } else {
      auto gram_a = torch::bmm(a, a.transpose(1, 2));
      auto gram_g = torch::bmm(gc.transpose(1, 2), gc);
      parts.push_back(gram_a.mul_(gram_g).flatten(1).sum(1));
    }
  }
  auto sum = std::get<1>(at::convolution_backward(g * w.view({B, 1, 1, 1}), x, weight, c10::nullopt,
                                                  {c.stride, c.stride}, {c.padding, c.padding},
                                                  {1, 1}, false, {0, 0}, 1, {false, true, false}));
  return {torch::cat(parts), sum};
}

void conv_cases() {
  const std::vector<ConvCase> cases{{"conv1 of the CNN", 256, 1, 28, 16, 8, 2, 2},
                                    {"conv2 of the CNN", 256, 16, 12, 32, 4, 2, 0},
                                    {"conv1 of the CNN", 1024, 1, 28, 16, 8, 2, 2},
                                    {"conv2 of the CNN", 1024, 16, 12, 32, 4, 2, 0}};
  for (const auto& c : cases) {
    torch::manual_seed(0);
    auto x = torch::randn({c.batch, c.channels, c.size, c.size});
    auto weight = torch::randn({c.out_channels, c.channels, c.kernel, c.kernel});
    auto g = torch::randn_like(at::convolution(x, weight, {}, {c.stride, c.stride},
                                               {c.padding, c.padding}, {1, 1}, false, {0, 0}, 1));
    auto w = torch::rand({c.batch});
    const int64_t T = g.size(2) * g.size(3), d = c.channels * c.kernel * c.kernel;
    const bool mat = gs::materialize_is_cheaper(T, d, c.out_channels);
    std::printf("%s, B=%lld: T=%lld d=%lld p=%lld, kAuto %s\n", c.name,
                static_cast<long long>(c.batch), static_cast<long long>(T),
                static_cast<long long>(d), static_cast<long long>(c.out_channels),
                mat ? "materializes" : "uses ghost norms");
    auto current = [&] {
      gs::LinearLikeGrads rule(gs::unfold_patches(x, {c.kernel, c.kernel}, {c.stride, c.stride},
                                                  {c.padding, c.padding}, {1, 1}),
                               g.flatten(2).transpose(1, 2), 1, weight.sizes().vec(),
                               /*has_bias=*/false, dptorch::NormMethod::kAuto);
      return std::make_pair(rule.norm_sq().at(0), rule.weighted_sum({w}).at(0));
    };
    const auto [n0, s0] = current();
    const auto [n1, s1] = conv_proposal(x, weight, g, w, c, mat);
    std::printf("  (proposal vs library: norms rel. diff %.1e, clipped sum rel. diff %.1e)\n",
                rel_diff(n0, n1), rel_diff(s0, s1));
    measure("library: unfold_patches + norm_sq + weighted_sum", [&] { (void)current(); });
    measure("proposal: chunked unfold norms + conv-backward clipped sum",
            [&] { (void)conv_proposal(x, weight, g, w, c, mat); });
    measure("  unfold_patches alone", [&] {
      (void)gs::unfold_patches(x, {c.kernel, c.kernel}, {c.stride, c.stride},
                               {c.padding, c.padding}, {1, 1});
    });
    measure("  non-private weight gradient (convolution_backward)", [&] {
      (void)at::convolution_backward(g, x, weight, c10::nullopt, {c.stride, c.stride},
                                     {c.padding, c.padding}, {1, 1}, false, {0, 0}, 1,
                                     {false, true, false});
    });
  }
}

// ------------------------------------------------------------------------------------ norms

// LinearLikeGrads::norm_sq of materialised per-sample gradients squares a copy of them first.
void materialized_norm_cases() {
  std::printf("norm of materialised per-sample gradients [B, p, d]\n");
  for (const auto& shape : std::vector<std::vector<int64_t>>{{1024, 32, 256}, {64, 128, 128}}) {
    auto samples = torch::randn(shape);
    std::ostringstream name;
    name << samples.sizes();
    std::printf(" %s (%.1f MB)\n", name.str().c_str(),
                static_cast<double>(samples.numel()) * 4 / 1048576);
    const auto a = samples.flatten(1).square().sum(1);
    const auto b = at::linalg_vector_norm(samples.flatten(1), 2, {1}).square();
    std::printf("  (rel. diff %.1e)\n", rel_diff(a, b));
    measure("library: flatten(1).square().sum(1)",
            [&] { (void)samples.flatten(1).square().sum(1); });
    measure("proposal: linalg_vector_norm(flatten(1), 2, {1}).square()",
            [&] { (void)at::linalg_vector_norm(samples.flatten(1), 2, {1}).square(); });
  }
}

// ------------------------------------------------------------------------------------ embedding

// Proposal for embedding_norm_sq: sort the (sample, row) keys so that equal keys are adjacent;
// unique_consecutive then gives a monotone inverse, and the scatter-add walks memory in order.
torch::Tensor embedding_norm_sq_sorted(const torch::Tensor& index, const torch::Tensor& sample,
                                       const torch::Tensor& g, int64_t batch_size,
                                       int64_t num_embeddings) {
  auto key = sample * num_embeddings + index;
  auto [sorted, order] = key.sort();
  auto [keys, inverse, counts] = at::unique_consecutive(sorted, /*return_inverse=*/true);
  (void)counts;
  auto summed = torch::zeros({keys.size(0), g.size(1)}, g.options())
                    .index_add_(0, inverse, g.index_select(0, order));
  return torch::zeros({batch_size}, g.options())
      .index_add_(0, keys.div(num_embeddings, "floor"), summed.square().sum(1));
}

void embedding_cases() {
  const int64_t B = 256, T = 128, V = 20000, D = 64;
  std::printf("Embedding(%lld, %lld), B=%lld, T=%lld (the text row)\n", static_cast<long long>(V),
              static_cast<long long>(D), static_cast<long long>(B), static_cast<long long>(T));
  torch::manual_seed(0);
  auto index = torch::randint(V, {B * T}, torch::kLong);
  auto sample = torch::arange(B, torch::kLong).repeat_interleave(T);
  auto g = torch::randn({B * T, D});
  std::printf("  (rel. diff %.1e)\n", rel_diff(gs::embedding_norm_sq(index, sample, g, B, V),
                                               embedding_norm_sq_sorted(index, sample, g, B, V)));
  measure("library: embedding_norm_sq (_unique2, unsorted)",
          [&] { (void)gs::embedding_norm_sq(index, sample, g, B, V); });
  measure("proposal: sort + unique_consecutive",
          [&] { (void)embedding_norm_sq_sorted(index, sample, g, B, V); });
  auto w = torch::rand({B});
  gs::EmbeddingGrads rule(index, sample, g, B, V);
  measure("library: EmbeddingGrads::weighted_sum", [&] { (void)rule.weighted_sum({w}); });
  auto idx2 = index.view({B, T});
  measure("  non-private: embedding_dense_backward", [&] {
    (void)at::embedding_dense_backward(g.view({B, T, D}), idx2, V, -1, false);
  });
  dptorch::optim::TorchNoise noise(1);
  measure("noise: TorchNoise::gaussian for the [20000, 64] table", [&] {
    (void)noise.gaussian({V, D}, 1.0, g.options());
  });
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

}  // namespace

int main(int argc, char** argv) {
  int threads = 1;
  bool no_mmap = false;
  std::string cases = "conv,norm,embedding,pages";
  CLI::App app{
      "The per-sample gradient rules next to the alternatives docs/performance.md "
      "proposes"};
  app.add_option("--threads", threads, "torch::set_num_threads (default 1)")
      ->check(CLI::PositiveNumber);
  app.add_option("--reps", g_reps, "timed calls per measurement (default 11)")
      ->check(CLI::PositiveNumber);
  app.add_option("--cases", cases, "comma-separated: conv, norm, embedding, pages");
  app.add_flag("--malloc-no-mmap", no_mmap,
               "call dptorch::keep_freed_memory() first (glibc: no mmap, no trimming)");
  CLI11_PARSE(app, argc, argv);
  if (no_mmap) {
    dptorch::keep_freed_memory();
  }
  std::set<std::string> chosen;
  std::istringstream in(cases);
  for (std::string c; std::getline(in, c, ',');) {
    if (c != "conv" && c != "norm" && c != "embedding" && c != "pages") {
      std::cerr << "grad_sample_rules_bench: error: unknown case '" << c
                << "'; choose from conv, norm, embedding, pages\n";
      return 2;
    }
    chosen.insert(c);
  }
  torch::set_num_threads(threads);
  std::printf("threads %d, allocator: glibc malloc%s, %d timed calls each\n\n", threads,
              no_mmap ? " without mmap or trimming" : " (default settings)", g_reps);
  if (chosen.count("conv")) conv_cases();
  if (chosen.count("norm")) materialized_norm_cases();
  if (chosen.count("embedding")) embedding_cases();
  if (chosen.count("pages")) page_fault_cases();
  return 0;
}
