//===- WeightFormat.cpp - Any stored weight format of moec ----------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "common/WeightFormat.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace moe::quant {

void nestCodes(const NestedFormat &format, const uint8_t *highCodes, const float *values, int64_t rows, int64_t cols,
               uint8_t *out) {
  const QuantFormat high = format.high, low = format.low(), rest = format.rest();
  const int shift = rest.bits;
  uint8_t *lowOut = out, *restOut = out + low.matrixBytes(rows, cols);
  std::fill(out, out + format.matrixBytes(rows, cols), 0);
  std::vector<float> own;
  if (!values) {
    own.resize(static_cast<size_t>(rows * cols));
    dequantizeReference(high, highCodes, rows, cols, own.data());
    values = own.data();
  }
  const int64_t groups = high.groupsPerRow(cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const uint8_t *source = highCodes + r * high.rowBytes(cols) + g * high.groupBytes();
      uint8_t *lowGroup = lowOut + r * low.rowBytes(cols) + g * low.groupBytes();
      uint8_t *restGroup = restOut + r * rest.rowBytes(cols) + g * rest.groupBytes();
      std::memcpy(restGroup, source, high.headerBytes());
      const int64_t count = std::min<int64_t>(high.group, cols - g * high.group);
      const float *w = values + r * cols + g * high.group;
      // Top codes, the rest's codes, and the least-squares fit of the top
      // codes (as the low format reads them) to the weights.
      double sumT = 0, sumW = 0, sumTT = 0, sumTW = 0;
      for (int64_t i = 0; i < high.group; ++i) { // the padding codes of a short group too
        const int code = unpackCode(source + high.headerBytes(), high.bits, i);
        const int top = code >> shift;
        packCode(lowGroup + low.headerBytes(), low.bits, i, top);
        packCode(restGroup + rest.headerBytes(), rest.bits, i, code & ((1 << shift) - 1));
        if (i >= count)
          continue;
        const double t = top;
        sumT += t;
        sumW += w[i];
        sumTT += t * t;
        sumTW += t * w[i];
      }
      uint16_t highScaleBits;
      std::memcpy(&highScaleBits, source, 2);
      const float highScale = scaleToFloat(highScaleBits, high.scaleType);
      const double n = static_cast<double>(count);
      // value = scale x top + min, fitted; a group of one top code keeps
      // the high step stretched.
      const double variance = sumTT - sumT * sumT / n;
      const double scale = variance > 1e-12 ? (sumTW - sumT * sumW / n) / variance : highScale * (1 << shift);
      const uint16_t scaleBits = floatToScale(static_cast<float>(scale), low.scaleType);
      const double rounded = scaleToFloat(scaleBits, low.scaleType);
      const uint16_t minBits = floatToScale(static_cast<float>((sumW - rounded * sumT) / n), low.scaleType);
      std::memcpy(lowGroup, &scaleBits, 2);
      std::memcpy(lowGroup + 2, &minBits, 2);
    }
}

void unnestCodes(const NestedFormat &format, const uint8_t *nested, int64_t rows, int64_t cols, uint8_t *highCodes) {
  const QuantFormat high = format.high, low = format.low(), rest = format.rest();
  const int shift = rest.bits;
  const uint8_t *lowIn = nested, *restIn = nested + low.matrixBytes(rows, cols);
  std::fill(highCodes, highCodes + high.matrixBytes(rows, cols), 0);
  const int64_t groups = high.groupsPerRow(cols);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t *target = highCodes + r * high.rowBytes(cols) + g * high.groupBytes();
      const uint8_t *lowGroup = lowIn + r * low.rowBytes(cols) + g * low.groupBytes();
      const uint8_t *restGroup = restIn + r * rest.rowBytes(cols) + g * rest.groupBytes();
      std::memcpy(target, restGroup, high.headerBytes());
      for (int64_t i = 0; i < high.group; ++i) {
        const int top = unpackCode(lowGroup + low.headerBytes(), low.bits, i);
        const int bottom = unpackCode(restGroup + rest.headerBytes(), rest.bits, i);
        packCode(target + high.headerBytes(), high.bits, i, (top << shift) | bottom);
      }
    }
}

