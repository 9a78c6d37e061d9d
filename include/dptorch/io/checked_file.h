#pragma once

#include <string>
#include <string_view>

namespace dptorch::io {

/// Files that are checked before anything parses them. A checked file is one header line,
/// "dptorch <kind> v1 size=<payload bytes> crc32=<8 hex digits>", then the payload: a file of
/// another kind, truncated, extended or changed by a single bit since it was written is refused
/// by name before its payload reaches a parser. (LibTorch 1.13's archive reader, for one, can
/// crash on an archive with one bit flipped; docs/reliability.md.) The CRC-32 guards against
/// accidents (bit rot, a torn copy, the wrong file), not against a deliberately forged file:
/// a checkpoint is as trusted as the code that resumes from it.
///
/// Example:
///   io::write_checked_file("run/whitening.pt", "whitening", bytes);
///   const std::string again = io::read_checked_file("run/whitening.pt", "whitening");

/// The header line (with its '\n') that write_checked_file puts before `payload`. `kind` is one
/// word of printable ASCII (letters, digits, '-', '_', '.').
[[nodiscard]] std::string checked_header(std::string_view kind, std::string_view payload);

/// Writes checked_header(kind, payload) and `payload` to `path`, atomically
/// (write_file_atomically: the old file or the whole new one, never a torn one).
void write_checked_file(const std::string& path, std::string_view kind, std::string_view payload);

/// The payload of the checked file at `path`, after checking its kind, its size and its CRC-32.
/// Throws c10::Error naming the path, the kind and what is wrong ("does not exist", "is not a
/// dptorch <kind> file", "is truncated", "is corrupt"). Reads no more than the file holds,
/// whatever its header claims.
[[nodiscard]] std::string read_checked_file(const std::string& path, std::string_view kind);

}  // namespace dptorch::io
