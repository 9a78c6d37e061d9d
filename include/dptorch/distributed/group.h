#pragma once

#include <torch/arg.h>
#include <torch/types.h>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace dptorch::distributed {

/// Where the ranks of a job meet, and how long they wait for one another: the values of
/// torchrun's environment (options_from_environment()), or set by hand.
/// Example: `GroupOptions().rank(1).world_size(2).master_port(29500)`
struct GroupOptions {
  /// This process's rank in [0, world_size).
  TORCH_ARG(int64_t, rank) = 0;
  /// The number of processes in the job (>= 1).
  TORCH_ARG(int64_t, world_size) = 1;
  /// The rank among the processes of this host (informational; a device index on CUDA builds).
  TORCH_ARG(int64_t, local_rank) = 0;
  /// The host of rank 0, which serves the job's key-value store (c10d::TCPStore).
  TORCH_ARG(std::string, master_addr) = "127.0.0.1";
  /// The store's TCP port on master_addr, in [1, 65535].
  TORCH_ARG(int64_t, master_port) = 29500;
  /// How long rendezvous, a collective or a barrier waits for the slowest rank; past it the job
  /// stops with an error that names the rank(s) missing.
  TORCH_ARG(std::chrono::milliseconds, timeout) = std::chrono::seconds(60);
};

/// Whether this process was started as part of a distributed job: WORLD_SIZE is set.
[[nodiscard]] bool environment_is_distributed();

/// GroupOptions from torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (all
/// required), LOCAL_RANK (default: RANK); an error naming the variable that is missing or
/// malformed. `timeout` is kept as given.
[[nodiscard]] GroupOptions options_from_environment(
    std::chrono::milliseconds timeout = std::chrono::seconds(60));

/// A rank of the job failed, died or hung: the error every other rank stops with.
class RankFailure : public std::runtime_error {
 public:
  RankFailure(const std::string& message, int64_t failed_rank)
      : std::runtime_error(message), failed_rank_(failed_rank) {}
  /// The rank that failed, died or hung (-1 if it could not be told).
  [[nodiscard]] int64_t failed_rank() const noexcept { return failed_rank_; }

 private:
  int64_t failed_rank_;
};

/// Counters of a group's traffic, for measurements.
struct GroupStats {
  int64_t collectives = 0;            // all-reduces, broadcasts and barriers
  int64_t bytes_reduced = 0;          // payload of all_reduce_sum() and all_reduce_max()
  double seconds_in_collectives = 0;  // wall time inside them, waiting for peers included
};

/// The ranks of one distributed job over torch's c10d (docs/design.md §6): a c10d::ProcessGroup
/// for the collectives (ProcessGroupGloo from connect()) and the job's c10d::Store. Every
/// collective names the rank that is missing when it fails: each rank's heartbeat thread
/// publishes in the store which collective the rank reached and a beat counter (every 0.2 s, on
/// a connection of its own, so that a collective itself costs no store round trip), and a
/// failure is told apart as a rank that stopped with an error, died, or hangs. The first rank to
/// name a culprit publishes it, and the ranks that fail after it name the same one.
///
/// All ranks must call the collectives in the same order, as with any process group.
///
/// Example (every rank, started by torchrun or `dptrain --nproc`):
///   auto group = dptorch::distributed::Group::connect(
///       dptorch::distributed::options_from_environment());
///   std::vector<torch::Tensor> bucket{grads};
///   group->all_reduce_sum(bucket);
class Group {
 public:
  /// Rendezvous over a c10d::TCPStore served by rank 0 at master_addr:master_port, then a
  /// ProcessGroupGloo over TCP. Errors name what went wrong: the port in use on rank 0, rank 0
  /// unreachable, or ranks missing after `timeout`. Ignores SIGPIPE if it has its default action
  /// (Gloo's sockets would otherwise kill this process silently when a peer dies).
  [[nodiscard]] static std::shared_ptr<Group> connect(const GroupOptions& options);

