//===- File.h - Whole-file reads with error messages ------------*- C++ -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_SUPPORT_FILE_H
#define MOE_SUPPORT_FILE_H

#include "moe/Support/Status.h"

#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <sys/stat.h>

namespace moe {

/// The bytes of the file at `path`, or an error naming it.
inline Expected<std::string> readWholeFile(const std::string &path) {
  struct stat info;
  if (::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode))
    return Status::error(path, ": is a directory; expected a file");
  std::ifstream stream(path, std::ios::binary);
  if (!stream)
    return Status::error(path, ": cannot read: ", std::strerror(errno));
  std::stringstream buffer;
  buffer << stream.rdbuf();
  if (stream.bad())
    return Status::error(path, ": read failed: ", std::strerror(errno));
  return buffer.str();
}

} // namespace moe

#endif // MOE_SUPPORT_FILE_H
