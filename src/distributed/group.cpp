#include <dptorch/distributed/group.h>

#include <dptorch/common.h>

// torch's ProcessGroupGloo.hpp declares its class only for builds with Gloo, which torch's own
// build flags say; the libtorch this links has it (its headers need the gloo/ ones).
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO
#endif
#include <torch/torch.h>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>

namespace dptorch::distributed {
namespace {

using Clock = std::chrono::steady_clock;
using dptorch::detail::first_line;
// The heartbeat's period, and how long a diagnosis watches for beats.
constexpr auto kBeat = std::chrono::milliseconds(200);
constexpr auto kWatch = std::chrono::milliseconds(1000);
// How long the heartbeat and a diagnosis wait for the store to answer (its host may hang).
constexpr auto kStoreReply = std::chrono::milliseconds(3000);

std::string seconds(std::chrono::milliseconds ms) {
  std::ostringstream out;
  out << static_cast<double>(ms.count()) / 1000 << " s";
  return out.str();
}

std::vector<uint8_t> bytes_of(const std::string& s) { return {s.begin(), s.end()}; }
std::string string_of(const std::vector<uint8_t>& v) { return {v.begin(), v.end()}; }

std::string arrived_key(int64_t rank) { return "dptorch/arrived/" + std::to_string(rank); }
std::string beat_key(int64_t rank) { return "dptorch/beat/" + std::to_string(rank); }
std::string failed_key(int64_t rank) { return "dptorch/failed/" + std::to_string(rank); }
// The first diagnosis of a failure: "<rank> <message>", so that every rank names the same one.
const char* const kCulpritKey = "dptorch/culprit";

int64_t env_int(const char* name, int64_t lo, int64_t hi) {
  const char* value = std::getenv(name);
  TORCH_CHECK_VALUE(value != nullptr && *value != '\0', "environment variable ", name,
                    " is not set; a distributed job needs RANK, WORLD_SIZE, MASTER_ADDR and "
                    "MASTER_PORT (torchrun and dptrain --nproc set them)");
  char* end = nullptr;
  errno = 0;
  const long long v = std::strtoll(value, &end, 10);
  TORCH_CHECK_VALUE(errno == 0 && end != value && *end == '\0' && v >= lo && v <= hi,
                    "environment variable ", name, " is '", value, "'; it must be an integer in [",
                    lo, ", ", hi, "]");
  return v;
}

bool is_loopback(const std::string& host) {
  return host == "localhost" || host.rfind("127.", 0) == 0 || host == "::1";
}

}  // namespace

bool environment_is_distributed() { return std::getenv("WORLD_SIZE") != nullptr; }

GroupOptions options_from_environment(std::chrono::milliseconds timeout) {
  GroupOptions options;
  const int64_t world = env_int("WORLD_SIZE", 1, 1 << 20);
  options.world_size(world).rank(env_int("RANK", 0, world - 1));
  const char* addr = std::getenv("MASTER_ADDR");
  TORCH_CHECK_VALUE(addr != nullptr && *addr != '\0',
                    "environment variable MASTER_ADDR is not set; a distributed job needs RANK, "
                    "WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun and dptrain --nproc set "
                    "them)");
  options.master_addr(addr).master_port(env_int("MASTER_PORT", 1, 65535));
  options.local_rank(std::getenv("LOCAL_RANK") ? env_int("LOCAL_RANK", 0, world - 1)
                                               : options.rank());
  options.timeout(timeout);
  return options;
}

int64_t free_port(const std::string& host) {
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  TORCH_CHECK_VALUE(::inet_pton(AF_INET, host.c_str(), &addr.sin_addr) == 1, "free_port: '", host,
                    "' is not an IPv4 address of this machine");
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  TORCH_CHECK(fd >= 0, "free_port: cannot open a socket: ", std::strerror(errno));
  socklen_t len = sizeof addr;
  const bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  const int err = errno;
  ::close(fd);
  TORCH_CHECK(ok, "free_port: cannot bind a port on ", host, ": ", std::strerror(err));
  return ntohs(addr.sin_port);
}

uint64_t rank_seed(uint64_t seed, int64_t rank) {
  // splitmix64 of the seed, mixed with the rank, mixed again: rank 0 does not get `seed` itself.
  auto mix = [](uint64_t z) {
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  };
  return mix(mix(seed) ^ (static_cast<uint64_t>(rank) + 1));
}

std::shared_ptr<Group> Group::connect(const GroupOptions& options) {
  const int64_t world = options.world_size();
  const int64_t rank = options.rank();
  TORCH_CHECK_VALUE(world >= 1, "world_size must be >= 1, got ", world);
  TORCH_CHECK_VALUE(rank >= 0 && rank < world, "rank must be in [0, world_size = ", world,
                    "), got ", rank);
  TORCH_CHECK_VALUE(options.master_port() >= 1 && options.master_port() <= 65535,
                    "master_port must be in [1, 65535], got ", options.master_port());
  TORCH_CHECK_VALUE(options.timeout().count() > 0, "timeout must be positive");
  // Gloo writes to sockets without MSG_NOSIGNAL: a peer that dies would kill this process with
  // SIGPIPE, silently, instead of failing the collective with an error that names it.
  struct sigaction pipe_action {};
  if (::sigaction(SIGPIPE, nullptr, &pipe_action) == 0 && pipe_action.sa_handler == SIG_DFL) {
    std::signal(SIGPIPE, SIG_IGN);
  }
  const std::string& addr = options.master_addr();
  const auto where = addr + ":" + std::to_string(options.master_port());

  c10d::TCPStoreOptions store_options;
  store_options.port = static_cast<uint16_t>(options.master_port());
  store_options.isServer = rank == 0;
  store_options.numWorkers = static_cast<size_t>(world);
  store_options.waitWorkers = true;
  store_options.timeout = options.timeout();
  c10::intrusive_ptr<c10d::Store> store;
  try {
    store = c10::make_intrusive<c10d::TCPStore>(addr, store_options);
  } catch (const std::exception& e) {
    const std::string what = e.what();
    TORCH_CHECK(rank != 0 || what.find("in use") == std::string::npos,
                "rank 0 cannot serve the job's store on ", where,
                ": the port is in use (another job or program holds it); choose another "
                "MASTER_PORT (dptrain: --master-port)");
    if (rank == 0) {
      TORCH_CHECK(false, "rank 0 served the job's store on ", where, " but not all ", world,
                  " ranks connected within ", seconds(options.timeout()),
                  ": start every rank with the same MASTER_ADDR and MASTER_PORT (",
                  first_line(what), ")");
    }
    TORCH_CHECK(false, "rank ", rank, " could not reach rank 0's store at ", where, " within ",
                seconds(options.timeout()),
                ": start rank 0, and check MASTER_ADDR and MASTER_PORT (", first_line(what), ")");
  }

  auto gloo_options = c10d::ProcessGroupGloo::Options::create(options.timeout());
  if (const char* ifname = std::getenv("GLOO_SOCKET_IFNAME")) {
    gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(ifname));
  } else if (is_loopback(addr)) {
    gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
  } else {
    gloo_options->devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
  }
  c10::intrusive_ptr<c10d::ProcessGroup> group;
  try {
    group = c10::make_intrusive<c10d::ProcessGroupGloo>(store, static_cast<int>(rank),
                                                        static_cast<int>(world), gloo_options);
  } catch (const std::exception& e) {
    TORCH_CHECK(false, "rank ", rank, " could not connect to the other ranks of the job at ", where,
                " within ", seconds(options.timeout()), ": ", first_line(e.what()));
  }
  // The heartbeat has its own connection, so that it never waits behind a long store call.
  c10d::TCPStoreOptions beat_options;
  beat_options.port = store_options.port;
  beat_options.isServer = false;
  beat_options.waitWorkers = false;
  beat_options.timeout = options.timeout();
  auto beat_store = c10::make_intrusive<c10d::TCPStore>(addr, beat_options);
  return std::make_shared<Group>(std::move(store), std::move(group), options.timeout(),
                                 std::move(beat_store));
}

