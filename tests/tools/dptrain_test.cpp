// Runs dptrain on a small subset of Fashion-MNIST: help, argument errors, every output file, and
// an interrupted run resumed to the same result as an uninterrupted one.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <thread>
#include <vector>

#include "support/run_tool.h"

namespace {

using dptorch::testing::run_tool;
using dptorch::testing::tool_path;
using ::testing::HasSubstr;
using ::testing::StartsWith;
namespace fs = std::filesystem;

// Small and fast: 512 examples, expected batch 64, 2 epochs (16 steps), fixed σ; kQuick with the
// CNN.
const std::string kQuickSettings =
    "--train-subset 512 --batch-size 64 --epochs 2 --noise-multiplier 1.0 --lr 0.5 --max-grad-norm "
    "1.0 --threads 2 --seed 3";
const std::string kQuick = "--model cnn " + kQuickSettings;

class DptrainTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(fs::exists(tool_path("dptrain"))) << "build the dptrain target first";
    ASSERT_TRUE(fs::exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"))
        << "Debian's dataset-fashion-mnist package is not installed (scripts/setup.sh does it)";
    dir_ = fs::path(::testing::TempDir()) / ("dptrain_test_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string out(const std::string& name) const { return (dir_ / name).string(); }
  fs::path dir_;
};

nlohmann::json read_json(const fs::path& path) {
  return nlohmann::json::parse(std::ifstream(path));
}

TEST_F(DptrainTest, HelpExplainsEveryOption) {
  auto r = run_tool("dptrain", "--help");
  EXPECT_EQ(r.status, 0);
  for (const char* option :
       {"--epsilon", "--delta", "--epochs", "--batch-size", "--lr", "--max-grad-norm",
        "--noise-multiplier", "--accountant", "--clipping", "--seed", "--threads", "--out",
        "--resume", "--no-privacy", "--secure-rng", "--model", "--audit", "--validation",
        "--feature-cache"}) {
    EXPECT_THAT(r.out, HasSubstr(option));
  }
}

TEST_F(DptrainTest, BadArgumentsGiveOneLineAndStatus2) {
  for (const std::string args :
       {"--noise-multipler 1", "--epsilon -1", "--accountant moments", "--clipping none",
        "--model gru", "--secure-rng --seed 3", "--delta 2", "--resume /nonexistent/run"}) {
    SCOPED_TRACE(args);
    auto r = run_tool("dptrain", args + " --out " + out("bad"));
    EXPECT_EQ(r.status, 2);
    EXPECT_THAT(r.err, StartsWith("dptrain: error: "));
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
  }
  // A budget the planned run would exceed is refused before training.
  auto r = run_tool("dptrain", kQuick + " --epsilon 0.5 --out " + out("budget"));
  EXPECT_EQ(r.status, 2);
  EXPECT_THAT(r.err, HasSubstr("past the budget"));
}

TEST_F(DptrainTest, ShortRunWritesEveryOutput) {
  auto r = run_tool("dptrain", kQuick + " --epsilon 50 --out " + out("run"));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("test accuracy"));
  for (const char* file :
       {"report.json", "metrics.jsonl", "plot.svg", "checkpoint.pt", "config.json"}) {
    EXPECT_TRUE(fs::exists(dir_ / "run" / file)) << file;
  }
  auto report = read_json(dir_ / "run" / "report.json");
  EXPECT_EQ(report["steps"], 16);
  EXPECT_GT(report["epsilon"].get<double>(), 0);
  EXPECT_LE(report["epsilon"].get<double>(), 50);
  EXPECT_GT(report["test_accuracy"].get<double>(), 0.3);  // 16 noisy steps: well above chance
  // The privacy ledger, ε under every accountant, and the statement in words.
  ASSERT_EQ(report["privacy_ledger"].size(), 1u);
  EXPECT_EQ(report["privacy_ledger"][0]["sampler"], "poisson");
  EXPECT_EQ(report["privacy_ledger"][0]["steps"], 16);
  EXPECT_EQ(report["privacy_ledger"][0]["noise_multiplier"], 1.0);
  EXPECT_EQ(report["privacy_ledger"][0]["sample_rate"], 0.125);
  EXPECT_EQ(report["privacy_ledger"][0]["max_grad_norm"], 1.0);
  for (const char* name : {"prv", "pld", "rdp", "gdp"}) {
    EXPECT_GT(report["epsilon_by_accountant"][name].get<double>(), 0) << name;
  }
  EXPECT_EQ(report["epsilon_by_accountant"]["prv"], report["epsilon"]);
  EXPECT_THAT(r.out, HasSubstr("What is protected is any one training example"));
  EXPECT_EQ(report["privacy_statement"].get<std::string>().substr(0, 8), "Privacy:");
  std::ifstream metrics(dir_ / "run" / "metrics.jsonl");
  int lines = 0;
  for (std::string line; std::getline(metrics, line);) lines += !line.empty();
  EXPECT_EQ(lines, 2);
  std::ifstream svg(dir_ / "run" / "plot.svg");
  std::string text((std::istreambuf_iterator<char>(svg)), std::istreambuf_iterator<char>());
  EXPECT_THAT(text, HasSubstr("<polyline"));
}

// --budget stops the run before the step that would pass it, with its report; resuming the run
// gets no further.
TEST_F(DptrainTest, StopsCleanlyAtTheBudget) {
  auto r =
      run_tool("dptrain",
               "--model cnn --train-subset 512 --batch-size 64 --epochs 4 --noise-multiplier 1.0 "
               "--lr 0.5 --max-grad-norm 1.0 --threads 2 --seed 3 --epsilon 50 --budget 4 --out " +
                   out("budget"));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("stopped at the privacy budget"));
  auto report = read_json(dir_ / "budget" / "report.json");
  EXPECT_TRUE(report["stopped_at_budget"].get<bool>());
  EXPECT_LE(report["epsilon"].get<double>(), 4.0);
  const int64_t steps = report["steps"];
  EXPECT_GT(steps, 8);  // ε = 3.18 after 8 steps, 4.03 after 16 (dpaccount)
  EXPECT_LT(steps, 16);
  EXPECT_EQ(report["privacy_ledger"][0]["steps"], steps);
  auto again = run_tool("dptrain", "--resume " + out("budget"));
  EXPECT_EQ(again.status, 0) << again.err;
  auto resumed = read_json(dir_ / "budget" / "report.json");
  EXPECT_EQ(resumed["steps"], steps);
  EXPECT_EQ(resumed["epsilon"], report["epsilon"]);
}

