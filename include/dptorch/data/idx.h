#pragma once

#include <torch/types.h>

#include <string>

namespace dptorch::data {

/// Reads an IDX file (the format of MNIST and Fashion-MNIST), gzip-compressed or plain, into a
/// CPU tensor whose shape is the file's dimensions and whose dtype follows its type code
/// (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64).
///
/// The header (magic number, dimensions) and the data length are validated: a missing, truncated,
/// corrupt or over-long file is an error that names the file and what is wrong with it.
/// Example:
///   torch::Tensor labels = dptorch::data::read_idx("train-labels-idx1-ubyte.gz");  // [60000]
[[nodiscard]] torch::Tensor read_idx(const std::string& path);

}  // namespace dptorch::data