  /// Wraps an existing process group (any backend) and the store its ranks share; `heartbeat`
  /// is a second connection to that store for the heartbeat thread (null: no heartbeat, and a
  /// dead rank is reported as one that did not arrive).
  Group(c10::intrusive_ptr<c10d::Store> store, c10::intrusive_ptr<c10d::ProcessGroup> group,
        std::chrono::milliseconds timeout, c10::intrusive_ptr<c10d::Store> heartbeat = {});
  ~Group();
  Group(const Group&) = delete;
  Group& operator=(const Group&) = delete;

  /// This process's rank.
  [[nodiscard]] int64_t rank() const noexcept { return rank_; }
  /// The number of ranks.
  [[nodiscard]] int64_t world_size() const noexcept { return world_size_; }
  /// The collectives' timeout.
  [[nodiscard]] std::chrono::milliseconds timeout() const noexcept { return timeout_; }

  /// Sums `tensors` element-wise over all ranks, in place, one collective per tensor; every
  /// rank ends with the same bits. A RankFailure if a rank fails, dies or hangs.
  void all_reduce_sum(std::vector<torch::Tensor>& tensors);
  /// The element-wise maximum over all ranks of `tensor`, in place.
  void all_reduce_max(torch::Tensor& tensor);
  /// Whether `flag` is true on any rank (one small collective).
  [[nodiscard]] bool any(bool flag);
  /// Waits until every rank has arrived.
  void barrier();
  /// Rank `root`'s `bytes` on every rank.
  [[nodiscard]] std::string broadcast(const std::string& bytes, int64_t root = 0);
  /// On rank `root`, every rank's `bytes` in rank order; elsewhere empty. Through the store.
  [[nodiscard]] std::vector<std::string> gather(const std::string& bytes, int64_t root = 0);

  /// Tells the other ranks that this one stops with `message` (their next collective fails with
  /// it instead of waiting for the timeout). For error handlers; never throws.
  void fail(const std::string& message) noexcept;

  /// Traffic so far.
  [[nodiscard]] const GroupStats& stats() const noexcept { return stats_; }
  /// The c10d process group.
  [[nodiscard]] c10d::ProcessGroup& process_group() { return *group_; }
  /// The job's store.
  [[nodiscard]] c10d::Store& store() { return *store_; }

 private:
  // Marks arrival at the next collective (named `what`) and returns its number.
  int64_t arrive(const char* what);
  // Runs `work` as collective `seq`; turns a failure into a RankFailure naming the rank.
  template <typename Work>
  void collective(const char* what, int64_t bytes, Work&& work);
  // The RankFailure for collective `seq` that failed with `cause`.
  [[nodiscard]] RankFailure diagnose(const char* what, int64_t seq, const std::string& cause);

  c10::intrusive_ptr<c10d::Store> store_;
  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  c10::intrusive_ptr<c10d::Store> heartbeat_store_;
  std::chrono::milliseconds timeout_;
  int64_t rank_;
  int64_t world_size_;
  int64_t seq_ = 0;
  std::atomic<int64_t> reached_{0};  // the last collective this rank arrived at
  int64_t gathers_ = 0;
  GroupStats stats_;
  std::atomic<bool> stop_{false};
  std::thread heartbeat_;
};

/// Ends this process after a distributed failure, with `status`, without running destructors
/// (a process group's may wait on peers that are gone): flushes std::cout and std::cerr, marks
/// this rank as gone in the store, and on rank 0 first keeps the job's store up until every rank
/// but `culprit` (RankFailure::failed_rank(), or this rank for its own error) has gone, for at
/// most 5 s, so that they can still name the culprit. For a program's error handler.
[[noreturn]] void exit_after_failure(const std::shared_ptr<Group>& group, int status,
                                     int64_t culprit);

/// A TCP port on `host` (an address of this machine) that was free a moment ago: the kernel's
/// choice for port 0. For starting a job on one host (dptrain --nproc); another program may take
/// it before the job's store binds it, and then Group::connect says the port is in use.
[[nodiscard]] int64_t free_port(const std::string& host = "127.0.0.1");

/// A seed for rank `rank`'s own randomness (dropout, augmentation) derived from the job's `seed`:
/// distinct per rank, and the same whichever order the ranks start in.
[[nodiscard]] uint64_t rank_seed(uint64_t seed, int64_t rank);

}  // namespace dptorch::distributed
