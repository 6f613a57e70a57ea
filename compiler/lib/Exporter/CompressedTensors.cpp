//===- CompressedTensors.cpp - Quantized matrices as compressed-tensors ---===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "CompressedTensors.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace moe {

namespace {

template <typename T> std::vector<uint8_t> bytesOf(const std::vector<T> &values) {
  std::vector<uint8_t> bytes(values.size() * sizeof(T));
  std::memcpy(bytes.data(), values.data(), bytes.size());
  return bytes;
}

int64_t wordsFor(int64_t count, int bits) { return (count * bits + 31) / 32; }

} // namespace

std::vector<int32_t> packInt32(const std::vector<int32_t> &values, int64_t rows, int64_t count, int bits) {
  const int64_t words = wordsFor(count, bits);
  std::vector<uint32_t> packed(static_cast<size_t>(rows * words), 0);
  const int32_t offset = 1 << (bits - 1);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < count; ++i) {
      const uint64_t stored = static_cast<uint64_t>(values[r * count + i] + offset) & ((1u << bits) - 1);
      const int64_t bit = i * bits;
      uint32_t *row = packed.data() + r * words;
      row[bit / 32] |= static_cast<uint32_t>(stored << (bit % 32));
      if (bit % 32 + bits > 32) // straddles into the next word
        row[bit / 32 + 1] |= static_cast<uint32_t>(stored >> (32 - bit % 32));
    }
  std::vector<int32_t> out(packed.size());
  std::memcpy(out.data(), packed.data(), packed.size() * 4);
  return out;
}

void ctFromValues(const std::vector<float> &values, int64_t rows, int64_t cols, int bits, bool symmetric, int64_t group,
                  CtScheme &scheme, std::vector<CtTensor> &tensors) {
  tensors.clear();
  std::vector<int32_t> q(static_cast<size_t>(rows * cols));
  const std::vector<int64_t> shapeValues = {rows, cols};
  if (group <= 0 || cols % group != 0)
    group = cols % 32 == 0 ? 32 : cols;
  const int64_t groups = cols / group;
  const int qmin = -(1 << (bits - 1)), qmax = (1 << (bits - 1)) - 1;
  std::vector<uint16_t> scales(static_cast<size_t>(rows * groups));
  std::vector<int32_t> zeros(static_cast<size_t>(rows * groups), 0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const float *x = values.data() + r * cols + g * group;
      float lo = 0.0f, hi = 0.0f; // the range always holds zero
      for (int64_t i = 0; i < group; ++i) {
        lo = std::min(lo, x[i]);
        hi = std::max(hi, x[i]);
      }
      float scale =
          symmetric ? std::max(-lo, hi) / ((qmax - qmin) / 2.0f) : (hi - lo) / static_cast<float>(qmax - qmin);
      // The scale as stored (bf16) is the one the codes are rounded with.
      uint16_t stored = quant::floatToScale(scale, quant::ScaleType::BF16);
      scale = quant::scaleToFloat(stored, quant::ScaleType::BF16);
      if (scale == 0.0f) {
        stored = quant::floatToScale(1e-8f, quant::ScaleType::BF16);
        scale = quant::scaleToFloat(stored, quant::ScaleType::BF16);
      }
      scales[r * groups + g] = stored;
      int32_t zp = 0;
      if (!symmetric)
        zp = std::clamp(static_cast<int32_t>(std::nearbyint(static_cast<float>(qmin) - lo / scale)), qmin, qmax);
      zeros[r * groups + g] = zp;
      for (int64_t i = 0; i < group; ++i)
        q[r * cols + g * group + i] = std::clamp(static_cast<int32_t>(std::nearbyint(x[i] / scale)) + zp, qmin, qmax);
    }
  scheme = CtScheme{bits, group == cols ? 0 : group, symmetric};
  tensors.push_back(
      {"weight_packed", DType::I32, {rows, wordsFor(cols, bits)}, bytesOf(packInt32(q, rows, cols, bits))});
  tensors.push_back({"weight_scale", DType::BF16, {rows, groups}, bytesOf(scales)});
  if (!symmetric) {
    // Zero points are packed down each column: transpose, pack, transpose.
    std::vector<int32_t> byColumn(zeros.size());
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < groups; ++g)
        byColumn[g * rows + r] = zeros[r * groups + g];
    const std::vector<int32_t> packedColumns = packInt32(byColumn, groups, rows, bits);
    const int64_t words = wordsFor(rows, bits);
    std::vector<int32_t> packed(static_cast<size_t>(words * groups));
    for (int64_t g = 0; g < groups; ++g)
      for (int64_t w = 0; w < words; ++w)
        packed[w * groups + g] = packedColumns[g * words + w];
    tensors.push_back({"weight_zero_point", DType::I32, {words, groups}, bytesOf(packed)});
  }
  tensors.push_back({"weight_shape", DType::I64, {2}, bytesOf(shapeValues)});
}