double nestedSquaredDifference(const NestedFormat &format, const uint8_t *nested, int64_t rows, int64_t cols) {
  std::vector<uint8_t> highCodes(format.high.matrixBytes(rows, cols));
  unnestCodes(format, nested, rows, cols, highCodes.data());
  std::vector<float> high(static_cast<size_t>(rows * cols)), low(high.size());
  dequantizeReference(format.high, highCodes.data(), rows, cols, high.data());
  dequantizeReference(format.low(), nested, rows, cols, low.data());
  double sum = 0;
  for (size_t i = 0; i < high.size(); ++i) {
    const double difference = static_cast<double>(high[i]) - low[i];
    sum += difference * difference;
  }
  return sum;
}

std::string WeightFormat::name() const {
  return group ? group->name() : nested ? nested->name() : ggmlTraits(*ggml)->name;
}

int WeightFormat::bits() const { return group ? group->bits : nested ? nested->high.bits : ggmlTraits(*ggml)->bits; }

int WeightFormat::block() const {
  return group ? group->group : nested ? nested->high.group : ggmlTraits(*ggml)->blockSize;
}

const char *WeightFormat::scheme() const {
  const QuantFormat *f = group ? &*group : nested ? &nested->high : nullptr;
  return f ? (f->symmetric ? "sym" : "asym") : "ggml";
}

size_t WeightFormat::matrixBytes(int64_t rows, int64_t cols) const {
  return group    ? group->matrixBytes(rows, cols)
         : nested ? nested->matrixBytes(rows, cols)
                  : static_cast<size_t>(rows) * ggmlRowBytes(*ggml, cols);
}

std::string WeightFormat::checkColumns(int64_t cols) const {
  if (group || nested || cols % ggmlTraits(*ggml)->blockSize == 0)
    return "";
  return "rows of " + std::to_string(cols) + " values are not whole " + ggmlTraits(*ggml)->ggmlName + " blocks of " +
         std::to_string(ggmlTraits(*ggml)->blockSize);
}

void WeightFormat::dequantize(const uint8_t *data, int64_t rows, int64_t cols, float *out) const {
  if (group) {
    dequantizeReference(*group, data, rows, cols, out);
    return;
  }
  if (nested) {
    std::vector<uint8_t> high(nested->high.matrixBytes(rows, cols));
    unnestCodes(*nested, data, rows, cols, high.data());
    dequantizeReference(nested->high, high.data(), rows, cols, out);
    return;
  }
  const size_t rowBytes = ggmlRowBytes(*ggml, cols);
  for (int64_t r = 0; r < rows; ++r)
    ggmlDequantizeRow(*ggml, data + r * rowBytes, cols, out + r * cols);
}

std::optional<WeightFormat> parseWeightFormat(std::string_view name) {
  if (std::optional<QuantFormat> format = parseQuantFormat(name))
    return WeightFormat{format, std::nullopt, std::nullopt};
  if (const GgmlTraits *traits = ggmlBlockFormat(name))
    return WeightFormat{std::nullopt, traits->type, std::nullopt};
  // "<high>_n<low>": high 4 or 8 bits, low half of them.
  const size_t suffix = name.rfind("_n");
  if (suffix != std::string_view::npos && suffix + 3 == name.size()) {
    std::optional<QuantFormat> high = parseQuantFormat(name.substr(0, suffix));
    const int lowBits = name.back() - '0';
    if (high && (high->bits == 4 || high->bits == 8) && lowBits * 2 == high->bits)
      return WeightFormat{std::nullopt, std::nullopt, NestedFormat{*high, lowBits}};
  }
  return std::nullopt;
}

} // namespace moe::quant
