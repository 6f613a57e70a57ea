//===- AtomicFile.cpp - Outputs that appear whole or not at all -----------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Support/AtomicFile.h"
#include "moe/Support/Signals.h"

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <filesystem>
#include <sys/stat.h>
#include <unistd.h>

namespace moe {

namespace {

std::string temporaryTemplate(const std::string &path) { return path + ".tmp.XXXXXX"; }

} // namespace

Expected<std::unique_ptr<AtomicFile>> AtomicFile::create(const std::string &path) {
  struct stat info;
  if (::stat(path.c_str(), &info) == 0 && S_ISDIR(info.st_mode))
    return Status::error(path, ": is a directory; expected a file name to write");
  std::unique_ptr<AtomicFile> file(new AtomicFile());
  file->finalPath = path;
  file->temporaryPath = temporaryTemplate(path);
  file->descriptor = ::mkostemp(file->temporaryPath.data(), O_CLOEXEC);
  if (file->descriptor < 0)
    return Status::error(path, ": cannot create a temporary file beside it: ", std::strerror(errno));
  registerTemporaryPath(file->temporaryPath);
  // mkstemp makes the file private; an output is as readable as any other file.
  const mode_t mask = ::umask(0);
  ::umask(mask);
  (void)::fchmod(file->descriptor, 0666 & ~mask);
  return file;
}

AtomicFile::~AtomicFile() {
  if (descriptor >= 0)
    ::close(descriptor);
  if (!committed) {
    ::unlink(temporaryPath.c_str());
    unregisterTemporaryPath(temporaryPath);
  }
}

Status AtomicFile::writeAt(std::span<const uint8_t> bytes, uint64_t offset) {
  const uint8_t *data = bytes.data();
  size_t size = bytes.size();
  uint64_t at = offset;
  while (size > 0) {
    ssize_t written = ::pwrite(descriptor, data, size, static_cast<off_t>(at));
    if (written < 0 && errno == EINTR)
      continue;
    if (written <= 0)
      return Status::error(finalPath, ": write failed: ", std::strerror(errno));
    data += written;
    size -= static_cast<size_t>(written);
    at += static_cast<uint64_t>(written);
  }
  end = std::max(end, at);
  return Status::success();
}

Status AtomicFile::write(std::span<const uint8_t> bytes) { return writeAt(bytes, end); }

Status AtomicFile::resize(uint64_t bytes) {
  if (::ftruncate(descriptor, static_cast<off_t>(bytes)) != 0)
    return Status::error(finalPath, ": cannot size the output: ", std::strerror(errno));
  end = bytes;
  return Status::success();
}

Status AtomicFile::commit() {
  if (::fsync(descriptor) != 0)
    return Status::error(finalPath, ": fsync failed: ", std::strerror(errno));
  const int closed = ::close(descriptor);
  descriptor = -1;
  if (closed != 0)
    return Status::error(finalPath, ": cannot finish writing: ", std::strerror(errno));
  if (::rename(temporaryPath.c_str(), finalPath.c_str()) != 0)
    return Status::error(finalPath, ": cannot rename the finished file into place: ", std::strerror(errno));
  committed = true;
  unregisterTemporaryPath(temporaryPath);
  return Status::success();
}

Status writeChunksAtomically(const std::string &path, const std::vector<std::span<const uint8_t>> &chunks) {
  Expected<std::unique_ptr<AtomicFile>> file = AtomicFile::create(path);
  if (!file)
    return file.status();
  for (std::span<const uint8_t> chunk : chunks)
    MOE_RETURN_IF_ERROR((*file)->write(chunk));
  return (*file)->commit();
}

Status writeFileAtomically(const std::string &path, std::span<const uint8_t> bytes) {
  return writeChunksAtomically(path, {bytes});
}

Status writeTextAtomically(const std::string &path, std::string_view text) {
  return writeFileAtomically(path,
                             std::span<const uint8_t>(reinterpret_cast<const uint8_t *>(text.data()), text.size()));
}

Expected<std::unique_ptr<AtomicDirectory>> AtomicDirectory::create(const std::string &path) {
  struct stat info;
  if (::stat(path.c_str(), &info) == 0 && !S_ISDIR(info.st_mode))
    return Status::error(path, ": exists and is not a directory");
  std::string trimmed = path;
  while (trimmed.size() > 1 && trimmed.back() == '/')
    trimmed.pop_back();
  std::unique_ptr<AtomicDirectory> directory(new AtomicDirectory());
  directory->finalPath = trimmed;
  directory->temporaryPath = temporaryTemplate(trimmed);
  if (!::mkdtemp(directory->temporaryPath.data()))
    return Status::error(path, ": cannot create a temporary directory beside it: ", std::strerror(errno));
  registerTemporaryPath(directory->temporaryPath);
  const mode_t mask = ::umask(0);
  ::umask(mask);
  (void)::chmod(directory->temporaryPath.c_str(), 0777 & ~mask);
  return directory;
}

AtomicDirectory::~AtomicDirectory() {
  if (!committed) {
    std::error_code ignored;
    std::filesystem::remove_all(temporaryPath, ignored);
    unregisterTemporaryPath(temporaryPath);
  }
}

Status AtomicDirectory::commit() {
  if (::rename(temporaryPath.c_str(), finalPath.c_str()) == 0) {
    committed = true;
    unregisterTemporaryPath(temporaryPath);
    return Status::success();
  }
  if (errno != ENOTEMPTY && errno != EEXIST)
    return Status::error(finalPath, ": cannot rename the finished directory into place: ", std::strerror(errno));
  // An earlier output is there: swap the two in one step, then remove the
  // old one (now under the temporary name).
  if (::renameat2(AT_FDCWD, temporaryPath.c_str(), AT_FDCWD, finalPath.c_str(), RENAME_EXCHANGE) != 0)
    return Status::error(finalPath, ": cannot replace the existing directory: ", std::strerror(errno));
  committed = true;
  std::error_code ignored;
  std::filesystem::remove_all(temporaryPath, ignored);
  unregisterTemporaryPath(temporaryPath);
  return Status::success();
}

} // namespace moe
