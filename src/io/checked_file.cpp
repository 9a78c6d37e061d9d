#include <dptorch/common.h>
#include <dptorch/io/atomic_file.h>
#include <dptorch/io/checked_file.h>

#include "io/descriptor.h"

#include <c10/util/Exception.h>
#include <zlib.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>

namespace dptorch::io {
namespace {

using detail::Descriptor;

constexpr const char* kVersion = "v1";
// A header line is at most this long: "dptorch " + a kind + " v1 size=" + 20 digits + " crc32=" +
// 8 hex digits + '\n' fits with room for kinds of up to 64 characters.
constexpr size_t kMaxHeader = 128;
constexpr size_t kMaxKind = 64;

uint32_t crc32_of(std::string_view bytes) {
  uLong crc = ::crc32(0L, Z_NULL, 0);
  // zlib takes lengths as uInt: feed it in pieces of at most 1 GiB.
  for (size_t at = 0; at < bytes.size();) {
    const size_t piece = std::min<size_t>(bytes.size() - at, size_t{1} << 30);
    crc = ::crc32(crc, reinterpret_cast<const Bytef*>(bytes.data() + at), static_cast<uInt>(piece));
    at += piece;
  }
  return static_cast<uint32_t>(crc);
}

std::string hex8(uint32_t value) {
  char text[9];
  std::snprintf(text, sizeof text, "%08x", value);
  return text;
}

std::string header_of(std::string_view kind, uint64_t size, uint32_t crc) {
  return "dptorch " + std::string(kind) + " " + kVersion + " size=" + std::to_string(size) +
         " crc32=" + hex8(crc) + "\n";
}

void check_kind(std::string_view kind) {
  const bool ok =
      !kind.empty() && kind.size() <= kMaxKind && std::all_of(kind.begin(), kind.end(), [](char c) {
        return std::isalnum(static_cast<unsigned char>(c)) != 0 || c == '-' || c == '_' || c == '.';
      });
  TORCH_CHECK_VALUE(ok, "a checked file's kind must be 1 to ", kMaxKind,
                    " letters, digits, '-', '_' or '.', but is '",
                    dptorch::detail::printable(std::string(kind), 80), "'");
}

// Reads exactly `size` bytes at the descriptor's position into `out`; false if the file ends first.
bool read_exactly(int fd, char* out, size_t size, const std::string& path, std::string_view kind) {
  while (size > 0) {
    const ssize_t got = ::read(fd, out, size);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      const int error = errno;
      TORCH_CHECK(false, kind, " ", path, " cannot be read (", std::strerror(error), ")");
    }
    if (got == 0) return false;
    out += got;
    size -= static_cast<size_t>(got);
  }
  return true;
}

// Parses a canonical unsigned decimal (no sign, no leading zeros) that fits 64 bits.
bool parse_size(std::string_view text, uint64_t& value) {
  if (text.empty() || text.size() > 20 || (text.size() > 1 && text[0] == '0')) return false;
  value = 0;
  for (const char c : text) {
    if (c < '0' || c > '9') return false;
    const uint64_t digit = static_cast<uint64_t>(c - '0');
    if (value > (std::numeric_limits<uint64_t>::max() - digit) / 10) return false;
    value = value * 10 + digit;
  }
  return true;
}

}  // namespace

std::string checked_header(std::string_view kind, std::string_view payload) {
  check_kind(kind);
  return header_of(kind, payload.size(), crc32_of(payload));
}

void write_checked_file(const std::string& path, std::string_view kind, std::string_view payload) {
  write_file_atomically(path, {checked_header(kind, payload), payload});
}