Status toCompressedTensors(const quant::WeightFormat &format, const uint8_t *codes, int64_t rows, int64_t cols,
                           CtScheme &scheme, std::vector<CtTensor> &tensors, std::string &remark) {
  if (format.nested) {
    // Nested codes are the high format's codes, put back together.
    std::vector<uint8_t> high(format.nested->high.matrixBytes(rows, cols));
    quant::unnestCodes(*format.nested, codes, rows, cols, high.data());
    return toCompressedTensors(quant::WeightFormat{format.nested->high, std::nullopt, std::nullopt}, high.data(), rows,
                               cols, scheme, tensors, remark);
  }
  tensors.clear();
  remark.clear();
  const int bits = std::clamp(format.bits(), 2, 8);
  std::vector<int32_t> q(static_cast<size_t>(rows * cols));
  const std::vector<int64_t> shapeValues = {rows, cols};
  if (format.group && format.group->symmetric && cols % format.group->group == 0) {
    // Exact: a symmetric moec code c stands for (c - 2^(b-1)) * scale.
    const quant::QuantFormat &f = *format.group;
    const int64_t groups = cols / f.group;
    std::vector<uint16_t> scales(static_cast<size_t>(rows * groups));
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const uint8_t *group = codes + r * f.rowBytes(cols) + g * f.groupBytes();
        std::memcpy(&scales[r * groups + g], group, 2);
        for (int64_t i = 0; i < f.group; ++i)
          q[r * cols + g * f.group + i] = quant::unpackCode(group + f.headerBytes(), f.bits, i) - f.zeroPoint();
      }
    scheme = CtScheme{f.bits, f.group, true};
    tensors.push_back(
        {"weight_packed", DType::I32, {rows, wordsFor(cols, f.bits)}, bytesOf(packInt32(q, rows, cols, f.bits))});
    tensors.push_back({"weight_scale",
                       f.scaleType == quant::ScaleType::BF16 ? DType::BF16 : DType::F16,
                       {rows, groups},
                       bytesOf(scales)});
    tensors.push_back({"weight_shape", DType::I64, {2}, bytesOf(shapeValues)});
    return Status::success();
  }
  // Requantized with compressed-tensors' min-max rule from the values.
  std::vector<float> values(static_cast<size_t>(rows * cols));
  format.dequantize(codes, rows, cols, values.data());
  const bool symmetric = format.group ? format.group->symmetric : true;
  ctFromValues(values, rows, cols, bits, symmetric, format.block(), scheme, tensors);
  const int64_t group = scheme.group == 0 ? cols : scheme.group;
  remark =
      concat(format.name(), " requantized to compressed-tensors int", bits, symmetric ? " symmetric" : " asymmetric",
             group == cols ? " per channel" : concat(" in groups of ", group),
             " (its codes have no exact compressed-tensors form)");
  return Status::success();
}

} // namespace moe
