//===- RowTiles.cpp - A group-format matrix as tiles of 16 rows -----------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "common/RowTiles.h"

#include <cstring>

namespace moe::quant {

RowTileLayout rowTileLayout(const QuantFormat &format, int64_t rows, int64_t cols) {
  RowTileLayout layout;
  layout.tiles = (rows + kTileRows - 1) / kTileRows;
  layout.groups = format.groupsPerRow(cols);
  layout.chunksPerLine = tileChunksPerLine(format.bits);
  // A row's words per group: its code bytes / 4 (stored), or codes / 4.
  layout.linesPerGroup = format.group / 4 / layout.chunksPerLine;
  layout.headerBytes = format.symmetric ? 32 : 64;
  layout.groupStride = layout.headerBytes + 64 * static_cast<size_t>(layout.linesPerGroup);
  layout.tileBytes = static_cast<size_t>(layout.groups) * layout.groupStride;
  layout.totalBytes = static_cast<size_t>(layout.tiles) * layout.tileBytes;
  return layout;
}

void packRowTilesReference(const QuantFormat &format, bool signedCodes, const uint8_t *packed, int64_t rows,
                           int64_t cols, uint8_t *out) {
  const RowTileLayout layout = rowTileLayout(format, rows, cols);
  std::memset(out, 0, layout.totalBytes);
  const size_t rowBytes = format.rowBytes(cols), groupBytes = format.groupBytes();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t tile = r / kTileRows, i = r % kTileRows;
    for (int64_t g = 0; g < layout.groups; ++g) {
      const uint8_t *group = packed + static_cast<size_t>(r) * rowBytes + static_cast<size_t>(g) * groupBytes;
      uint8_t *target =
          out + static_cast<size_t>(tile) * layout.tileBytes + static_cast<size_t>(g) * layout.groupStride;
      std::memcpy(target + 2 * i, group, 2);
      if (!format.symmetric)
        std::memcpy(target + 32 + 2 * i, group + 2, 2);
      const uint8_t *codes = group + format.headerBytes();
      uint8_t *lines = target + layout.headerBytes;
      for (int k = 0; k < layout.linesPerGroup; ++k) {
        uint8_t *word = lines + 64 * k + 4 * i;
        if (format.bits != 3) { // the stored word
          std::memcpy(word, codes + 4 * k, 4);
          if (signedCodes)
            for (int b = 0; b < 4; ++b)
              word[b] ^= 0x80;
        } else {
          for (int b = 0; b < 4; ++b)
            word[b] = static_cast<uint8_t>(unpackCode(codes, format.bits, 4 * k + b));
        }
      }
    }
  }
}

} // namespace moe::quant
