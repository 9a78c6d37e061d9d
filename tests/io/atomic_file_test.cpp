#include <dptorch/io/atomic_file.h>
#include <dptorch/io/checked_file.h>

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

void write_raw(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A payload with every byte value, newlines and NULs included.
std::string binary_payload(size_t size) {
  std::string payload(size, '\0');
  for (size_t i = 0; i < size; ++i) payload[i] = static_cast<char>((i * 37 + 11) % 256);
  return payload;
}

TEST(CheckedFile, WritesAHeaderLineThenThePayloadAndReadsItBack) {
  testing::TempDir dir;
  const auto path = dir.file("c");
  const std::string payload = binary_payload(1000);
  write_checked_file(path, "checkpoint", payload);
  const std::string bytes = read(path);
  const std::string header = checked_header("checkpoint", payload);
  // CRC-32 (zlib's, the ISO-HDLC polynomial) of "123456789" is cbf43926.
  EXPECT_EQ(checked_header("x", "123456789"), "dptorch x v1 size=9 crc32=cbf43926\n");
  EXPECT_EQ(bytes.substr(0, header.size()), header);
  EXPECT_EQ(bytes.substr(header.size()), payload);
  EXPECT_EQ(read_checked_file(path, "checkpoint"), payload);
  write_checked_file(path, "empty", "");
  EXPECT_EQ(read(path), "dptorch empty v1 size=0 crc32=00000000\n");
  EXPECT_EQ(read_checked_file(path, "empty"), "");
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
}

// Each way a file can be wrong is refused with the path and the reason, before any payload is
// allocated: a header that claims an exabyte costs nothing.
TEST(CheckedFile, RefusesEachWrongFileByNameAndReason) {
  testing::TempDir dir;
  const auto path = dir.file("c");
  const std::string payload = binary_payload(100);
  const std::string header = checked_header("checkpoint", payload);
  auto refused = [&](const std::string& bytes, const std::string& reason) {
    write_raw(path, bytes);
    EXPECT_THAT([&] { (void)read_checked_file(path, "checkpoint"); },
                ThrowsMessage<c10::Error>(
                    ::testing::AllOf(HasSubstr("checkpoint " + path), HasSubstr(reason))))
        << ::testing::PrintToString(bytes.substr(0, 80));
  };
  refused("", "is not a dptorch checkpoint file");
  refused("hello\n", "is not a dptorch checkpoint file");
  refused(std::string("PK\x03\x04", 4) + payload, "is a bare torch archive");
  refused(checked_header("whitening", payload) + payload, "is a dptorch 'whitening' file");
  refused("dptorch checkpoint v2 size=100 crc32=00000000\n" + payload, "another version");
  refused("dptorch checkpoint v1 size=0100 crc32=00000000\n" + payload, "damaged header");
  refused("dptorch checkpoint v1 size=100 crc32=0000000\n" + payload, "damaged header");
  refused("dptorch checkpoint v1 size=100 crc32=ABCDEF01\n" + payload, "damaged header");
  refused("dptorch checkpoint v1 size=-1 crc32=00000000\n", "damaged header");
  refused("dptorch checkpoint v1 size=99999999999999999999 crc32=00000000\n", "damaged header");
  refused("dptorch checkpoint v1 size=1000000000000000000 crc32=00000000\n" + payload,
          "is truncated: it holds 100 of the 1000000000000000000 bytes");
  refused(header + payload.substr(0, 99), "is truncated: it holds 99 of the 100 bytes");
  refused(header + payload + "x", "has 1 bytes past the 100");
  std::string flipped = payload;
  flipped[50] = static_cast<char>(flipped[50] ^ 0x10);
  refused(header + flipped, "is corrupt: its content does not match its checksum");
  EXPECT_THAT([&] { (void)read_checked_file(dir.file("missing"), "checkpoint"); },
              ThrowsMessage<c10::Error>(
                  HasSubstr("checkpoint " + dir.file("missing") + " does not exist")));
  EXPECT_THAT([&] { (void)read_checked_file(dir.path().string(), "checkpoint"); },
              ThrowsMessage<c10::Error>(HasSubstr("is not a regular file")));
  EXPECT_THAT([&] { write_checked_file(path, "two words", payload); },
              ThrowsMessage<c10::Error>(HasSubstr("kind must be 1 to 64 letters")));
  // The messages quote no raw bytes.
  write_raw(path, "dptorch \x01\xff\n");
  try {
    (void)read_checked_file(path, "checkpoint");
    ADD_FAILURE() << "accepted a damaged header";
  } catch (const c10::Error& e) {
    const std::string message = e.what_without_backtrace();
    for (const char c : message) EXPECT_TRUE(c >= 0x20 && c <= 0x7e) << int(c) << " in " << message;
  }
}

// Exhaustive over a small file: each of its bits flipped alone, and each of its prefixes, is
// refused (a CRC-32 catches every single-bit error and every burst up to 32 bits).
TEST(CheckedFile, EveryFlippedBitAndEveryTruncationIsRefused) {
  testing::TempDir dir;
  const auto path = dir.file("c");
  const std::string payload = binary_payload(200);
  write_checked_file(path, "checkpoint", payload);
  const std::string good = read(path);
  int refusals = 0;
  for (size_t at = 0; at < good.size(); ++at) {
    for (int bit = 0; bit < 8; ++bit) {
      std::string bytes = good;
      bytes[at] = static_cast<char>(bytes[at] ^ (1 << bit));
      write_raw(path, bytes);
      try {
        (void)read_checked_file(path, "checkpoint");
        ADD_FAILURE() << "bit " << bit << " of byte " << at << " flipped was accepted";
      } catch (const c10::Error&) {
        ++refusals;
      }
    }
  }
  for (size_t size = 0; size < good.size(); ++size) {
    write_raw(path, good.substr(0, size));
    EXPECT_THROW((void)read_checked_file(path, "checkpoint"), c10::Error) << size << " bytes";
  }
  EXPECT_EQ(refusals, static_cast<int>(8 * good.size()));
}

}  // namespace
}  // namespace dptorch::io