// --audit reports the one-run audit beside the accountant's ε, below it; an audited run cannot
// be resumed (its canaries are not in the checkpoint), and says so.
TEST_F(DptrainTest, AuditsTheRun) {
  auto r = run_tool("dptrain", kQuick + " --epsilon 8 --audit 500 --out " + out("audit"));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_THAT(r.out, HasSubstr("audit: epsilon >= "));
  auto report = read_json(dir_ / "audit" / "report.json");
  EXPECT_EQ(report["audit"]["canaries"], 500);
  EXPECT_EQ(report["audit"]["steps"], report["steps"]);
  EXPECT_GE(report["audit"]["epsilon_lower_bound"].get<double>(), 0.0);
  EXPECT_LT(report["audit"]["epsilon_lower_bound"].get<double>(), report["epsilon"].get<double>());
  auto again = run_tool("dptrain", "--resume " + out("audit"));
  EXPECT_EQ(again.status, 2);
  EXPECT_THAT(again.err, HasSubstr("cannot be resumed"));
}

// The scattering models train on features computed once per data set; --validation evaluates
// on held-out training examples; --feature-cache keeps the features, and a damaged cache file is
// recomputed, not read.
TEST_F(DptrainTest, ScatteringModelsTrainOnCachedFeatures) {
  const std::string args =
      " --train-subset 2048 --validation 1000 --batch-size 256 --epochs 2 --noise-multiplier 1.0 "
      "--epsilon 50 --threads 2 --seed 3 --feature-cache " +
      out("cache");
  for (const std::string model : {"scatter-linear", "scatter-cnn"}) {
    SCOPED_TRACE(model);
    auto r = run_tool("dptrain", "--model " + model + args + " --out " + out(model));
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_THAT(r.out, HasSubstr("validation accuracy"));
    auto report = read_json(dir_ / model / "report.json");
    EXPECT_FALSE(report.contains("test_accuracy"));
    EXPECT_GT(report["validation_accuracy"].get<double>(), 0.5);  // chance is 0.1
  }
  // Two files: the 2048 training and the 1000 validation images.
  std::vector<fs::path> cached;
  for (const auto& entry : fs::directory_iterator(dir_ / "cache")) cached.push_back(entry.path());
  ASSERT_EQ(cached.size(), 2u);
  const auto first = read_json(dir_ / "scatter-linear" / "report.json");
  for (const auto& file : cached) fs::resize_file(file, fs::file_size(file) / 2);
  auto again = run_tool("dptrain", "--model scatter-linear" + args + " --out " + out("again"));
  ASSERT_EQ(again.status, 0) << again.err;
  EXPECT_EQ(read_json(dir_ / "again" / "report.json")["validation_accuracy"],
            first["validation_accuracy"]);
  for (const auto& file : cached) EXPECT_GT(fs::file_size(file), 1000u * 81 * 49 * 4);
}

