//===- HugePages.cpp - Large fresh buffers backed by huge pages -----------===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Support/HugePages.h"

#include <cstdint>
#include <sys/mman.h>

namespace moe {

void adviseHugePages(void *data, size_t bytes) {
#ifdef MADV_HUGEPAGE
  if (!data || bytes < kHugePageAdviceBytes)
    return;
  constexpr uintptr_t page = uintptr_t{2} << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + page - 1) & ~(page - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(page - 1);
  if (end > begin)
    (void)madvise(reinterpret_cast<void *>(begin), end - begin, MADV_HUGEPAGE); // advice: a refusal changes nothing
#else
  (void)data;
  (void)bytes;
#endif
}

} // namespace moe
