// Distributed DP-SGD over c10d on loopback: jobs of 2 ranks × 1 thread against one process, the
// noise of the summed gradient, a rank killed mid-run, and bad input. The ranks are processes of
// tests/distributed/dist_worker.cpp, started here with torchrun's environment variables.
#include <dptorch/distributed/group.h>

#include <gtest/gtest.h>
#include <torch/torch.h>

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

extern char** environ;

#ifndef DPTORCH_DIST_WORKER
#error "DPTORCH_DIST_WORKER must name the dist_worker executable"
#endif

namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

fs::path scratch(const std::string& name) {
  const fs::path dir =
      fs::path(::testing::TempDir()) / ("dptorch_dist_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::string slurp(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// One worker process: its pid and where its output goes.
struct Worker {
  pid_t pid = -1;
  fs::path out, err;
  int status = -1;  // exit status once reaped; -2: killed by the test after a time-out
  [[nodiscard]] std::string stdout_text() const { return slurp(out); }
  [[nodiscard]] std::string stderr_text() const { return slurp(err); }
};

// Starts dist_worker with `args`; `rank` >= 0 adds torchrun's variables for a job of `world`
// ranks meeting at 127.0.0.1:`port`; rank < 0 runs it alone (those variables removed).
Worker spawn(const fs::path& dir, const std::vector<std::string>& args, int rank, int world,
             int port) {
  Worker w;
  const std::string tag = rank < 0 ? "solo" : "rank" + std::to_string(rank);
  w.out = dir / (tag + ".out");
  w.err = dir / (tag + ".err");
  std::vector<std::string> env;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string kv = *e;
    const std::string key = kv.substr(0, kv.find('='));
    if (key == "RANK" || key == "WORLD_SIZE" || key == "MASTER_ADDR" || key == "MASTER_PORT" ||
        key == "LOCAL_RANK" || key == "OMP_NUM_THREADS") {
      continue;
    }
    env.push_back(kv);
  }
  env.push_back("OMP_NUM_THREADS=1");
  if (rank >= 0) {
    env.push_back("RANK=" + std::to_string(rank));
    env.push_back("LOCAL_RANK=" + std::to_string(rank));
    env.push_back("WORLD_SIZE=" + std::to_string(world));
    env.push_back("MASTER_ADDR=127.0.0.1");
    env.push_back("MASTER_PORT=" + std::to_string(port));
  }
  std::vector<std::string> argv_s{DPTORCH_DIST_WORKER};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv, envp;
  for (auto& s : argv_s) argv.push_back(s.data());
  argv.push_back(nullptr);
  for (auto& s : env) envp.push_back(s.data());
  envp.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, w.out.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, w.err.c_str(),
                                   O_WRONLY | O_CREAT | O_TRUNC, 0644);
  EXPECT_EQ(posix_spawn(&w.pid, argv[0], &actions, nullptr, argv.data(), envp.data()), 0);
  posix_spawn_file_actions_destroy(&actions);
  return w;
}