// scatter-linear whitens its features by default: the released statistics are counted in ε
// (σ is calibrated for both), kept as whitening.pt, loaded again on --resume (the resumed run
// ends as the uninterrupted one) and shared by the ranks of a distributed job.
TEST_F(DptrainTest, FeatureWhiteningIsCountedAndKept) {
  const std::string args =
      " --model scatter-linear --train-subset 2048 --validation 1000 --batch-size 256 --epochs 2 "
      "--epsilon 3 --threads 1 --seed 3 --feature-cache " +
      out("cache");
  auto whitened = run_tool("dptrain", args + " --out " + out("whitened"));
  ASSERT_EQ(whitened.status, 0) << whitened.err;
  EXPECT_THAT(whitened.out, HasSubstr("whitening.pt"));
  EXPECT_TRUE(fs::exists(dir_ / "whitened" / "whitening.pt"));
  auto plain = run_tool("dptrain", args + " --whitening 0 --out " + out("plain"));
  ASSERT_EQ(plain.status, 0) << plain.err;
  EXPECT_FALSE(fs::exists(dir_ / "plain" / "whitening.pt"));
  const auto w = read_json(dir_ / "whitened" / "report.json");
  const auto p = read_json(dir_ / "plain" / "report.json");
  EXPECT_EQ(w["config"]["whitening"], 1.0);
  EXPECT_DOUBLE_EQ(w["feature_release"]["noise_multiplier"].get<double>(), 20.0 / std::sqrt(2.0));
  EXPECT_FALSE(p.contains("feature_release"));
  EXPECT_GT(w["noise_multiplier"].get<double>(), p["noise_multiplier"].get<double>());
  EXPECT_LE(w["epsilon"].get<double>(), 3.0);
  EXPECT_GT(w["epsilon"].get<double>(), 2.95);
  ASSERT_EQ(w["privacy_ledger"].size(), 1u);  // the training steps; the release is separate
  EXPECT_EQ(w["privacy_ledger"][0]["steps"], w["steps"]);
  EXPECT_GT(w["validation_accuracy"].get<double>(), 0.5);

  auto part = run_tool("dptrain", args + " --stop-after-steps 5 --out " + out("part"));
  ASSERT_EQ(part.status, 130) << part.err;
  auto rest = run_tool("dptrain", "--resume " + out("part"));
  ASSERT_EQ(rest.status, 0) << rest.err;
  const auto r = read_json(dir_ / "part" / "report.json");
  EXPECT_EQ(r["validation_accuracy"], w["validation_accuracy"]);
  EXPECT_EQ(r["epsilon"], w["epsilon"]);

  auto two = run_tool("dptrain", args + " --nproc 2 --out " + out("two"));
  ASSERT_EQ(two.status, 0) << two.err;
  const auto t = read_json(dir_ / "two" / "report.json");
  EXPECT_EQ(t["epsilon"], w["epsilon"]);
  EXPECT_NEAR(t["validation_accuracy"].get<double>(), w["validation_accuracy"].get<double>(), 0.01);

  auto pixels = run_tool("dptrain", kQuick + " --whitening 1 --out " + out("pixels"));
  EXPECT_EQ(pixels.status, 2);
  EXPECT_THAT(pixels.err, HasSubstr("--whitening whitens the scattering features"));
}

