// allreduce_bench: what one distributed DP-SGD step's all-reduce costs by itself, on this host.
// Starts --nproc ranks (processes, one thread each) on 127.0.0.1; each round is a barrier, so
// that no rank waits for a slower one, then one all-reduce of a float bucket, timed on rank 0.
// Reported per bucket size: the median of the c10d all-reduce alone and of dptorch's
// Group::all_reduce_sum (the same plus the arrival mark that lets a failure name its rank).
#include <dptorch/distributed/group.h>

#include <torch/torch.h>
#include <CLI/CLI.hpp>

#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <vector>

namespace {

using Clock = std::chrono::steady_clock;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int rank_main(int rank, int world, int port, int rounds) {
  torch::set_num_threads(1);
  auto group = dptorch::distributed::Group::connect(
      dptorch::distributed::GroupOptions().rank(rank).world_size(world).master_port(port));
  // 26010 floats: the gradient of dptrain's cnn (104 040 bytes); then 1 MB and 16 MB buckets.
  for (const int64_t n : {int64_t{26010}, int64_t{1} << 18, int64_t{1} << 22}) {
    std::vector<torch::Tensor> bucket{torch::randn({n})};
    std::vector<double> raw, ours;
    for (int r = 0; r < rounds; ++r) {
      group->barrier();
      auto t0 = Clock::now();
      group->process_group().allreduce(bucket)->wait();
      raw.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
      group->barrier();
      t0 = Clock::now();
      group->all_reduce_sum(bucket);
      ours.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
    }
    if (rank == 0) {
      std::printf("| %d | %lld | %.0f | %.0f | %.2f |\n", world, static_cast<long long>(n * 4),
                  median(raw), median(ours), static_cast<double>(n * 4) / median(raw) / 1e3);
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"allreduce_bench: the cost of one gradient all-reduce over c10d on 127.0.0.1"};
  int nproc = 2, rounds = 200;
  app.add_option("--nproc", nproc, "ranks (processes)")->check(CLI::Range(2, 64));
  app.add_option("--rounds", rounds, "timed all-reduces per size")->check(CLI::PositiveNumber);
  CLI11_PARSE(app, argc, argv);
  const int port = static_cast<int>(dptorch::distributed::free_port());
  std::printf(
      "| ranks | bucket bytes | c10d all-reduce µs (median) | Group::all_reduce_sum µs | "
      "GB/s |\n|---|---|---|---|---|\n");
  std::fflush(stdout);
  std::vector<pid_t> children;
  for (int rank = 1; rank < nproc; ++rank) {
    const pid_t pid = ::fork();
    if (pid == 0) ::_exit(rank_main(rank, nproc, port, rounds));
    children.push_back(pid);
  }
  const int status = rank_main(0, nproc, port, rounds);
  for (pid_t pid : children) ::waitpid(pid, nullptr, 0);
  return status;
}
