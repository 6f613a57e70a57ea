//===- ByteSize.h - Sizes as users write them -------------------*- C++ -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_SUPPORT_BYTESIZE_H
#define MOE_SUPPORT_BYTESIZE_H

#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>

namespace moe {

/// "1290240", "512K", "1.5M", "12G", "1T" (powers of 1024; "KiB", "MiB",
/// "GiB" and a bare "B" too) as a positive number of bytes; nullopt otherwise.
inline std::optional<double> parseByteSize(const std::string &text) {
  char *end = nullptr;
  const double value = std::strtod(text.c_str(), &end);
  if (text.empty() || end == text.c_str() || !(value > 0) || value > 1e30)
    return std::nullopt;
  const std::string suffix(end);
  const std::pair<const char *, double> units[] = {{"", 1.0},
                                                   {"B", 1.0},
                                                   {"K", 1024.0},
                                                   {"KiB", 1024.0},
                                                   {"M", 1024.0 * 1024},
                                                   {"MiB", 1024.0 * 1024},
                                                   {"G", 1024.0 * 1024 * 1024},
                                                   {"GiB", 1024.0 * 1024 * 1024},
                                                   {"T", 1024.0 * 1024 * 1024 * 1024}};
  for (const auto &[name, scale] : units)
    if (suffix == name)
      return value * scale;
  return std::nullopt;
}

/// 2.91 MiB, 16.00 GiB, 512 B: sizes for people.
inline std::string formatBytes(double bytes) {
  char buffer[32];
  if (bytes >= 1024.0 * 1024 * 1024)
    std::snprintf(buffer, sizeof(buffer), "%.2f GiB", bytes / (1024.0 * 1024 * 1024));
  else if (bytes >= 1024.0 * 1024)
    std::snprintf(buffer, sizeof(buffer), "%.2f MiB", bytes / (1024.0 * 1024));
  else if (bytes >= 1024.0)
    std::snprintf(buffer, sizeof(buffer), "%.2f KiB", bytes / 1024.0);
  else
    std::snprintf(buffer, sizeof(buffer), "%.0f B", bytes);
  return buffer;
}

} // namespace moe

#endif // MOE_SUPPORT_BYTESIZE_H