TEST_F(DptrainTest, AutomaticClippingTrains) {
  auto r = run_tool("dptrain", kQuick + " --clipping automatic --epsilon 50 --out " + out("auto"));
  ASSERT_EQ(r.status, 0) << r.err;
  EXPECT_EQ(read_json(dir_ / "auto" / "config.json")["clipping"], "automatic");
  EXPECT_GT(read_json(dir_ / "auto" / "report.json")["test_accuracy"].get<double>(), 0.3);
}

TEST_F(DptrainTest, SequenceModelsTrain) {
  for (const std::string model : {"lstm", "transformer"}) {
    SCOPED_TRACE(model);
    auto r = run_tool("dptrain",
                      kQuickSettings + " --model " + model + " --epsilon 50 --out " + out(model));
    ASSERT_EQ(r.status, 0) << r.err;
    EXPECT_EQ(read_json(dir_ / model / "config.json")["model"], model);
    auto report = read_json(dir_ / model / "report.json");
    EXPECT_EQ(report["steps"], 16);
    EXPECT_GT(report["test_accuracy"].get<double>(), 0.2);  // chance is 0.1; 16 noisy steps
  }
}

// --nproc 2: two processes of one thread each train the run that one process trains (the same
// seed gives the same batches and noise; the sums differ in float rounding only), stop together
// when interrupted, and resume with the same number of processes only.
TEST_F(DptrainTest, TwoProcessesTrainTheOneProcessRun) {
  auto one = run_tool("dptrain", kQuick + " --epsilon 50 --out " + out("one"));
  ASSERT_EQ(one.status, 0) << one.err;
  auto two = run_tool("dptrain", kQuick + " --epsilon 50 --nproc 2 --out " + out("two"));
  ASSERT_EQ(two.status, 0) << two.err;
  EXPECT_THAT(two.out, HasSubstr("threads in each of 2 processes"));
  auto a = read_json(dir_ / "one" / "report.json");
  auto b = read_json(dir_ / "two" / "report.json");
  EXPECT_EQ(a["epsilon"], b["epsilon"]);
  EXPECT_EQ(a["steps"], b["steps"]);
  EXPECT_NEAR(a["test_accuracy"].get<double>(), b["test_accuracy"].get<double>(), 0.01);
  EXPECT_EQ(b["processes"], 2);
  // One gradient's worth per step: the cnn's 26 010 float parameters.
  EXPECT_EQ(b["allreduce_bytes_per_step"], 26010 * 4);

  auto part = run_tool(
      "dptrain", kQuick + " --epsilon 50 --nproc 2 --stop-after-steps 5 --out " + out("part"));
  ASSERT_EQ(part.status, 130) << part.err;
  EXPECT_THAT(part.out, HasSubstr("--nproc 2"));
  auto wrong = run_tool("dptrain", "--resume " + out("part") + " --threads 1");
  EXPECT_EQ(wrong.status, 2);
  EXPECT_THAT(wrong.err, HasSubstr("written by a job of 2 processes, but this job has 1"));
  auto rest = run_tool("dptrain", "--resume " + out("part") + " --nproc 2");
  ASSERT_EQ(rest.status, 0) << rest.err;
  auto c = read_json(dir_ / "part" / "report.json");
  EXPECT_EQ(b["test_accuracy"], c["test_accuracy"]);
  EXPECT_EQ(b["epsilon"], c["epsilon"]);
}

// Starts dptrain with `args` in a child process (output discarded); its pid.
pid_t start_dptrain(const std::vector<std::string>& args) {
  const pid_t pid = ::fork();
  if (pid == 0) {
    const int null = ::open("/dev/null", O_WRONLY);
    ::dup2(null, 1);
    ::dup2(null, 2);
    std::vector<char*> argv{const_cast<char*>("dptrain")};
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    ::execv(tool_path("dptrain").c_str(), argv.data());
    ::_exit(127);
  }
  return pid;
}

