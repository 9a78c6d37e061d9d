#pragma once

// What the fuzz targets share: a scratch file per process for the readers that take a path.

#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <fstream>
#include <string>

namespace dptorch::fuzz {

// This process's scratch file with `suffix` (under /tmp).
inline std::string scratch_path(const char* suffix) {
  return "/tmp/dptorch_fuzz_" + std::to_string(::getpid()) + std::string(suffix);
}

// Writes the input to this process's scratch file (under /tmp) and returns its path.
inline std::string scratch_file(const uint8_t* data, size_t size, const char* suffix) {
  const std::string path = scratch_path(suffix);
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(size));
  return path;
}

}  // namespace dptorch::fuzz
