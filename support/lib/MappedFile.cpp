//===- MappedFile.cpp - A whole file mapped read-only ---------------------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Support/MappedFile.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace moe {

Expected<std::unique_ptr<MappedFile>> MappedFile::open(const std::string &path) {
  const int descriptor = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (descriptor < 0)
    return Status::error(path, ": cannot open: ", std::strerror(errno));
  struct stat info;
  if (::fstat(descriptor, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(descriptor);
    return Status::error(path, ": not a regular file");
  }
  std::unique_ptr<MappedFile> file(new MappedFile());
  file->filePath = path;
  file->length = static_cast<uint64_t>(info.st_size);
  if (file->length > 0) {
    void *mapped = ::mmap(nullptr, file->length, PROT_READ, MAP_PRIVATE, descriptor, 0);
    if (mapped == MAP_FAILED) {
      const int error = errno;
      ::close(descriptor);
      return Status::error(path, ": cannot map: ", std::strerror(error));
    }
    file->bytes = static_cast<const uint8_t *>(mapped);
  }
  ::close(descriptor);
  return file;
}

MappedFile::~MappedFile() {
  if (bytes)
    ::munmap(const_cast<uint8_t *>(bytes), length);
}

void MappedFile::releasePages(const uint8_t *begin, uint64_t count) const {
  static const uintptr_t pageSize = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  uintptr_t first = reinterpret_cast<uintptr_t>(begin);
  uintptr_t last = first + count;
  first = (first + pageSize - 1) / pageSize * pageSize;
  last = last / pageSize * pageSize;
  if (last > first)
    ::madvise(reinterpret_cast<void *>(first), last - first, MADV_DONTNEED);
}

} // namespace moe