// Killed with SIGKILL at random moments (before its first checkpoint, while writing one, between
// files), and resumed each time from whatever it left: the run ends as the uninterrupted one.
TEST_F(DptrainTest, KilledAtRandomMomentsResumesToTheSameResult) {
  const std::string settings = kQuick + " --epsilon 50 --ema 0.8";
  const auto started_at = std::chrono::steady_clock::now();
  auto whole = run_tool("dptrain", settings + " --out " + out("whole"));
  ASSERT_EQ(whole.status, 0) << whole.err;
  const auto whole_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                            std::chrono::steady_clock::now() - started_at)
                            .count();
  std::vector<std::string> fresh;
  std::istringstream words(settings);
  for (std::string w; words >> w;) fresh.push_back(w);
  fresh.push_back("--out");
  fresh.push_back(out("killed"));
  // Six starts killed after a random part of the whole run's time (0.1 to 1.1 of it: before the
  // first checkpoint, mid-epoch, while writing), then one left to finish.
  std::mt19937 rng(5);
  constexpr int kKills = 6;
  for (int attempt = 0; attempt <= kKills; ++attempt) {
    // Until the run has written its settings, it starts afresh; then it resumes.
    const bool started = fs::exists(dir_ / "killed" / "config.json");
    const pid_t pid =
        start_dptrain(started ? std::vector<std::string>{"--resume", out("killed")} : fresh);
    ASSERT_GT(pid, 0);
    int status = 0;
    if (attempt < kKills) {
      const auto delay = whole_ms / 10 + static_cast<int64_t>(rng() % (whole_ms + 1));
      const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(delay);
      pid_t done = 0;
      while ((done = ::waitpid(pid, &status, WNOHANG)) == 0 &&
             std::chrono::steady_clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      if (done == 0) {
        ::kill(pid, SIGKILL);
        ::waitpid(pid, &status, 0);
        continue;
      }
    } else {
      ::waitpid(pid, &status, 0);
    }
    // A run that ended on its own (before its kill, or the last one) ended well.
    ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0)
        << "attempt " << attempt << " ended with status " << status;
  }
  const auto a = read_json(dir_ / "whole" / "report.json");
  const auto b = read_json(dir_ / "killed" / "report.json");
  EXPECT_EQ(a["test_accuracy"], b["test_accuracy"]);
  EXPECT_EQ(a["epsilon"], b["epsilon"]);
  EXPECT_EQ(a["steps"], b["steps"]);
  // No temporary file is left behind, and the metrics hold each epoch once.
  for (const auto& entry : fs::directory_iterator(dir_ / "killed")) {
    EXPECT_NE(entry.path().extension(), ".tmp") << entry.path();
  }
  std::ifstream metrics(dir_ / "killed" / "metrics.jsonl");
  int64_t last_epoch = 0;
  for (std::string line; std::getline(metrics, line);) {
    const auto epoch = nlohmann::json::parse(line)["epoch"].get<int64_t>();
    EXPECT_GT(epoch, last_epoch);
    last_epoch = epoch;
  }
}

// A garbled config.json is refused with the file's name, and none of its bytes unreadable.
TEST_F(DptrainTest, GarbledSettingsAreRefusedByName) {
  // A real run's settings, to garble below.
  auto made = run_tool(
      "dptrain", kQuick + " --epsilon 50 --stop-after-steps 1 --out " + out("whole_settings"));
  ASSERT_EQ(made.status, 130) << made.err;
  fs::create_directories(dir_ / "garbled");
  std::ofstream(dir_ / "garbled" / "config.json") << "{\"epsilon\": 3,\x01\xff\xfe";
  auto r = run_tool("dptrain", "--resume " + out("garbled"));
  EXPECT_EQ(r.status, 2);
  EXPECT_THAT(r.err, HasSubstr((dir_ / "garbled" / "config.json").string() +
                               " is not a dptrain run's settings"));
  for (const char c : r.err) {
    EXPECT_TRUE(c == '\n' || (c >= 0x20 && c <= 0x7e)) << "byte " << static_cast<int>(c);
  }
  std::ofstream(dir_ / "garbled" / "config.json") << "{\"epsilon\": \"three\"}";
  r = run_tool("dptrain", "--resume " + out("garbled"));
  EXPECT_EQ(r.status, 2);
  EXPECT_THAT(r.err, HasSubstr("is not a dptrain run's settings"));
  // Well-formed JSON with a value dptrain's options would refuse: named.
  auto settings = read_json(dir_ / "whole_settings" / "config.json");
  settings["model"] = "resnet-1000";
  std::ofstream(dir_ / "garbled" / "config.json") << settings.dump();
  r = run_tool("dptrain", "--resume " + out("garbled"));
  EXPECT_EQ(r.status, 2);
  EXPECT_THAT(r.err, HasSubstr("\"model\" must be cnn, scatter-linear"));
  settings["model"] = "cnn";
  settings["batch_size"] = -4;
  std::ofstream(dir_ / "garbled" / "config.json") << settings.dump();
  r = run_tool("dptrain", "--resume " + out("garbled"));
  EXPECT_EQ(r.status, 2);
  EXPECT_THAT(r.err, HasSubstr("\"batch_size\" must be >= 1, but is -4"));
}

