#pragma once

#include <gtest/gtest.h>
#include <zlib.h>

#include <cstdint>
#include <fstream>
#include <string>
#include <vector>

/// Writers of (possibly damaged) IDX files for the data tests.
namespace dptorch::testing {

using Bytes = std::vector<std::uint8_t>;

/// Writes `bytes` to `path` as they are.
inline void write_plain(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

/// Writes `bytes` to `path` gzip-compressed.
inline void write_gz(const std::string& path, const Bytes& bytes) {
  gzFile file = gzopen(path.c_str(), "wb");
  ASSERT_NE(file, nullptr) << path;
  if (!bytes.empty()) {
    ASSERT_EQ(gzwrite(file, bytes.data(), static_cast<unsigned>(bytes.size())),
              static_cast<int>(bytes.size()));
  }
  ASSERT_EQ(gzclose(file), Z_OK);
}

/// An IDX header: two zero bytes, the type code, the number of dimensions, big-endian sizes.
inline Bytes idx_header(std::uint8_t code, const std::vector<std::uint32_t>& dims) {
  Bytes out = {0, 0, code, static_cast<std::uint8_t>(dims.size())};
  for (const std::uint32_t d : dims) {
    for (int shift = 24; shift >= 0; shift -= 8)
      out.push_back(static_cast<std::uint8_t>(d >> shift));
  }
  return out;
}

}  // namespace dptorch::testing
