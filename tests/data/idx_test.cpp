#include "dptorch/data/idx.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <zlib.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "support/idx_files.h"
#include "support/temp_dir.h"

namespace dptorch::data {
namespace {

using ::testing::AllOf;
using testing::Bytes;
using ::testing::HasSubstr;
using testing::idx_header;
using testing::TempDir;
using ::testing::ThrowsMessage;
using testing::write_gz;
using testing::write_plain;

Bytes read_plain(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void append_big_endian(Bytes& out, std::uint64_t bits, int size) {
  for (int b = size - 1; b >= 0; --b) {
    out.push_back(static_cast<std::uint8_t>(bits >> (8 * b)));
  }
}

struct IdxCase {
  const char* name;
  std::uint8_t code;
  torch::ScalarType dtype;
  std::vector<std::uint32_t> dims;
  std::vector<double> values;
};

// The IDX encoding of `values` in `c`'s type.
Bytes encode(const IdxCase& c) {
  Bytes out = idx_header(c.code, c.dims);
  for (const double v : c.values) {
    switch (c.code) {
      case 0x08: out.push_back(static_cast<std::uint8_t>(v)); break;
      case 0x09: out.push_back(static_cast<std::uint8_t>(static_cast<std::int8_t>(v))); break;
      case 0x0B:
        append_big_endian(out, static_cast<std::uint16_t>(static_cast<std::int16_t>(v)), 2);
        break;
      case 0x0C:
        append_big_endian(out, static_cast<std::uint32_t>(static_cast<std::int32_t>(v)), 4);
        break;
      case 0x0D: {
        const auto f = static_cast<float>(v);
        std::uint32_t bits = 0;
        std::memcpy(&bits, &f, 4);
        append_big_endian(out, bits, 4);
        break;
      }
      case 0x0E: {
        std::uint64_t bits = 0;
        std::memcpy(&bits, &v, 8);
        append_big_endian(out, bits, 8);
        break;
      }
      default: ADD_FAILURE() << "no encoder for type code " << int{c.code};
    }
  }
  return out;
}

class ReadIdxTypesTest : public ::testing::TestWithParam<IdxCase> {};

TEST_P(ReadIdxTypesTest, DecodesBigEndianValuesFromGzipAndPlainFiles) {
  const IdxCase& c = GetParam();
  TempDir dir;
  const Bytes bytes = encode(c);
  write_gz(dir.file("values.gz"), bytes);
  write_plain(dir.file("values"), bytes);
  const std::vector<int64_t> shape(c.dims.begin(), c.dims.end());
  const torch::Tensor expected =
      torch::tensor(c.values, torch::TensorOptions().dtype(torch::kFloat64))
          .to(c.dtype)
          .reshape(shape);
  for (const char* name : {"values.gz", "values"}) {
    const torch::Tensor got = read_idx(dir.file(name));
    EXPECT_EQ(got.scalar_type(), c.dtype) << name;
    EXPECT_EQ(got.sizes(), expected.sizes()) << name;
    EXPECT_TRUE(torch::equal(got, expected)) << name << ": got\n"
                                             << got << "\nexpected\n"
                                             << expected;
  }
}

INSTANTIATE_TEST_SUITE_P(
    AllTypeCodes, ReadIdxTypesTest,
    ::testing::Values(
        IdxCase{"uint8", 0x08, torch::kUInt8, {2, 3}, {0, 1, 127, 128, 200, 255}},
        IdxCase{"int8", 0x09, torch::kInt8, {4}, {-128, -1, 0, 127}},
        IdxCase{"int16", 0x0B, torch::kInt16, {2, 2}, {-32768, -2, 258, 32767}},
        IdxCase{"int32", 0x0C, torch::kInt32, {3}, {-2147483648.0, 16909060, 2147483647}},
        IdxCase{"float32", 0x0D, torch::kFloat32, {1, 3}, {-1.5, 0.0, 3.25e10}},
        IdxCase{"float64", 0x0E, torch::kFloat64, {2, 1, 2}, {-1e-300, 0.1, 2.5, 1e300}},
        IdxCase{"empty", 0x08, torch::kUInt8, {0, 28, 28}, {}}),
    [](const ::testing::TestParamInfo<IdxCase>& info) { return std::string(info.param.name); });

// Each case writes one malformed file and names a phrase its error must contain.
struct BadFileCase {
  const char* name;
  Bytes (*contents)();
  bool gzip;
  const char* message;
};

class ReadIdxErrorsTest : public ::testing::TestWithParam<BadFileCase> {};

TEST_P(ReadIdxErrorsTest, NamesTheFileAndTheProblem) {
  const BadFileCase& c = GetParam();
  TempDir dir;
  const std::string path = dir.file("bad-idx1-ubyte.gz");
  if (c.gzip) {
    write_gz(path, c.contents());
  } else {
    write_plain(path, c.contents());
  }
  EXPECT_THAT([&] { (void)read_idx(path); },
              ThrowsMessage<c10::Error>(AllOf(HasSubstr(path), HasSubstr(c.message))));
}

Bytes three_bytes() { return {0, 0, 8}; }
Bytes bad_magic() { return {0x1F, 0x00, 0x08, 0x01, 0, 0, 0, 1, 7}; }
Bytes unknown_type() { return {0, 0, 0x0A, 0x01, 0, 0, 0, 1, 7}; }
Bytes zero_dims() { return {0, 0, 0x08, 0x00}; }
Bytes short_header() { return {0, 0, 0x08, 0x03, 0, 0, 0, 2, 0, 0}; }
Bytes short_data() {
  Bytes out = idx_header(0x08, {2, 3});
  out.insert(out.end(), {1, 2, 3, 4, 5});
  return out;
}
Bytes long_data() {
  Bytes out = idx_header(0x0C, {1});
  out.insert(out.end(), {0, 0, 0, 1, 9});
  return out;
}
// Declares 2^32-1 x 2^32-1 x 2^32-1 bytes: the size overflows before anything is allocated.
Bytes overflowing_dims() { return idx_header(0x08, {0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF}); }
// Declares 4 GiB that are not there: reported as truncation, without allocating 4 GiB.
Bytes huge_dims() { return idx_header(0x08, {0xFFFFFFFF}); }

INSTANTIATE_TEST_SUITE_P(
    MalformedFiles, ReadIdxErrorsTest,
    ::testing::Values(
        BadFileCase{"Empty", [] { return Bytes{}; }, true, "too short to be an IDX file"},
        BadFileCase{"ThreeBytes", three_bytes, false, "it holds 3 bytes"},
        BadFileCase{"BadMagic", bad_magic, true,
                    "is not an IDX file: its magic number is 0x1F000801"},
        BadFileCase{"UnknownType", unknown_type, true, "unknown IDX type code 10"},
        BadFileCase{"ZeroDims", zero_dims, true, "declares 0 dimensions"},
        BadFileCase{"ShortHeader", short_header, true,
                    "declares 3 dimensions (12 header bytes), but only 6"},
        BadFileCase{"ShortData", short_data, true,
                    "declares 2x3 uint8 values (6 bytes), but only 5"},
        BadFileCase{"LongData", long_data, false, "has data beyond the end declared by its header"},
        BadFileCase{"OverflowingDims", overflowing_dims, true, "overflows int64"},
        BadFileCase{"HugeDims", huge_dims, true, "(4294967295 bytes), but only 0 bytes"}),
    [](const ::testing::TestParamInfo<BadFileCase>& info) { return std::string(info.param.name); });

class ReadIdxGzipTest : public ::testing::Test {
 protected:
  void SetUp() override {
    Bytes data = idx_header(0x08, {64, 64});
    for (int i = 0; i < 64 * 64; ++i) {
      data.push_back(static_cast<std::uint8_t>((i * 37) ^ (i >> 5)));
    }
    write_gz(path_, data);
    compressed_ = read_plain(path_);
    ASSERT_GT(compressed_.size(), 40u);
  }

  TempDir dir_;
  std::string path_ = dir_.file("images-idx3-ubyte.gz");
  Bytes compressed_;
};

TEST_F(ReadIdxGzipTest, ReadsTheIntactFile) {
  EXPECT_EQ(read_idx(path_).sizes(), (std::vector<int64_t>{64, 64}));
}

TEST_F(ReadIdxGzipTest, CutCompressedStreamIsAnError) {
  compressed_.resize(compressed_.size() / 2);
  write_plain(path_, compressed_);
  EXPECT_THAT([&] { (void)read_idx(path_); },
              ThrowsMessage<c10::Error>(AllOf(HasSubstr(path_),
                                              HasSubstr("is corrupt or truncated: zlib reports"),
                                              HasSubstr("unexpected end of file"))));
}

TEST_F(ReadIdxGzipTest, DamagedCompressedBytesAreAnError) {
  // Flip bits in the middle of the deflate data: an invalid block or a failed CRC check.
  for (size_t i = compressed_.size() / 2; i < compressed_.size() / 2 + 4; ++i) {
    compressed_[i] ^= 0x5A;
  }
  write_plain(path_, compressed_);
  EXPECT_THAT([&] { (void)read_idx(path_); },
              ThrowsMessage<c10::Error>(
                  AllOf(HasSubstr(path_), HasSubstr("is corrupt or truncated: zlib reports"))));
}

TEST_F(ReadIdxGzipTest, DamagedChecksumIsAnError) {
  compressed_[compressed_.size() - 6] ^= 0xFF;  // inside the CRC-32 of the gzip trailer
  write_plain(path_, compressed_);
  EXPECT_THAT([&] { (void)read_idx(path_); },
              ThrowsMessage<c10::Error>(HasSubstr("incorrect data check")));
}

TEST(ReadIdxTest, MissingFileIsNamed) {
  TempDir dir;
  const std::string path = dir.file("absent-idx1-ubyte.gz");
  EXPECT_THAT([&] { (void)read_idx(path); },
              ThrowsMessage<c10::Error>(HasSubstr("IDX file '" + path + "' does not exist")));
}

TEST(ReadIdxTest, DirectoryIsRefused) {
  TempDir dir;
  const std::string path = dir.file("sub");
  std::filesystem::create_directory(path);
  EXPECT_THAT([&] { (void)read_idx(path); },
              ThrowsMessage<c10::Error>(HasSubstr("'" + path + "' is a directory")));
}

}  // namespace
}  // namespace dptorch::data