Group::Group(c10::intrusive_ptr<c10d::Store> store, c10::intrusive_ptr<c10d::ProcessGroup> group,
             std::chrono::milliseconds timeout, c10::intrusive_ptr<c10d::Store> heartbeat)
    : store_(std::move(store)),
      group_(std::move(group)),
      heartbeat_store_(std::move(heartbeat)),
      timeout_(timeout),
      rank_(group_ ? group_->getRank() : 0),
      world_size_(group_ ? group_->getSize() : 1) {
  TORCH_CHECK_VALUE(store_ && group_, "Group needs a store and a process group");
  store_->set(arrived_key(rank_), bytes_of("0"));
  if (heartbeat_store_) {
    // A wait on a key that exists returns at once and leaves this connection's receive timeout
    // at kStoreReply (torch's TCPStore sets it only in waits): a hung store host then fails the
    // heartbeat's calls instead of blocking them, and the destructor's join, forever.
    heartbeat_store_->wait({arrived_key(rank_)}, kStoreReply);
    heartbeat_ = std::thread([this] {
      try {
        int64_t published = 0;
        while (!stop_.load()) {
          // The collective this rank reached, published here rather than by the collective
          // itself, so that a collective costs no store round trip.
          const int64_t reached = reached_.load();
          if (reached != published) {
            heartbeat_store_->set(arrived_key(rank_), bytes_of(std::to_string(reached)));
            published = reached;
          }
          heartbeat_store_->add(beat_key(rank_), 1);
          std::this_thread::sleep_for(kBeat);
        }
      } catch (const std::exception&) {
        // The store is gone (rank 0 ended) or does not answer: nothing left to beat for.
      }
    });
  }
}

