#include <dptorch/io/atomic_file.h>

#include <c10/util/Exception.h>
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>

#include "support/temp_dir.h"

namespace dptorch::io {
namespace {

using ::testing::HasSubstr;
using ::testing::ThrowsMessage;

std::string read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream bytes;
  bytes << in.rdbuf();
  return bytes.str();
}

TEST(AtomicFile, WritesThePartsInOrderAndReplacesTheOldFile) {
  testing::TempDir dir;
  const auto path = dir.file("f");
  write_file_atomically(path, "old");
  EXPECT_EQ(read(path), "old");
  write_file_atomically(path, {"one ", "", "two"});
  EXPECT_EQ(read(path), "one two");
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

TEST(AtomicFile, AFailedWriteNamesThePathAndChangesNothing) {
  testing::TempDir dir;
  const auto missing = dir.file("no/such/dir/f");
  EXPECT_THAT([&] { write_file_atomically(missing, "x"); },
              ThrowsMessage<c10::Error>(HasSubstr("could not write " + missing)));
  // A directory where the file should be: the rename fails, the temporary file is removed.
  const auto blocked = dir.file("blocked");
  std::filesystem::create_directories(blocked + "/inside");
  EXPECT_THAT([&] { write_file_atomically(blocked, "x"); },
              ThrowsMessage<c10::Error>(HasSubstr("rename failed")));
  EXPECT_FALSE(std::filesystem::exists(blocked + ".tmp"));
  EXPECT_TRUE(std::filesystem::is_directory(blocked));
}

// A writer killed with SIGKILL at 150 random moments, while it replaces the file again and
// again with one of two contents of different lengths: the file is always one of them, whole.
TEST(AtomicFile, AWriterKilledAtAnyMomentLeavesTheOldFileOrTheNew) {
  testing::TempDir dir;
  const auto path = dir.file("f");
  const std::string a = std::string(1 << 19, 'a') + "end of a";
  const std::string b = std::string(3 << 18, 'b') + "end of b";
  write_file_atomically(path, a);
  std::mt19937 rng(11);
  int saw_a = 0, saw_b = 0;
  for (int round = 0; round < 150; ++round) {
    const pid_t child = ::fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      try {
        for (int i = 0;; ++i) write_file_atomically(path, i % 2 == 0 ? b : a);
      } catch (...) {
        ::_exit(3);
      }
    }
    ::usleep(static_cast<useconds_t>(rng() % 30000));
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status)) << "the writer stopped on its own, status " << status;
    const std::string now = read(path);
    ASSERT_TRUE(now == a || now == b)
        << "round " << round << ": a torn file of " << now.size() << " bytes";
    (now == a ? saw_a : saw_b) += 1;
  }
  EXPECT_GT(saw_a, 0);
  EXPECT_GT(saw_b, 0);
}

}  // namespace
}  // namespace dptorch::io