std::string read_checked_file(const std::string& path, std::string_view kind) {
  check_kind(kind);
  Descriptor file(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (file.get() < 0) {
    const int error = errno;
    TORCH_CHECK_VALUE(error != ENOENT, kind, " ", path, " does not exist");
    TORCH_CHECK(false, kind, " ", path, " cannot be opened (", std::strerror(error), ")");
  }
  struct stat info {};
  TORCH_CHECK(::fstat(file.get(), &info) == 0 && S_ISREG(info.st_mode), kind, " ", path,
              " is not a regular file");
  const auto file_size = static_cast<uint64_t>(info.st_size);
  // The header line, from at most kMaxHeader bytes at the start.
  std::string head(static_cast<size_t>(std::min<uint64_t>(file_size, kMaxHeader)), '\0');
  TORCH_CHECK(read_exactly(file.get(), head.data(), head.size(), path, kind), kind, " ", path,
              " changed while it was read");
  const std::string expected = "dptorch " + std::string(kind) + " ";
  const auto newline = head.find('\n');
  if (head.rfind("dptorch ", 0) != 0 || newline == std::string::npos) {
    TORCH_CHECK_VALUE(head.rfind("PK\x03\x04", 0) != 0, kind, " ", path,
                      " is a bare torch archive, not a dptorch ", kind,
                      " file (a file without the checked header cannot be checked, so it is not "
                      "read); write it again with this version");
    TORCH_CHECK_VALUE(false, kind, " ", path, " is not a dptorch ", kind,
                      " file (it does not start with a 'dptorch ", kind, " ", kVersion,
                      " ...' line); pass the file that dptorch wrote");
  }
  const std::string line = head.substr(0, newline);
  if (line.rfind(expected, 0) != 0) {
    const std::string other = line.substr(8, line.find(' ', 8) - 8);
    TORCH_CHECK_VALUE(false, kind, " ", path, " is a dptorch '",
                      dptorch::detail::printable(other, 64), "' file, not a ", kind,
                      " file; pass the ", kind, " that dptorch wrote");
  }
  // The rest: "v1 size=<n> crc32=<hex>", in exactly the form header_of writes.
  const std::string rest = line.substr(expected.size());
  TORCH_CHECK_VALUE(rest.rfind(std::string(kVersion) + " ", 0) == 0, kind, " ", path,
                    " has a header of another version ('", dptorch::detail::printable(line, 100),
                    "'; this build reads ", kVersion, ")");
  const auto size_at = rest.find(" size="), crc_at = rest.find(" crc32=");
  uint64_t payload_size = 0;
  uint32_t crc = 0;
  bool parsed =
      size_at != std::string::npos && crc_at != std::string::npos && crc_at > size_at &&
      parse_size(std::string_view(rest).substr(size_at + 6, crc_at - size_at - 6), payload_size);
  if (parsed) {
    const std::string crc_text = rest.substr(crc_at + 7);
    parsed = crc_text.size() == 8 && std::all_of(crc_text.begin(), crc_text.end(), [](char c) {
               return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f');
             });
    if (parsed) crc = static_cast<uint32_t>(std::stoul(crc_text, nullptr, 16));
  }
  TORCH_CHECK_VALUE(parsed && line + "\n" == header_of(kind, payload_size, crc), kind, " ", path,
                    " has a damaged header ('", dptorch::detail::printable(line, 100), "')");
  // The size the header states is checked against the file's before anything is allocated.
  const uint64_t header_size = line.size() + 1;
  const uint64_t present = file_size - header_size;
  TORCH_CHECK_VALUE(present >= payload_size, kind, " ", path, " is truncated: it holds ", present,
                    " of the ", payload_size, " bytes its header states");
  TORCH_CHECK_VALUE(present == payload_size, kind, " ", path, " has ", present - payload_size,
                    " bytes past the ", payload_size, " its header states");
  std::string payload(static_cast<size_t>(payload_size), '\0');
  const size_t in_head = head.size() - static_cast<size_t>(header_size);
  std::memcpy(payload.data(), head.data() + header_size, in_head);
  TORCH_CHECK(
      read_exactly(file.get(), payload.data() + in_head, payload.size() - in_head, path, kind),
      kind, " ", path, " changed while it was read");
  const uint32_t actual = crc32_of(payload);
  TORCH_CHECK_VALUE(actual == crc, kind, " ", path,
                    " is corrupt: its content does not match its checksum (crc32 ", hex8(actual),
                    ", the header states ", hex8(crc),
                    "); restore it from a copy or write it again");
  return payload;
}

}  // namespace dptorch::io