// Waits up to `limit` for the worker to exit (then kills it: status -2). Returns the status.
int reap(Worker& w, std::chrono::milliseconds limit) {
  const auto deadline = Clock::now() + limit;
  while (true) {
    int raw = 0;
    const pid_t got = ::waitpid(w.pid, &raw, WNOHANG);
    if (got == w.pid) {
      w.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : 128 + WTERMSIG(raw);
      return w.status;
    }
    if (Clock::now() > deadline) {
      ::kill(w.pid, SIGKILL);
      ::waitpid(w.pid, &raw, 0);
      w.status = -2;
      return w.status;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

constexpr auto kJobLimit = std::chrono::seconds(120);

// Runs a job of `world` ranks (world 0: one process without the environment) to the end; every
// rank must succeed.
std::vector<Worker> run_job(const fs::path& dir, const std::vector<std::string>& args, int world) {
  std::vector<Worker> workers;
  const int port = world > 0 ? static_cast<int>(dptorch::distributed::free_port()) : 0;
  if (world == 0) {
    workers.push_back(spawn(dir, args, -1, 0, 0));
  } else {
    for (int r = 0; r < world; ++r) workers.push_back(spawn(dir, args, r, world, port));
  }
  for (auto& w : workers) {
    EXPECT_EQ(reap(w, kJobLimit), 0) << w.stderr_text();
  }
  return workers;
}

std::vector<torch::Tensor> load_params(const fs::path& path) {
  std::vector<torch::Tensor> params;
  torch::load(params, path.string());
  return params;
}

void expect_same_params(const fs::path& a, const fs::path& b, double tol) {
  ASSERT_TRUE(fs::exists(a) && fs::exists(b)) << a << " or " << b << " is missing";
  const auto pa = load_params(a);
  const auto pb = load_params(b);
  ASSERT_EQ(pa.size(), pb.size());
  for (size_t k = 0; k < pa.size(); ++k) {
    const double diff = (pa[k] - pb[k]).abs().max().item<double>();
    EXPECT_LE(diff, tol) << "parameter " << k;
  }
}

// The value after "key=" in a worker's line.
std::string field(const std::string& text, const std::string& key) {
  const auto at = text.find(key + "=");
  if (at == std::string::npos) return "";
  const auto begin = at + key.size() + 1;
  return text.substr(begin, text.find_first_of(" \n", begin) - begin);
}

class DistributedTest : public ::testing::TestWithParam<std::string> {};

// The same seed gives the same training with 2 ranks as with 1: the union of the ranks' Poisson
// batches is the one process's batch, rank 0 draws the one process's noise, and the all-reduced
// clipped sum differs only by the order of additions. Physical batches of 2 make virtual steps;
// some steps leave a rank's part of the batch empty (asserted).
TEST_P(DistributedTest, TwoRanksTrainAsOneProcess) {
  const auto dir = scratch("same_" + GetParam());
  const std::vector<std::string> common{"--steps", "12",         "--physical",
                                        "2",       "--clipping", GetParam()};
  auto solo_args = common;
  solo_args.insert(solo_args.end(), {"--out", (dir / "solo.pt").string()});
  auto job_args = common;
  job_args.insert(job_args.end(), {"--out", (dir / "job.pt").string()});
  const auto solo = run_job(dir / "", solo_args, 0);
  const auto job = run_job(dir, job_args, 2);
  expect_same_params(dir / "solo.pt", dir / "job.pt", 1e-12);
  // Every rank holds the same model, and each accounted the same steps.
  const auto out0 = job[0].stdout_text();
  const auto out1 = job[1].stdout_text();
  EXPECT_EQ(field(out0, "digest"), field(out1, "digest"));
  EXPECT_EQ(field(out0, "epsilon"), field(solo[0].stdout_text(), "epsilon"));
  EXPECT_EQ(field(out0, "steps"), "12");
  const int empty =
      std::stoi(field(out0, "empty_local_batches")) + std::stoi(field(out1, "empty_local_batches"));
  EXPECT_GT(empty, 0) << "the seed gives no step with an empty local batch; the test needs one";
}

INSTANTIATE_TEST_SUITE_P(Clipping, DistributedTest,
                         ::testing::Values("flat", "adaptive", "per-layer"));

// The summed gradient carries N(0, σ²C²) once. The loss is zero, so with a sum loss, SGD at lr 1
// and no momentum one step moves each of the 100 000 weights by minus its noise. Seed 7, σ = 1,
// C = 1: the sample std of n = 100 000 draws has a standard error of 1/√(2n) = 0.0022; the
// tolerance of 0.015 (6.7 standard errors) tells σC from √2·σC and σC/√2 (0.41 and 0.29 away).
TEST(DistributedNoiseTest, SummedNoiseHasStdSigmaC) {
  const auto dir = scratch("noise");
  const auto job = run_job(dir,
                           {"--noise-only", "--steps", "1", "--dataset", "20", "--batch", "5",
                            "--out", (dir / "after.pt").string(), "--seed", "7"},
                           2);
  const auto after = load_params(dir / "after.pt");
  const auto before = load_params(dir / "after.pt.init");
  ASSERT_EQ(after.size(), 1u);
  const auto delta = (after[0] - before[0]).flatten();
  ASSERT_EQ(delta.numel(), 100000);
  const double std = delta.std().item<double>();
  const double mean = delta.mean().item<double>();
  EXPECT_NEAR(std, 1.0, 0.015);
  EXPECT_LT(std::abs(mean), 5.0 / std::sqrt(1e5));
  EXPECT_EQ(field(job[0].stdout_text(), "digest"), field(job[1].stdout_text(), "digest"));
}

// Rank 1 killed with SIGKILL mid-run: rank 0 stops with an error naming rank 1 well within its
// 5 s timeout; the last checkpoint is intact, and resuming from it reaches the uninterrupted
// result exactly.
TEST(DistributedFaultTest, KilledRankStopsTheOtherAndTheJobResumes) {
  const auto dir = scratch("fault");
  const std::vector<std::string> common{"--steps", "12", "--physical", "3"};
  auto full_args = common;
  full_args.insert(full_args.end(), {"--out", (dir / "full.pt").string(), "--checkpoint",
                                     (dir / "full.ckpt").string()});
  (void)run_job(dir / "", full_args, 2);

  const fs::path ckpt = dir / "job.ckpt";
  auto args = common;
  args.insert(args.end(), {"--out", (dir / "resumed.pt").string(), "--checkpoint", ckpt.string(),
                           "--delay-ms", "150", "--timeout-ms", "5000"});
  const int port = static_cast<int>(dptorch::distributed::free_port());
  std::vector<Worker> job{spawn(dir, args, 0, 2, port), spawn(dir, args, 1, 2, port)};
  // Wait (bounded) for a checkpoint of a few steps, then kill rank 1.
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (!fs::exists(ckpt) && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  ASSERT_TRUE(fs::exists(ckpt)) << job[0].stderr_text();
  std::this_thread::sleep_for(std::chrono::milliseconds(400));
  ::kill(job[1].pid, SIGKILL);
  const auto killed = Clock::now();
  EXPECT_EQ(reap(job[1], std::chrono::seconds(5)), 128 + SIGKILL);
  const int status = reap(job[0], std::chrono::seconds(20));
  const double waited = std::chrono::duration<double>(Clock::now() - killed).count();
  EXPECT_NE(status, 0);
  EXPECT_NE(status, -2) << "rank 0 hung after rank 1 died";
  EXPECT_LT(waited, 5.0 + 3.0);
  const auto err = job[0].stderr_text();
  EXPECT_NE(err.find("rank 1"), std::string::npos) << err;

  auto resume_args = common;
  resume_args.insert(resume_args.end(), {"--out", (dir / "resumed.pt").string(), "--checkpoint",
                                         ckpt.string(), "--resume"});
  fs::create_directories(dir / "resume");
  (void)run_job(dir / "resume", resume_args, 2);
  expect_same_params(dir / "full.pt", dir / "resumed.pt", 0.0);
}

// Starts a job of `world` ranks of a long run that checkpoints every step, and waits (bounded)
// until its first checkpoint is in place: every rank is then past start-up and training.
std::vector<Worker> start_long_job(const fs::path& dir, int world) {
  const fs::path ckpt = dir / "job.ckpt";
  const std::vector<std::string> args{"--steps",      "400",  "--delay-ms",   "20",
                                      "--timeout-ms", "5000", "--checkpoint", ckpt.string()};
  const int port = static_cast<int>(dptorch::distributed::free_port());
  std::vector<Worker> job;
  for (int r = 0; r < world; ++r) job.push_back(spawn(dir, args, r, world, port));
  const auto deadline = Clock::now() + std::chrono::seconds(60);
  while (!fs::exists(ckpt) && Clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_TRUE(fs::exists(ckpt)) << job[0].stderr_text();
  return job;
}

// A rank stopped with SIGSTOP (alive to the kernel, silent to the job): the others stop within
// the 5 s collective timeout plus the diagnosis (1 s watching beats, at most 3 s for the store to
// answer) with an error naming it; rank 0, which serves the store, included.
TEST(DistributedFaultTest, HungRankStopsTheOthersWithinTheTimeout) {
  for (const int hung : {1, 0}) {
    SCOPED_TRACE("hung rank " + std::to_string(hung));
    const auto dir = scratch("hang" + std::to_string(hung));
    auto job = start_long_job(dir, 2);
    Worker& stopped = job[static_cast<size_t>(hung)];
    Worker& other = job[static_cast<size_t>(1 - hung)];
    ::kill(stopped.pid, SIGSTOP);
    const auto since = Clock::now();
    const int status = reap(other, std::chrono::seconds(30));
    const double waited = std::chrono::duration<double>(Clock::now() - since).count();
    ::kill(stopped.pid, SIGKILL);
    (void)reap(stopped, std::chrono::seconds(5));
    EXPECT_EQ(status, 1) << other.stderr_text();
    EXPECT_LT(waited, 5.0 + 1.0 + 3.0 + 3.0);
    const auto err = other.stderr_text();
    EXPECT_NE(err.find("died or hangs"), std::string::npos) << err;
    EXPECT_NE(err.find("(failed rank " + std::to_string(hung) + ")"), std::string::npos) << err;
  }
}

// In a job of 3, rank 2 killed: both others stop and name rank 2 (the first to find it publishes
// it; the other, not necessarily a neighbour of rank 2 in Gloo's ring, names the same rank).
TEST(DistributedFaultTest, EveryRankNamesTheDeadOne) {
  const auto dir = scratch("three");
  auto job = start_long_job(dir, 3);
  ::kill(job[2].pid, SIGKILL);
  (void)reap(job[2], std::chrono::seconds(5));
  for (int r = 0; r < 2; ++r) {
    EXPECT_EQ(reap(job[static_cast<size_t>(r)], std::chrono::seconds(30)), 1)
        << job[static_cast<size_t>(r)].stderr_text();
    const auto err = job[static_cast<size_t>(r)].stderr_text();
    EXPECT_NE(err.find("(failed rank 2)"), std::string::npos) << "rank " << r << ": " << err;
  }
}

// A job's checkpoint is refused by a job of another size, with the reason.
TEST(DistributedFaultTest, ResumeWithAnotherWorldSizeIsRefused) {
  const auto dir = scratch("world");
  const auto ckpt = (dir / "job.ckpt").string();
  (void)run_job(dir, {"--steps", "2", "--checkpoint", ckpt}, 2);
  auto solo = spawn(dir, {"--steps", "4", "--checkpoint", ckpt, "--resume"}, -1, 0, 0);
  EXPECT_EQ(reap(solo, kJobLimit), 1);
  EXPECT_NE(solo.stderr_text().find("written by a job of 2 processes, but this job has 1"),
            std::string::npos)
      << solo.stderr_text();
}

// Environment variables that torchrun sets, restored on scope exit.
class ScopedEnv {
 public:
  void set(const char* key, const char* value) {
    remember(key);
    if (value) {
      ::setenv(key, value, 1);
    } else {
      ::unsetenv(key);
    }
  }
  ~ScopedEnv() {
    for (const auto& [key, value] : saved_) {
      if (value) {
        ::setenv(key.c_str(), value->c_str(), 1);
      } else {
        ::unsetenv(key.c_str());
      }
    }
  }

 private:
  void remember(const char* key) {
    if (saved_.count(key)) return;
    const char* old = std::getenv(key);
    saved_[key] = old ? std::optional<std::string>(old) : std::nullopt;
  }
  std::map<std::string, std::optional<std::string>> saved_;
};

TEST(DistributedInputTest, MissingEnvironmentVariableIsNamed) {
  ScopedEnv env;
  env.set("RANK", "0");
  env.set("WORLD_SIZE", "2");
  env.set("MASTER_ADDR", "127.0.0.1");
  env.set("MASTER_PORT", nullptr);
  EXPECT_TRUE(dptorch::distributed::environment_is_distributed());
  try {
    (void)dptorch::distributed::options_from_environment();
    FAIL() << "no error";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("MASTER_PORT is not set"), std::string::npos) << e.what();
  }
  env.set("MASTER_PORT", "29500");
  env.set("RANK", "2");
  try {
    (void)dptorch::distributed::options_from_environment();
    FAIL() << "no error";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("RANK is '2'; it must be an integer in [0, 1]"),
              std::string::npos)
        << e.what();
  }
  env.set("RANK", "1");
  const auto options = dptorch::distributed::options_from_environment();
  EXPECT_EQ(options.rank(), 1);
  EXPECT_EQ(options.world_size(), 2);
  EXPECT_EQ(options.master_port(), 29500);
  EXPECT_EQ(options.master_addr(), "127.0.0.1");
}

TEST(DistributedInputTest, PortInUseIsNamed) {
  // Hold a listening socket on a port, then ask rank 0 to serve the store there.
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  ASSERT_EQ(::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr), 0);
  ASSERT_EQ(::listen(fd, 1), 0);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  const int port = ntohs(addr.sin_port);
  try {
    (void)dptorch::distributed::Group::connect(
        dptorch::distributed::GroupOptions().rank(0).world_size(2).master_port(port).timeout(
            std::chrono::seconds(2)));
    FAIL() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("port is in use"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find(std::to_string(port)), std::string::npos) << e.what();
  }
  ::close(fd);
}

TEST(DistributedInputTest, UnreachableRankZeroIsNamed) {
  const auto start = Clock::now();
  try {
    (void)dptorch::distributed::Group::connect(
        dptorch::distributed::GroupOptions()
            .rank(1)
            .world_size(2)
            .master_port(static_cast<int>(dptorch::distributed::free_port()))
            .timeout(std::chrono::seconds(1)));
    FAIL() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("could not reach rank 0's store"), std::string::npos)
        << e.what();
  }
  EXPECT_LT(std::chrono::duration<double>(Clock::now() - start).count(), 30.0);
}

TEST(DistributedInputTest, RankSeedsDifferPerRankAndRepeat) {
  using dptorch::distributed::rank_seed;
  EXPECT_EQ(rank_seed(5, 1), rank_seed(5, 1));
  EXPECT_NE(rank_seed(5, 0), rank_seed(5, 1));
  EXPECT_NE(rank_seed(5, 0), rank_seed(6, 0));
  EXPECT_NE(rank_seed(5, 0), 5u);
}

}  // namespace
