#include "dptorch/data/idx.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <sstream>
#include <vector>

namespace dptorch::data {
namespace {

struct GzCloser {
  void operator()(gzFile_s* file) const { gzclose(file); }
};
using GzFile = std::unique_ptr<gzFile_s, GzCloser>;

struct IdxType {
  std::uint8_t code;
  torch::ScalarType dtype;
  int64_t element_size;
  const char* name;
};

constexpr IdxType kIdxTypes[] = {
    {0x08, torch::kUInt8, 1, "uint8"},     {0x09, torch::kInt8, 1, "int8"},
    {0x0B, torch::kInt16, 2, "int16"},     {0x0C, torch::kInt32, 4, "int32"},
    {0x0D, torch::kFloat32, 4, "float32"}, {0x0E, torch::kFloat64, 8, "float64"},
};

std::string hex32(std::uint32_t value) {
  char text[16];
  std::snprintf(text, sizeof(text), "0x%08X", value);
  return text;
}

std::string join_dims(const std::vector<int64_t>& dims) {
  std::ostringstream out;
  for (size_t i = 0; i < dims.size(); ++i) {
    out << (i ? "x" : "") << dims[i];
  }
  return out.str();
}

// Reads up to `count` bytes; fewer only at the end of the stream. zlib errors (bad compressed
// data, a compressed stream cut short, a failing read) are reported with the file's name.
int64_t read_bytes(gzFile file, const std::string& path, std::uint8_t* out, int64_t count) {
  int64_t total = 0;
  while (total < count) {
    const auto chunk = static_cast<unsigned>(std::min<int64_t>(count - total, int64_t{1} << 30));
    const int got = gzread(file, out + total, chunk);
    if (got <= 0) {
      break;
    }
    total += got;
  }
  int error = Z_OK;
  const char* message = gzerror(file, &error);
  TORCH_CHECK(error == Z_OK || error == Z_STREAM_END, "'", path,
              "' is corrupt or truncated: zlib reports \"", message,
              "\" while decompressing it; download or reinstall the file");
  return total;
}

}  // namespace

torch::Tensor read_idx(const std::string& path) {
  std::error_code status_error;
  const auto status = std::filesystem::status(path, status_error);
  TORCH_CHECK(std::filesystem::exists(status), "IDX file '", path, "' does not exist");
  TORCH_CHECK(!std::filesystem::is_directory(status), "'", path,
              "' is a directory, but an IDX file (such as train-images-idx3-ubyte.gz) is expected");

  GzFile file(gzopen(path.c_str(), "rb"));
  TORCH_CHECK(file != nullptr, "cannot open IDX file '", path, "': ", std::strerror(errno));
  gzbuffer(file.get(), 1 << 18);

  std::uint8_t magic[4];
  const int64_t magic_read = read_bytes(file.get(), path, magic, 4);
  TORCH_CHECK(magic_read == 4, "'", path, "' is too short to be an IDX file: it holds ", magic_read,
              " bytes, but the magic number alone takes 4");
  const std::uint32_t magic_number = (std::uint32_t{magic[0]} << 24) |
                                     (std::uint32_t{magic[1]} << 16) |
                                     (std::uint32_t{magic[2]} << 8) | std::uint32_t{magic[3]};
  TORCH_CHECK(magic[0] == 0 && magic[1] == 0, "'", path,
              "' is not an IDX file: its magic number is ", hex32(magic_number),
              ", but an IDX file starts with two zero bytes, a type code and the number of "
              "dimensions (e.g. 0x00000803)");
  const IdxType* type = std::find_if(std::begin(kIdxTypes), std::end(kIdxTypes),
                                     [&](const IdxType& t) { return t.code == magic[2]; });
  TORCH_CHECK(type != std::end(kIdxTypes), "'", path, "' has magic number ", hex32(magic_number),
              " with unknown IDX type code ", static_cast<int>(magic[2]),
              "; known codes are 0x08 (uint8), 0x09 (int8), 0x0B (int16), 0x0C (int32), "
              "0x0D (float32) and 0x0E (float64)");
  const int ndims = magic[3];
  TORCH_CHECK(ndims >= 1, "'", path, "' has magic number ", hex32(magic_number),
              " which declares 0 dimensions; an IDX file has at least one");

  std::vector<std::uint8_t> header(4 * static_cast<size_t>(ndims));
  const int64_t header_read =
      read_bytes(file.get(), path, header.data(), static_cast<int64_t>(header.size()));
  TORCH_CHECK(header_read == static_cast<int64_t>(header.size()), "'", path,
              "' is truncated: its magic number declares ", ndims, " dimensions (", header.size(),
              " header bytes), but only ", header_read, " header bytes follow");
  std::vector<int64_t> dims(ndims);
  int64_t numel = 1;
  for (int d = 0; d < ndims; ++d) {
    const std::uint8_t* b = &header[4 * static_cast<size_t>(d)];
    dims[d] = static_cast<int64_t>((std::uint32_t{b[0]} << 24) | (std::uint32_t{b[1]} << 16) |
                                   (std::uint32_t{b[2]} << 8) | std::uint32_t{b[3]});
    TORCH_CHECK(dims[d] == 0 || numel <= std::numeric_limits<int64_t>::max() / 8 / dims[d], "'",
                path, "' declares dimensions ",
                join_dims(std::vector<int64_t>(dims.begin(), dims.begin() + d + 1)),
                "... whose size overflows int64; the file is corrupt");
    numel *= dims[d];
  }
  const int64_t expected_bytes = numel * type->element_size;

  // The buffer grows with the data actually present, so a corrupt header that declares a huge
  // size cannot make us allocate it. One byte more than declared is requested to detect excess.
  std::vector<std::uint8_t> data;
  data.reserve(static_cast<size_t>(std::min<int64_t>(expected_bytes, int64_t{64} << 20)));
  const int64_t wanted = expected_bytes + 1;
  constexpr int64_t kChunkBytes = int64_t{4} << 20;
  while (static_cast<int64_t>(data.size()) < wanted) {
    const auto before = static_cast<int64_t>(data.size());
    const int64_t request = std::min(kChunkBytes, wanted - before);
    data.resize(static_cast<size_t>(before + request));
    const int64_t got = read_bytes(file.get(), path, data.data() + before, request);
    data.resize(static_cast<size_t>(before + got));
    if (got < request) {
      break;
    }
  }
  const auto data_bytes = static_cast<int64_t>(data.size());
  TORCH_CHECK(data_bytes >= expected_bytes, "'", path, "' is truncated: its header declares ",
              join_dims(dims), " ", type->name, " values (", expected_bytes, " bytes), but only ",
              data_bytes, " bytes of data follow; download or reinstall it");
  TORCH_CHECK(data_bytes == expected_bytes, "'", path,
              "' has data beyond the end declared by its header (", join_dims(dims), " ",
              type->name, " values, ", expected_bytes, " bytes); the file is corrupt");

  torch::Tensor result =
      torch::empty(dims, torch::TensorOptions().dtype(type->dtype).device(torch::kCPU));
  auto* out = static_cast<std::uint8_t*>(result.data_ptr());
  const int64_t size = type->element_size;
  if (size == 1 && numel > 0) {
    std::memcpy(out, data.data(), static_cast<size_t>(expected_bytes));
  } else {
    // IDX stores big-endian values; assembling them by shifts is correct on any host.
    for (int64_t i = 0; i < numel; ++i) {
      const std::uint8_t* in = &data[static_cast<size_t>(i * size)];
      std::uint64_t value = 0;
      for (int64_t b = 0; b < size; ++b) {
        value = (value << 8) | in[b];
      }
      if (size == 2) {
        const auto v = static_cast<std::uint16_t>(value);
        std::memcpy(out + i * size, &v, 2);
      } else if (size == 4) {
        const auto v = static_cast<std::uint32_t>(value);
        std::memcpy(out + i * size, &v, 4);
      } else {
        std::memcpy(out + i * size, &value, 8);
      }
    }
  }
  return result;
}

}  // namespace dptorch::data
