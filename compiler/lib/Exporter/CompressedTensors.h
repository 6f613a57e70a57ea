//===- CompressedTensors.h - Quantized matrices as compressed-tensors -*- C++ -*-===//
//
// Part of moec. Internal to the exporters. compressed-tensors'
// "pack-quantized" weights (vLLM, transformers), written from the format's
// public description (compressed-tensors 0.20.1): per Linear module P,
//   P.weight_packed      I32 [O, ceil(I*b/32)]: signed codes q in
//                        [-2^(b-1), 2^(b-1)) stored as q + 2^(b-1), element i
//                        of a row at bits [i*b, (i+1)*b) of the row's
//                        little-endian bit stream (b = 4: word i/8, bits 4*(i%8));
//   P.weight_scale       the scale dtype, [O, I/g] (group) or [O, 1] (channel);
//   P.weight_zero_point  I32 [ceil(O*b/32), I/g], asymmetric only: signed zero
//                        points packed the same way down each column;
//   P.weight_shape       I64 [2] = [O, I];
// and x = (q - zp) * scale.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_EXPORTER_COMPRESSEDTENSORS_H
#define MOE_EXPORTER_COMPRESSEDTENSORS_H

#include "common/WeightFormat.h"
#include "moe/Frontend/DType.h"
#include "moe/Support/Status.h"

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace moe {

/// One config group's weight arguments.
struct CtScheme {
  int bits = 4;
  int64_t group = 0; ///< 0: channel-wise.
  bool symmetric = true;
  bool operator<(const CtScheme &other) const {
    return std::tie(bits, group, symmetric) < std::tie(other.bits, other.group, other.symmetric);
  }
};

struct CtTensor {
  std::string suffix; ///< "weight_packed", ...
  DType dtype;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;
};

/// The compressed-tensors tensors of a [rows, cols] matrix stored in
/// `format` (`codes` its bytes). moec's symmetric group formats whose groups
/// divide the rows convert exactly (the codes are q + 2^(b-1) already);
/// anything else is requantized from the values the codes stand for with
/// compressed-tensors' own min-max rule (groups of the format's size when
/// they divide the rows, else of 32, else per channel) and `remark` says so.
Status toCompressedTensors(const quant::WeightFormat &format, const uint8_t *codes, int64_t rows, int64_t cols,
                           CtScheme &scheme, std::vector<CtTensor> &tensors, std::string &remark);

/// The compressed-tensors tensors of a [rows, cols] matrix of `values`,
/// quantized with compressed-tensors' min-max rule at `bits`, `symmetric`,
/// in groups of `group` (0 or not dividing the rows: per channel).
void ctFromValues(const std::vector<float> &values, int64_t rows, int64_t cols, int bits, bool symmetric, int64_t group,
                  CtScheme &scheme, std::vector<CtTensor> &tensors);

/// Packs signed `values` ([rows, count], in [-2^(b-1), 2^(b-1))) row by row.
std::vector<int32_t> packInt32(const std::vector<int32_t> &values, int64_t rows, int64_t count, int bits);

} // namespace moe

#endif // MOE_EXPORTER_COMPRESSEDTENSORS_H
