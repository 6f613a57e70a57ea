//===- WeightFormat.cpp - Any stored weight format of moec ----------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "common/WeightFormat.h"

namespace moe::quant {

std::string WeightFormat::name() const { return group ? group->name() : ggmlTraits(*ggml)->name; }

int WeightFormat::bits() const { return group ? group->bits : ggmlTraits(*ggml)->bits; }

int WeightFormat::block() const { return group ? group->group : ggmlTraits(*ggml)->blockSize; }

const char *WeightFormat::scheme() const { return group ? (group->symmetric ? "sym" : "asym") : "ggml"; }

size_t WeightFormat::matrixBytes(int64_t rows, int64_t cols) const {
  return group ? group->matrixBytes(rows, cols) : static_cast<size_t>(rows) * ggmlRowBytes(*ggml, cols);
}

std::string WeightFormat::checkColumns(int64_t cols) const {
  if (group || cols % ggmlTraits(*ggml)->blockSize == 0)
    return "";
  return "rows of " + std::to_string(cols) + " values are not whole " + ggmlTraits(*ggml)->ggmlName + " blocks of " +
         std::to_string(ggmlTraits(*ggml)->blockSize);
}

void WeightFormat::dequantize(const uint8_t *data, int64_t rows, int64_t cols, float *out) const {
  if (group) {
    dequantizeReference(*group, data, rows, cols, out);
    return;
  }
  const size_t rowBytes = ggmlRowBytes(*ggml, cols);
  for (int64_t r = 0; r < rows; ++r)
    ggmlDequantizeRow(*ggml, data + r * rowBytes, cols, out + r * cols);
}

std::optional<WeightFormat> parseWeightFormat(std::string_view name) {
  if (std::optional<QuantFormat> format = parseQuantFormat(name))
    return WeightFormat{format, std::nullopt};
  if (const GgmlTraits *traits = ggmlBlockFormat(name))
    return WeightFormat{std::nullopt, traits->type};
  return std::nullopt;
}

} // namespace moe::quant