Group::~Group() {
  stop_ = true;
  if (heartbeat_.joinable()) heartbeat_.join();
}

int64_t Group::arrive(const char* what) {
  const int64_t seq = ++seq_;
  reached_ = seq;
  if (heartbeat_store_) return seq;  // the heartbeat publishes it
  try {
    store_->set(arrived_key(rank_), bytes_of(std::to_string(seq)));
  } catch (const std::exception& e) {
    throw diagnose(what, seq, e.what());
  }
  return seq;
}

template <typename Work>
void Group::collective(const char* what, int64_t bytes, Work&& work) {
  const auto start = Clock::now();
  const int64_t seq = arrive(what);
  try {
    auto job = work();
    job->wait(timeout_);
  } catch (const RankFailure&) {
    throw;
  } catch (const std::exception& e) {
    throw diagnose(what, seq, e.what());
  }
  ++stats_.collectives;
  stats_.bytes_reduced += bytes;
  stats_.seconds_in_collectives += std::chrono::duration<double>(Clock::now() - start).count();
}

RankFailure Group::diagnose(const char* what, int64_t seq, const std::string& cause) {
  const std::string here = std::string(what) + " #" + std::to_string(seq) + " (rank " +
                           std::to_string(rank_) + " of " + std::to_string(world_size_) + ")";
  // Publishes the culprit found here, so that ranks that fail later (not neighbours of the
  // culprit in Gloo's ring) name the same one.
  auto found = [&](int64_t culprit, const std::string& message) {
    try {
      if (!store_->check({kCulpritKey})) {
        store_->set(kCulpritKey, bytes_of(std::to_string(culprit) + " " + message));
      }
    } catch (const std::exception&) {
      // The store went away meanwhile: the others will name rank 0 or find the culprit alone.
    }
    return RankFailure(message, culprit);
  };
  try {
    // As in the constructor: the store's answers must come within kStoreReply from here on.
    store_->wait({arrived_key(rank_)}, kStoreReply);
    // Another rank found the culprit first.
    if (store_->check({kCulpritKey})) {
      const std::string entry = string_of(store_->get(kCulpritKey));
      const auto space = entry.find(' ');
      const int64_t culprit = std::stoll(entry.substr(0, space));
      return RankFailure(entry.substr(space + 1) + " [seen from rank " + std::to_string(rank_) +
                             " at " + here + "]",
                         culprit);
    }
    // A rank that stopped with an error said so.
    for (int64_t r = 0; r < world_size_; ++r) {
      if (r != rank_ && store_->check({failed_key(r)})) {
        return found(r, "rank " + std::to_string(r) + " stopped with an error: " +
                            string_of(store_->get(failed_key(r))) + " [at " + here + "]");
      }
    }
    // A rank whose heartbeat stands still died or hangs; one that is alive but did not arrive
    // is stuck elsewhere. (Watching the beats for kWatch also lets each live rank's heartbeat
    // publish the collective it reached.)
    auto beats = [&] {
      std::vector<int64_t> b(static_cast<size_t>(world_size_), -1);
      for (int64_t r = 0; r < world_size_; ++r) {
        if (heartbeat_store_ && r != rank_) b[static_cast<size_t>(r)] = store_->add(beat_key(r), 0);
      }
      return b;
    };
    const auto before = beats();
    if (heartbeat_store_) std::this_thread::sleep_for(kWatch);
    const auto after = beats();
    // A silent rank is named before a lagging one: a rank that waits on the dead one in another
    // part of Gloo's ring may lag behind without being the cause.
    for (const bool want_silent : {true, false}) {
      for (int64_t r = 0; r < world_size_; ++r) {
        if (r == rank_) continue;
        const int64_t reached = std::stoll(string_of(store_->get(arrived_key(r))));
        const bool silent =
            heartbeat_store_ && before[static_cast<size_t>(r)] == after[static_cast<size_t>(r)];
        if (silent != want_silent) continue;
        if (silent || reached < seq) {
          std::string state = silent ? "died or hangs (no heartbeat for " + seconds(kWatch) + ")"
                                     : "is alive but did not arrive within " + seconds(timeout_);
          return found(r, "rank " + std::to_string(r) + " " + state +
                              "; its heartbeat last reported " + "collective #" +
                              std::to_string(reached) + ", this rank waited at " + here + ": " +
                              first_line(cause));
        }
      }
    }
  } catch (const std::exception&) {
    if (rank_ != 0) {
      return RankFailure(
          "rank 0, which serves the job's store, died or hangs (the store does "
          "not answer) [at " +
              here + ": " + first_line(cause) + "]",
          0);
    }
  }
  return RankFailure("the job failed at " + here + ": " + first_line(cause), -1);
}