// With --ema, the checkpoint holds the parameters' average too: the resumed run evaluates the
// same average as the uninterrupted one.
TEST_F(DptrainTest, InterruptedRunResumesToTheSameResult) {
  auto whole = run_tool("dptrain", kQuick + " --epsilon 50 --ema 0.8 --out " + out("whole"));
  ASSERT_EQ(whole.status, 0) << whole.err;
  auto part = run_tool(
      "dptrain", kQuick + " --epsilon 50 --ema 0.8 --stop-after-steps 11 --out " + out("part"));
  ASSERT_EQ(part.status, 130) << part.err;
  EXPECT_THAT(part.out, HasSubstr("--resume"));
  auto rest = run_tool("dptrain", "--resume " + out("part"));
  ASSERT_EQ(rest.status, 0) << rest.err;
  auto a = read_json(dir_ / "whole" / "report.json");
  auto b = read_json(dir_ / "part" / "report.json");
  EXPECT_EQ(a["test_accuracy"], b["test_accuracy"]);
  EXPECT_GT(a["test_accuracy"].get<double>(), 0.3);  // the average of trained parameters
  EXPECT_EQ(a["epsilon"], b["epsilon"]);
  EXPECT_EQ(a["steps"], b["steps"]);
  // Resuming a finished run takes no further step and spends nothing more.
  auto again = run_tool("dptrain", "--resume " + out("part"));
  ASSERT_EQ(again.status, 0) << again.err;
  EXPECT_EQ(read_json(dir_ / "part" / "report.json")["epsilon"], a["epsilon"]);
}

// The files --resume reads are checked files: one flipped bit in the checkpoint (or in
// --no-privacy's model.pt) stops the run with exit status 2 and one line naming the file, and
// the file is left as it was for the user to restore. An intact model.pt resumes a --no-privacy
// run to the uninterrupted run's result.
TEST_F(DptrainTest, DamagedCheckpointsAreRefusedByName) {
  const std::string plain =
      "--model cnn --no-privacy --train-subset 512 --batch-size 64 --epochs 2 --lr 0.5 --threads 2 "
      "--seed 3";
  auto whole = run_tool("dptrain", plain + " --out " + out("whole"));
  ASSERT_EQ(whole.status, 0) << whole.err;
  for (const std::string& settings : {kQuick + " --epsilon 50", plain}) {
    SCOPED_TRACE(settings);
    const std::string name = settings == plain ? "plain" : "private";
    const fs::path file = dir_ / name / (name == "plain" ? "model.pt" : "checkpoint.pt");
    auto part = run_tool("dptrain", settings + " --stop-after-steps 11 --out " + out(name));
    ASSERT_EQ(part.status, 130) << part.err;
    std::string bytes;
    {
      std::ifstream in(file, std::ios::binary);
      bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    }
    const std::string good = bytes;
    bytes[bytes.size() / 2] = static_cast<char>(bytes[bytes.size() / 2] ^ 0x20);
    std::ofstream(file, std::ios::binary | std::ios::trunc) << bytes;
    auto r = run_tool("dptrain", "--resume " + out(name));
    EXPECT_EQ(r.status, 2);
    EXPECT_THAT(r.err, HasSubstr(file.string() + " is corrupt"));
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;
    std::ifstream in(file, std::ios::binary);
    EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()),
              bytes);
    if (name == "plain") {
      std::ofstream(file, std::ios::binary | std::ios::trunc) << good;
      auto rest = run_tool("dptrain", "--resume " + out(name));
      ASSERT_EQ(rest.status, 0) << rest.err;
      EXPECT_EQ(read_json(dir_ / "whole" / "report.json")["test_accuracy"],
                read_json(dir_ / name / "report.json")["test_accuracy"]);
    }
  }
}

}  // namespace
