#pragma once

#include <initializer_list>
#include <string>
#include <string_view>

namespace dptorch::io {

/// Writes `parts`, one after another, to `path` so that a crash at any moment (the process
/// killed, the machine losing power) leaves either the old file or the complete new one there,
/// never a torn one: the bytes go to `path` + ".tmp", are flushed to the disk (fsync), the
/// temporary file is renamed over `path`, and the directory is flushed so that the rename
/// itself is durable. Throws c10::Error naming the path and the system's reason if any step
/// fails; the temporary file is then removed and `path` is unchanged. Every file dptorch and its
/// tools write goes through here (checkpoints, reports, metrics, plots, configs, caches).
void write_file_atomically(const std::string& path, std::initializer_list<std::string_view> parts);

/// The one-part form: write_file_atomically(path, {bytes}).
void write_file_atomically(const std::string& path, std::string_view bytes);

}  // namespace dptorch::io