void Group::all_reduce_sum(std::vector<torch::Tensor>& tensors) {
  for (auto& t : tensors) {
    std::vector<torch::Tensor> one{t};
    collective("all-reduce", t.numel() * static_cast<int64_t>(t.element_size()),
               [&] { return group_->allreduce(one); });
  }
}

void Group::all_reduce_max(torch::Tensor& tensor) {
  std::vector<torch::Tensor> one{tensor};
  c10d::AllreduceOptions options;
  options.reduceOp = c10d::ReduceOp::MAX;
  collective("all-reduce (max)", tensor.numel() * static_cast<int64_t>(tensor.element_size()),
             [&] { return group_->allreduce(one, options); });
}

bool Group::any(bool flag) {
  auto t = torch::full({1}, flag ? 1 : 0, torch::kInt);
  all_reduce_max(t);
  return t.item<int>() != 0;
}

void Group::barrier() {
  collective("barrier", 0, [&] { return group_->barrier(); });
}

std::string Group::broadcast(const std::string& bytes, int64_t root) {
  TORCH_CHECK_VALUE(root >= 0 && root < world_size_, "broadcast root ", root, " is not a rank");
  std::vector<torch::Tensor> size{
      torch::full({1}, rank_ == root ? static_cast<int64_t>(bytes.size()) : 0, torch::kLong)};
  c10d::BroadcastOptions options;
  options.rootRank = root;
  collective("broadcast", 8, [&] { return group_->broadcast(size, options); });
  const int64_t n = size[0].item<int64_t>();
  std::vector<torch::Tensor> data{torch::empty({n}, torch::kUInt8)};
  if (rank_ == root && n > 0) std::memcpy(data[0].data_ptr(), bytes.data(), bytes.size());
  collective("broadcast", n, [&] { return group_->broadcast(data, options); });
  const auto* p = static_cast<const char*>(data[0].data_ptr());
  return rank_ == root ? bytes : std::string(p, p + n);
}

std::vector<std::string> Group::gather(const std::string& bytes, int64_t root) {
  TORCH_CHECK_VALUE(root >= 0 && root < world_size_, "gather root ", root, " is not a rank");
  const std::string prefix = "dptorch/gather/" + std::to_string(++gathers_) + "/";
  store_->set(prefix + std::to_string(rank_), bytes_of(bytes));
  // The barrier makes every rank's part present (or names the rank that is not).
  barrier();
  std::vector<std::string> parts;
  if (rank_ != root) return parts;
  for (int64_t r = 0; r < world_size_; ++r) {
    const auto key = prefix + std::to_string(r);
    parts.push_back(string_of(store_->get(key)));
    store_->deleteKey(key);
  }
  return parts;
}

void Group::fail(const std::string& message) noexcept {
  try {
    store_->set(failed_key(rank_), bytes_of(first_line(message)));
  } catch (...) {
    // The store is gone too: the others find this rank silent instead.
  }
}

void exit_after_failure(const std::shared_ptr<Group>& group, int status, int64_t culprit) {
  std::cout.flush();
  std::cerr.flush();
  if (group && group->world_size() > 1) {
    try {
      group->store().set("dptorch/left/" + std::to_string(group->rank()), bytes_of("1"));
      // Rank 0 serves the store: keep it up until every other rank but the culprit has left (at
      // most the time a diagnosis takes), so that they can still name the culprit.
      if (group->rank() == 0) {
        const auto deadline = Clock::now() + 2 * kWatch + kStoreReply;
        while (Clock::now() < deadline) {
          bool all_left = true;
          for (int64_t r = 1; r < group->world_size() && all_left; ++r) {
            all_left = r == culprit || group->store().check({"dptorch/left/" + std::to_string(r)});
          }
          if (all_left) break;
          std::this_thread::sleep_for(std::chrono::milliseconds(50));
        }
      }
    } catch (const std::exception&) {
      // The store is gone: nothing to keep up.
    }
  }
  std::_Exit(status);
}

}  // namespace dptorch::distributed
